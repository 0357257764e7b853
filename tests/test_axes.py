"""Axis inference of ``lj.split``: which axes of a target are in / out / stack, and its kind.

Every case checks three things:

* the inferred ``(in_axes, out_axes, stack_axes)`` and ``kind`` exactly, and the factor
  layout ``a.shape == (*stack, r, *in)``, ``b.shape == (*stack, r, *out)``;
* ``lj.merge`` against a float64 numpy reference ``W + s * einsum(a, b)`` built from the
  *expected* axes with one einsum letter per weight axis (independent of ``w.delta()``);
* where a model function is given (traced or not), the model run through ``lj.wrap(apply_fn, strategy="merge")`` against
  the model applied to the numpy-merged parameters.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import lora_jax as lj
from reference import np_delta, randomize

KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------------------
# helpers


def ref_merged(W, a, b, ins, outs, stack, scale):
    """Numpy float64 ``W + scale * a⊗b`` from the expected axes, one letter per W axis."""
    W = np.asarray(W, np.float64)
    d = np_delta(a, b, ins, outs, stack, scale, W.ndim)
    assert d.shape == W.shape
    return (W + d).astype(np.float32)


def lora_leaves(lora):
    """path -> LoraWeight for every adapter (linen dicts and NNX states alike)."""
    out = {}
    for p, w in jax.tree_util.tree_flatten_with_path(lora, is_leaf=lj.is_lora)[0]:
        if lj.is_lora(w):
            out[lj.path_str(p)] = w
    return out


def param_leaves(params):
    return {lj.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def replace_leaves(params, new):
    """``params`` with the leaves at the paths in ``new`` replaced."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(new[lj.path_str(p)]) if lj.path_str(p) in new else x, params
    )


def assert_weight(w, *, shape, ins, outs, stack=(), kind="linear", rank, alpha):
    assert (w.in_axes, w.out_axes, w.stack_axes) == (ins, outs, stack), (
        w.in_axes,
        w.out_axes,
        w.stack_axes,
    )
    assert w.kind == kind
    assert tuple(w.shape) == tuple(shape)
    assert w.rank == rank
    assert w.scale == pytest.approx(alpha / rank)
    stack_dims = tuple(shape[i] for i in stack)
    assert np.shape(w.a) == (*stack_dims, rank, *(shape[i] for i in ins))
    assert np.shape(w.b) == (*stack_dims, rank, *(shape[i] for i in outs))


def check_split(
    params,
    rules,
    expected,
    *,
    apply_fn=None,
    args=(),
    traced=True,
    init="default",
    seed=0,
):
    """Split, check every expected target's metadata, merge and the model output.

    ``expected``: path -> dict(ins=, outs=, stack=, kind=), rank/alpha taken from the rule
    that matches the path. With ``apply_fn``, its output through ``lj.wrap`` is checked
    against the reference; ``traced=False`` splits without tracing it. Returns
    ``(base, lora, lora_random, ref_params)``.
    """
    cfg = lj.LoraConfig(rules=tuple(rules), init=init)
    kw = dict(apply_fn=apply_fn, args=args) if apply_fn is not None and traced else {}
    base, lora = lj.split(KEY, params, cfg, **kw)
    got = lora_leaves(lora)
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    flat = param_leaves(params)
    chex.assert_trees_all_equal(base, params)  # non-pissa: base is params

    lora_r = randomize(lora, seed)
    got_r = lora_leaves(lora_r)
    refs = {}
    for path, exp in expected.items():
        rule = next(r for r in cfg.rules if r.matches(path))
        exp = dict(exp)
        exp.setdefault("stack", ())
        exp.setdefault("kind", "linear")
        W = flat[path]
        assert_weight(got[path], shape=W.shape, rank=rule.rank, alpha=rule.alpha, **exp)
        w = got_r[path]
        assert np.all(np.asarray(w.a) != 0) and np.all(np.asarray(w.b) != 0)
        refs[path] = ref_merged(
            W, w.a, w.b, exp["ins"], exp["outs"], exp["stack"], rule.alpha / rule.rank
        )
        # the reference really differs from W (the check below is not vacuous)
        assert not np.allclose(refs[path], np.asarray(W), rtol=1e-3, atol=1e-3)

    ref_params = replace_leaves(params, refs)
    merged = lj.merge(base, lora_r)
    chex.assert_trees_all_close(merged, ref_params, rtol=RTOL, atol=1e-6)
    if apply_fn is not None:
        y = lj.wrap(apply_fn, strategy="merge")(base, lora_r, *args)
        y_ref = apply_fn(ref_params, *args)
        chex.assert_trees_all_close(y, y_ref, rtol=RTOL, atol=ATOL)
    return base, lora, lora_r, ref_params


