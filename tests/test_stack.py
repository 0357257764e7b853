"""Many adapters on one base: lj.stack / lj.swap / lj.unstack, and lj.wrap with adapter_ids
(example i uses adapter ids[i], -1 the base alone), against running each example alone with
its own adapter, in values and in gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from reference import randomize

B = 5
IDS = jnp.array([1, -1, 0, 2, 1], jnp.int32)


class Block(nn.Module):
    """A small attention block: attention (q, k, v, out projections) then an MLP."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x, x)
        return x + nn.Dense(16, name="down")(nn.gelu(nn.Dense(24, name="up")(x)))


def _mlp():
    model = nn.Sequential([nn.Dense(24), nn.relu, nn.Dense(6)])
    x = jax.random.normal(jax.random.key(0), (B, 12))
    return model, x, r"params/layers_\d/kernel", r"params/layers_0/kernel"


def _block():
    model = Block()
    x = jax.random.normal(jax.random.key(0), (B, 3, 16))
    return model, x, r"params/(attn/\w+|up|down)/kernel", r"params/attn/(query|value)/kernel"


@functools.cache
def _setup(setup):
    model, x, everywhere, some = setup()
    return (model, x, everywhere, some, *_adapters(model, x, everywhere, some))


def _adapters(model, x, everywhere, some):
    """Three adapters of one base: rank 2 (lora), rank 4 (rsLoRA, another alpha), and a
    rank-3 one on some targets only; random nonzero factors."""
    params = jax.jit(model.init)(jax.random.key(1), x)
    split = lambda k, pattern, rank, alpha, scaling: lj.split(
        jax.random.key(k), params, lj.LoraConfig(rules=(lj.Rule(pattern, rank=rank, alpha=alpha),), scaling=scaling),
        apply_fn=model.apply, args=(x,))
    base, l0 = split(2, everywhere, 2, 4.0, "lora")
    _, l1 = split(3, everywhere, 4, 3.0, "rslora")
    _, l2 = split(4, some, 3, 0.5, "lora")
    return base, [randomize(l0, 0), randomize(l1, 1), randomize(l2, 2)]


def _same_tree(got, want):
    """``got`` (from unstack) holds ``want``'s adapters: every number and factor exact; the
    factors in the stack's dtype; the scaling name as read back from the numbers."""
    g, gd = jax.tree.flatten(got, is_leaf=lj.is_lora)
    w, wd = jax.tree.flatten(want, is_leaf=lj.is_lora)
    assert gd == wd
    for x, y in zip(g, w):
        if y is None:
            assert x is None
            continue
        fields = ("shape", "dtype", "in_axes", "out_axes", "stack_axes", "rank", "alpha", "scale", "dropout", "kind")
        assert {f: getattr(x, f) for f in fields} == {f: getattr(y, f) for f in fields}
        assert x.scaling == (y.scaling if y.rank > 1 else "lora") and x.rule == ""
        for f in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(getattr(x, f), np.float32), np.asarray(getattr(y, f), np.float32))


def test_stack_unstack_round_trip_is_exact():
    model, x, everywhere, some, base, loras = _setup(_block)
    loras = list(loras)
    loras[2] = jax.tree.map(lambda w: w if w is None else w.replace(a=w.a.astype(jnp.bfloat16), dropout=0.1),
                            loras[2], is_leaf=lj.is_lora)
    stacked = lj.stack(loras)
    q = stacked["params"]["attn"]["query"]["kernel"]
    k = stacked["params"]["attn"]["key"]["kernel"]
    assert q.ranks == (2, 4, 3) and k.ranks == (2, 4, 0) and q.r_max == 4
    assert q.a.shape == (3, 4, 16) and q.b.shape == (3, 4, 2, 4)   # (n, r_max, in) / (n, r_max, heads, head_dim)
    assert q.a.dtype == jnp.float32                                   # the common dtype
    np.testing.assert_array_equal(q.a[0, 2:], 0)                     # padding is zeros
    np.testing.assert_array_equal(k.a[2], 0)                         # a target adapter 2 lacks
    assert k.scale.tolist() == [2.0, 3.0 / 2.0, 0.0] and k.alpha.tolist() == [4.0, 3.0, 0.0]
    assert q.dropout.tolist() == [0.0, 0.0, 0.1]
    for got, want in zip(lj.unstack(stacked), loras):
        _same_tree(got, want)
    # through jit: the numbers come back rounded to float32, the structure unchanged
    back = lj.unstack(jax.jit(lambda s: s)(stacked))
    assert [t["params"]["attn"]["query"]["kernel"].rank for t in back] == [2, 4, 3]
    assert back[1]["params"]["attn"]["key"]["kernel"].scaling == "rslora"


