"""Stacked lora trees (lj.stack) beyond wrap: checkpoints, PEFT directories, sharding across
8 simulated devices, the optimizer, the summary, and the functions that take one adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import checkpoint, metadata, peft
from reference import randomize

PARAMS = {"q": {"kernel": jnp.linspace(-1, 1, 16 * 8).reshape(16, 8)},
          "v": {"kernel": jnp.linspace(1, -1, 16 * 8).reshape(16, 8)}}
MAP = [(r"(\w+)/kernel", r"\1_proj")]


def f(p, x):
    return jnp.tanh(x @ p["q"]["kernel"]) + x @ p["v"]["kernel"]


def _adapters():
    """Three adapters of PARAMS: q+v at rank 2 (lora), q at rank 4 (rsLoRA, dropout), v at rank 1."""
    split = lambda k, pattern, rank, alpha, scaling="lora", dropout=0.0: randomize(lj.split(
        jax.random.key(k), PARAMS,
        lj.LoraConfig(rules=(lj.Rule(pattern, rank=rank, alpha=alpha, dropout=dropout),), scaling=scaling))[1], k)
    return [split(0, "(q|v)/kernel", 2, 4.0), split(1, "q/kernel", 4, 3.0, "rslora", 0.1), split(2, "v/kernel", 1, 0.5)]


def _assert_same_stack(got, want):
    g = jax.tree.leaves(got, is_leaf=lj.stacked.is_stacked_node)
    w = jax.tree.leaves(want, is_leaf=lj.stacked.is_stacked_node)
    assert jax.tree.structure(got, is_leaf=lj.stacked.is_stacked_node) == \
        jax.tree.structure(want, is_leaf=lj.stacked.is_stacked_node)
    for x, y in zip(g, w):
        for field in ("a", "b", "scale", "alpha", "rank", "dropout"):
            np.testing.assert_array_equal(np.asarray(getattr(x, field)), np.asarray(getattr(y, field)), err_msg=field)
        assert (x.shape, x.dtype, x.in_axes, x.out_axes, x.stack_axes, x.kind) == \
            (y.shape, y.dtype, y.in_axes, y.out_axes, y.stack_axes, y.kind)


def test_checkpoint_round_trip_keeps_every_adapter(tmp_path):
    loras = _adapters()
    stacked = lj.swap(lj.stack(loras), 0, jax.tree.map(lambda w: None, loras[0], is_leaf=lj.is_lora))
    stacked = lj.swap(stacked, 0, loras[2])  # slot 0 now rank 1 under a padded rank 4: the padding is kept
    checkpoint.save(tmp_path / "s", stacked)
    meta = checkpoint.metadata(tmp_path / "s")
    own = [{t["path"]: (t["rank"], t["alpha"], t["scaling"]) for t in a["targets"]} for a in meta["stack"]]
    assert own == [{"v/kernel": (1, 0.5, "lora")},
                   {"q/kernel": (4, 3.0, "rslora")},
                   {"v/kernel": (1, 0.5, "lora")}]
    back = checkpoint.restore(tmp_path / "s")
    _assert_same_stack(back, stacked)
    assert back["q"]["kernel"].r_max == 4
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), stacked)
    _assert_same_stack(checkpoint.restore(tmp_path / "s", like), stacked)
    with pytest.raises(ValueError, match="it holds a stacked tree.*like must be one too"):
        checkpoint.restore(tmp_path / "s", loras[0])
    x = jax.random.normal(jax.random.key(3), (3, 16))
    ids = jnp.array([2, 1, -1])
    run = jax.jit(lambda s, x: lj.wrap(f)(PARAMS, s, x, adapter_ids=ids))
    np.testing.assert_array_equal(run(back, x), run(stacked, x))


def test_a_stacked_checkpoint_is_not_merged_and_damage_is_named(tmp_path):
    stacked = lj.stack(_adapters())
    checkpoint.save(tmp_path / "s", stacked)
    checkpoint.save_params(tmp_path / "base", PARAMS)
    with pytest.raises(ValueError, match="holds 3 stacked adapters.*lj.unstack"):
        checkpoint.merge(tmp_path / "base", tmp_path / "s", tmp_path / "out")
    meta, _ = metadata.encode(stacked)
    meta["stack"][1]["targets"][0]["rank"] = 9
    with pytest.raises(ValueError, match=r"stack\[1\]\.targets\['q/kernel'\]\.rank is 9, expected an int in 1\.\.4"):
        metadata.check_format(meta, "ckpt")
    meta, _ = metadata.encode(stacked)
    meta["targets"][0]["a"]["shape"] = [4, 16]
    with pytest.raises(ValueError, match=r"a\.shape is \[4, 16\], expected \[3, 4, 16\].*3 adapters"):
        metadata.check_format(meta, "ckpt")


def test_peft_directories_load_stacked_equal_each_loaded_alone(tmp_path):
    loras = _adapters()
    dirs = []
    for k, lora in enumerate(loras):
        dirs.append(tmp_path / str(k))
        peft.save(dirs[-1], lora, MAP)
    stacked = peft.load(dirs, PARAMS, MAP)
    alone = [peft.load(d, PARAMS, MAP) for d in dirs]
    _assert_same_stack(stacked, lj.stack(alone))
    assert stacked["q"]["kernel"].ranks == (2, 4, 0) and stacked["v"]["kernel"].ranks == (2, 0, 1)
    x = jax.random.normal(jax.random.key(3), (3, 16))
    y = lj.wrap(f)(PARAMS, stacked, x, adapter_ids=jnp.array([1, 2, 0]))
    for i, k in enumerate([1, 2, 0]):
        np.testing.assert_allclose(y[i], lj.wrap(f)(PARAMS, loras[k], x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="list of adapter directories is empty"):
        peft.load([], PARAMS, MAP)


def test_eight_devices_equal_one():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"q": {"kernel": P(None, "model")}, "v": {"kernel": P(None, "model")}}
    stacked = lj.stack(_adapters())
    s = lj.sharding.specs(stacked, specs)
    assert tuple(s["q"]["kernel"].b) == (None, None, "model") and tuple(s["q"]["kernel"].scale) == ()
    placed = lj.sharding.shard(stacked, mesh, specs)
    assert placed["v"]["kernel"].b.sharding.spec == P(None, None, "model")
    params = jax.device_put(PARAMS, jax.tree.map(lambda p: NamedSharding(mesh, p), specs))
    x = jax.device_put(jax.random.normal(jax.random.key(3), (8, 16)), NamedSharding(mesh, P("data")))
    ids = jnp.array([0, 1, 2, -1, 2, 1, 0, 0])
    loss = lambda s, x: jnp.sum(lj.wrap(f)(params, s, x, adapter_ids=ids) ** 2)
    got = jax.jit(jax.value_and_grad(loss))(placed, x)
    one = jax.jit(jax.value_and_grad(lambda s, x: jnp.sum(lj.wrap(f)(PARAMS, s, x, adapter_ids=ids) ** 2)))(
        stacked, np.asarray(x))
    np.testing.assert_allclose(got[0], one[0], rtol=1e-5)
    for g, o in zip(jax.tree.leaves(got[1]), jax.tree.leaves(one[1])):
        np.testing.assert_allclose(g, o, rtol=1e-4, atol=1e-5)


def test_the_optimizer_trains_factors_and_freezes_the_numbers():
    stacked = lj.stack(_adapters())
    state = {"base": PARAMS, "lora": stacked}
    tx = lj.optimizer(optax.adamw(0.1, weight_decay=0.5))
    x, ids = jax.random.normal(jax.random.key(3), (3, 16)), jnp.array([0, 1, 2])
    loss = lambda s: jnp.sum(lj.wrap(f)(s["base"], s["lora"], x, adapter_ids=ids) ** 2)
    grads = jax.jit(jax.grad(loss))(state)
    updates, _ = tx.update(grads, tx.init(state), state)
    new = lj.apply_updates(state, updates)["lora"]
    for w, old in zip(jax.tree.leaves(new, is_leaf=lj.stacked.is_stacked),
                      jax.tree.leaves(stacked, is_leaf=lj.stacked.is_stacked)):
        for field in ("scale", "alpha", "rank", "dropout"):   # (as float32: they went through JAX)
            np.testing.assert_array_equal(getattr(w, field), np.float32(getattr(old, field)))
        assert not np.allclose(w.b, old.b)


def test_functions_of_one_adapter_refuse_a_stack_with_the_fix():
    stacked = lj.stack(_adapters())
    for call in (lambda: lj.merge(PARAMS, stacked), lambda: lj.unmerge(PARAMS, stacked),
                 lambda: lj.delta_norms(stacked), lambda: lj.combine([stacked], [1.0]),
                 lambda: peft.save("/nonexistent", stacked, MAP)):
        with pytest.raises(TypeError, match=r"holds stacked adapters \(lj.stack\) at q/kernel, v/kernel.*unstack"):
            call()


def test_summary_of_a_stack_beside_a_plain_adapter_lists_both():
    loras = _adapters()
    tree = lj.stack(loras)
    tree["v"]["kernel"] = loras[0]["v"]["kernel"]     # one plain adapter every example shares
    text = lj.summary(tree)
    assert "q/kernel" in text and "v/kernel" in text, text
    q = tree["q"]["kernel"]
    assert f"{q.a.size + q.b.size + loras[0]['v']['kernel'].num_params:,} in 2 targets" in text
