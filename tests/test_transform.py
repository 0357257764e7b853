"""The factored transform's own properties: no d_in×d_out intermediate, no per-adapter copy of
a stacked base, the materializing fallback, dropout, tracing once per signature, and a
property test over weight layouts against numpy."""

import math
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.transform import MaterializeWarning
from reference import np_delta_of


def _normal(seed, shape, dtype=jnp.float32):
    """Gaussian test data from numpy: jax.random would compile a sampler for every new shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _randomize_b(lora, key=3, scale=1.0):
    rng = np.random.default_rng(key)

    def f(w):
        if not lj.is_lora(w):
            return w
        return w.replace(b=jnp.asarray(scale * rng.standard_normal(w.b.shape), w.b.dtype))

    return jax.tree.map(f, lora, is_leaf=lj.is_lora)


def _materialized(run):
    """``run()``'s result and the messages of the MaterializeWarnings it raised."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = run()
    return out, [str(r.message) for r in rec if issubclass(r.category, MaterializeWarning)]


def _eqn_shapes(jaxpr):
    """Shapes of every value any equation produces, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for j in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    out += _eqn_shapes(j.jaxpr)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    out += _eqn_shapes(j)
    return out


D_IN, D_OUT, BATCH = 48, 80, 6


def _dense_setup():
    model = nn.Sequential([nn.Dense(D_OUT), nn.relu, nn.Dense(D_OUT)])
    x = _normal(0, (BATCH, D_IN))
    params = model.init(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/layers_0/kernel", rank=4),))
    base, lora = lj.split(jax.random.key(2), params, cfg, apply_fn=model.apply, args=(x,))
    return model, x, base, _randomize_b(lora)


@pytest.mark.parametrize("strategy", ["factored", "merge"])
def test_dense_factored_jaxpr_has_no_din_by_dout_intermediate(strategy):
    model, x, base, lora = _dense_setup()
    fwd = lj.wrap(model.apply, strategy)

    def loss(lora, x):
        return jnp.sum(fwd(base, lora, x) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lora, x).jaxpr
    big = [s for s in _eqn_shapes(jaxpr) if math.prod(s) >= D_IN * D_OUT]
    if strategy == "factored":
        assert big == [], f"factored path formed weight-sized values {big}"
    else:  # the reference does form W + s·A⊗B: the check above can fail
        assert (D_IN, D_OUT) in big


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D_IN, name="fc")(h)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(_Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="stack")(x, None)[0]


@pytest.mark.parametrize("strategy", ["factored", "merge"])
def test_scan_holds_no_copy_of_the_stacked_base(strategy):
    model = _Stack()
    x = _normal(0, (BATCH, D_IN))
    params = model.init(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/fc/kernel", rank=4),))
    base, lora = lj.split(jax.random.key(2), params, cfg, apply_fn=model.apply, args=(x,))
    assert lora["params"]["stack"]["fc"]["kernel"].stack_axes == (0,)
    lora = _randomize_b(lora, scale=0.1)
    fwd = lj.wrap(model.apply, strategy)
    jaxpr = jax.make_jaxpr(jax.grad(lambda l: jnp.sum(fwd(base, l, x) ** 2)))(lora).jaxpr
    weight_sized = [s for s in _eqn_shapes(jaxpr) if math.prod(s) >= D_IN * D_IN]
    if strategy == "factored":
        assert weight_sized == [], f"copies of the stacked base: {weight_sized}"
    else:
        assert (3, D_IN, D_IN) in weight_sized
    chex.assert_trees_all_close(
        lj.wrap(model.apply)(base, lora, x), lj.wrap(model.apply, "merge")(base, lora, x), rtol=1e-5, atol=1e-6
    )


def test_fallback_materializes_correctly_and_warns_exactly_once():
    def f(p, x):  # a weight norm: no factored rule for integer_pow / reduce_sum on a weight
        w = p["w"]
        return (x @ w) / jnp.sqrt(jnp.sum(w**2))

    params = {"w": _normal(0, (8, 5))}
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    lora = _randomize_b(lora)
    x = _normal(2, (3, 8))
    g = lj.wrap(f)
    (y1, y2, gr), msgs = _materialized(lambda: (
        g(base, lora, x), jax.jit(g)(base, lora, x * 2), jax.grad(lambda l: jnp.sum(g(base, l, x)))(lora)))
    assert len(msgs) == 1 and "integer_pow" in msgs[0] and "'w'" in msgs[0], msgs
    w = np.asarray(params["w"], np.float64) + np_delta_of(lora["w"])
    for xx, y in ((x, y1), (x * 2, y2)):
        ref = np.asarray(xx, np.float64) @ w / np.sqrt((w**2).sum())
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    gm = jax.grad(lambda l: jnp.sum(lj.wrap(f, "merge")(base, l, x)))(lora)
    chex.assert_trees_all_close(gr, gm, rtol=1e-5, atol=1e-6)


def test_fallback_warns_once_per_weight_and_primitive_naming_the_path():
    def f(p, x):  # both kernels reach sin; layer_0's twice (two uses, one warning)
        h = x @ jnp.sin(p["params"]["layer_0"]["mlp"]["kernel"])
        h = h + x @ jnp.sin(p["params"]["layer_0"]["mlp"]["kernel"]) * 0.5
        return h @ jnp.sin(p["params"]["layer_1"]["mlp"]["kernel"])

    params = {"params": {f"layer_{i}": {"mlp": {"kernel": _normal(i, (4, 4))}} for i in range(2)}}
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule(".*/kernel", rank=2),)))
    lora = _randomize_b(lora)
    x = _normal(2, (3, 4))
    g = lj.wrap(f)
    (y, _), msgs = _materialized(lambda: (g(base, lora, x), g(base, lora, x * 2)))  # the second: nothing new
    assert len(msgs) == 2, msgs
    for path, msg in zip(("params/layer_0/mlp/kernel", "params/layer_1/mlp/kernel"), msgs):
        assert f"{path!r} reaches 'sin'" in msg, msg
    np.testing.assert_allclose(y, lj.wrap(f, "merge")(base, lora, x), rtol=1e-5, atol=1e-6)


def test_reshape_that_mixes_input_and_output_axes_falls_back():
    def f(p, x):  # the whole kernel flattened: one dimension holds both roles
        return x @ p["w"].reshape(-1)[: x.shape[-1] * 2].reshape(x.shape[-1], 2)

    params = {"w": _normal(0, (4, 6))}
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    lora = _randomize_b(lora)
    x = jnp.ones((2, 4))
    with pytest.warns(MaterializeWarning, match="reshape"):
        y = lj.wrap(f)(base, lora, x)
    chex.assert_trees_all_close(y, lj.wrap(f, "merge")(base, lora, x), rtol=1e-6)


def _identity_adapter(n, dropout, scale=1.0):
    """W = 0, A = B = I (rank n): the adapter's output is s·dropout(x) exactly."""
    params = {"w": jnp.zeros((n, n))}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=n, alpha=scale * n, dropout=dropout),))
    base, lora = lj.split(jax.random.key(0), params, cfg)
    lora = {"w": lora["w"].replace(a=jnp.eye(n), b=jnp.eye(n))}
    return base, lora