def linen_case(model, x, pattern, expected, *, rank=2, alpha=3.0, traced=True, **kw):
    params = model.init(KEY, x)
    rules = (lj.Rule(pattern, rank=rank, alpha=alpha),)
    return check_split(params, rules, expected, apply_fn=model.apply, args=(x,), traced=traced, **kw)


def f32(*shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------------------
# 1. Dense


@pytest.mark.parametrize("traced", [True, False])
def test_dense(traced):
    x = f32(2, 3)
    _, lora, _, _ = linen_case(
        nn.Dense(5),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=(0,), outs=(1,))},
        traced=traced,
    )
    w = lora["params"]["kernel"]
    assert lora["params"]["bias"] is None
    # default init: A (r, in) kaiming-uniform, B zero
    assert np.any(np.asarray(w.a) != 0) and np.all(np.asarray(w.b) == 0)
    assert np.abs(np.asarray(w.a)).max() <= 1 / math.sqrt(3) + 1e-6


def test_dense_untraced_wrap_matches_reference():
    """Untraced split: the same adapters, and wrap on model.apply still agrees."""
    model, x = nn.Dense(5), f32(2, 3)
    params = model.init(KEY, x)
    check_split(
        params,
        (lj.Rule("params/kernel", rank=3, alpha=2.0),),
        {"params/kernel": dict(ins=(0,), outs=(1,))},
        apply_fn=model.apply,
        args=(x,),
        traced=False,
    )


# ---------------------------------------------------------------------------------------
# 2. DenseGeneral


def test_dense_general_multi_out():
    x = f32(2, 3)
    linen_case(
        nn.DenseGeneral(features=(4, 5)),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=(0,), outs=(1, 2))},
    )


def test_dense_general_multi_in():
    x = f32(2, 4, 5)
    linen_case(
        nn.DenseGeneral(features=6, axis=(-2, -1)),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=(0, 1), outs=(2,))},
        rank=3,
    )


# ---------------------------------------------------------------------------------------
# 3. Einsum


@pytest.mark.parametrize(
    "spec,kshape,x_shape,ins,outs,stack",
    [
        ("bd,hde->bhe", (4, 3, 5), (2, 3), (1,), (0, 2), ()),
        # axes order (in, out...) = (2, 0, 1) is not its own inverse: catches a delta that
        # transposes by the permutation instead of its inverse
        ("bd,hed->bhe", (4, 5, 3), (2, 3), (2,), (0, 1), ()),
        # a head axis shared with the input is a dot batch dim -> stack axis
        ("bhd,ehd->bhe", (5, 4, 3), (2, 4, 3), (2,), (0,), (1,)),
    ],
    ids=["bd,hde", "bd,hed", "bhd,ehd"],
)
def test_einsum(spec, kshape, x_shape, ins, outs, stack):
    x = f32(*x_shape)
    _, lora, _, _ = linen_case(
        nn.Einsum(kshape, spec),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=ins, outs=outs, stack=stack)},
    )
    w = lora["params"]["kernel"]
    assert w.a.shape == (*(kshape[i] for i in stack), 2, *(kshape[i] for i in ins))


# ---------------------------------------------------------------------------------------
# 4. Conv


def test_conv_1d():
    x = f32(2, 7, 2)  # (batch, length, in)
    _, lora, _, _ = linen_case(
        nn.Conv(5, (3,)),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=(0, 1), outs=(2,), kind="conv")},
    )
    assert lora["params"]["kernel"].a.shape == (2, 3, 2)


