"""LoRA on a small Flax linen model: split, train the adapters only, merge.

Run: python examples/linen_quickstart.py [--steps N] [--ckpt-dir DIR]

A two-layer MLP is first fit to one random linear map (the "pretrained" model), then
adapted with rank-4 LoRA on both Dense kernels to a second map. Only A and B train; the
base is checked bit-identical afterwards and the merged model reproduces the adapter.

With --ckpt-dir the adapter training keeps orbax checkpoints (adapters, Adam state, step;
the newest two) and a rerun with the same --steps resumes from the latest one.
"""

from __future__ import annotations

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from lora_jax import checkpoint


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


def fit(loss_fn, params, steps, lr, start=0, opt=None, on_step=None):
    """Adam on ``params`` from step ``start`` to ``steps``; ``on_step(step, params, opt)``."""
    tx = optax.adam(lr)
    opt = tx.init(params) if opt is None else opt

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    loss = None
    for i in range(start, steps):
        params, opt, loss = step(params, opt)
        if on_step is not None:
            on_step(i + 1, params, opt)
    return params, loss


def resume(ckpt_dir, steps, lora, lr):
    """``(start, lora, opt_state, manager)``: the latest checkpoint in ``ckpt_dir``, if any."""
    run_file = os.path.join(ckpt_dir, "run.json")
    if os.path.exists(run_file):
        with open(run_file) as f:
            saved = json.load(f)["steps"]
        if saved != steps:  # the base is pretrained for `steps` too: another run entirely
            raise ValueError(f"{ckpt_dir} holds a run with --steps {saved}; use it or a new --ckpt-dir")
    else:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(run_file, "w") as f:
            json.dump({"steps": steps}, f)
    mgr = checkpoint.Manager(ckpt_dir, max_to_keep=2)
    opt = optax.adam(lr).init(lora)
    if mgr.latest_step() is None:
        return 0, lora, opt, mgr
    restored = mgr.restore(lora=lora, opt_state=opt)  # lora/opt give structure and devices
    print(f"resumed from step {restored.step} in {ckpt_dir}")
    return restored.step, restored.lora, restored.opt_state, mgr


def main(steps: int = 300, ckpt_dir: str | None = None) -> dict:
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

    # 3. train the adapters only (base closed over, not differentiated), with checkpoints
    #    every quarter of the run when ckpt_dir is given
    loss_fn = lambda l: jnp.mean((forward(base, l, x2) - y2) ** 2)
    start, opt, mgr, on_step = 0, None, None, None
    if ckpt_dir is not None:
        start, lora, opt, mgr = resume(ckpt_dir, steps, lora, 1e-2)
        every = max(1, steps // 4)

        def on_step(step, lora, opt):
            if step % every == 0 or step == steps:
                mgr.save(step, lora, opt, config=config)

    try:
        lora, _ = fit(loss_fn, lora, steps, 1e-2, start=start, opt=opt, on_step=on_step)
    finally:
        if mgr is not None:
            mgr.close()  # waits for the last save
    after = float(loss_fn(lora))

    # 4. merge into a plain variables tree and check it reproduces the adapter
    merged = lj.merge(base, lora)
    merged_loss = float(mse(merged, x2, y2))
    print(f"pretrain loss (task 1): {float(pre_loss):.4f}")
    print(f"task 2 loss: before LoRA {before:.4f} -> after {after:.4f} (merged model {merged_loss:.4f})")
    return {"before": before, "after": after, "merged": merged_loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ckpt-dir", default=None, help="keep checkpoints here and resume from them")
    ns = parser.parse_args()
    main(ns.steps, ns.ckpt_dir)
