"""DoRA: the factored transform, merge and init against a float64 numpy reference of
``m · V / ||V||`` (V = W + s·A⊗B, the norm over W's input axes per output), gradients
against central differences, and DoRA through checkpoints, sharding and the optimizer."""

from __future__ import annotations

import math
import string
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax.transform import MaterializeWarning

from reference import np_delta


def np_dora(W, a, b, m, scale, ins, outs, stack, norm_from=None):
    """float64 ``m·V/||V||`` laid out like ``W``; ``norm_from=(a0, b0)`` takes the norm of
    ``W + s·a0⊗b0`` instead (the detached norm, held fixed while a and b move)."""
    W = np.asarray(W, np.float64)
    V = W + np_delta(a, b, ins, outs, stack, scale, W.ndim)
    Vn = V if norm_from is None else W + np_delta(*norm_from, ins, outs, stack, scale, W.ndim)
    norm = np.sqrt(np.sum(Vn ** 2, axis=tuple(ins), keepdims=True))
    letters = string.ascii_lowercase[: W.ndim]
    m_w = np.einsum(f"{''.join(letters[i] for i in (*stack, *outs))}->{''.join(letters[i] for i in sorted((*stack, *outs)))}",
                    np.asarray(m, np.float64))
    m_w = m_w.reshape([W.shape[d] if d in (*stack, *outs) else 1 for d in range(W.ndim)])
    return m_w * V / norm


def _dora(lora, seed=0, m_noise=0.3):
    """Every adapter with random B (and A) and a magnitude moved off its initial norm."""
    rng = np.random.default_rng(seed)

    def fill(w):
        if not lj.is_lora(w):
            return w
        a = jnp.asarray(rng.standard_normal(np.shape(w.a)) * 0.5, w.a.dtype)
        b = jnp.asarray(rng.standard_normal(np.shape(w.b)) * 0.5, w.b.dtype)
        m = w.m * jnp.asarray(1 + m_noise * rng.standard_normal(np.shape(w.m)), w.m.dtype)
        return w.replace(a=a, b=b, m=m)

    return jax.tree.map(fill, lora, is_leaf=lj.is_lora)


def _cfg(pattern=".*w.*", rank=2, **kw):
    return lj.LoraConfig(rules=(lj.Rule(pattern, rank=rank, alpha=3.0),), dora=True, **kw)


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _agree(f, params, x, cfg=None, atol=2e-5):
    """factored and merge agree, values and gradients w.r.t. a, b and m; returns the pair."""
    base, lora = lj.split(jax.random.key(1), params, cfg or _cfg(), apply_fn=f, args=(x,))
    lora = _dora(lora)
    def both(strategy):
        fn = lj.wrap(f, strategy=strategy)
        return jax.jit(lambda l: (fn(base, l, x), jax.grad(lambda l: jnp.sum(jnp.sin(fn(base, l, x))))(l)))(lora)

    with warnings.catch_warnings():
        warnings.simplefilter("error", MaterializeWarning)
        y, g = both("factored")
    y_ref, g_ref = both("merge")
    np.testing.assert_allclose(y, y_ref, atol=atol, rtol=1e-4)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(got, want, atol=atol * 10, rtol=1e-3)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
    return base, lora


# -- the formula ----------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(d_in=st.integers(2, 7), d_out=st.integers(2, 7), rank=st.integers(1, 2), out_in=st.booleans(),
       detach=st.booleans(), seed=st.integers(0, 99))
def test_forward_and_grads_match_numpy(d_in, d_out, rank, out_in, detach, seed):
    """Values and gradients (a, b, m) of x·W' against float64 numpy; with the norm detached
    the reference holds the norm at the current factors (central differences)."""
    rank = min(rank, d_in, d_out)
    shape = (d_out, d_in) if out_in else (d_in, d_out)
    ins, outs = ((1,), (0,)) if out_in else ((0,), (1,))
    with jax.enable_x64(True):
        W = jax.random.normal(jax.random.key(seed), shape, jnp.float64)
        x = jax.random.normal(jax.random.key(seed + 1), (3, d_in), jnp.float64)
        f = (lambda p, x: x @ p["w"].T) if out_in else (lambda p, x: x @ p["w"])
        cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, alpha=2.0),), dora=True, dora_detach=detach)
        base, lora = lj.split(jax.random.key(seed), {"w": W}, cfg, apply_fn=f, args=(x,))
        lora = _dora(lora, seed)
        w = lora["w"]
        assert w.in_axes == ins and w.out_axes == outs

        def ref(a, b, m, fixed=None):
            Wp = np_dora(W, a, b, m, w.scale, ins, outs, (), norm_from=fixed)
            return np.sum(np.sin(np.asarray(x) @ (Wp.T if out_in else Wp)))

        fn = lj.wrap(f)
        y, g = jax.jit(lambda l: (fn(base, l, x), jax.grad(lambda l: jnp.sum(jnp.sin(fn(base, l, x))))(l)))(lora)
        g = g["w"]
        Wp = np_dora(W, w.a, w.b, w.m, w.scale, ins, outs, ())
        np.testing.assert_allclose(y, np.asarray(x) @ (Wp.T if out_in else Wp), rtol=1e-10, atol=1e-10)
        a0, b0, m0 = (np.asarray(v, np.float64) for v in (w.a, w.b, w.m))
        fixed = (a0, b0) if detach else None
        eps = 1e-6
        for name, got in (("a", g.a), ("b", g.b), ("m", g.m)):
            vals = dict(a=a0, b=b0, m=m0)
            num = np.zeros_like(vals[name])
            for idx in np.ndindex(num.shape):
                hi, lo = (dict(vals, **{name: vals[name].copy()}) for _ in range(2))
                hi[name][idx] += eps
                lo[name][idx] -= eps
                num[idx] = (ref(**hi, fixed=fixed) - ref(**lo, fixed=fixed)) / (2 * eps)
            np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-6, err_msg=f"d/d{name}")


