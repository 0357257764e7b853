"""One training step of a small causal LM: LoRA strategies against the frozen-model bound.

Measured side by side in one process (medians over interleaved rounds):

* ``full``: full fine-tune (gradients of every weight, Adam over all of them);
* ``bound``: forward + gradient w.r.t. the embedding output with every weight frozen: the
  least work any adapter method must do (no weight gradients at all);
* ``factored``: ``lj.wrap`` (default strategy), gradients w.r.t. the adapters only, Adam;
* ``merge``: ``lj.wrap(strategy="merge")``, same step;
* ``combined``: ``lj.optimizer`` over ``{"base": base, "lora": lora}`` with ``jax.grad`` of
  the whole tree, factored forward.

Times are printed as ratios to the bound and to full fine-tuning; compiled memory
(``memory_analysis``: temporaries, and arguments + outputs + temporaries) as a ratio to the
bound's. Also: retraces after the first step, and merged vs base inference.

    python benchmarks/train_step.py                 # 6 layers, d=512, vocab 8192, batch 8x128
    python benchmarks/train_step.py --large         # memory only: 8 layers, d=1024, vocab 32k, 4x128
    python benchmarks/train_step.py --size 1b       # for an accelerator: 16 layers, d=2048, seq 1024, bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


class Block(nn.Module):
    d: int
    heads: int
    ffn: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(self.d, name=n)(h).reshape(b, t, self.heads, -1) for n in "qkv")
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, jnp.finfo(att.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v).reshape(b, t, self.d)
        x = x + nn.Dense(self.d, name="o")(y)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(self.ffn, name="up")(h)))


class LM(nn.Module):
    vocab: int
    d: int
    heads: int
    ffn: int
    layers: int

    @nn.compact
    def __call__(self, ids, h=None):
        if h is None:
            h = nn.Embed(self.vocab, self.d, name="embed")(ids)
        for i in range(self.layers):
            h = Block(self.d, self.heads, self.ffn, name=f"block_{i}")(h)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(h))


def xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


# about 1 B parameters in bfloat16 (0.94 B for this LM), for an accelerator; peers.py's "1b"
SIZE_1B = dict(layers=16, d=2048, heads=16, ffn=8192, vocab=32768, batch=1, seq=1024, dtype="bfloat16")


def cast(tree, dtype):
    """``tree`` with its floating-point arrays as ``dtype`` (the weights' type sets the
    compute's: activations, adapters and gradients follow it)."""
    return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)


def nonzero_b(lora):
    """Small random B, so the adapter path is not trivially zero."""
    return jax.tree.map(
        lambda w: w.replace(b=0.01 * jax.random.normal(jax.random.key(3), w.b.shape, w.b.dtype))
        if lj.is_lora(w) else w,
        lora, is_leaf=lj.is_lora)


def build(layers, d, heads, ffn, vocab, batch, seq, rank=8, alpha=16.0, dtype=jnp.float32):
    """The steps of the benchmark LM; ``dtype``: its weights' (and so its compute's and the
    adapters') floating-point type."""
    model = LM(vocab, d, heads, ffn, layers)
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(lambda k, x: cast(model.init(k, x), dtype))(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(q|k|v|o|up|down)/kernel", rank=rank, alpha=alpha),), dtype=dtype)
    base, lora = lj.split(jax.random.key(2), params, cfg)
    lora = nonzero_b(lora)
    h0 = params["params"]["embed"]["embedding"][x]  # the embedding output
    tx = optax.adam(1e-3)
    traces: dict[str, int] = {}

    def counted(name, fn):
        def inner(*a):
            traces[name] = traces.get(name, 0) + 1
            return fn(*a)
        return inner

    def full(params, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: xent(model.apply(p, x), y))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    def bound(params, h, x, y):
        return jax.value_and_grad(lambda h: xent(model.apply(params, x, h), y))(h)

    def lora_step(strategy):
        fwd = lj.wrap(model.apply, strategy)

        def step(base, lora, opt, x, y):
            loss, g = jax.value_and_grad(lambda l: xent(fwd(base, l, x), y))(lora)
            upd, opt = tx.update(g, opt, lora)
            return optax.apply_updates(lora, upd), opt, loss

        return step

    ctx = lj.optimizer(tx)
    fwd = lj.wrap(model.apply)

    def combined(state, opt, x, y):
        loss, g = jax.value_and_grad(lambda s: xent(fwd(s["base"], s["lora"], x), y))(state)
        upd, opt = ctx.update(g, opt, state)
        return lj.apply_updates(state, upd), opt, loss

    def infer(p, x):
        return model.apply(p, x)

    steps = {
        "full": (jax.jit(counted("full", full), donate_argnums=(0, 1)), lambda: (params, tx.init(params), x, y)),
        # keep_unused: the bound never reads the embedding table, but a training step holds it
        "bound": (jax.jit(counted("bound", bound), keep_unused=True), lambda: (params, h0, x, y)),
        "factored": (jax.jit(counted("factored", lora_step("factored")), donate_argnums=(1, 2)),
                     lambda: (base, lora, tx.init(lora), x, y)),
        "merge": (jax.jit(counted("merge", lora_step("merge")), donate_argnums=(1, 2)),
                  lambda: (base, lora, tx.init(lora), x, y)),
        "combined": (jax.jit(counted("combined", combined), donate_argnums=(0, 1)),
                     lambda: ({"base": base, "lora": lora}, ctx.init({"base": base, "lora": lora}), x, y)),
    }
    merged = lj.merge(base, lora)
    infer_jit = jax.jit(counted("infer", infer))
    return steps, traces, infer_jit, (base, merged, x)


def copy(tree):
    return jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, tree)


