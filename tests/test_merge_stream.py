"""checkpoint.merge streams the base: exact results, path prefixes, and interrupted merges."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import checkpoint
from processes import run_workers

CONFIG = lj.LoraConfig(rules=(lj.Rule(r"(.*/)?(q|up)/kernel", rank=2, alpha=4.0),))


def make_params():
    k = iter(jax.random.split(jax.random.key(0), 8))
    return {
        "q": {"kernel": jax.random.normal(next(k), (16, 8)), "bias": jnp.zeros(8)},
        "up": {"kernel": jax.random.normal(next(k), (8, 32)).astype(jnp.bfloat16)},
        "norm": {"scale": jnp.ones(32)},
        "head": {"kernel": jax.random.normal(next(k), (32, 4))},
    }


def nonzero(lora):
    """The adapter with nonzero B factors (a fresh split merges to the base exactly)."""
    return jax.tree.map(lambda w: w if w is None else w.replace(b=jnp.full(w.b.shape, 0.3, w.b.dtype)),
                        lora, is_leaf=lambda x: x is None or isinstance(x, lj.LoraWeight))


def write(tmp_path, base_tree, adapter_tree):
    """A base checkpoint of ``base_tree`` and an adapter split from ``adapter_tree``."""
    _, lora = lj.split(jax.random.key(1), adapter_tree, CONFIG)
    checkpoint.save_params(tmp_path / "base", base_tree)
    checkpoint.save(tmp_path / "adapter", nonzero(lora), CONFIG)
    return tmp_path / "base", tmp_path / "adapter"


def plain_restore(path):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def digest(path):
    """One hash of every file's relative name and bytes under ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_streamed_merge_restores_with_plain_orbax_and_equals_lj_merge(tmp_path):
    base, adapter = write(tmp_path, make_params(), make_params())
    assert checkpoint.merge(base, adapter, tmp_path / "out") == ["q/kernel", "up/kernel"]
    want = lj.merge(checkpoint.restore_params(base), checkpoint.restore(adapter))
    got = plain_restore(tmp_path / "out")
    chex.assert_trees_all_equal(got, want)
    assert got["up"]["kernel"].dtype == jnp.bfloat16
    chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / "out"), want)
    assert "commit_success.txt" in os.listdir(tmp_path / "out")
    checkpoint.merge(base, adapter, tmp_path / "whole", stream=False)
    chex.assert_trees_all_equal(plain_restore(tmp_path / "whole"), got)
    # sharded: each leaf read and written in its shards, outputs keeping the shardings
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    checkpoint.merge(base, adapter, tmp_path / "sharded", shardings=NamedSharding(mesh, P("x")))
    chex.assert_trees_all_equal(plain_restore(tmp_path / "sharded"), want)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "out", "sharded", "whole"]  # nothing left over


def test_a_base_with_lists_merges_whole(tmp_path):
    params = {"layers": [{"q": make_params()["q"]}, {"q": make_params()["q"]}]}
    base, adapter = write(tmp_path, params, params)
    checkpoint.merge(base, adapter, tmp_path / "out")
    want = lj.merge(checkpoint.restore_params(base), checkpoint.restore(adapter))
    chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / "out"), want)


@pytest.mark.parametrize("side", ["base", "adapter"])
def test_a_prefix_on_one_side_only_is_mapped(tmp_path, side):
    params = make_params()
    wrapped = {"params": params}
    base, adapter = write(tmp_path, *((wrapped, params) if side == "base" else (params, wrapped)))
    merged = checkpoint.merge(base, adapter, tmp_path / "out")
    assert merged == (["params/q/kernel", "params/up/kernel"] if side == "base" else ["q/kernel", "up/kernel"])
    lora = checkpoint.restore(adapter)
    inner = lambda t: t["params"] if "params" in t else t
    want = lj.merge(inner(checkpoint.restore_params(base)), inner(lora))
    chex.assert_trees_all_equal(inner(plain_restore(tmp_path / "out")), want)


def test_paths_that_no_prefix_maps_are_an_error_naming_the_mappings(tmp_path):
    params = make_params()
    base, adapter = write(tmp_path, {"encoder": params}, {"params": params})
    with pytest.raises(ValueError, match=r"targets that are not in the base checkpoint .*\['params/q/kernel', "
                                         r"'params/up/kernel'\].*Tried the paths as they are and adding a prefix \(none to try: "
                                         r"no base path ends with '/params/q/kernel'\) or removing one of the "
                                         r"prefixes \['params/', 'params/q/'\] to every adapter path; none fits"):
        checkpoint.merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failing_write_leaves_no_output_and_the_inputs_unchanged(tmp_path, monkeypatch):
    from orbax.checkpoint.experimental.v1 import partial

    base, adapter = write(tmp_path, make_params(), make_params())
    before = digest(base), digest(adapter)
    calls, save = [], partial.save

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(partial, "save", failing)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.merge(base, adapter, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]  # the staged groups are removed
    assert (digest(base), digest(adapter)) == before


KILLED = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint.experimental.v1 import partial
    from lora_jax import checkpoint
    save, calls = partial.save, []
    def killed(*args, **kwargs):  # the second group: the first one is written
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(*args, **kwargs)
    partial.save = killed
    checkpoint.merge(*sys.argv[1:])
""")


def test_a_merge_killed_while_writing_leaves_nothing_that_restores(tmp_path):
    base, adapter = write(tmp_path, make_params(), make_params())
    before = digest(base), digest(adapter)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(base), str(adapter), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    left = [n for n in os.listdir(tmp_path) if n not in ("base", "adapter")]
    assert len(left) == 1 and left[0].startswith("out.orbax-checkpoint-tmp")
    with pytest.raises(FileNotFoundError, match=r"does not exist; an interrupted save left .*out\.orbax-checkpoint-tmp"):
        checkpoint.restore_params(tmp_path / "out")
    with pytest.raises(ValueError, match="unfinished orbax checkpoint"):
        checkpoint.restore_params(tmp_path / left[0])
    assert (digest(base), digest(adapter)) == before
    checkpoint.merge(base, adapter, tmp_path / "out")  # a new merge beside the leftover works
    chex.assert_trees_all_equal(plain_restore(tmp_path / "out"),
                                lj.merge(checkpoint.restore_params(base), checkpoint.restore(adapter)))


@pytest.mark.slow
def test_two_processes_merge_their_own_shards(tmp_path):
    worker = Path(__file__).resolve().parent / "merge_multihost_worker.py"
    logs = run_workers(worker, [tmp_path], [worker.parents[1]], timeout=240)
    # each process wrote its own shards
    assert any(line.startswith("0 merged") and "ocdbt.process_1" in line for line in logs[0].splitlines())