def test_detached_and_full_gradients_differ():
    """The switch is real: the norm's gradient changes dA and dB (m's is the same)."""
    W, x = _normal(0, (6, 5)), _normal(1, (3, 6))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    grads = []
    for detach in (True, False):
        base, lora = lj.split(jax.random.key(0), {"w": W}, _cfg(dora_detach=detach))
        lora = _dora(lora)
        grads.append(jax.grad(lambda l: jnp.sum(lj.wrap(f)(base, l, x) ** 2))(lora)["w"])
    assert float(jnp.abs(grads[0].b - grads[1].b).max()) > 1e-3
    np.testing.assert_allclose(grads[0].m, grads[1].m, rtol=1e-5)


def test_split_starts_at_the_base_and_merge_matches_numpy():
    W = _normal(0, (2, 6, 5))  # a stacked weight: (layers, in, out)
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0, axes=((1,), (2,), (0,))),), dora=True)
    base, lora = lj.split(jax.random.key(0), {"w": W}, cfg)
    w = lora["w"]
    assert w.m.shape == w.m_shape == (2, 5)
    np.testing.assert_allclose(w.m, np.linalg.norm(np.asarray(W), axis=1), rtol=1e-6)
    np.testing.assert_allclose(lj.merge(base, lora)["w"], W, rtol=1e-5, atol=1e-6)
    lora = _dora(lora)
    w = lora["w"]
    want = np_dora(W, w.a, w.b, w.m, w.scale, (1,), (2,), (0,))
    np.testing.assert_allclose(lj.merge(base, lora)["w"], want, rtol=1e-5, atol=1e-5)


def test_pissa_with_dora_reproduces_the_weights():
    W = _normal(0, (8, 6))
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),), init="pissa", dora=True)
    base, lora = lj.split(jax.random.key(0), {"w": W}, cfg)
    np.testing.assert_allclose(lora["w"].m, np.linalg.norm(np.asarray(W), axis=0), rtol=1e-5)
    np.testing.assert_allclose(lj.merge(base, lora)["w"], W, atol=1e-5)


def test_rule_overrides_the_config():
    params = {"q": _normal(0, (4, 4)), "v": _normal(1, (4, 4))}
    cfg = lj.LoraConfig(rules=(lj.Rule("q", rank=1, dora=False), lj.Rule("v", rank=1)), dora=True)
    _, lora = lj.split(jax.random.key(0), params, cfg)
    assert not lora["q"].is_dora and lora["v"].is_dora
    cfg = lj.LoraConfig(rules=(lj.Rule("q", rank=1, dora=True), lj.Rule("v", rank=1)))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    assert lora["q"].is_dora and not lora["v"].is_dora


# -- the factored rules --------------------------------------------------------------------
class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.DenseGeneral((2, 3), name="heads")(x))
        return nn.DenseGeneral(5, axis=(-2, -1), name="out")(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(6, name="fc")(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(_Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="stack")(x, None)[0]


class _Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (3, 3), name="conv")(jnp.tanh(nn.Conv(4, (3, 3), feature_group_count=2, name="g")(x)))


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 4, name="wte")
        return emb.attend(jnp.tanh(emb(ids)))


@pytest.mark.parametrize("name", ["multi_axis", "scanned", "conv", "tied_embedding"])
def test_factored_equals_merge_on_model_families(name):
    model, x = {
        "multi_axis": (_Mlp(), _normal(0, (4, 6))),
        "scanned": (_Scanned(), _normal(0, (4, 6))),
        "conv": (_Conv(), _normal(0, (2, 6, 6, 4))),
        "tied_embedding": (_Tied(), jnp.array([[1, 3, 3, 7], [0, 10, 2, 2]])),
    }[name]
    params = model.init(jax.random.key(0), x)
    _agree(model.apply, params, x, _cfg(r".*(kernel|embedding)"))