def test_dropout_acts_on_the_adapter_input_only():
    n, rate = 16, 0.25
    base, lora = _identity_adapter(n, rate)
    base = {"w": jnp.full((n, n), 0.5)}
    x = jax.random.uniform(jax.random.key(1), (256, n), minval=1.0, maxval=2.0)
    g = lj.wrap(lambda p, x: x @ p["w"])
    plain = g(base, lora, x)
    np.testing.assert_allclose(plain, x @ base["w"] + x, rtol=1e-6)  # no key: no dropout
    y = g(base, lora, x, lora_rng=jax.random.key(7))
    adapter = np.asarray(y - x @ base["w"])  # base term untouched
    keep = 1 - rate
    dropped = np.isclose(adapter, 0.0, atol=1e-6)
    kept = np.isclose(adapter, np.asarray(x) / keep, rtol=1e-5)
    assert (dropped | kept).all(), "adapter input must be 0 or x/keep (inverted dropout)"
    assert abs(dropped.mean() - rate) < 0.03  # 4096 Bernoulli draws
    chex.assert_trees_all_close(y, g(base, lora, x, lora_rng=jax.random.key(7)))  # reproducible
    assert not np.allclose(y, g(base, lora, x, lora_rng=jax.random.key(8)))
    # gradients flow through the kept entries only: with B = I, dL/dA[r, i] = sum_n x_d[n, i]
    ga = jax.grad(lambda l: jnp.sum(g(base, l, x, lora_rng=jax.random.key(7))))(lora)["w"].a
    x_d = np.where(kept, np.asarray(x) / keep, 0.0)
    np.testing.assert_allclose(ga, np.broadcast_to(x_d.sum(0), (n, n)), rtol=1e-5)


