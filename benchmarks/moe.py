"""Mixture-of-experts through ``jax.lax.ragged_dot``: the factored step against the merge strategy.

A stack of Mixtral-style layers (router, top-2 of E SwiGLU experts, tokens sorted by expert,
the experts run as ragged dots over the sorted rows), LoRA on every expert stack (gate, up,
down), one training step (gradients w.r.t. the adapters, Adam), in one process, interleaved
rounds (medians):

* ``factored``: ``lj.wrap``: ``ragged_dot(x, W, g) + s·ragged_dot(ragged_dot(x, A, g), B, g)``;
* ``merge``: ``lj.wrap(strategy="merge")``: every expert stack merged (``W + s·A⊗B``, an
  (E, in, out) value and its gradient per stack) before the step.

Times and compiled temporaries (``memory_analysis``) are ratios to ``merge``.

``--tunix`` measures google-tunix's MoE layers instead (one layer each, ``LoraConfig.all_linear``,
which adapts the expert stacks and leaves the router out): Gemma 4's ``MoERagged`` (ragged dots
over the tokens sorted by expert) and Qwen 3's ``MoELayer`` on CPU (a dense loop over the
experts). Qwen 3's ``shard_map`` + megablox path is not measured: its ``gmm`` is a TPU Pallas
kernel, and the factored transform materializes the expert stacks at its ``pallas_call``.
Which strategy needs fewer temporaries depends on the tokens per step: merge holds each merged
stack and its gradient (E·in·out, whatever the tokens), the factored step's extra values grow
with the rows (tokens × top-k), and on CPU each ``ragged_dot`` is lowered through an E-fold
masked copy of its input; ``--tokens`` changes the count.

    python benchmarks/moe.py                 # 2 layers, d=512, ff=1024, 8 experts, 1024 tokens, r=8
    python benchmarks/moe.py --tunix         # tunix layers: d=256, ff=512, 8 experts, 512 tokens, r=8
    python benchmarks/moe.py --tunix --tokens 64
"""

from __future__ import annotations

import argparse
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from many_adapters import timing


