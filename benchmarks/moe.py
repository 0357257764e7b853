"""Mixture-of-experts through ``jax.lax.ragged_dot``: the factored step against the merge strategy.

A stack of Mixtral-style layers (router, top-2 of E SwiGLU experts, tokens sorted by expert,
the experts run as ragged dots over the sorted rows), LoRA on every expert stack (gate, up,
down), one training step (gradients w.r.t. the adapters, Adam), in one process, interleaved
rounds (medians):

* ``factored``: ``lj.wrap``: ``ragged_dot(x, W, g) + s·ragged_dot(ragged_dot(x, A, g), B, g)``;
* ``merge``: ``lj.wrap(strategy="merge")``: every expert stack merged (``W + s·A⊗B``, an
  (E, in, out) value and its gradient per stack) before the step.

Times and compiled temporaries (``memory_analysis``) are ratios to ``merge``.

    python benchmarks/moe.py                 # 2 layers, d=512, ff=1024, 8 experts, 1024 tokens, r=8
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from many_adapters import timing


class Experts(nn.Module):
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
    d: int
    ff: int
    n_exp: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Experts(self.d, self.ff, self.n_exp, name=f"moe_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
        return x


def build(layers, d, ff, n_exp, tokens, rank):
    model = Model(d, ff, n_exp, layers)
    x = jax.random.normal(jax.random.key(0), (tokens, d))
    target = jax.random.normal(jax.random.key(1), (tokens, d))
    params = jax.jit(model.init)(jax.random.key(2), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(gate|up|down)", rank=rank),))
    base, lora = lj.split(jax.random.key(3), params, cfg, apply_fn=model.apply, args=(x,))
    lora = jax.tree.map(lambda w: w.replace(b=0.01 * jnp.ones_like(w.b)) if lj.is_lora(w) else w, lora,
                        is_leaf=lj.is_lora)
    tx = optax.adam(1e-3)

    def step(strategy):
        fwd = lj.wrap(model.apply, strategy)

        def run(l, opt, x, t):
            loss, g = jax.value_and_grad(lambda l: jnp.mean((fwd(base, l, x) - t) ** 2))(l)
            upd, opt = tx.update(g, opt, l)
            return optax.apply_updates(l, upd), opt, loss
        return jax.jit(run)

    return {s: (step(s), (lora, tx.init(lora), x, target)) for s in ("factored", "merge")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args(argv)
    shape = dict(layers=2, d=512, ff=1024, n_exp=8, tokens=1024, rank=8)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, shape {shape}")
    variants = build(**shape)
    mem = {n: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes for n, (fn, args) in variants.items()}
    t = timing(variants, a.rounds, a.iters)
    ref_t, ref_m = t["merge"][0], mem["merge"]
    print(f"\ntraining step (median of {a.rounds} interleaved rounds x {a.iters}; spread = min..max over rounds)")
    print(f"{'strategy':10s} {'ms':>8s} {'x merge':>8s} {'spread':>14s} {'temp MiB':>9s} {'x merge':>8s}")
    for name, (med, lo, hi) in t.items():
        print(f"{name:10s} {med * 1e3:8.1f} {med / ref_t:8.3f} {lo / ref_t:6.3f}..{hi / ref_t:<6.3f} "
              f"{mem[name] / 2**20:9.1f} {mem[name] / ref_m:8.3f}")


if __name__ == "__main__":
    main()