def test_stacking_adapters_of_different_bases_names_the_path():
    params = {"w": jnp.ones((4, 6))}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),))
    _, la = lj.split(jax.random.key(0), params, cfg)
    _, lb = lj.split(jax.random.key(0), {"w": jnp.ones((4, 5))}, cfg)
    with pytest.raises(ValueError, match=r"w: the adapters are for different weights.*\(4, 6\).*\(4, 5\).*stack only"):
        lj.stack([la, lb])
    with pytest.raises(ValueError, match="empty"):
        lj.stack([])
    with pytest.raises(TypeError, match="already stacked"):
        lj.stack([lj.stack([la]), la])


def _own_grads(grads, stacked):
    """The stacked gradient tree with the stack's ranks, so unstack cuts each adapter's own."""
    keep = lambda g, s: g if g is None else g.replace(rank=s.rank, scale=s.scale, alpha=s.alpha, dropout=s.dropout)
    return lj.unstack(jax.tree.map(keep, grads, stacked, is_leaf=lj.stacked.is_stacked_node))


def check_per_example(f, base, loras, args, ids, *, example_axes=0, axis=0, grads=True, tol=1e-5):
    """wrap(f) with adapter_ids equals each example run alone with its own adapter (and the
    base alone for -1), in the outputs and, with ``grads``, in each adapter's gradient,
    which must equal the gradient of its own examples' loss."""
    stacked, g = lj.stack(loras), lj.wrap(f)
    ids = np.asarray(ids)
    take = lambda a, rows: jnp.take(a, jnp.asarray(rows), axis=axis)
    plain = lj.dequantize(base)   # f's own view of a quantized base
    target = jax.random.normal(jax.random.key(9), jax.eval_shape(lambda: f(plain, *args)).shape)

    def loss(lora, target, *args, adapter_ids=None):
        kw = {} if adapter_ids is None else dict(adapter_ids=adapter_ids, example_axes=example_axes)
        y = g(base, lora, *args, **kw)
        return jnp.sum((y.astype(jnp.float32) - target) ** 2), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, ys), full = run(stacked, target, *args, adapter_ids=jnp.asarray(ids, jnp.int32))
    own = _own_grads(full, stacked) if grads else None
    alone, plain_f = jax.jit(g), jax.jit(f)
    for i, k in enumerate(ids):
        one = [take(a, [i]) for a in args]
        want = plain_f(plain, *one) if k < 0 else alone(base, loras[k], *one)
        np.testing.assert_allclose(take(ys, [i]), want, rtol=tol, atol=tol, err_msg=f"example {i}")
    if not grads:
        return
    for k, lora in enumerate(loras):
        rows = np.flatnonzero(ids == k)
        (_, _), want = run(lora, take(target, rows), *[take(a, rows) for a in args])
        for (path, got), (_, w) in zip(lj.targets(own[k]), lj.targets(want), strict=True):
            np.testing.assert_allclose(got.a, w.a, rtol=10 * tol, atol=10 * tol, err_msg=path)
            np.testing.assert_allclose(got.b, w.b, rtol=10 * tol, atol=10 * tol, err_msg=path)
    for w, s in zip(jax.tree.leaves(full, is_leaf=lj.stacked.is_stacked_node),
                    jax.tree.leaves(stacked, is_leaf=lj.stacked.is_stacked_node)):
        if w is None:
            continue
        for field in ("scale", "alpha", "rank", "dropout"):
            np.testing.assert_array_equal(getattr(w, field), 0)
        r = len(w.stack_axes)
        for k, rank in enumerate(s.ranks):   # no gradient on the padding
            np.testing.assert_array_equal(jax.lax.slice_in_dim(w.a[k], rank, None, axis=r), 0)
            np.testing.assert_array_equal(jax.lax.slice_in_dim(w.b[k], rank, None, axis=r), 0)


