"""google-tunix's mixture-of-experts layers under ``lj.wrap``: the factored step against merge.

Two NNX layers, built tiny and random on CPU:

* Gemma 4's ``MoERagged``: a router (``approx_max_k``), the tokens sorted by expert and the
  experts run as ``ragged_dot`` over the sorted rows; its gate/up stack is stored
  ``(E, 2, ff, d)`` and transposed and reshaped to ``(E, d, 2·ff)`` before the ragged dot;
* Qwen 3's ``MoELayer`` on CPU: a top-k router and a loop over the experts, each a dense
  SwiGLU on its slice ``W[i]`` of the ``(E, d, ff)`` stacks.

Qwen 3's other path (taken on an accelerator under a mesh) runs the experts inside
``shard_map`` through megablox's ``gmm``, a TPU Pallas kernel: its weights reach
``pallas_call``, which has no factored rule, so each expert stack is materialized there.
"""

from __future__ import annotations

import types
import warnings
from unittest import mock

import numpy as np
import pytest

tunix = pytest.importorskip("tunix", reason="google-tunix is not installed (it is a bench extra)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.transform import MaterializeWarning  # noqa: E402

with warnings.catch_warnings():  # tunix imports jax.experimental.shard_map
    warnings.simplefilter("ignore", DeprecationWarning)
    from tunix.models.gemma4 import model as gemma4_model
    from tunix.models.gemma4 import moe as gemma4_moe
    from tunix.models.qwen3 import model as qwen3_model

# tunix declares Variables with ``sharding=``, reads them through ``.value`` and the mesh
# through ``pxla.thread_resources``; the megablox path needs the legacy ``with mesh:`` that sets it
pytestmark = [
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`with mesh.` context manager has been deprecated:DeprecationWarning"),
]

D, FF, E, K = 32, 64, 4, 2
STACK = E * D * FF  # the size of one expert stack, in any layout


def _gemma4():
    cfg = gemma4_model.ModelConfig(
        num_layers=1, num_embed=16, embed_dim=D, hidden_dim=FF, num_heads=2, head_dim=16, num_kv_heads=1,
        enable_moe=True, num_experts=E, num_experts_per_tok=K, expert_dim=FF)
    experts = {"gating_einsum": ((0,), (3,), (1, 2)), "linear": ((0,), (1,), (2,))}  # (stack, in, out) axes
    return gemma4_moe.MoERagged(cfg, rngs=nnx.Rngs(0)), experts, "router_logits"


def _qwen3(num_experts=E):
    cfg = qwen3_model.ModelConfig(
        num_layers=1, vocab_size=16, embed_dim=D, hidden_dim=FF, num_heads=2, head_dim=16, num_kv_heads=1,
        rope_theta=10_000, norm_eps=1e-6, num_experts=num_experts, num_experts_per_tok=K)
    experts = {p: ((0,), (1,), (2,)) for p in ("gate_proj", "up_proj", "down_proj")}
    return qwen3_model.MoELayer(cfg, rngs=nnx.Rngs(0)), experts, "router/kernel"


LAYERS = {"gemma4.MoERagged": _gemma4, "qwen3.MoELayer": _qwen3}


def _setup(make):
    """The layer's apply function, state and a (2, 8, D) input (16 tokens)."""
    model, experts, router = make()
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, x, experts, router


def _randomize_b(lora, scale=0.3):
    rng = np.random.default_rng(3)
    return jax.tree.map(
        lambda w: w.replace(b=jnp.asarray(scale * rng.standard_normal(w.b.shape), w.b.dtype)) if lj.is_lora(w) else w,
        lora, is_leaf=lj.is_lora)


def _materialized(run):
    """``run()``'s result and the messages of the MaterializeWarnings it raised."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        out = run()
    return out, [str(r.message) for r in rec if issubclass(r.category, MaterializeWarning)]


def _adapter_dependent_sizes(closed, n_inputs):
    """Sizes of the values that depend on the first ``n_inputs`` inputs, sub-jaxprs included.

    A ``jit``'s inputs map one to one onto its body's; any other sub-jaxpr (``shard_map``,
    custom derivatives) is taken whole: every input of it counts as dependent if one is.
    """
    sizes = []

    def walk(jaxpr, tainted):
        for eqn in jaxpr.eqns:
            hit = [not isinstance(v, jax.extend.core.Literal) and v in tainted for v in eqn.invars]
            if not any(hit):
                continue
            for p in eqn.params.values():
                for j in p if isinstance(p, (tuple, list)) else (p,):
                    inner = j.jaxpr if isinstance(j, jax.extend.core.ClosedJaxpr) else j
                    if isinstance(inner, jax.extend.core.Jaxpr):
                        one_to_one = eqn.primitive.name in ("jit", "pjit") and len(inner.invars) == len(hit)
                        walk(inner, {v for v, h in zip(inner.invars, hit) if h or not one_to_one})
            for v in eqn.outvars:
                tainted.add(v)
                sizes.append(int(np.prod(v.aval.shape)))

    walk(closed.jaxpr, set(closed.jaxpr.invars[:n_inputs]))
    return sizes


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_expert_stacks_stay_factored(layer):
    f, state, x, experts, router = _setup(LAYERS[layer])
    with jax.numpy_rank_promotion("allow"):  # tunix broadcasts (d,) scales against (b, t, d)
        base, lora = lj.split(jax.random.key(2), state, lj.LoraConfig.all_linear(rank=2), apply_fn=f, args=(x,))
        # the expert stacks, the router left out
        assert {p: (w.stack_axes, w.in_axes, w.out_axes) for p, w in lj.targets(lora)} == experts
        lora = _randomize_b(lora)
        leaves = len(jax.tree.leaves(lora))
        loss = lambda strategy: lambda l, x: jnp.sum(jnp.sin(lj.wrap(f, strategy)(base, l, x)))  # noqa: E731
        (y, g, jaxpr), msgs = _materialized(lambda: (
            jax.jit(lj.wrap(f))(base, lora, x), jax.jit(jax.grad(loss("factored")))(lora, x),
            jax.make_jaxpr(jax.grad(loss("factored")))(lora, x)))
        assert not msgs, msgs
        ym, gm = jax.jit(lj.wrap(f, "merge"))(base, lora, x), jax.jit(jax.grad(loss("merge")))(lora, x)
        merged = jax.make_jaxpr(jax.grad(loss("merge")))(lora, x)
    np.testing.assert_allclose(y, ym, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ym))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(gm)):
        assert float(jnp.max(jnp.abs(b))) > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=str(path))
    # no value depending on the adapters is as large as an expert stack (the base stacks'
    # own transposes are); the merge strategy forms one (the check can fail)
    assert max(_adapter_dependent_sizes(jaxpr, leaves)) < STACK
    assert max(_adapter_dependent_sizes(merged, leaves)) >= STACK


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_all_linear_leaves_the_router_out(layer):
    f, state, x, experts, router = _setup(LAYERS[layer])
    with jax.numpy_rank_promotion("allow"):
        _, lora = lj.split(jax.random.key(2), state, lj.LoraConfig.all_linear(rank=2), apply_fn=f, args=(x,))
        # the router is a plain (d, E) product: a rule naming it adapts it. (Gemma 4 picks
        # its experts with approx_max_k; its choices reach an argsort, which marks the router.)
        cfg = lj.LoraConfig(rules=(lj.Rule(router, rank=2),))
        _, explicit = lj.split(jax.random.key(2), state, cfg, apply_fn=f, args=(x,))
    assert router not in {p for p, _ in lj.targets(lora)}
    ((path, w),) = lj.targets(explicit)
    assert path == router and (w.stack_axes, w.in_axes, w.out_axes) == ((), (0,), (1,))


def test_qwen3_megablox_path_materializes_at_pallas_call():
    # the shard_map + megablox path, taken off CPU under a mesh: traced here with the device
    # platform reported as "tpu" (gmm's Pallas kernel only compiles for TPU, so nothing runs)
    n = min(jax.device_count(), 8)
    if n < 2:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    f, state, x, experts, _ = _setup(lambda: _qwen3(num_experts=n))
    with jax.numpy_rank_promotion("allow"):
        base, lora = lj.split(jax.random.key(2), state, lj.LoraConfig.all_linear(rank=2), apply_fn=f, args=(x,))
    x = jnp.tile(x, (n // 2, 1, 1))  # the batch split over the expert-parallel axis
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(n, 1), ("fsdp", "tp"))
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5")
    with mesh, mock.patch.object(jax, "devices", lambda *a, **k: [tpu]), jax.numpy_rank_promotion("allow"):
        prims = {e.primitive.name for e in jax.make_jaxpr(f)(state, x).jaxpr.eqns}
        jaxpr, msgs = _materialized(lambda: jax.make_jaxpr(lambda l, x: lj.wrap(f)(base, l, x))(lora, x))
    assert "shard_map" in prims and "top_k" in prims  # the megablox path, not the dense loop
    assert sorted(msgs) == sorted(
        f"lora_jax.wrap: the adapted weight {p!r} reaches 'pallas_call', which has no factored rule; "
        "W + s*A@B is materialized for this use (correct, but with merge-like memory). "
        "Warned once per weight and primitive." for p in experts), msgs
    assert max(_adapter_dependent_sizes(jaxpr, len(jax.tree.leaves(lora)))) >= n * D * FF
