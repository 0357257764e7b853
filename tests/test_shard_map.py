"""Weights used inside ``jax.shard_map`` (tensor-parallel layers written per shard) stay
factored: the adapter enters sharded like its weight, on 8 simulated devices, and equals the
merge strategy and the same model on one device without shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from reference import randomize

D, FF, B = 16, 32, 6


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def plain(p, x):
    return jnp.tanh(x @ p["up"]) @ p["down"]


def parallel(mesh):
    """Megatron-style: ``up`` split over its outputs, ``down`` over its inputs (a sharded
    contraction summed with psum), the batch over "data"."""

    def body(up, down, x):
        return jax.lax.psum(jnp.tanh(x @ up) @ down, "model")

    def f(p, x):
        return jax.shard_map(body, mesh=mesh, in_specs=(P(None, "model"), P("model", None), P("data", None)),
                             out_specs=P("data", None))(p["up"], p["down"], x)

    return f


def _shapes(jaxpr):
    """Shapes of the products and sums in ``jaxpr`` (what forming A⊗B or W + s·A⊗B takes)."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "add", "add_any"):
            out |= {tuple(v.aval.shape) for v in eqn.outvars}
        for sub in jaxprs_in_params(eqn.params):
            out |= _shapes(sub)
    return out


def test_shard_map_layers_stay_factored_and_equal_one_device():
    mesh = _mesh()
    f = parallel(mesh)
    params = {"up": jax.random.normal(jax.random.key(0), (D, FF)) * 0.3,
              "down": jax.random.normal(jax.random.key(1), (FF, D)) * 0.3}
    x = jax.random.normal(jax.random.key(2), (B, D))
    _, lora = lj.split(jax.random.key(3), params, lj.LoraConfig(rules=(lj.Rule("up|down", rank=2),)),
                       apply_fn=f, args=(x,))
    assert {p: (w.in_axes, w.out_axes) for p, w in lj.targets(lora)} == {"up": ((0,), (1,)), "down": ((0,), (1,))}
    lora = jax.tree.map(lambda w: w.replace(a=0.3 * w.a, b=0.3 * w.b), randomize(lora, 4), is_leaf=lj.is_lora)
    loss = lambda g: lambda l, x: jnp.sum(jnp.sin(g(params, l, x)))  # noqa: E731
    factored, merged, one = lj.wrap(f), lj.wrap(f, "merge"), lj.wrap(plain)
    y = jax.jit(factored)(params, lora, x)       # (a MaterializeWarning would fail the test)
    np.testing.assert_allclose(y, jax.jit(merged)(params, lora, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, jax.jit(one)(params, lora, x), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(loss(factored)))(lora, x)
    for want in (jax.jit(jax.grad(loss(merged)))(lora, x), jax.jit(jax.grad(loss(one)))(lora, x)):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # per shard, neither A⊗B nor W + s·A⊗B (nor a gradient of W) is formed
    shard = {(D, FF // 4), (FF // 4, D)}
    assert not shard & _shapes(jax.make_jaxpr(jax.grad(loss(factored)))(lora, x).jaxpr)
    assert shard & _shapes(jax.make_jaxpr(jax.grad(loss(merged)))(lora, x).jaxpr)   # (the check can fail)


def test_adapter_dropout_inside_shard_map_is_refused_by_path():
    mesh = _mesh()
    params = {"up": jnp.ones((D, FF)), "down": jnp.ones((FF, D))}
    x = jnp.ones((B, D))
    cfg = lj.LoraConfig(rules=(lj.Rule("up", rank=2, dropout=0.5),))
    _, lora = lj.split(jax.random.key(3), params, cfg, apply_fn=parallel(mesh), args=(x,))
    with pytest.raises(ValueError, match=r"dropout \(lora_rng\) for up inside shard_map.*lora_rng=None"):
        lj.wrap(parallel(mesh))(params, lora, x, lora_rng=jax.random.key(0))