@pytest.mark.parametrize("setup", [_mlp, _block])
def test_each_example_gets_its_own_adapter_in_values_and_grads(setup):
    model, x, everywhere, some, base, loras = _setup(setup)
    check_per_example(model.apply, base, loras, (x,), IDS)


def _split_random(params, rules, f, args, seeds, scalings=None):
    out = []
    for i, (k, rank) in enumerate(seeds):
        cfg = lj.LoraConfig(rules=tuple(lj.Rule(p, rank=rank, alpha=2.0 + k) for p in rules),
                            scaling=(scalings or ["lora"] * len(seeds))[i])
        out.append(randomize(lj.split(jax.random.key(k), params, cfg, apply_fn=f, args=args)[1], k))
    return out


def test_convs_embeddings_and_reshaped_weights_follow_per_example_adapters():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens, image):
            e = nn.Embed(11, 8, name="embed")(tokens)                       # (B, T, 8)
            c = nn.Conv(8, (3, 3), name="conv")(image).mean(axis=(1, 2))    # (B, 8)
            w = self.param("fused", nn.initializers.normal(0.3), (8, 3 * 8))
            q, k, v = jnp.split(e @ w.reshape(8, 3, 8).reshape(8, 24), 3, axis=-1)   # a fused, reshaped weight
            att = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2), axis=-1) @ v
            return att.sum(1) + c

    model = Net()
    tokens = jax.random.randint(jax.random.key(0), (4, 5), 0, 11)
    image = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
    params = model.init(jax.random.key(2), tokens, image)
    rules = (r".*/embedding", r".*/conv/kernel", r".*/fused")
    loras = _split_random(params, rules, model.apply, (tokens, image), [(3, 2), (4, 3)], ["lora", "rslora"])
    check_per_example(model.apply, params, loras, (tokens, image), [1, 0, -1, 1])  # (a MaterializeWarning would fail)


def test_a_layer_stack_under_scan_and_remat():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.3}   # 3 layers, scanned
    body = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
    f = lambda p, x: jax.lax.scan(body, x, p["w"])[0]
    x = jax.random.normal(jax.random.key(1), (4, 2, 6))
    loras = _split_random(params, ("w",), f, (x,), [(1, 2), (2, 3)])
    assert loras[0]["w"].stack_axes == (0,)
    check_per_example(f, params, loras, (x,), [1, 0, -1, 1])


def test_nnx_module_per_example():
    from flax import nnx

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(6, 10, rngs=rngs)
            self.down = nnx.Linear(10, 3, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.gelu(self.up(x)))

    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
    f = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    loras = _split_random(state, (r".*/kernel",), f, (x,), [(1, 2), (2, 3)])
    check_per_example(f, state, loras, (x,), [1, 1, 0])


def test_hugging_face_flax_model_per_example():
    from test_transform_families import hf_model

    f, params = hf_model("gpt2")
    tokens = jax.random.randint(jax.random.key(0), (3, 8), 0, 64)
    loras = _split_random(params, (r".*/(c_attn|c_fc)/kernel",), f, (tokens,), [(1, 2), (2, 4)])
    check_per_example(f, params, loras, (tokens,), [1, -1, 0], tol=2e-5)


