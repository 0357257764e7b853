"""Multi-host: 2 processes x 4 CPU devices under jax.distributed train like 1 process x 8."""

from pathlib import Path

import numpy as np
import pytest

import multihost_worker
from processes import run_workers

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, capsys):
    out = tmp_path / "two_processes.npz"
    # the worker imports this checkout's lora_jax and examples/sharded_train.py
    logs = run_workers(WORKER, [out], [WORKER.parents[1], WORKER.parents[1] / "examples"])
    assert "2 process(es), 8 cpu devices" in logs[0]
    assert "2 process(es)" not in logs[1]  # only process 0 prints
    two = dict(np.load(out))

    # the same example, one process with 8 local devices
    one = multihost_worker.results(multihost_worker.sharded_train.main(multihost_worker.ARGV)["2d"])
    printed = capsys.readouterr().out
    assert "1 process(es), 8 cpu devices" in printed
    assert "block0/q/kernel: base P('data', 'model', None) -> A P(None, 'data'), B P(None, 'model', None)" in printed

    assert sorted(two) == sorted(one) and len(one) == 2 + 2 * 7  # losses, merged loss, 7 adapters
    assert one["losses"][-1] < one["losses"][0]
    assert one["lora/params/block0/q/kernel/b"].any()  # B moved away from its zero init
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