def test_conv_2d():
    x = f32(2, 6, 7, 2)  # (batch, h, w, in)
    _, lora, _, _ = linen_case(
        nn.Conv(5, (3, 4)),
        x,
        "params/kernel",
        {"params/kernel": dict(ins=(0, 1, 2), outs=(3,), kind="conv")},
        rank=3,
    )
    assert lora["params"]["kernel"].a.shape == (3, 3, 4, 2)
    assert lora["params"]["kernel"].b.shape == (3, 5)


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize(
    "features,kernel_size,x_shape,max_rank",
    [
        (8, (3,), (2, 7, 2), 6),  # in side 3*2 = 6 < out 8
        (7, (2, 3), (2, 5, 6, 1), 6),  # in side 2*3*1 = 6 < out 7
    ],
)
def test_conv_rank_limit_is_window_times_in(traced, features, kernel_size, x_shape, max_rank):
    """rank may exceed in_features (and each window dim) up to prod(window * in)."""
    model, x = nn.Conv(features, kernel_size), f32(*x_shape)
    nd = len(kernel_size) + 2
    kind = "conv" if traced else "linear"  # untraced: only the path decides the kind
    linen_case(
        model,
        x,
        "params/kernel",
        {"params/kernel": dict(ins=tuple(range(nd - 1)), outs=(nd - 1,), kind=kind)},
        rank=max_rank,
        traced=traced,
    )
    params = model.init(KEY, x)
    cfg = lj.LoraConfig(rules=(lj.Rule("params/kernel", rank=max_rank + 1),))
    kw = dict(apply_fn=model.apply, args=(x,)) if traced else {}
    with pytest.raises(ValueError, match=rf"min\({max_rank}, {features}\)"):
        lj.split(KEY, params, cfg, **kw)


# ---------------------------------------------------------------------------------------
# 5. Embed


@pytest.mark.parametrize("traced", [True, False])
def test_embed(traced):
    ids = jnp.array([[1, 4, 6], [0, 2, 4]], jnp.int32)
    _, lora, _, _ = linen_case(
        nn.Embed(7, 5),
        ids,
        "params/embedding",
        {"params/embedding": dict(ins=(0,), outs=(1,), kind="embed")},
        traced=traced,
    )
    w = lora["params"]["embedding"]
    # swapped init: the lookup side A (r, vocab) starts at zero, B (r, features) gaussian
    assert w.a.shape == (2, 7) and w.b.shape == (2, 5)
    assert np.all(np.asarray(w.a) == 0)
    assert np.all(np.asarray(w.b) != 0)


# ---------------------------------------------------------------------------------------
# 6. hand-written (out, in) kernel


def _transposed_fn(p, x):
    return x @ p["lin"]["w"].T + p["lin"]["b"][None, :]


def test_handwritten_out_in_traced():
    params = {"lin": {"w": f32(5, 3), "b": f32(5)}}
    x = f32(2, 3, seed=2)
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("lin/w", rank=2, alpha=3.0),),
        {"lin/w": dict(ins=(1,), outs=(0,))},
        apply_fn=_transposed_fn,
        args=(x,),
    )
    assert lora["lin"]["w"].a.shape == (2, 3)
    assert lora["lin"]["w"].b.shape == (2, 5)


def test_handwritten_out_in_untraced_uses_flax_default():
    """Without tracing the (out, in) storage is invisible: last axis out, the rest in."""
    params = {"lin": {"w": f32(5, 3), "b": f32(5)}}
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("lin/w", rank=2, alpha=3.0),),
        {"lin/w": dict(ins=(0,), outs=(1,))},
    )
    assert lora["lin"]["w"].a.shape == (2, 5)


# ---------------------------------------------------------------------------------------
# 7. nn.scan (and nn.scan over nn.remat)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        h = jnp.tanh(nn.Dense(5)(c))  # kernel (L, 4, 5)
        return c + nn.Dense(4)(h), None  # kernel (L, 5, 4)


class _Stack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_Block) if self.remat else _Block
        scan = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        y, _ = scan()(x, None)
        return y


@pytest.mark.parametrize("remat", [False, True])
def test_scan_stack_axes(remat):
    model, x = _Stack(remat=remat), f32(2, 4)
    params = model.init(KEY, x)
    paths = sorted(p for p in param_leaves(params) if p.endswith("kernel"))
    assert len(paths) == 2, paths
    prefix = paths[0].rsplit("/", 2)[0]
    assert prefix.startswith("params/Scan"), prefix
    _, lora, _, _ = linen_case(
        model,
        x,
        r".*/kernel",
        {p: dict(ins=(1,), outs=(2,), stack=(0,)) for p in paths},
        rank=3,
    )
    got = lora_leaves(lora)
    assert got[f"{prefix}/Dense_0/kernel"].a.shape == (3, 3, 4)
    assert got[f"{prefix}/Dense_0/kernel"].b.shape == (3, 3, 5)
    assert got[f"{prefix}/Dense_1/kernel"].a.shape == (3, 3, 5)
    assert got[f"{prefix}/Dense_1/kernel"].b.shape == (3, 3, 4)


