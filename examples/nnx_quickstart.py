"""LoRA on a small Flax NNX model: split, train the adapters only, merge into a plain module.

Run: python examples/nnx_quickstart.py [--steps N]

A bag-of-tokens model (nnx.Embed, mean over the sequence, two nnx.Linear layers) is first
trained the ordinary NNX way (nnx.Optimizer) on one task: the "pretrained" model. It is
then adapted to a second task that reads the same tokens out differently, with rank-4 LoRA
on the embedding table and both kernels: ``lj.nnx.split`` gives ``(graphdef, base, lora)``,
optax trains ``lora`` through ``lj.nnx.call``, and ``lj.nnx.merge`` folds the adapters into
a plain NNX module that computes what the adapted forward computes. The base state is
checked bit-identical to the pretrained weights afterwards.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj


class BagOfTokens(nnx.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, hidden: int = 64, out: int = 8, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, tokens):  # (batch, seq) int -> (batch, out)
        h = jnp.mean(self.embed(tokens), axis=1)
        return self.down(nnx.gelu(self.up(h)))


@functools.partial(jax.jit, static_argnames=("n", "seq", "vocab", "dim", "out"))
def make_tasks(key, n=512, seq=8, vocab=64, dim=16, out=8):
    """Two regression tasks over the same random token features, read out differently."""
    kt, kf, k1, k2 = jax.random.split(key, 4)
    tokens = jax.random.randint(kt, (n, seq), 0, vocab)
    feats = jnp.mean(jax.random.normal(kf, (vocab, dim))[tokens], axis=1)  # (n, dim)
    readout = lambda k: jax.random.normal(k, (dim, out)) / jnp.sqrt(dim / 8.0)
    return tokens, jnp.tanh(feats @ readout(k1)), jnp.tanh(feats @ readout(k2))


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def pretrain(model, x, y, steps, lr=1e-2):
    """Plain NNX training of every parameter; the model is updated in place."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        loss = step(model, optimizer)
    return float(loss)


def main(steps: int = 300) -> dict:
    tokens, y1, y2 = make_tasks(jax.random.key(1))
    model = BagOfTokens(rngs=nnx.Rngs(0))

    # 1. "pretrain" on task 1, all parameters
    pre_loss = pretrain(model, tokens, y1, steps)
    pretrained = jax.tree.map(np.array, nnx.state(model))  # a copy, to check the base later

    # 2. LoRA on the embedding table and both kernels; axes and kinds found by tracing
    config = lj.LoraConfig(rules=(lj.Rule(r"embed/embedding|(up|down)/kernel", rank=4, alpha=8.0),))
    graphdef, base, lora = lj.nnx.split(model, config, jax.random.key(2), args=(tokens,))
    print(lj.summary(lora, base))
    forward = jax.jit(lambda lora: lj.nnx.call(graphdef, base, lora, tokens))
    loss_fn = lambda lora: mse(forward(lora), y2)
    before = float(loss_fn(lora))

    # 3. train the adapters only; the base is closed over and gets no gradient
    tx = optax.adam(1e-2)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    for _ in range(steps):
        lora, opt, _ = step(lora, opt)
    after = float(loss_fn(lora))

    # 4. a plain NNX module with the adapters folded in
    merged = lj.nnx.merge(graphdef, base, lora)
    adapted_out = forward(lora)
    merged_out = merged(tokens)
    diff = float(jnp.max(jnp.abs(merged_out - adapted_out)))
    merged_loss = float(mse(merged_out, y2))
    pretrained_on_2 = float(mse(model(tokens), y2))
    print(f"pretrain loss (task 1): {pre_loss:.4f}")
    print(f"task 2 loss: pretrained model {pretrained_on_2:.4f}; with LoRA before {before:.4f} "
          f"-> after {after:.4f} (merged module {merged_loss:.4f})")
    print(f"max |merged module - adapted forward| = {diff:.2e}")
    return {
        "pretrain": pre_loss,
        "before": before,
        "after": after,
        "merged": merged_loss,
        "max_diff": diff,
        "tokens": tokens,
        "graphdef": graphdef,
        "base": base,
        "lora": lora,
        "pretrained_state": pretrained,
        "merged_model": merged,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    ns = parser.parse_args()
    main(ns.steps)
