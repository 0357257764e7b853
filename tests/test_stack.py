"""Many adapters on one base: lj.stack / lj.unstack, and lj.wrap with adapter_ids (example i
uses adapter ids[i], -1 the base alone), against running each example alone with its own
adapter, in values and in gradients."""

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
    g, gd = jax.tree.flatten(got, is_leaf=lj.is_lora)
    w, wd = jax.tree.flatten(want, is_leaf=lj.is_lora)
    assert gd == wd
    for x, y in zip(g, w):
        if y is None:
            assert x is None
            continue
        fields = ("shape", "dtype", "in_axes", "out_axes", "stack_axes", "rank", "alpha", "scale", "scaling",
                  "dropout", "kind", "rule")
        assert {f: getattr(x, f) for f in fields} == {f: getattr(y, f) for f in fields}
        for f in ("a", "b"):
            assert jnp.result_type(getattr(x, f)) == jnp.result_type(getattr(y, f))
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_stack_unstack_round_trip_is_exact():
    model, x, everywhere, some, base, loras = _setup(_block)
    loras = list(loras)
    loras[2] = jax.tree.map(lambda w: w if w is None else w.replace(a=w.a.astype(jnp.bfloat16)), loras[2],
                            is_leaf=lj.is_lora)
    stacked = lj.stack(loras)
    q = stacked["params"]["attn"]["query"]["kernel"]
    k = stacked["params"]["attn"]["key"]["kernel"]
    assert q.ranks == (2, 4, 3) and k.ranks == (2, 4, 0)
    assert q.a.shape == (3, 4, 16) and q.b.shape == (3, 4, 2, 4)   # (n, r_max, in) / (n, r_max, heads, head_dim)
    np.testing.assert_array_equal(q.a[0, 2:], 0)                     # padding is zeros
    np.testing.assert_array_equal(k.a[2], 0)                         # a target adapter 2 lacks
    assert k.scale.tolist() == [2.0, 3.0 / 2.0, 0.0] and k.alpha.tolist() == [4.0, 3.0, 0.0]
    for got, want in zip(lj.unstack(stacked), loras):
        _same_tree(got, want)


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


@pytest.mark.parametrize("setup", [_mlp, _block])
def test_each_example_gets_its_own_adapter_in_values_and_grads(setup):
    model, x, everywhere, some, base, loras = _setup(setup)
    stacked = lj.stack(loras)
    g = lj.wrap(model.apply)
    target = jax.random.normal(jax.random.key(9), model.apply(base, x).shape)

    def loss(lora, x, target, ids=None):  # the sum over examples of each example's loss, and the outputs
        y = g(base, lora, x) if ids is None else g(base, lora, x, adapter_ids=ids)
        return jnp.sum((y - target) ** 2), y

    (_, ys), full = jax.jit(jax.value_and_grad(loss, has_aux=True))(stacked, x, target, IDS)
    ids = np.asarray(IDS)
    np.testing.assert_allclose(ys[ids < 0], model.apply(base, x)[ids < 0], rtol=1e-6, atol=1e-6)  # the base alone
    grads = lj.unstack(full)
    for k, lora in enumerate(loras):
        rows = np.flatnonzero(ids == k)
        (_, y_own), own = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora, x[rows], target[rows])
        np.testing.assert_allclose(ys[rows], y_own, rtol=1e-5, atol=1e-5)
        for (path, got), (_, want) in zip(lj.targets(grads[k]), lj.targets(own), strict=True):
            np.testing.assert_allclose(got.a, want.a, rtol=1e-4, atol=1e-4, err_msg=path)
            np.testing.assert_allclose(got.b, want.b, rtol=1e-4, atol=1e-4, err_msg=path)
    for path, w in jax.tree_util.tree_flatten_with_path(full, is_leaf=lambda n: isinstance(n, lj.StackedLoraWeight))[0]:
        if w is None:
            continue
        np.testing.assert_array_equal(w.scale, 0)
        r = len(w.stack_axes)
        for k, rank in enumerate(stacked_node(stacked, path).ranks):   # no gradient on the padding
            np.testing.assert_array_equal(jax.lax.slice_in_dim(w.a[k], rank, None, axis=r), 0)
            np.testing.assert_array_equal(jax.lax.slice_in_dim(w.b[k], rank, None, axis=r), 0)


def stacked_node(tree, path):
    for p, w in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda n: isinstance(n, lj.StackedLoraWeight))[0]:
        if p == path:
            return w
    raise KeyError(path)


def test_swapping_an_adapter_of_the_same_rank_does_not_retrace():
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

    y0 = step(lj.stack(loras), IDS)
    n = len(traces)
    _, other = lj.split(jax.random.key(7), base, lj.LoraConfig(rules=(lj.Rule(everywhere, rank=4, alpha=11.0),),
                                                               scaling="rslora"), apply_fn=model.apply, args=(x,))
    other = randomize(other, 5)   # same rank and rule as loras[1], another alpha and other factors
    y1 = step(lj.stack([loras[0], other, loras[2]]), IDS[::-1])
    assert n == 2 and len(traces) == n      # neither the jitted step nor f traced again
    np.testing.assert_allclose(y1[0:1], g(base, other, x[0:1]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y0, y1)


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


def test_a_product_without_the_examples_leading_is_refused_with_the_path():
    params = {"w": jnp.ones((4, 6))}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    stacked, ids = lj.stack([lora, lora]), jnp.array([0, 1, 0])
    x = jnp.ones((3, 4))
    f = lambda p, x: jnp.tanh(x) @ p["w"].T.T   # fine: the examples lead, the weight is transposed
    assert lj.wrap(f)(params, stacked, x, adapter_ids=ids).shape == (3, 6)
    with pytest.raises(ValueError, match=r"stacked adapter at 'w' reads an input of shape \(4,\)"):
        lj.wrap(lambda p, x: x.sum(0) @ p["w"])(params, stacked, x, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"stacked adapter at 'w' reaches 'reshape'.*Fix"):
        lj.wrap(lambda p, x: x @ p["w"].reshape(4, 2, 3).reshape(4, 6))(params, stacked, x, adapter_ids=ids)


def test_a_layer_stack_under_scan_slices_each_examples_factors_per_step():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.3}   # 3 layers, scanned
    f = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    x = jax.random.normal(jax.random.key(1), (4, 6))
    split = lambda k, r: randomize(lj.split(jax.random.key(k), params, lj.LoraConfig(rules=(lj.Rule("w", rank=r),)),
                                            apply_fn=f, args=(x,))[1], k)
    loras, ids = [split(1, 2), split(2, 3)], np.array([1, 0, -1, 1])
    assert loras[0]["w"].stack_axes == (0,)
    y = lj.wrap(f)(params, lj.stack(loras), x, adapter_ids=ids)
    for i, k in enumerate(ids):
        want = f(params, x[i:i + 1]) if k < 0 else lj.wrap(f)(params, loras[k], x[i:i + 1])
        np.testing.assert_allclose(y[i:i + 1], want, rtol=1e-5, atol=1e-5)