# ---------------------------------------------------------------------------------------
# 8. Rule(axes=...) override


@pytest.mark.parametrize(
    "axes",
    [
        lj.Axes(in_axes=(1,), out_axes=(0,)),
        ((1,), (0,)),
        (1, 0),
        {"in": (1,), "out": (0,)},
        lj.Axes(in_axes=(-1,), out_axes=(-2,)),
    ],
    ids=["Axes", "tuple", "ints", "dict", "negative"],
)
def test_rule_axes_override_untraced(axes):
    params = {"lin": {"w": f32(5, 3), "b": f32(5)}}
    x = f32(2, 3, seed=2)
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("lin/w", rank=2, alpha=3.0, axes=axes),),
        {"lin/w": dict(ins=(1,), outs=(0,))},
        apply_fn=_transposed_fn,
        args=(x,),
        traced=False,
    )
    assert lora["lin"]["w"].a.shape == (2, 3)


def test_rule_axes_override_beats_tracing():
    """An explicit axes= wins over what tracing finds (here: deliberately the transpose)."""
    params = {"lin": {"w": f32(5, 3), "b": f32(5)}}
    x = f32(2, 3, seed=2)
    check_split(
        params,
        (lj.Rule("lin/w", rank=2, alpha=3.0, axes=((0,), (1,))),),
        {"lin/w": dict(ins=(0,), outs=(1,))},
        apply_fn=_transposed_fn,
        args=(x,),
    )


def test_rule_axes_override_with_stack_on_scan_untraced():
    model, x = _Stack(), f32(2, 4)
    params = model.init(KEY, x)
    paths = sorted(p for p in param_leaves(params) if p.endswith("kernel"))
    check_split(
        params,
        (lj.Rule(r".*/kernel", rank=2, alpha=3.0, axes={"in": 1, "out": 2, "stack": 0}),),
        {p: dict(ins=(1,), outs=(2,), stack=(0,)) for p in paths},
        apply_fn=model.apply,
        args=(x,),
        traced=False,
    )


def test_rule_axes_dict_with_bare_ints():
    """Regression: the dict form takes bare ints like the tuple and Axes forms."""
    for axes in ({"in": 1, "out": 0}, {"in_axes": 1, "out_axes": 0}, (1, 0), lj.Axes(1, 0)):
        assert lj.Rule("lin/w", rank=2, axes=axes).axes == lj.Axes((1,), (0,), ()), axes


def test_rule_axes_override_conv_multi_in_unsorted():
    """A multi-axis in group given out of order keeps that order in A's layout."""
    model, x = nn.Conv(5, (3,)), f32(2, 7, 2)
    params = model.init(KEY, x)
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("params/kernel", rank=2, alpha=3.0, axes=((1, 0), (2,))),),
        {"params/kernel": dict(ins=(1, 0), outs=(2,))},
    )
    assert lora["params"]["kernel"].a.shape == (2, 2, 3)


# ---------------------------------------------------------------------------------------
# 9. NNX


class _NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)  # (3, 4)
        self.lg = nnx.LinearGeneral(4, (2, 5), rngs=rngs)  # (4, 2, 5)
        self.ein = nnx.Einsum("bhd,hde->bhe", (2, 5, 6), rngs=rngs)  # (2, 5, 6), h batched
        self.conv = nnx.Conv(2, 3, kernel_size=(4,), rngs=rngs)  # (4, 2, 3)
        self.emb = nnx.Embed(7, 3, rngs=rngs)  # (7, 3)

    def __call__(self, x, ids, s):
        h = self.lin(x + self.emb(ids))  # (b, 4)
        h = self.lg(h)  # (b, 2, 5)
        h = self.ein(h)  # (b, 2, 6)
        c = self.conv(s)  # (b, L, 3)
        return h, c


NNX_EXPECTED = {
    "lin/kernel": dict(ins=(0,), outs=(1,)),
    "lg/kernel": dict(ins=(0,), outs=(1, 2)),
    "ein/kernel": dict(ins=(1,), outs=(2,), stack=(0,)),
    "conv/kernel": dict(ins=(0, 1), outs=(2,), kind="conv"),
    "emb/embedding": dict(ins=(0,), outs=(1,), kind="embed"),
}