def test_fused_and_sibling_products():
    """q/k/v concatenated into one kernel (factors joined along the outputs) and three
    products of one input (x·A shared): both keep DoRA's factors apart."""
    params = {"wq": _normal(0, (6, 4)), "wk": _normal(1, (6, 4)), "o": _normal(2, (6, 3))}
    x = _normal(3, (5, 6))
    _agree(lambda p, x: x @ jnp.concatenate([p["wq"], p["wk"], p["o"]], axis=1), params, x)
    _agree(lambda p, x: jnp.tanh(x @ p["wq"]) * (x @ p["wk"]), params, x)


def test_slices_reshapes_and_moe():
    params = {"w": _normal(0, (6, 2, 3))}
    x = _normal(1, (5, 6))
    _agree(lambda p, x: x @ p["w"].reshape(6, 6)[:, :3] + x[:, :2] @ p["w"][:2, 1], params, x)
    experts = {"w": _normal(2, (3, 6, 4))}  # (E, in, out), tokens sorted by expert
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, axes=((1,), (2,), (0,))),), dora=True)
    sizes = jnp.array([2, 0, 3])
    _agree(lambda p, x: jax.lax.ragged_dot(x, p["w"], sizes), experts, x, cfg)


def test_a_quantized_base():
    W = _normal(0, (64, 32))
    x = _normal(1, (3, 64))
    qbase = lj.quantize({"w": W}, "nf4", block_size=32, pattern="w")
    base, lora = lj.split(jax.random.key(0), qbase, _cfg())
    np.testing.assert_allclose(lora["w"].m, np.linalg.norm(np.asarray(lj.dequantize(qbase)["w"]), axis=0), rtol=1e-5)
    lora = _dora(lora)
    f = lambda p, x: x @ p["w"]  # noqa: E731
    np.testing.assert_allclose(lj.wrap(f)(base, lora, x), x @ lj.merge(base, lora)["w"], atol=1e-4, rtol=1e-4)


def test_no_weight_sized_value_but_w_forward_or_backward():
    d_in, d_out = 24, 40
    W, x = _normal(0, (d_in, d_out)), _normal(1, (3, d_in))
    f = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    for detach in (True, False):
        base, lora = lj.split(jax.random.key(0), {"w": W}, _cfg(dora_detach=detach))
        lora = _dora(lora)
        jaxpr = jax.make_jaxpr(jax.grad(lambda l, x: jnp.sum(lj.wrap(f)(base, l, x) ** 2), argnums=(0, 1)))(lora, x)
        big = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars if math.prod(v.aval.shape) >= d_in * d_out]
        assert big == [], f"weight-sized values formed: {big}"
        merged = jax.make_jaxpr(lambda l: lj.wrap(f, strategy="merge")(base, l, x))(lora)
        assert any(tuple(v.aval.shape) == (d_in, d_out) for e in merged.jaxpr.eqns for v in e.outvars)


@pytest.mark.parametrize("detach", [True, False])
def test_zero_norm_outputs_stay_finite(detach):
    W = _normal(0, (6, 5)).at[:, 2].set(0.0)  # an output with all-zero weights
    base, lora = lj.split(jax.random.key(0), {"w": W}, _cfg(dora_detach=detach))
    assert float(lora["w"].m[2]) == 0.0
    x = _normal(1, (3, 6))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    y, g = jax.value_and_grad(lambda l: jnp.sum(lj.wrap(f)(base, l, x) ** 2))(lora)
    assert bool(jnp.isfinite(y)) and all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(g))
    assert bool(jnp.isfinite(lj.merge(base, lora)["w"]).all())


# -- around the transform ----------------------------------------------------------------
def test_training_moves_the_magnitude():
    W, x = _normal(0, (6, 5)), _normal(1, (8, 6))
    target = x @ (W * 1.5)  # a pure change of magnitude
    base, lora = lj.split(jax.random.key(0), {"w": W}, _cfg())
    tx = lj.optimizer(optax.adam(0.05))
    loss = lambda l: jnp.mean((lj.wrap(lambda p, x: x @ p["w"])(base, l, x) - target) ** 2)  # noqa: E731

    @jax.jit
    def step(state, opt):
        grads = {"base": jax.tree.map(jnp.zeros_like, state["base"]), "lora": jax.grad(loss)(state["lora"])}
        updates, opt = tx.update(grads, opt, state)
        return lj.apply_updates(state, updates), opt

    state = {"base": base, "lora": lora}
    opt = tx.init(state)
    first = float(loss(lora))
    for _ in range(60):
        state, opt = step(state, opt)
    assert float(loss(state["lora"])) < 0.05 * first
    assert float(jnp.mean(state["lora"]["w"].m / jnp.linalg.norm(W, axis=0))) > 1.4
    assert bool((state["base"]["w"] == W).all())