def memory(steps):
    out = {}
    for name, (fn, args) in steps.items():
        compiled = fn.lower(*args()).compile()
        m = compiled.memory_analysis()
        temp = m.temp_size_in_bytes
        total = m.argument_size_in_bytes + m.output_size_in_bytes + temp - m.alias_size_in_bytes
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[name] = (temp, total, float(cost.get("flops", float("nan"))))
    return out


CHAINED = {"full": (0, 1), "factored": (1, 2), "merge": (1, 2), "combined": (0, 1)}


def timing(steps, rounds, iters, chained=CHAINED):
    """Median seconds per step; each round runs every variant (side by side)."""
    return {name: statistics.median(ts) for name, ts in timing_samples(steps, rounds, iters, chained).items()}


def timing_samples(steps, rounds, iters, chained=CHAINED):
    """Seconds per step of every round, per variant; each round runs every variant (side by
    side). ``chained[name]`` are the argument positions that the step's first outputs (its
    donated state) feed back into."""
    state = {name: list(copy(args())) for name, (fn, args) in steps.items()}

    def run(name):
        fn = steps[name][0]
        out = fn(*state[name])
        if name in chained:  # feed the donated state back in
            for pos, val in zip(chained[name], out):
                state[name][pos] = val
        jax.block_until_ready(out)

    for name in steps:  # compile + warm up
        run(name)
        run(name)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name in steps:
            t0 = time.perf_counter()
            for _ in range(iters):
                run(name)
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", action="store_true", help="8 layers, d=1024, vocab 32k, 4x128 (memory only)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated subset of variants")
    ap.add_argument("--size", choices=("default", "1b"), default="default",
                    help="1b: 16 layers, d=2048, ffn 8192, vocab 32k, 1x1024, bfloat16 (0.94 B parameters)")
    a = ap.parse_args(argv)
    if a.size == "1b":
        shape = SIZE_1B
    elif a.large:
        shape = dict(layers=8, d=1024, heads=16, ffn=4096, vocab=32768, batch=4, seq=128)
    else:
        shape = dict(layers=6, d=512, heads=8, ffn=2048, vocab=8192, batch=8, seq=128)
    steps, traces, infer, (base, merged, x) = build(**shape)
    if a.only:
        steps = {k: v for k, v in steps.items() if k in a.only.split(",") + ["bound"]}
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, shape {shape}")
    mem = memory(steps)
    b_temp, b_total, b_flops = mem["bound"]
    print("\ncompiled memory (memory_analysis) and flops (cost_analysis), ratio to the bound")
    print(f"{'step':10s} {'temp MiB':>9s} {'x bound':>8s} {'total MiB':>10s} {'x bound':>8s} {'GFLOP':>8s} {'x bound':>8s}")
    for name, (temp, total, flops) in mem.items():
        print(f"{name:10s} {temp / 2**20:9.1f} {temp / b_temp:8.2f} {total / 2**20:10.1f} {total / b_total:8.2f}"
              f" {flops / 1e9:8.2f} {flops / b_flops:8.3f}")
    if a.large:
        return
    t = timing(steps, a.rounds, a.iters)
    print(f"\nstep time (median of {a.rounds} interleaved rounds x {a.iters})")
    print(f"{'step':10s} {'ms':>8s} {'x bound':>8s} {'x full':>8s}")
    for name, sec in t.items():
        print(f"{name:10s} {sec * 1e3:8.1f} {sec / t['bound']:8.3f} {sec / t.get('full', float('nan')):8.3f}")
    if "combined" in t:
        print(f"\ncombined tree vs lora-only grads: {t['combined'] / t['factored']:.3f}x")
    # inference: merged weights vs base weights (same program, so this checks merging costs nothing)
    ti = {"base": [], "merged": []}
    jax.block_until_ready(infer(base, x))
    for _ in range(a.rounds):
        for name, p in (("base", base), ("merged", merged)):
            t0 = time.perf_counter()
            for _ in range(a.iters):
                jax.block_until_ready(infer(p, x))
            ti[name].append((time.perf_counter() - t0) / a.iters)
    mi, bi = statistics.median(ti["merged"]), statistics.median(ti["base"])
    print(f"merged inference vs base inference: {mi / bi:.3f}x ({mi * 1e3:.1f} ms vs {bi * 1e3:.1f} ms)")
    print(f"traces per variant after all steps: {traces} (1 = no recompile)")


if __name__ == "__main__":
    main()