def test_dropout_masks_differ_per_scan_step_and_per_use():
    n, rate, layers = 8, 0.5, 4
    params = {"w": jnp.zeros((layers, n, n))}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=n, alpha=float(n), dropout=rate,
                                       axes=lj.Axes(in_axes=(1,), out_axes=(2,), stack_axes=(0,))),))
    base, lora = lj.split(jax.random.key(0), params, cfg)
    eye = jnp.broadcast_to(jnp.eye(n), (layers, n, n))
    lora = {"w": lora["w"].replace(a=eye, b=eye)}

    def f(p, x):  # each step sees the same x; returns every step's output
        return jax.lax.scan(lambda c, w: (c, x @ w), 0.0, p["w"])[1]

    x = jnp.ones((32, n))
    ys = np.asarray(lj.wrap(f)(base, lora, x, lora_rng=jax.random.key(3)))
    masks = [ys[i] != 0 for i in range(layers)]
    assert all(set(np.unique(y)) <= {0.0, 2.0} for y in ys)
    assert len({m.tobytes() for m in masks}) == layers, "every layer needs its own mask"

    def twice(p, x):  # two uses of one weight: two masks
        return x @ p["w"][0], x @ p["w"][0]

    y1, y2 = lj.wrap(twice)(base, lora, x, lora_rng=jax.random.key(3))
    assert not np.array_equal(np.asarray(y1) != 0, np.asarray(y2) != 0)


def test_traces_once_per_signature():
    calls = []

    def f(p, x, flag=True):
        calls.append(x.shape)
        return x @ p["w"] if flag else -(x @ p["w"])

    params = {"w": jnp.ones((4, 3))}
    base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    g = lj.wrap(f)
    for _ in range(3):
        g(base, lora, jnp.ones((2, 4)))
    assert calls == [(2, 4)]
    g(base, lora, jnp.ones((5, 4)))
    g(base, lora, jnp.ones((2, 4)), flag=False)  # a static argument is part of the signature
    assert calls == [(2, 4), (5, 4), (2, 4)]
    step = jax.jit(lambda l, x: g(base, l, x))
    for k in range(3):
        step(lora, jnp.full((7, 4), float(k)))
    assert calls[3:] == [(7, 4)]


def test_split_hands_its_trace_to_the_first_call_of_wrap():
    calls = []

    def f(p, x):
        calls.append(x.shape)
        return x @ p["w"]

    params, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=1),))
    jax.clear_caches()
    base, lora = lj.split(jax.random.key(0), params, cfg, apply_fn=f, args=(x,))
    assert calls == [(2, 4)]
    y = jax.jit(lj.wrap(f))(base, lora, x)  # under jit, a new wrap: split's trace
    assert calls == [(2, 4)]
    np.testing.assert_allclose(y, x @ lj.merge(base, lora)["w"], rtol=1e-6)
    lj.wrap(f)(base, lora, x)  # another wrap of the same function, eagerly
    assert calls == [(2, 4)]
    lj.wrap(f)(base, lora, jnp.ones((5, 4)))  # a new signature traces
    assert calls == [(2, 4), (5, 4)]
    with jax.default_matmul_precision("highest"):  # so does a new trace configuration
        lj.wrap(f)(base, lora, x)
    assert calls == [(2, 4), (5, 4), (2, 4)]
    lj.wrap(lambda p, x: f(p, x))(base, lora, x)  # another function with the same code
    assert len(calls) == 4
    jax.clear_caches()  # drops the kept traces with JAX's own
    lj.wrap(f)(base, lora, x)
    assert len(calls) == 5
    # a quantized weight is traced as the float weight it stands for: quantize, split and
    # wrap of the quantized base read one trace
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 3)), jnp.float32)}
    x = jnp.ones((2, 64))
    del calls[:]
    qbase = lj.quantize(params, "int8", pattern="w", apply_fn=f, args=(x,))
    qbase, lora = lj.split(jax.random.key(0), qbase, cfg, apply_fn=f, args=(x,))
    y = jax.jit(lj.wrap(f))(qbase, lora, x)
    assert calls == [(2, 64)]
    np.testing.assert_allclose(y, x @ lj.merge(qbase, lora)["w"], rtol=1e-5)