def test_checkpoint_round_trip(tmp_path):
    params = {"q": _normal(0, (6, 4)), "v": _normal(1, (6, 4))}
    cfg = lj.LoraConfig(rules=(lj.Rule("q", rank=2), lj.Rule("v", rank=2, dora=False)), dora=True, dora_detach=False)
    base, lora = lj.split(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda w: w.replace(b=w.b + 0.5, m=None if w.m is None else w.m * 2), lora,
                        is_leaf=lj.is_lora)
    lj.checkpoint.save(tmp_path / "a", lora, cfg)
    meta = lj.checkpoint.metadata(tmp_path / "a")
    assert meta["targets"][0]["m"] == {"shape": [4], "dtype": "float32"} and "m" not in meta["targets"][1]
    assert (meta["config"]["dora"], meta["config"]["dora_detach"]) == (True, False)
    assert [r["dora"] for r in meta["config"]["rules"]] == [None, False]
    for like in (None, lora):
        back = lj.checkpoint.restore(tmp_path / "a", like=like)
        assert back["q"].dora_detach is False and not back["v"].is_dora
        np.testing.assert_array_equal(back["q"].m, lora["q"].m)
        np.testing.assert_array_equal(lj.merge(base, back)["q"], lj.merge(base, lora)["q"])
    _, plain = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q|v", rank=2),)))
    with pytest.raises(ValueError, match="q: the checkpoint's adapter is a DoRA adapter.*dora=True"):
        lj.checkpoint.restore(tmp_path / "a", like=plain)
    lj.checkpoint.save_params(tmp_path / "base", base)
    lj.checkpoint.merge(tmp_path / "base", tmp_path / "a", tmp_path / "merged")
    merged = lj.checkpoint.restore_params(tmp_path / "merged")
    np.testing.assert_allclose(merged["q"], lj.merge(base, lora)["q"], rtol=1e-6)


def test_sharded_split_and_step_equal_one_device():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    W, x = _normal(0, (8, 16)), _normal(1, (4, 8))
    specs = {"w": P("data", "model")}
    params = {"w": jax.device_put(W, NamedSharding(mesh, specs["w"]))}
    base, lora = lj.sharding.split(jax.random.key(0), params, _cfg(), base_specs=specs)
    assert lora["w"].m.sharding.spec == P("model")
    assert lj.sharding.specs(lora, specs)["w"].m == P("model")
    _, lora1 = lj.split(jax.random.key(0), {"w": W}, _cfg())
    np.testing.assert_allclose(lora["w"].m, lora1["w"].m, rtol=1e-6)
    f = lambda p, x: x @ p["w"]  # noqa: E731
    grad = jax.jit(jax.grad(lambda l, b, x: jnp.sum(lj.wrap(f)(b, l, x) ** 2)))
    lora, lora1 = _dora(lora), _dora(lora1)
    g8, g1 = grad(lora, base, x), grad(lora1, {"w": W}, x)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_summary_counts_the_magnitude():
    _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 6))}, _cfg())
    text = lj.summary(lora)
    assert "linear+dora" in text and f"{2 * 8 + 2 * 6 + 6:,}" in text


def test_bad_input():
    with pytest.raises(TypeError, match="dora must be True, False or None"):
        lj.Rule("w", dora="yes")
    with pytest.raises(TypeError, match="LoraConfig dora must be True or False"):
        lj.LoraConfig(rules=(lj.Rule("w"),), dora=1)
    params = {"w": _normal(0, (6, 4))}
    base, lora = lj.split(jax.random.key(0), params, _cfg())
    with pytest.raises(ValueError, match="unmerge.*'?w'?.*DoRA.*keep the base"):
        lj.unmerge(lj.merge(base, lora), lora)
    with pytest.raises(ValueError, match="stack: the adapters at w are DoRA"):
        lj.stack([lora, lora])
    with pytest.raises(ValueError, match="combine: the adapters at w are DoRA"):
        lj.combine([lora, lora], [0.5, 0.5])
    with pytest.raises(ValueError, match="adalora.split: rules.*DoRA"):
        lj.adalora.split(jax.random.key(0), params, _cfg())
    wrong = {"w": lora["w"].replace(m=jnp.ones(3))}
    with pytest.raises(ValueError, match=r"w: factor m has shape \(3,\), expected \(4,\)"):
        lj.merge(base, wrong)