def test_nnx_modules():
    model = _NnxModel(nnx.Rngs(0))
    x, ids, s = f32(2, 3), jnp.array([1, 6], jnp.int32), f32(2, 5, 2, seed=3)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(kernel|embedding)", rank=2, alpha=3.0),))
    graphdef, base, lora = lj.nnx.split(model, cfg, KEY, args=(x, ids, s))

    # leaves are nnx Variables holding a LoraWeight (or None for non-targets)
    assert lora["lin"]["bias"].get_value() is None
    got = {p: lora[p.split("/")[0]][p.split("/")[1]].get_value() for p in NNX_EXPECTED}
    assert set(lora_leaves(lora)) == set(NNX_EXPECTED)
    flat = param_leaves(base)
    assert np.all(np.asarray(got["emb/embedding"].a) == 0)
    assert np.all(np.asarray(got["lin/kernel"].b) == 0)

    lora_r = randomize(lora, seed=5)
    got_r = lora_leaves(lora_r)
    refs = {}
    for path, exp in NNX_EXPECTED.items():
        exp = {"stack": (), "kind": "linear", **exp}
        W = flat[path]
        assert_weight(got[path], shape=W.shape, rank=2, alpha=3.0, **exp)
        w = got_r[path]
        refs[path] = ref_merged(W, w.a, w.b, exp["ins"], exp["outs"], exp["stack"], 1.5)
    ref_state = replace_leaves(base, refs)

    chex.assert_trees_all_close(
        param_leaves(lj.merge(base, lora_r)), param_leaves(ref_state), rtol=RTOL, atol=1e-6
    )
    y = lj.nnx.call(graphdef, base, lora_r, x, ids, s)
    y_ref = nnx.merge(graphdef, ref_state)(x, ids, s)
    chex.assert_trees_all_close(y, y_ref, rtol=RTOL, atol=ATOL)
    y_merge = lj.nnx.call(graphdef, base, lora_r, x, ids, s, strategy="merge")
    chex.assert_trees_all_close(y_merge, y_ref, rtol=RTOL, atol=ATOL)
    # the adapters change the output (the comparison is not vacuous)
    y_base = nnx.merge(graphdef, base)(x, ids, s)
    assert not np.allclose(np.asarray(y[0]), np.asarray(y_base[0]), atol=1e-3)
    assert not np.allclose(np.asarray(y[1]), np.asarray(y_base[1]), atol=1e-3)


# ---------------------------------------------------------------------------------------
# 10. higher-order primitives: jit, checkpoint, cond, while, scan


def _w(p):
    return p["w"]


def _hop_jit(p, x):
    return jax.jit(lambda w, x: x @ w.T)(_w(p), x)


def _hop_jit_closure(p, x):
    return jax.jit(lambda x: jnp.tanh(x @ _w(p).T))(x)


def _hop_checkpoint(p, x):
    return jax.checkpoint(lambda w, x: jnp.sin(x @ w.T))(_w(p), x)


def _hop_cond(p, x):
    return lax.cond(
        jnp.sum(x) > 0,
        lambda x: x @ _w(p).T,
        lambda x: jnp.tanh(x @ _w(p).T),
        x,
    )


def _hop_while(p, x):
    def body(c):
        i, acc = c
        return i + 1, acc + jnp.tanh(x @ _w(p).T + acc)

    return lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros((x.shape[0], 5), x.dtype)))[1]


def _hop_scan_const(p, x):
    def body(acc, xt):
        return acc + jnp.tanh(xt @ _w(p).T), None

    return lax.scan(body, jnp.zeros((x.shape[0], 5), x.dtype), jnp.stack([x, 2 * x]))[0]


def _hop_nested(p, x):
    inner = jax.checkpoint(lambda w, x: lax.cond(jnp.sum(x) > 0, lambda: x @ w.T, lambda: -(x @ w.T)))
    return jax.jit(inner)(_w(p), x)


def _hop_einsum(p, x):
    return jnp.einsum("bi,oi->bo", x, _w(p))


_HOPS = [
    _hop_jit,
    _hop_jit_closure,
    _hop_checkpoint,
    _hop_cond,
    _hop_while,
    _hop_scan_const,
    _hop_nested,
    _hop_einsum,
]


@pytest.mark.parametrize(
    "fn,sign",
    [(f, 1.0) for f in _HOPS] + [(_hop_cond, -1.0), (_hop_nested, -1.0)],  # both branches
    ids=[f.__name__ for f in _HOPS] + ["_hop_cond-neg", "_hop_nested-neg"],
)
def test_higher_order_primitives(fn, sign):
    params = {"w": f32(5, 3)}  # stored (out, in)
    x = sign * jnp.abs(f32(2, 3, seed=2))  # both cond branches get exercised
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("w", rank=2, alpha=3.0),),
        {"w": dict(ins=(1,), outs=(0,))},
        apply_fn=fn,
        args=(x,),
    )
    assert lora["w"].a.shape == (2, 3)