def test_a_callable_without_a_hash_is_traced_once_per_signature():
    import dataclasses

    @dataclasses.dataclass  # eq=True and not frozen: no __hash__
    class Model:
        sign: float
        calls: list = dataclasses.field(default_factory=list)

        def __call__(self, p, x):
            self.calls.append(x.shape)
            return self.sign * (x @ p["w"])

    params, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
    base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    pos, neg = Model(1.0), Model(-1.0)
    assert pos == Model(1.0) and pos != neg
    g = lj.wrap(pos)
    for _ in range(3):
        y = g(base, lora, x)
    assert pos.calls == [(2, 4)]
    np.testing.assert_allclose(lj.wrap(neg)(base, lora, x), -y)  # another object: its own trace
    assert neg.calls == [(2, 4)]


def test_a_trace_closing_over_an_enclosing_trace_is_not_kept():
    params, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
    base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    box = {}

    def f(p, x):
        return x @ p["w"] * box["c"]

    g = lj.wrap(f)

    @jax.jit
    def outer(c):
        box["c"] = c  # f reads the enclosing trace's tracer
        return g(base, lora, x)

    np.testing.assert_allclose(outer(2.0), 2 * outer(1.0), rtol=1e-6)
    box["c"] = 3.0  # outside jit, a fresh trace sees the concrete value
    np.testing.assert_allclose(g(base, lora, x), 3 * outer(1.0), rtol=1e-6)


@st.composite
def _contractions(draw):
    roles = draw(st.lists(st.sampled_from(["batch", "contract", "left", "right"]), min_size=1, max_size=6))
    letters = "abcdefgh"[: len(roles)]
    sizes = [draw(st.integers(1, 3)) for _ in roles]
    lhs = [c for c, r in zip(letters, roles) if r in ("batch", "contract", "left")]
    rhs = [c for c, r in zip(letters, roles) if r in ("batch", "contract", "right")]
    out = [c for c, r in zip(letters, roles) if r in ("batch", "left", "right")]
    lhs, rhs, out = (draw(st.permutations(x)) for x in (lhs, rhs, out))
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}", dict(zip(letters, sizes))


@settings(max_examples=40, deadline=None)
@given(_contractions(), st.sampled_from([None, "float32"]))
def test_the_factored_products_emit_what_jnp_einsum_emits(contraction, pet):
    from lora_jax.transform import _einsum

    subscripts, size = contraction
    ins = subscripts.split("->")[0].split(",")
    a, b = (jnp.asarray(np.random.default_rng(k).standard_normal([size[c] for c in s]), jnp.float32)
            for k, s in enumerate(ins))
    ours = jax.make_jaxpr(lambda a, b: _einsum(subscripts, a, b, preferred_element_type=pet))(a, b)
    ref = jax.make_jaxpr(lambda a, b: jnp.einsum(subscripts, a, b, preferred_element_type=pet))(a, b)
    assert str(ours) == str(ref), subscripts
    np.testing.assert_array_equal(_einsum(subscripts, a, b), jnp.einsum(subscripts, a, b))


