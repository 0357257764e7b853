"""Checkpoints: adapters round-trip bit-exactly with their metadata, merged checkpoints load
with plain orbax, interrupted saves never restore, training resumes from the latest step."""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_worker as worker
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.core import FrozenDict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import np_delta, randomize

import lora_jax as lj
from lora_jax import checkpoint, metadata
from lora_jax.app import cli

HERE = Path(__file__).resolve().parent
STATIC = [f.name for f in dataclasses.fields(lj.LoraWeight) if f.metadata.get("static")]


def targets(lora):
    return [(p, w) for p, w in lj.targets(lora)]


def assert_same_adapter(got, want):
    """Same containers, same static fields, bit-identical factors of the same dtypes."""
    # the full treedef includes every LoraWeight's static aux data and every container type
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [p for p, _ in targets(got)] == [p for p, _ in targets(want)]
    for (path, g), (_, w) in zip(targets(got), targets(want)):
        for name in STATIC:
            assert getattr(g, name) == getattr(w, name), (path, name)
            assert type(getattr(g, name)) is type(getattr(w, name)), (path, name)
        for name in ("a", "b"):
            x, y = getattr(g, name), getattr(w, name)
            assert x.dtype == y.dtype, (path, name)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def plain_save(path, tree):
    """A plain orbax checkpoint, as users write one (StandardCheckpointer saves in the background)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)


def disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 8), name="q")(x)  # kernel (16, 2, 8): two output axes
        h = nn.gelu(q.reshape(*x.shape[:-1], 16))
        h = nn.Dense(32, name="up", param_dtype=jnp.bfloat16)(h)  # bf16 weight, fp32 compute
        return nn.Dense(4, name="head")(nn.gelu(h))


@functools.cache
def linen_setup(scaling="lora"):
    """(model, x, variables, config, base, lora with random factors); cached, arrays are immutable."""
    model = Block()
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = model.init(jax.random.key(1), x)
    cfg = lj.LoraConfig(
        rules=(lj.Rule(r"params/q/kernel", rank=3, alpha=6.0, dropout=0.1),
               lj.Rule(r"params/up/kernel", rank=2, alpha=5.0),
               lj.Rule(r"params/head/kernel", rank=1, alpha=0.5, axes=((0,), (1,)))),
        scaling=scaling,
    )
    base, lora = lj.split(jax.random.key(2), variables, cfg, apply_fn=model.apply, args=(x,))
    return model, x, variables, cfg, base, randomize(lora, seed=3)


# ---------------------------------------------------------------------------------------
# save / restore


@pytest.mark.parametrize("scaling", ["lora", "rslora", "custom"])
def test_round_trip_is_bit_exact_with_all_metadata(tmp_path, scaling):
    custom = lambda alpha, r: alpha / r**0.25  # noqa: E731
    _, _, _, cfg, _, lora = linen_setup(custom if scaling == "custom" else scaling)
    checkpoint.save(tmp_path / "a", lora, cfg)
    back = checkpoint.restore(tmp_path / "a")
    assert_same_adapter(back, lora)
    assert back["params"]["q"]["bias"] is None
    assert back["params"]["up"]["kernel"].b.dtype == jnp.float32  # bf16 base: fp32 adapter

    # the metadata file says what an independent reader needs, without arrays
    meta = json.loads((tmp_path / "a" / "lora_jax" / "metadata").read_text())
    assert meta["library_version"] == lj.__version__
    t = {e["path"]: e for e in meta["targets"]}
    q = t["params/q/kernel"]
    assert q["weight"]["in_axes"] == [0] and q["weight"]["out_axes"] == [1, 2]
    assert q["weight"]["dropout"] == 0.1 and q["a"]["shape"] == [3, 16] and q["b"]["shape"] == [3, 2, 8]
    expected = {"lora": 6.0 / 3, "rslora": 6.0 / math.sqrt(3), "custom": 6.0 / 3**0.25}[scaling]
    assert q["weight"]["scale"] == pytest.approx(expected, rel=1e-15)
    assert q["scale_fixed"] is (scaling == "custom")
    assert t["params/up/kernel"]["weight"]["dtype"] == "bfloat16"
    assert meta["config"]["rules"][2]["axes"] == [[0], [1], []]
    if scaling == "custom":
        assert meta["config"]["scaling"] == {"custom": custom.__qualname__}
        assert back["params"]["q"]["kernel"].scaling.startswith("custom:")
    else:
        assert meta["config"]["scaling"] == scaling
    assert checkpoint.metadata(tmp_path / "a") == meta


def test_round_trip_keeps_containers(tmp_path):
    """FrozenDict, lists, tuples and an NNX State (with its Param variables) come back as such."""
    w = lambda k, *s: jax.random.normal(jax.random.key(k), s)  # noqa: E731
    params = FrozenDict({"layers": [{"kernel": w(0, 6, 5)}, {"kernel": w(1, 5, 4)}], "pair": (w(2, 4, 4), w(3, 4))})
    cfg = lj.LoraConfig(rules=(lj.Rule(r"layers/\d/kernel", rank=2), lj.Rule("pair/0", rank=1)))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    lora = randomize(lora, 1)
    checkpoint.save(tmp_path / "frozen", lora)
    back = checkpoint.restore(tmp_path / "frozen")
    assert type(back) is FrozenDict and type(back["layers"]) is list and type(back["pair"]) is tuple
    assert_same_adapter(back, lora)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 6, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(2)])

        def __call__(self, x):
            x = self.lin(x)
            for layer in self.layers:
                x = layer(x)
            return x

    cfg = lj.LoraConfig(rules=(lj.Rule(r".*kernel", rank=2),))
    _, _, lora = lj.nnx.split(Net(nnx.Rngs(0)), cfg, jax.random.key(1))
    lora = jax.tree.map(lambda w: w.replace(b=jnp.full(w.b.shape, 0.5)) if lj.is_lora(w) else w,
                        lora, is_leaf=lj.is_lora)
    checkpoint.save(tmp_path / "nnx", lora)
    back = checkpoint.restore(tmp_path / "nnx")
    assert type(back) is nnx.State and type(back["lin"]["kernel"]) is nnx.Param
    assert_same_adapter(back, lora)


def test_nnx_partitioned_variables_round_trip(tmp_path, monkeypatch):
    """Variables annotated with nnx.with_partitioning (out_sharding metadata) save and restore
    with their metadata, inside and outside the mesh they were made on."""
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with jax.set_mesh(mesh):
        model = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
    cfg = lj.LoraConfig(rules=(lj.Rule(".*kernel", rank=2),))
    _, _, lora = lj.nnx.split(model, cfg, jax.random.key(1))
    lora = jax.tree.map(lambda w: w.replace(b=jnp.full(w.b.shape, 0.5)) if lj.is_lora(w) else w,
                        lora, is_leaf=lj.is_lora)
    assert lora["kernel"].get_metadata()["out_sharding"] == ("data", "model")
    checkpoint.save(tmp_path / "outside", lora)
    with jax.set_mesh(mesh):
        checkpoint.save(tmp_path / "inside", lora)
        assert_same_adapter(checkpoint.restore(tmp_path / "inside"), lora)
    for name in ("outside", "inside"):
        assert checkpoint.metadata(tmp_path / name)["structure"] is not None
        back = checkpoint.restore(tmp_path / name)
        assert type(back) is nnx.State and type(back["kernel"]) is nnx.Param
        assert back["kernel"].get_metadata() == lora["kernel"].get_metadata()
        assert back["bias"].get_metadata() == lora["bias"].get_metadata()
        assert_same_adapter(back, lora)

    # any failure to rebuild the containers at save time only means restore needs like=
    def fail(*args):
        raise RuntimeError("cannot rebuild")

    monkeypatch.setattr(metadata, "_variable", fail)
    checkpoint.save(tmp_path / "fallback", lora)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"cannot be rebuilt .*RuntimeError: cannot rebuild.*pass like="):
        checkpoint.restore(tmp_path / "fallback")
    assert_same_adapter(checkpoint.restore(tmp_path / "fallback", like=lora), lora)


def test_unknown_container_needs_like(tmp_path):
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        inner: dict

    params = Box(inner={"w": jnp.ones((4, 4))})
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("inner/w", rank=2),)))
    lora = randomize(lora)
    checkpoint.save(tmp_path / "box", lora)
    with pytest.raises(ValueError, match=r"cannot be rebuilt from metadata \(container .*Box\); pass like="):
        checkpoint.restore(tmp_path / "box")
    assert_same_adapter(checkpoint.restore(tmp_path / "box", like=lora), lora)


def test_restore_into_other_shardings(tmp_path):
    devices = np.array(jax.devices())  # 8 simulated CPU devices (root conftest.py)
    params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((32, 48))}}
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=4),))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    lora = randomize(lora, 5)
    # saved sharded over every device along the factors' last (in/out) axis
    mesh8 = jax.sharding.Mesh(devices, ("x",))
    s8 = NamedSharding(mesh8, P(None, "x"))
    lora = jax.tree.map(lambda x: jax.device_put(x, s8), lora)
    checkpoint.save(tmp_path / "s", lora)
    # restored onto a 2 x n/2 mesh: rank axis over "r", last axis over "c"; then replicated
    mesh = jax.sharding.Mesh(devices.reshape(2, -1), ("r", "c"))
    for spec in (P("r", "c"), P()):
        want = NamedSharding(mesh, spec)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=want), lora)
        back = checkpoint.restore(tmp_path / "s", like)
        assert_same_adapter(back, lora)
        for _, w in targets(back):
            assert w.a.sharding == want and w.b.sharding == want
    # an abstract like straight from jax.eval_shape of the same split
    like = jax.eval_shape(lambda: lj.split(jax.random.key(0), params, cfg)[1])
    assert_same_adapter(checkpoint.restore(tmp_path / "s", like), lora)


def test_like_that_does_not_fit_names_path_and_shapes(tmp_path):
    params = {"w": jnp.ones((16, 8)), "v": jnp.ones((8, 8))}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w|v", rank=4),)))
    checkpoint.save(tmp_path / "c", lora)
    _, other = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2), lj.Rule("v", rank=4))))
    with pytest.raises(ValueError, match=r"w: factor a is \(4, 16\) in the checkpoint but \(2, 16\) in like"):
        checkpoint.restore(tmp_path / "c", other)
    _, fewer = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=4),)))
    with pytest.raises(ValueError, match=r"in the checkpoint but not in like: \['v'\]"):
        checkpoint.restore(tmp_path / "c", fewer)


def test_save_rejects_bad_input(tmp_path):
    _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    checkpoint.save(tmp_path / "x", lora)
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(tmp_path / "x", lora)
    with pytest.raises(TypeError, match=r"found other leaves at w \(ArrayImpl\)"):
        checkpoint.save(tmp_path / "y", {"w": jnp.ones((4, 4))})
    with pytest.raises(TypeError, match="w: factor a is ShapeDtypeStruct"):
        checkpoint.save(tmp_path / "y", jax.eval_shape(lambda: lora))
    with pytest.raises(ValueError, match="no lj.LoraWeight"):
        checkpoint.save(tmp_path / "y", {"w": None})
    assert not (tmp_path / "y").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "nothing")
    plain_save(tmp_path / "plain", {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="is not a lora_jax adapter checkpoint"):
        checkpoint.restore(tmp_path / "plain")


@pytest.mark.parametrize("n_targets,dim,rank", [(4, 64, 4), (24, 1024, 8)])
def test_size_on_disk_is_the_adapters_bytes(tmp_path, n_targets, dim, rank):
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((dim, dim), jnp.float32)} for i in range(n_targets)}
    _, abstract = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=rank),)))
    rng = np.random.default_rng(0)  # incompressible values: the bound must hold without compression
    lora = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), abstract)
    raw = sum(x.nbytes for x in jax.tree.leaves(lora))
    checkpoint.save(tmp_path / "c", lora, lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=rank),)))
    size = disk_bytes(tmp_path / "c")
    print(f"{n_targets} targets, raw {raw} B, on disk {size} B ({size / raw:.3f}x)")
    assert size <= 1.05 * raw + 64 * 1024


# ---------------------------------------------------------------------------------------
# merge


def write_base_and_adapter(tmp_path):
    model, x, variables, cfg, base, lora = linen_setup()
    plain_save(tmp_path / "base", variables)
    checkpoint.save(tmp_path / "adapter", lora, cfg)
    return model, x, variables, base, lora


def test_merged_checkpoint_restores_with_plain_orbax(tmp_path):
    model, x, variables, base, lora = write_base_and_adapter(tmp_path)
    paths = checkpoint.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert paths == ["params/head/kernel", "params/q/kernel", "params/up/kernel"]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, variables)
    merged = ocp.StandardCheckpointer().restore(tmp_path / "out", abstract)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)
    chex.assert_trees_all_equal_dtypes(merged, variables)
    # equal to lj.merge in memory (same fp32 accumulation), up to one rounding of the jit
    chex.assert_trees_all_close(merged, lj.merge(base, lora), rtol=1e-6, atol=0)
    # and to an independent float64 reference, within the base dtype's rounding
    for path, w in targets(lora):
        keys = path.split("/")
        got, w0 = merged, variables
        for k in keys:
            got, w0 = got[k], w0[k]
        want = np.asarray(w0, np.float64) + np_delta(w.a, w.b, w.in_axes, w.out_axes, w.stack_axes,
                                                      w.scale, w0.ndim)
        tol = 2 ** -7 if w0.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    # untouched leaves are bit-identical
    np.testing.assert_array_equal(merged["params"]["q"]["bias"], variables["params"]["q"]["bias"])
    # the model run on the merged params equals the wrapped forward on (base, lora)
    y = model.apply(merged, x)
    # (the merged bf16 kernel is rounded to bf16 once, relative 2**-9, which the factored
    # forward never does: compare at a fraction of the output's scale)
    scale = float(jnp.abs(y).max())
    chex.assert_trees_all_close(y, lj.wrap(model.apply)(base, lora, x), rtol=0, atol=1e-2 * scale)
    chex.assert_trees_all_close(y, model.apply(lj.merge(base, lora), x), rtol=1e-5, atol=1e-5)


def test_merge_sharded(tmp_path):
    _, _, variables, base, lora = write_base_and_adapter(tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))

    def spec(path, x):
        name = lj.path_str(path)
        if name == "params/q/kernel":
            return NamedSharding(mesh, P("data", None, "model"))  # (16, 2, 8)
        if name == "params/up/kernel":
            return NamedSharding(mesh, P(None, "model"))  # (16, 32)
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(spec, variables)
    checkpoint.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", shardings=shardings)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variables, shardings)
    merged = ocp.StandardCheckpointer().restore(tmp_path / "out", abstract)
    chex.assert_trees_all_close(merged, lj.merge(base, lora), rtol=1e-6, atol=0)
    # one sharding for every leaf works too
    checkpoint.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out2",
                     shardings=NamedSharding(mesh, P()))
    chex.assert_trees_all_equal(ocp.StandardCheckpointer().restore(tmp_path / "out2"),
                                ocp.StandardCheckpointer().restore(tmp_path / "out"))


def test_merge_on_explicit_and_reordered_meshes(tmp_path):
    """The factors are placed on the base shardings' own mesh: Explicit axes (jax.make_mesh's
    default) and meshes whose devices are not in id order both merge."""
    _, _, variables, base, lora = write_base_and_adapter(tmp_path)
    want = lj.merge(base, lora)
    meshes = {
        "explicit": jax.make_mesh((2, 4), ("x", "y")),
        "reversed": jax.sharding.Mesh(np.array(jax.devices()[::-1]).reshape(2, 4), ("x", "y")),
    }
    for name, mesh in meshes.items():
        def spec(path, x, mesh=mesh):
            if lj.path_str(path) == "params/up/kernel":
                return NamedSharding(mesh, P("x", "y"))  # (16, 32)
            return NamedSharding(mesh, P())

        shardings = jax.tree_util.tree_map_with_path(spec, variables)
        checkpoint.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / name, shardings=shardings)
        merged = ocp.StandardCheckpointer().restore(tmp_path / name)
        chex.assert_trees_all_close(merged, want, rtol=1e-6, atol=0)
        checkpoint.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / (name + "1"),
                         shardings=NamedSharding(mesh, P()))
        chex.assert_trees_all_equal(ocp.StandardCheckpointer().restore(tmp_path / (name + "1")), merged)


def test_merge_onto_base_that_does_not_fit(tmp_path):
    _, _, variables, _, _ = write_base_and_adapter(tmp_path)
    wrong = jax.tree.map(lambda x: x, variables)
    wrong["params"]["up"]["kernel"] = jnp.zeros((16, 40), jnp.bfloat16)
    plain_save(tmp_path / "wrong", wrong)
    with pytest.raises(ValueError, match=r"params/up/kernel: the adapter was made for shape \(16, 32\) "
                                         r"but the base weight has shape \(16, 40\)"):
        checkpoint.merge(tmp_path / "wrong", tmp_path / "adapter", tmp_path / "out")
    # the params dict saved under another top-level name: no prefix added or removed fits
    plain_save(tmp_path / "renamed", {"encoder": variables["params"]})
    with pytest.raises(ValueError, match=r"not in the base checkpoint .*'params/q/kernel'.*base paths are \['encoder/head/bias'"):
        checkpoint.merge(tmp_path / "renamed", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge(tmp_path, capsys):
    _, _, variables, base, lora = write_base_and_adapter(tmp_path)
    args = [str(tmp_path / d) for d in ("base", "adapter", "out")]
    assert cli.main(["merge", *args]) == 0
    assert "merged 3 adapter(s)" in capsys.readouterr().out
    merged = ocp.StandardCheckpointer().restore(tmp_path / "out")
    chex.assert_trees_all_close(merged, lj.merge(base, lora), rtol=1e-6, atol=0)
    assert cli.main(["merge", *args]) == 1  # OUT exists now
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["info"]) == 0


# ---------------------------------------------------------------------------------------
# crash safety


def start_worker(directory, mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(HERE.parent))
    return subprocess.Popen(
        [sys.executable, str(HERE / "checkpoint_worker.py"), str(directory), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_for(proc, line):
    for got in proc.stdout:
        if got.strip() == line:
            return
    proc.wait()
    raise AssertionError(f"worker ended before printing {line!r}: {proc.stderr.read()[-2000:]}")


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def leftovers(directory):
    return sorted(p for p in Path(directory).iterdir() if worker.TMP_MARK in p.name)


@pytest.mark.slow
def test_save_killed_before_commit(tmp_path):
    proc = start_worker(tmp_path, "stall")
    try:
        wait_for(proc, "saved")
        wait_for(proc, "committing")  # every array of "second" is written, not yet renamed
    finally:
        kill(proc)
    assert_same_adapter(checkpoint.restore(tmp_path / "first"), worker.adapter(0))
    assert not (tmp_path / "second").exists()
    (partial,) = leftovers(tmp_path)
    assert partial.name.startswith("second")
    with pytest.raises(FileNotFoundError, match=r"an interrupted save left .*second\.orbax-checkpoint-tmp"):
        checkpoint.restore(tmp_path / "second")
    with pytest.raises(ValueError, match="unfinished orbax checkpoint"):
        checkpoint.restore(partial)
    with pytest.raises(ValueError, match="unfinished orbax checkpoint"):
        checkpoint.merge(tmp_path / "first", partial, tmp_path / "out")


@pytest.mark.slow
def test_manager_save_killed_before_commit(tmp_path):
    proc = start_worker(tmp_path, "manager")
    try:
        wait_for(proc, "step1")
        wait_for(proc, "committing")
    finally:
        kill(proc)
    with checkpoint.Manager(tmp_path / "run") as mgr:
        assert mgr.all_steps() == [1]
        got = mgr.restore()
        assert got.step == 1
        assert_same_adapter(got.lora, worker.adapter(1))
        mgr.save(2, worker.adapter(2))  # the interrupted step can be written again
    assert not leftovers(tmp_path / "run")


@pytest.mark.slow
def test_save_killed_at_arbitrary_moments(tmp_path):
    """Whatever the moment of the kill, each checkpoint either restores complete and exact
    or does not restore at all."""
    for delay in (0.3, 0.9):
        directory = tmp_path / str(delay)
        directory.mkdir()
        proc = start_worker(directory, "loop")
        try:
            wait_for(proc, "saved")
            time.sleep(delay)
        finally:
            kill(proc)
        assert_same_adapter(checkpoint.restore(directory / "first"), worker.adapter(0))
        for path in sorted(directory.iterdir()):
            if path.name == "first":
                continue
            if worker.TMP_MARK in path.name:
                with pytest.raises(ValueError, match="unfinished"):
                    checkpoint.restore(path)
            else:
                seed = int(path.name.split("-")[1])
                assert_same_adapter(checkpoint.restore(path), worker.adapter(seed, scale_dim=8))


# ---------------------------------------------------------------------------------------
# training checkpoints


def small_training():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32), "bias": jnp.zeros(10)}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),))
    base, lora = lj.split(jax.random.key(1), params, cfg)
    x = jnp.asarray(rng.standard_normal((32, 12)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 10)), jnp.float32)
    f = lambda p, x: x @ p["w"] + p["bias"][None, :]  # noqa: E731
    tx = optax.adam(1e-2)

    @jax.jit
    def step(lora, opt):
        g = jax.grad(lambda l: jnp.mean((f(lj.merge(base, l), x) - y) ** 2))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt

    return cfg, lora, tx, step


def test_manager_keeps_n_and_resumes_bit_exact(tmp_path):
    cfg, lora, tx, step = small_training()
    opt = tx.init(lora)
    history = {}
    with checkpoint.Manager(tmp_path, max_to_keep=2) as mgr:
        assert mgr.latest_step() is None
        for i in range(1, 6):
            lora, opt = step(lora, opt)
            mgr.save(i, lora, opt, config=cfg)
            history[i] = (lora, opt)
        with pytest.raises(FileExistsError, match="step 5 already exists"):
            mgr.save(5, lora, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]

    # a new manager resumes from the latest step; structure from an abstract opt state
    with checkpoint.Manager(tmp_path, max_to_keep=2) as mgr:
        assert mgr.all_steps() == [4, 5] and mgr.latest_step() == 5
        got = mgr.restore(opt_state=jax.eval_shape(tx.init, lora))
        assert got.step == 5
        assert_same_adapter(got.lora, history[5][0])
        assert jax.tree.structure(got.opt_state) == jax.tree.structure(history[5][1])
        chex.assert_trees_all_equal(got.opt_state, history[5][1])
        earlier = mgr.restore(4, lora=lora, opt_state=opt)
        assert_same_adapter(earlier.lora, history[4][0])
        chex.assert_trees_all_equal(earlier.opt_state, history[4][1])
        # training on from the restored state equals training on without the checkpoint
        resumed = step(got.lora, got.opt_state)
        chex.assert_trees_all_equal(resumed, step(*history[5]))
        with pytest.raises(FileNotFoundError, match=r"step 1 is not in .*steps there: \[4, 5\]"):
            mgr.restore(1)
        with pytest.raises(ValueError, match="opt_state does not fit"):
            mgr.restore(opt_state=optax.sgd(0.1, momentum=0.9).init(lora))
    # a step directory is an adapter checkpoint: restore and metadata read it directly
    assert_same_adapter(checkpoint.restore(tmp_path / "5"), history[5][0])
    assert checkpoint.metadata(tmp_path / "5")["config"]["rules"][0]["pattern"] == "w"


def test_manager_async_save(tmp_path):
    _, lora, tx, step = small_training()
    opt = tx.init(lora)
    with checkpoint.Manager(tmp_path, async_save=True) as mgr:
        lora, opt = step(lora, opt)
        mgr.save(1, lora, opt)
        lora2, opt2 = step(lora, opt)  # training goes on while the save runs
        mgr.wait_until_finished()
        assert mgr.latest_step() == 1
        got = mgr.restore(opt_state=opt)
    assert_same_adapter(got.lora, lora)
    chex.assert_trees_all_equal(got.opt_state, opt)


def test_manager_rejects_steps_below_latest(tmp_path):
    _, lora, _, _ = small_training()
    with checkpoint.Manager(tmp_path, max_to_keep=2) as mgr:
        for i in (1, 3, 4):
            mgr.save(i, lora)
        assert mgr.all_steps() == [3, 4]
        for old in (2, 1):  # 1 was deleted (max_to_keep): still below the latest
            with pytest.raises(ValueError, match=f"step {old} was not saved.* latest step .* is 4;"
                               ".*new directory"):
                mgr.save(old, lora)
        with pytest.raises(FileExistsError, match="step 4 already exists"):
            mgr.save(4, lora)
        assert mgr.all_steps() == [3, 4]
        mgr.save(5, lora)
        assert mgr.all_steps() == [4, 5]


def test_manager_optimizer_state_without_arrays(tmp_path):
    _, lora, _, _ = small_training()
    tx = optax.sgd(1e-3)
    empty = tx.init(lora)
    assert jax.tree.leaves(empty) == []
    with checkpoint.Manager(tmp_path) as mgr:
        mgr.save(1, lora, empty)
        got = mgr.restore(opt_state=empty)
        assert got.step == 1 and got.opt_state is empty
        assert_same_adapter(got.lora, lora)
        assert mgr.restore(opt_state=jax.eval_shape(tx.init, lora)).opt_state == empty
        assert mgr.restore().opt_state is None


@pytest.mark.slow
def test_quickstart_resumes_from_checkpoints(tmp_path, capsys):
    import linen_quickstart

    plain = linen_quickstart.main(steps=8)
    run = tmp_path / "run"
    assert linen_quickstart.main(steps=8, ckpt_dir=str(run)) == plain
    assert sorted(p.name for p in run.iterdir()) == ["6", "8", "run.json"]  # every 2, newest two kept
    # lose the last checkpoint (as if killed before it was written): resume from step 6
    shutil.rmtree(run / "8")
    assert linen_quickstart.main(steps=8, ckpt_dir=str(run)) == plain
    assert "resumed from step 6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a run with --steps 8"):
        linen_quickstart.main(steps=4, ckpt_dir=str(run))


def test_save_params_round_trips_and_refuses_to_overwrite(tmp_path):
    params = {"params": {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4).astype(jnp.bfloat16),
                                   "bias": jnp.ones(4)}},
              "stats": [jnp.zeros((2,), jnp.int32)]}
    path = tmp_path / "base"
    checkpoint.save_params(path, params)
    back = checkpoint.restore_params(path)
    chex.assert_trees_all_equal(back, params)
    chex.assert_trees_all_equal_dtypes(back, params)
    # like= gives the placement: restored onto the sharding it names
    mesh = jax.make_mesh((8,), ("d",))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params)
    sharded = checkpoint.restore_params(path, like=like)
    assert all(x.sharding.is_equivalent_to(NamedSharding(mesh, P()), x.ndim) for x in jax.tree.leaves(sharded))
    chex.assert_trees_all_equal(sharded, params)
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_params(path, params)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore_params(tmp_path / "missing")
    # plain orbax reads it too, and merge takes it as a base
    with ocp.StandardCheckpointer() as ckptr:
        chex.assert_trees_all_equal(ckptr.restore(path), params)
