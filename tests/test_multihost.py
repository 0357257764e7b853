"""Multi-host: 2 processes x 4 CPU devices under jax.distributed train like 1 process x 8."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import multihost_worker

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, capsys):
    out = tmp_path / "two_processes.npz"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # the worker imports this checkout's lora_jax and examples/sharded_train.py
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parents[1]), str(WORKER.parents[1] / "examples")])
    procs = [
        subprocess.Popen([sys.executable, "-W", "error", str(WORKER), str(i), str(port), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
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