class Experts(nn.Module):
    """Router, top-2 of ``n_exp`` SwiGLU experts run as ragged dots over the sorted rows, residual."""

    d: int
    ff: int
    n_exp: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        gate, up = (self.param(n, init, (self.n_exp, self.d, self.ff)) for n in ("gate", "up"))
        down = self.param("down", init, (self.n_exp, self.ff, self.d))
        weights, experts = jax.lax.top_k(nn.Dense(self.n_exp, name="router")(x), 2)
        weights = jax.nn.softmax(weights, axis=-1)
        order = jnp.argsort(experts.reshape(-1))
        rows = x[order // 2]
        sizes = jnp.bincount(experts.reshape(-1), length=self.n_exp).astype(jnp.int32)
        h = nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
        y = jnp.zeros((rows.shape[0], self.d), x.dtype).at[order].set(jax.lax.ragged_dot(h, down, sizes))
        return x + jnp.einsum("tkd,tk->td", y.reshape(x.shape[0], 2, self.d), weights)


class Model(nn.Module):
    """``layers`` pre-LayerNorm :class:`Experts` blocks."""

    d: int
    ff: int
    n_exp: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Experts(self.d, self.ff, self.n_exp, name=f"moe_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
        return x


def steps(apply, base, lora, x, target):
    """``{strategy: (jitted Adam step on the adapters, its arguments)}`` for factored and merge.

    The loss is the mean squared error of ``apply(base, lora, x)`` against ``target``; B is
    set to 0.01 so that the adapters take part in the gradients from the first step.
    """
    lora = jax.tree.map(lambda w: w.replace(b=0.01 * jnp.ones_like(w.b)) if lj.is_lora(w) else w, lora,
                        is_leaf=lj.is_lora)
    tx = optax.adam(1e-3)

    def step(strategy):
        fwd = lj.wrap(apply, strategy)

        def run(l, opt, x, t):
            loss, g = jax.value_and_grad(lambda l: jnp.mean((fwd(base, l, x) - t) ** 2))(l)
            upd, opt = tx.update(g, opt, l)
            return optax.apply_updates(l, upd), opt, loss
        return jax.jit(run)

    return {s: (step(s), (lora, tx.init(lora), x, target)) for s in ("factored", "merge")}


def build(layers, d, ff, n_exp, tokens, rank):
    """The factored and merge steps on a :class:`Model` with LoRA on every expert stack."""
    model = Model(d, ff, n_exp, layers)
    x = jax.random.normal(jax.random.key(0), (tokens, d))
    target = jax.random.normal(jax.random.key(1), (tokens, d))
    params = jax.jit(model.init)(jax.random.key(2), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(gate|up|down)", rank=rank),))
    base, lora = lj.split(jax.random.key(3), params, cfg, apply_fn=model.apply, args=(x,))
    return steps(model.apply, base, lora, x, target)


def build_tunix(layer, d, ff, n_exp, tokens, rank):
    """The factored and merge steps on one google-tunix MoE layer (``"gemma4"`` or ``"qwen3"``).

    Top-2 of ``n_exp`` experts, the ``tokens`` as a (4, tokens / 4, d) batch; the adapters
    from ``LoraConfig.all_linear`` on the traced layer (the expert stacks, not the router).
    """
    from flax import nnx

    if layer == "gemma4":
        from tunix.models.gemma4 import model as gemma4_model
        from tunix.models.gemma4 import moe as gemma4_moe

        cfg = gemma4_model.ModelConfig(
            num_layers=1, num_embed=16, embed_dim=d, hidden_dim=ff, num_heads=2, head_dim=16, num_kv_heads=1,
            enable_moe=True, num_experts=n_exp, num_experts_per_tok=2, expert_dim=ff)
        module = gemma4_moe.MoERagged(cfg, rngs=nnx.Rngs(0))
    else:
        from tunix.models.qwen3 import model as qwen3_model

        cfg = qwen3_model.ModelConfig(
            num_layers=1, vocab_size=16, embed_dim=d, hidden_dim=ff, num_heads=2, head_dim=16, num_kv_heads=1,
            rope_theta=10_000, norm_eps=1e-6, num_experts=n_exp, num_experts_per_tok=2)
        module = qwen3_model.MoELayer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (4, tokens // 4, d))
    target = jax.random.normal(jax.random.key(1), x.shape)
    base, lora = lj.split(jax.random.key(3), state, lj.LoraConfig.all_linear(rank=rank), apply_fn=apply, args=(x,))
    print(f"{layer}: adapted {sorted(p for p, _ in lj.targets(lora))}")
    return steps(apply, base, lora, x, target)


def report(title, variants, rounds, iters):
    """Print the steps' median times and compiled temporaries, as ratios to ``merge``."""
    mem = {n: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes for n, (fn, args) in variants.items()}
    t = timing(variants, rounds, iters)
    ref_t, ref_m = t["merge"][0], mem["merge"]
    print(f"\n{title}: training step (median of {rounds} interleaved rounds x {iters}; "
          "spread = min..max over rounds)")
    print(f"{'strategy':10s} {'ms':>8s} {'x merge':>8s} {'spread':>14s} {'temp MiB':>9s} {'x merge':>8s}")
    for name, (med, lo, hi) in t.items():
        print(f"{name:10s} {med * 1e3:8.1f} {med / ref_t:8.3f} {lo / ref_t:6.3f}..{hi / ref_t:<6.3f} "
              f"{mem[name] / 2**20:9.1f} {mem[name] / ref_m:8.3f}")


def main(argv=None):
    """Run the benchmark: the Mixtral-style stack, or with ``--tunix`` google-tunix's MoE layers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tunix", action="store_true", help="google-tunix's Gemma 4 and Qwen 3 MoE layers")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step with --tunix (a multiple of 4)")
    a = ap.parse_args(argv)
    backend = f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    if not a.tunix:
        shape = dict(layers=2, d=512, ff=1024, n_exp=8, tokens=1024, rank=8)
        print(f"{backend}, shape {shape}")
        report("Mixtral-style stack", build(**shape), a.rounds, a.iters)
        return
    try:
        import tunix
    except ImportError:
        print("--tunix needs google-tunix (pip install google-tunix)", file=sys.stderr)
        sys.exit(1)
    # tunix uses flax and jax APIs that warn of their deprecation at every call
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    shape = dict(d=256, ff=512, n_exp=8, tokens=a.tokens, rank=8)
    print(f"{backend}, tunix {getattr(tunix, '__version__', '?')}, shape {shape}")
    for layer, title in (("gemma4", "gemma4.MoERagged"), ("qwen3", "qwen3.MoELayer (CPU: dense loop)")):
        report(title, build_tunix(layer, **shape), a.rounds, a.iters)


if __name__ == "__main__":
    main()