# -- property test: any layout of a weight's axes, used through einsum ---------------------
@st.composite
def _layouts(draw):
    ndim = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(2, 5), min_size=ndim, max_size=ndim))
    roles = draw(st.permutations(["i", "o"] + draw(st.lists(st.sampled_from("ios"), min_size=ndim - 2,
                                                                max_size=ndim - 2))))
    transposed = draw(st.booleans())  # contract the output axes instead (tied-embedding style)
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    rank = draw(st.integers(1, 3))
    return sizes, roles, transposed, dtype, rank


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(_layouts())
def test_factored_matches_numpy_for_any_axis_layout(layout):
    sizes, roles, transposed, dtype, rank = layout
    letters = "abcdefgh"
    ins = tuple(d for d, r in enumerate(roles) if r == "i")
    outs = tuple(d for d, r in enumerate(roles) if r == "o")
    stack = tuple(d for d, r in enumerate(roles) if r == "s")
    rank = min(rank, math.prod(sizes[d] for d in ins), math.prod(sizes[d] for d in outs))
    contracted = outs if transposed else ins
    w_sub = letters[: len(sizes)]
    x_sub = "z" + "".join(w_sub[d] for d in stack + contracted)
    y_sub = "z" + "".join(w_sub[d] for d in range(len(sizes)) if d not in contracted)
    spec = f"{x_sub},{w_sub}->{y_sub}"

    def f(p, x):
        return jnp.einsum(spec, x, p["w"], preferred_element_type=jnp.float32)

    rng = np.random.default_rng(sum(sizes) * 7 + rank)
    params = {"w": _normal(rng, sizes, dtype)}
    x = _normal(rng, (3, *(sizes[d] for d in stack + contracted)), dtype)
    axes = lj.Axes(in_axes=ins, out_axes=outs, stack_axes=stack)
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=rank, axes=axes),)))
    lora = _randomize_b(lora, scale=0.5)
    y = jax.jit(lj.wrap(f))(base, lora, x)
    w64 = np.asarray(params["w"], np.float64) + np_delta_of(lora["w"])
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref = np.einsum(spec, x64, w64)
    # fp32: accumulation error only. bf16: the factors and the product x·A are rounded to
    # bf16 (unit roundoff 2^-8) before the second product, so each term's error is bounded by
    # a small multiple of 2^-8 times the sum of magnitudes along the factored path:
    # |x|·|W| + s·(|x|·|A|)·|B|.
    w = lora["w"]
    abs_path = np_delta_of(w.replace(a=jnp.abs(w.a), b=jnp.abs(w.b), scale=abs(w.scale)))
    mag = np.einsum(spec, np.abs(x64), np.abs(np.asarray(params["w"], np.float64)) + abs_path)
    eps = 2.0**-8 if dtype == "bfloat16" else 2.0**-20
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 4 * eps * mag + 1e-6), spec


def test_adapters_on_one_input_read_it_once():
    """q, k and v read the same activation: one product x·[A_q; A_k; A_v] instead of three."""

    def f(p, x):
        return x @ p["q"], x @ p["k"], x @ p["v"], (x * 2) @ p["o"]

    params = {n: _normal(k, (16, 12)) for k, n in enumerate("qkvo")}
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("q|k|v|o", rank=2),)))
    lora = _randomize_b(lora)
    x = _normal(2, (5, 16))
    jaxpr = jax.make_jaxpr(lambda l: lj.wrap(f)(base, l, x))(lora).jaxpr
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    # 4 base products, x·A once for q, k, v (rank 6) and once for o, 4 products with B
    assert len(dots) == 10
    assert sorted(tuple(e.outvars[0].aval.shape) for e in dots).count((5, 6)) == 1
    chex.assert_trees_all_close(lj.wrap(f)(base, lora, x), lj.wrap(f, "merge")(base, lora, x), rtol=1e-5, atol=1e-5)
    gf = jax.grad(lambda l: sum(jnp.sum(jnp.sin(y)) for y in lj.wrap(f)(base, l, x)))(lora)
    gm = jax.grad(lambda l: sum(jnp.sum(jnp.sin(y)) for y in lj.wrap(f, "merge")(base, l, x)))(lora)
    chex.assert_trees_all_close(gf, gm, rtol=1e-4, atol=1e-4)  # grads of size ~10, fp32


def test_reused_wrapper_with_a_closure_over_an_enclosing_trace():
    """f closes over a value traced by an enclosing jit: that trace must not be cached."""
    base, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 3))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    scale = {}
    g = lj.wrap(lambda p, x: (x @ p["w"]) * scale["s"])

    @jax.jit
    def step(lora, x, s):
        scale["s"] = s
        return g(base, lora, x)

    x = jnp.ones((2, 4))
    np.testing.assert_allclose(step(lora, x, 2.0), 8.0)
    np.testing.assert_allclose(step(lora, x[:1], 3.0), 12.0)  # a new trace, a new closure
    # same shapes for g, but a new trace of step (another dtype of s): g must trace again
    np.testing.assert_allclose(step(lora, x, jnp.asarray(5.0, jnp.bfloat16)), 20.0)


W45 = jnp.arange(20.0).reshape(4, 5) / 10