def test_examples_along_another_axis_and_shared_arguments():
    f = lambda p, x, bias: jnp.tanh(x @ p["w"]) + bias[None, None]   # x: (T, B, d) time-major, bias shared
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    bias = jnp.arange(5.0)
    loras = _split_random(params, ("w",), None, (), [(1, 2), (2, 3)])
    stacked, ids = lj.stack(loras), jnp.array([1, 0, -1, 1])
    y = lj.wrap(f)(params, stacked, x, bias, adapter_ids=ids, example_axes=(1, None))
    assert y.shape == (2, 4, 5)
    for i, k in enumerate(np.asarray(ids)):
        want = f(params, x[:, i:i + 1], bias) if k < 0 else lj.wrap(f)(params, loras[k], x[:, i:i + 1], bias)
        np.testing.assert_allclose(y[:, i:i + 1], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"example_axes gives 1 for the argument args\[1\] of shape \(5,\).*None for"):
        lj.wrap(f)(params, stacked, x, bias, adapter_ids=ids, example_axes=1)
    with pytest.raises(ValueError, match=r"args\[0\] has shape \(2, 4, 6\).*4 examples.*\(axis 0\); pass example_axes="):
        lj.wrap(f)(params, stacked, x, bias, adapter_ids=ids)
    with pytest.raises(ValueError, match="example_axes has 1 entries but there are 2"):
        lj.wrap(f)(params, stacked, x, bias, adapter_ids=ids, example_axes=(1,))


def test_quantized_base_per_example():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 16)), "v": jax.random.normal(jax.random.key(1), (16, 8))}
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    qbase = lj.quantize(params, "nf4", pattern="w|v")
    x = 0.05 * jax.random.normal(jax.random.key(2), (3, 64))   # tanh far from saturation
    loras = _split_random(qbase, ("w|v",), f, (x,), [(1, 2), (2, 4)])
    check_per_example(f, qbase, loras, (x,), [1, 0, -1])
    # each weight is dequantized once for the batch, not once per example (forward and backward)
    stacked, ids = lj.stack(loras), jnp.array([1, 0, -1])
    loss = lambda s, x: jnp.sum(lj.wrap(f)(qbase, s, x, adapter_ids=ids))
    sizes = _value_sizes(jax.make_jaxpr(jax.grad(loss))(stacked, x).jaxpr)
    assert max(sizes) < 2 * 64 * 16, sorted(sizes)[-3:]


def _value_sizes(jaxpr):
    from jax.extend.core import jaxprs_in_params

    out = []
    for eqn in jaxpr.eqns:
        out += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in jaxprs_in_params(eqn.params):
            out += _value_sizes(sub)
    return out


def test_dropout_per_example_masks_and_rates():
    params = {"w": jnp.eye(6)}
    f = lambda p, x: x @ p["w"]
    loras = [jax.tree.map(lambda w: w.replace(dropout=0.5), l, is_leaf=lj.is_lora)
             for l in _split_random(params, ("w",), None, (), [(1, 2), (2, 2)])]
    x, ids = jnp.ones((8, 6)), jnp.array([0, 1] * 4)
    y = lj.wrap(f)(params, lj.stack(loras), x, adapter_ids=ids, lora_rng=jax.random.key(3))
    plain = lj.wrap(f)(params, lj.stack(loras), x, adapter_ids=ids)
    assert not np.allclose(y, plain)                                  # dropout applied
    assert len({tuple(np.round(r, 5)) for r in np.asarray(y[ids == 0])}) > 1   # each example its own mask
    mixed = [loras[0], jax.tree.map(lambda w: w.replace(dropout=0.1), loras[1], is_leaf=lj.is_lora)]
    with pytest.raises(ValueError, match=r"w: the stacked adapters have different dropout rates \[0.1, 0.5\]"):
        lj.wrap(f)(params, lj.stack(mixed), x, adapter_ids=ids, lora_rng=jax.random.key(3))


