"""LoRA on a small Flax linen model: split, train the adapters only, merge.

Run: python examples/linen_quickstart.py [--steps N]

A two-layer MLP is first fit to one random linear map (the "pretrained" model), then
adapted with rank-4 LoRA on both Dense kernels to a second map. Only A and B train; the
base is checked bit-identical afterwards and the merged model reproduces the adapter.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


class MLP(nn.Module):
    hidden: int = 64
    out: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden, name="up")(x))
        return nn.Dense(self.out, name="down")(x)


def make_task(key, n=512, d_in=32, d_out=16):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in))
    w = jax.random.normal(kw, (d_in, d_out)) / jnp.sqrt(d_in)
    return x, jnp.tanh(x @ w)


def fit(loss_fn, params, steps, lr):
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    for _ in range(steps):
        params, opt, loss = step(params, opt)
    return params, float(loss)


def main(steps: int = 300) -> dict:
    model = MLP()
    x1, y1 = make_task(jax.random.key(1))
    x2, y2 = make_task(jax.random.key(2))
    variables = model.init(jax.random.key(0), x1)

    # 1. "pretrain" on task 1
    mse = lambda v, x, y: jnp.mean((model.apply(v, x) - y) ** 2)
    variables, pre_loss = fit(lambda v: mse(v, x1, y1), variables, steps, 1e-2)

    # 2. LoRA on both kernels; axes inferred by tracing model.apply
    config = lj.LoraConfig(rules=(lj.Rule(r"params/(up|down)/kernel", rank=4, alpha=8.0),))
    base, lora = lj.split(jax.random.key(3), variables, config, apply_fn=model.apply, args=(x2,))
    print(lj.summary(lora, base))
    forward = lj.wrap(model.apply)
    before = float(jnp.mean((forward(base, lora, x2) - y2) ** 2))

    # 3. train the adapters only (base closed over, not differentiated)
    lora, after = fit(lambda l: jnp.mean((forward(base, l, x2) - y2) ** 2), lora, steps, 1e-2)

    # 4. merge into a plain variables tree and check it reproduces the adapter
    merged = lj.merge(base, lora)
    merged_loss = float(mse(merged, x2, y2))
    print(f"pretrain loss (task 1): {pre_loss:.4f}")
    print(f"task 2 loss: before LoRA {before:.4f} -> after {after:.4f} (merged model {merged_loss:.4f})")
    return {"before": before, "after": after, "merged": merged_loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