def _w45():
    lw = lj.LoraWeight(a=jnp.ones((2, 4)), b=jnp.ones((2, 5)), shape=(4, 5), in_axes=(0,), out_axes=(1,),
                       rank=2, scale=0.5)
    return {"w": W45}, {"w": lw}


@pytest.mark.parametrize(
    "f, arg",
    [
        (lambda p, i: jnp.take(p["w"], i, axis=0, mode="fill", fill_value=1.0), jnp.array([9, 1])),
        (lambda p, i: jnp.take(p["w"], i, axis=1, mode="fill", fill_value=-2.0), jnp.array([0, 7])),
        (lambda p, x: x @ jax.lax.reduce_precision(p["w"], 2, 1), jnp.ones((1, 4))),
        (lambda p, x: x @ p["w"].astype(jnp.int32), jnp.ones((1, 4), jnp.int32)),
    ],
    ids=["take-fill-rows", "take-fill-cols", "reduce-precision", "cast-to-int"],
)
def test_fill_values_roundings_and_integer_casts_act_on_the_adapted_weight(f, arg):
    base, lora = _w45()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaterializeWarning)  # the last two materialize by design
        y = lj.wrap(f)(base, lora, arg)
    chex.assert_trees_all_close(y, lj.wrap(f, "merge")(base, lora, arg))


def test_non_array_leaves_in_params_are_static():
    base, lora = _w45()
    base, lora = {**base, "heads": 5}, {**lora, "heads": None}
    f = lambda p, x: (x @ p["w"]).reshape(p["heads"], -1)
    chex.assert_trees_all_close(lj.wrap(f)(base, lora, jnp.ones((1, 4))), lj.wrap(f, "merge")(base, lora, jnp.ones((1, 4))))


@pytest.mark.parametrize("stored", ["(E, in, out)", "(E, out, in)"])
def test_experts_picked_per_token_stay_factored(stored):
    """A mixture of experts picks each token's kernel with a gather over the stack axis:
    A and B are picked the same way, and no (E, in, out) weight is ever formed."""
    n_exp, d, o, t = 4, 6, 5, 7
    if stored == "(E, in, out)":
        f = lambda p, x, e: jnp.einsum("td,tdo->to", x, p["experts"][e])
        shape = (n_exp, d, o)
    else:
        f = lambda p, x, e: jnp.einsum("td,tod->to", x, jnp.take(p["experts"], e, axis=0))
        shape = (n_exp, o, d)
    params = {"experts": _normal(0, shape)}
    x = _normal(1, (t, d))
    e = jnp.array([0, 3, 1, 1, 2, 0, 3])
    cfg = lj.LoraConfig(rules=(lj.Rule("experts", rank=2),))
    base, lora = lj.split(jax.random.key(2), params, cfg, apply_fn=f, args=(x, e))
    assert lora["experts"].stack_axes == (0,)
    lora = _randomize_b(lora)
    chex.assert_trees_all_close(lj.wrap(f)(base, lora, x, e), lj.wrap(f, "merge")(base, lora, x, e),
                                rtol=1e-5, atol=1e-5)
    grads = {s: jax.grad(lambda l, x: jnp.sum(jnp.sin(lj.wrap(f, s)(base, l, x, e))), argnums=(0, 1))(lora, x)
             for s in ("factored", "merge")}
    chex.assert_trees_all_close(grads["factored"], grads["merge"], rtol=1e-4, atol=1e-4)
    for strategy in ("factored", "merge"):
        jaxpr = jax.make_jaxpr(lambda l: jax.grad(lambda l: jnp.sum(lj.wrap(f, strategy)(base, l, x, e)))(l))(lora)
        formed = shape in _eqn_shapes(jaxpr.jaxpr)
        assert formed == (strategy == "merge"), strategy