def test_swapping_adapters_or_ids_never_retraces():
    model, x, everywhere, some, base, loras = _setup(_mlp)
    traces = []

    def f(params, x):
        traces.append(1)
        return model.apply(params, x)

    g = lj.wrap(f)

    @jax.jit
    def step(s, ids):
        traces.append(2)
        return g(base, s, x, adapter_ids=ids)

    stacked = lj.stack(loras)
    y0 = step(stacked, IDS)
    n = len(traces)
    # another rank (3 < r_max 4), alpha and scaling rule, and a subset of the targets
    _, other = lj.split(jax.random.key(7), base, lj.LoraConfig(rules=(lj.Rule(some, rank=3, alpha=11.0),),
                                                               scaling="rslora"), apply_fn=model.apply, args=(x,))
    other = randomize(other, 5)
    swapped = lj.swap(stacked, 1, other)
    y1 = step(swapped, IDS[::-1])
    assert len(traces) == n                       # neither the jitted step nor f traced again
    rows = np.flatnonzero(np.asarray(IDS[::-1]) == 1)
    np.testing.assert_allclose(y1[rows], g(base, other, x[rows]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y0, y1)
    back = lj.unstack(swapped)
    _same_tree(back[1], other)
    _same_tree(back[0], loras[0])
    with pytest.raises(ValueError, match=r"rank 5 exceeds the stack's padded rank 4"):
        _, big = lj.split(jax.random.key(8), base, lj.LoraConfig(rules=(lj.Rule(everywhere, rank=5),)),
                          apply_fn=model.apply, args=(x,))
        lj.swap(stacked, 0, big)
    with pytest.raises(ValueError, match="k=3 is not an adapter slot"):
        lj.swap(stacked, 3, other)


def test_bad_adapter_ids_and_arguments_are_clear_errors():
    model, x, everywhere, some, base, loras = _setup(_mlp)
    stacked, g = lj.stack(loras), lj.wrap(model.apply)
    with pytest.raises(ValueError, match="pass adapter_ids=ids"):
        g(base, stacked, x)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 3 out of range for 3 stacked adapters"):
        g(base, stacked, x, adapter_ids=jnp.array([0, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match="-1 for the base alone"):
        g(base, stacked, x, adapter_ids=jnp.array([0, -2, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"1-D.*\(5, 1\)"):
        g(base, stacked, x, adapter_ids=IDS[:, None])
    with pytest.raises(TypeError, match="must be integers.*float32"):
        g(base, stacked, x, adapter_ids=IDS.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"args\[0\] has shape \(5, 12\).*4 examples"):
        g(base, stacked, x, adapter_ids=IDS[:4])
    with pytest.raises(ValueError, match="plain adapters"):
        g(base, loras[0], x, adapter_ids=IDS)
    with pytest.raises(ValueError, match="strategy='merge'"):
        lj.wrap(model.apply, strategy="merge")(base, stacked, x, adapter_ids=IDS)
    mean = lj.wrap(lambda p, x: jnp.mean(model.apply(p, x)))
    with pytest.raises(ValueError, match=r"output of f has shape \(\) for one example.*reduce after"):
        mean(base, stacked, x, adapter_ids=IDS)
    with pytest.raises(ValueError, match="adapter_ids is empty"):
        g(base, stacked, x, adapter_ids=[])
    shifted = lj.wrap(lambda p, x, bias: model.apply(p, x) + bias)
    with pytest.raises(ValueError, match=r"kwargs\['bias'\] has shape \(6,\).*keyword arguments run along axis 0"):
        shifted(base, stacked, x, bias=jnp.ones(6), adapter_ids=IDS)
    pairs = lj.wrap(lambda p, x: model.apply(p, x.reshape(-1, 2, x.shape[-1])[:, 0]))   # needs an even batch
    with pytest.raises(TypeError) as info:
        pairs(base, stacked, x, adapter_ids=IDS)
    assert any("runs f on each example alone" in n for n in getattr(info.value, "__notes__", []))


def test_a_shared_argument_does_not_trace_f_again_on_each_call():
    model, x, everywhere, some, base, loras = _setup(_mlp)
    traces = []

    def f(p, x, shift):
        traces.append(1)
        return model.apply(p, x) + shift

    g, stacked = lj.wrap(f), lj.stack(loras)
    for _ in range(3):
        g(base, stacked, x, jnp.float32(0.5), adapter_ids=IDS)
    assert len(traces) == 3   # one factored trace, and the shapes for one and two examples, once