def test_scan_sliced_weight_hand_written():
    """A weight stacked along a lax.scan xs axis (not nn.scan) gets that axis as stack."""
    params = {"w": f32(3, 5, 4)}  # (L, out, in)

    def f(p, x):
        def body(c, w):
            return jnp.tanh(c @ w.T) @ jnp.ones((5, 4), c.dtype), None

        return lax.scan(body, x, p["w"])[0]

    x = f32(2, 4, seed=2)
    _, lora, _, _ = check_split(
        params,
        (lj.Rule("w", rank=2, alpha=3.0),),
        {"w": dict(ins=(2,), outs=(1,), stack=(0,))},
        apply_fn=f,
        args=(x,),
    )
    assert lora["w"].a.shape == (3, 2, 4)
    assert lora["w"].b.shape == (3, 2, 5)


# ---------------------------------------------------------------------------------------
# 11. no matmul consumes the target


def test_elementwise_only_raises():
    params = {"layer": {"w": f32(2, 3), "k": f32(3, 4)}}
    cfg = lj.LoraConfig(rules=(lj.Rule("layer/w", rank=1),))

    def f(p, x):
        return (x * p["layer"]["w"]) @ p["layer"]["k"]

    with pytest.raises(ValueError, match=r"layer/w.*no dot_general") as err:
        lj.split(KEY, params, cfg, apply_fn=f, args=(f32(2, 3),))
    assert "mul" in str(err.value)
    # untraced, the same rule is accepted with the default axes
    _, lora = lj.split(KEY, params, cfg)
    assert (lora["layer"]["w"].in_axes, lora["layer"]["w"].out_axes) == ((0,), (1,))


def test_unused_target_raises():
    params = {"layer": {"w": f32(2, 3), "k": f32(3, 4)}}
    cfg = lj.LoraConfig(rules=(lj.Rule("layer/w", rank=1),))
    with pytest.raises(ValueError, match=r"layer/w.*no dot_general.*never uses it"):
        lj.split(KEY, params, cfg, apply_fn=lambda p, x: x @ p["layer"]["k"], args=(f32(2, 3),))


# ---------------------------------------------------------------------------------------
# property: traced inference always puts A over the input dimension


_FORMS = {
    # name: (stored (out, in)?, fn)
    "x@w": (False, lambda p, x: x @ p["w"]),
    "x@w.T": (True, lambda p, x: x @ p["w"].T),
    "einsum_io": (False, lambda p, x: jnp.einsum("bi,io->bo", x, p["w"])),
    "einsum_oi": (True, lambda p, x: jnp.einsum("bi,oi->bo", x, p["w"])),
    "w@x.T": (True, lambda p, x: (p["w"] @ x.T).T),
    "dot_general_oi": (
        True,
        lambda p, x: lax.dot_general(x, p["w"], (((1,), (1,)), ((), ()))),
    ),
}


@settings(max_examples=20, deadline=None, database=None)
@given(
    in_dim=st.integers(2, 6),
    out_dim=st.integers(2, 6),
    form=st.sampled_from(sorted(_FORMS)),
    data=st.data(),
)
def test_property_a_spans_input(in_dim, out_dim, form, data):
    rank = data.draw(st.integers(1, min(in_dim, out_dim)), label="rank")
    transposed, fn = _FORMS[form]
    shape = (out_dim, in_dim) if transposed else (in_dim, out_dim)
    ins, outs = ((1,), (0,)) if transposed else ((0,), (1,))
    params = {"w": f32(*shape, seed=in_dim * 10 + out_dim)}
    x = jax.ShapeDtypeStruct((2, in_dim), jnp.float32)  # abstract args suffice to trace
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, alpha=2.0),))
    _, lora = lj.split(KEY, params, cfg, apply_fn=fn, args=(x,))
    assert_weight(lora["w"], shape=shape, ins=ins, outs=outs, rank=rank, alpha=2.0)
    assert lora["w"].a.shape == (rank, in_dim)
    assert lora["w"].b.shape == (rank, out_dim)
    # untraced: the Flax default, right only for (in, out) storage
    _, plain = lj.split(KEY, params, cfg)
    assert plain["w"].a.shape == (rank, shape[0])