class _SparseMoE(nn.Module):
    """A Mixtral-style block: a router picks each token's top-2 of 4 experts (expert 3 is
    never picked: its router bias is very negative), the (token, expert) pairs are sorted by
    expert, and the SwiGLU experts run as ragged dots over the sorted rows."""

    d: int = 8
    ff: int = 12
    n_exp: int = 4

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        gate = self.param("gate", init, (self.n_exp, self.d, self.ff))
        up = self.param("up", init, (self.n_exp, self.d, self.ff))
        down = self.param("down", init, (self.n_exp, self.ff, self.d))
        bias = jnp.array([0.0] * (self.n_exp - 1) + [-1e4])
        weights, experts = jax.lax.top_k(nn.Dense(self.n_exp, name="router")(x) + bias[None, :], 2)
        weights = jax.nn.softmax(weights, axis=-1)
        order = jnp.argsort(experts.reshape(-1))  # (token, choice) pairs, sorted by expert
        rows = x[order // 2]
        sizes = jnp.bincount(experts.reshape(-1), length=self.n_exp).astype(jnp.int32)
        h = nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
        y = jax.lax.ragged_dot(h, down, sizes)
        y = jnp.zeros_like(y).at[order].set(y)  # back to (token, choice) order
        return jnp.einsum("tkd,tk->td", y.reshape(x.shape[0], 2, self.d), weights), sizes


@pytest.mark.slow
def test_ragged_dot_experts_stay_factored():
    model, x = _SparseMoE(), _normal(0, (6, 8))
    variables = model.init(jax.random.key(0), x)
    assert int(model.apply(variables, x)[1][3]) == 0  # an empty expert
    cfg = lj.LoraConfig(rules=(lj.Rule(".*/(gate|up|down|router/kernel)", rank=2),))
    base, lora = lj.split(jax.random.key(1), variables, cfg, apply_fn=model.apply, args=(x,))
    axes = {p: (w.stack_axes, w.in_axes, w.out_axes) for p, w in lj.targets(lora)}
    assert axes == {"params/gate": ((0,), (1,), (2,)), "params/up": ((0,), (1,), (2,)),
                    "params/down": ((0,), (1,), (2,)), "params/router/kernel": ((), (0,), (1,))}
    lora = _randomize_b(lora, scale=0.3)
    f = lambda v, x: model.apply(v, x)[0]  # noqa: E731
    loss = lambda strategy: lambda l, x: jnp.sum(jnp.sin(lj.wrap(f, strategy)(base, l, x)))  # noqa: E731
    (y, g, jaxpr), msgs = _materialized(lambda: (
        jax.jit(lj.wrap(f))(base, lora, x), jax.jit(jax.grad(loss("factored"), argnums=(0, 1)))(lora, x),
        jax.make_jaxpr(jax.grad(loss("factored")))(lora, x)))
    assert not msgs, msgs
    chex.assert_trees_all_close(y, jax.jit(lj.wrap(f, "merge"))(base, lora, x), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g, jax.jit(jax.grad(loss("merge"), argnums=(0, 1)))(lora, x), rtol=1e-4, atol=1e-5)
    shapes = _eqn_shapes(jaxpr.jaxpr)
    assert (4, 8, 12) not in shapes and (4, 12, 8) not in shapes  # no adapted expert weight is formed
    merged = _eqn_shapes(jax.make_jaxpr(jax.grad(loss("merge")))(lora, x).jaxpr)
    assert (4, 8, 12) in merged  # (the check can fail)
    # the empty expert's factors get no gradient; the others do
    for name in ("gate", "up", "down"):
        gb = np.asarray(g[0]["params"][name].b)
        assert np.all(gb[3] == 0) and np.all(np.abs(gb[:3]).sum(axis=(1, 2)) > 0), name


def test_ragged_dot_on_experts_stored_out_in():
    # (E, out, in) experts contracted on their last axis: A is laid over that axis
    dn = jax.lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))
    sizes = jnp.array([2, 0, 3], jnp.int32)
    f = lambda p, x: jax.lax.ragged_dot_general(x, p["e"], sizes, dn)  # noqa: E731
    params, x = {"e": _normal(0, (3, 8, 6))}, _normal(1, (5, 6))
    base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("e", rank=2),)),
                          apply_fn=f, args=(x,))
    assert (lora["e"].stack_axes, lora["e"].in_axes, lora["e"].out_axes) == ((0,), (2,), (1,))
    _assert_factored_equals_merge(f, base, _randomize_b(lora), x)


class _WeightNorm(nn.Module):
    """A Dense whose kernel is rescaled per output: ``v · g / ||v0||`` with the norms taken
    over the inputs of a separate frozen ``v0`` (the scale is constant along the inputs)."""

    features: int = 6

    @nn.compact
    def __call__(self, x):
        v = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        v0 = self.param("v0", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        g = self.param("g", nn.initializers.uniform(), (self.features,))
        return x @ (v * (g / jnp.linalg.norm(v0, axis=0))[None, :])


_RESCALED = {  # f, its target, the target's (in, out) axes
    # per output, the scale on either side of the product
    "v * c": (lambda p, x: x @ (p["w"] * p["c"][None, :]), "w", ((0,), (1,))),
    "c * v": (lambda p, x: x @ (p["c"][None, :] * p["w"]), "w", ((0,), (1,))),
    # divided per output; stored (out, in) as Hugging Face's GPT-2 does
    "v / c, (out, in)": (lambda p, x: x @ (p["wt"] / (1 + p["c"][:, None] ** 2)).T, "wt", ((1,), (0,))),
    # per input (constant along the outputs), then by a scalar
    "per input, scalar": (lambda p, x: x @ (p["w"] * p["r"][:, None] * 0.5), "w", ((0,), (1,))),
    # a stack of layers, one scale per (layer, output), scanned over
    "stacked": (lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x,
                                          p["ws"] * p["cs"][:, None, :])[0], "ws", ((1,), (2,))),
}


def _assert_factored_equals_merge(f, base, lora, x):
    (y, g), msgs = _materialized(lambda: (
        lj.wrap(f)(base, lora, x), jax.grad(lambda l: jnp.sum(jnp.sin(lj.wrap(f)(base, l, x))))(lora)))
    assert not msgs, msgs
    chex.assert_trees_all_close(y, lj.wrap(f, "merge")(base, lora, x), rtol=1e-5, atol=1e-5)
    gm = jax.grad(lambda l: jnp.sum(jnp.sin(lj.wrap(f, "merge")(base, l, x))))(lora)
    chex.assert_trees_all_close(g, gm, rtol=1e-4, atol=1e-5)
    return y


@pytest.mark.parametrize("name", list(_RESCALED))
def test_rescaled_kernels_stay_factored(name):
    f, target, axes = _RESCALED[name]
    params = {"w": _normal(0, (5, 5)), "wt": _normal(1, (5, 5)), "ws": _normal(2, (3, 5, 5)),
              "c": _normal(3, (5,)), "r": _normal(4, (5,)), "cs": _normal(5, (3, 5))}
    x = _normal(6, (4, 5))
    cfg = lj.LoraConfig(rules=(lj.Rule(target, rank=2),))
    base, lora = lj.split(jax.random.key(1), params, cfg, apply_fn=f, args=(x,))  # axes traced through the scale
    assert (lora[target].in_axes, lora[target].out_axes) == axes
    _assert_factored_equals_merge(f, base, _randomize_b(lora), x)


def test_weight_norm_module_stays_factored_and_matches_numpy():
    model, x = _WeightNorm(), _normal(0, (3, 5))
    variables = model.init(jax.random.key(0), x)
    base, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig(rules=(lj.Rule(".*/kernel", rank=2),)),
                          apply_fn=model.apply, args=(x,))
    lora = _randomize_b(lora)
    y = _assert_factored_equals_merge(model.apply, base, lora, x)
    p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
    w = (p["kernel"] + np_delta_of(lora["params"]["kernel"])) * (p["g"] / np.linalg.norm(p["v0"], axis=0))[None, :]
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_scales_that_vary_along_the_inputs_materialize():
    # a norm of the adapted kernel itself needs the whole adapted W (mul of W with W), and
    # an elementwise mask varies along inputs and outputs: both form W + s·A⊗B, correctly
    cases = {"norm of the kernel": lambda p, x: x @ (p["w"] / jnp.linalg.norm(p["w"], axis=0, keepdims=True)),
             "mask": lambda p, x: x @ (p["w"] * p["m"]),
             "c / v": lambda p, x: x @ (p["c"][None, :] / p["w"])}
    params = {"w": _normal(0, (5, 5)) + 3, "m": _normal(1, (5, 5)), "c": _normal(2, (5,))}
    x = _normal(3, (4, 5))
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    lora = _randomize_b(lora, scale=0.1)
    for name, f in cases.items():
        with pytest.warns(MaterializeWarning, match=r"'w' reaches '(mul|div)'"):
            y = lj.wrap(f)(base, lora, x)
        np.testing.assert_allclose(y, lj.wrap(f, "merge")(base, lora, x), rtol=1e-5, atol=1e-5, err_msg=name)
