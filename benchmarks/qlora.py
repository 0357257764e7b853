"""QLoRA: the factored LoRA step on a float base vs on nf4 / int8 / fp8 quantized bases.

Measured side by side in one process (medians over interleaved rounds), on the benchmark LM of
``train_step.py`` and on a weight-dominated variant (8 layers, d=1024, ffn 4096, vocab 512,
batch 1x32, where the float32 weights are most of a step's memory):

* step time of each quantized base as a ratio to the float base's factored step;
* compiled memory (``memory_analysis``): arguments, temporaries and their total, as ratios
  to the float step's, and temporaries minus the float step's in units of the largest
  dequantized weight (the bound: at most two, so nothing is kept between the passes);
* stored bytes per quantized parameter and the quantization error
  ``||deq(W) - W||_F / ||W||_F`` (all quantized weights together);
* held-out loss after a short run on a learnable task (each token predicts a fixed random
  successor), each base against the float base.

    python benchmarks/qlora.py                      # both models
    python benchmarks/qlora.py --only weights       # the weight-dominated model only
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_step import LM, xent  # noqa: E402  (the benchmark LM)

MODELS = {
    "lm": dict(layers=6, d=512, heads=8, ffn=2048, vocab=8192, batch=8, seq=128),
    "weights": dict(layers=8, d=1024, heads=8, ffn=4096, vocab=512, batch=1, seq=32),
}
QTYPES = ("nf4", "int8", "fp8")


def task(key, vocab, batch, seq):
    """Sequences where each token is followed by its fixed random successor."""
    succ = jax.random.permutation(jax.random.key(7), vocab)
    start = jax.random.randint(key, (batch,), 0, vocab)

    def walk(t, _):
        return succ[t], t

    _, ids = jax.lax.scan(walk, start, None, length=seq + 1)
    ids = ids.T
    return ids[:, :-1], ids[:, 1:]


def build(m, rank=8):
    model = LM(m["vocab"], m["d"], m["heads"], m["ffn"], m["layers"])
    x, y = task(jax.random.key(0), m["vocab"], m["batch"], m["seq"])
    params = jax.jit(model.init)(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(q|k|v|o|up|down)/kernel", rank=rank, alpha=2.0 * rank),))
    tx = optax.adam(1e-3)
    fwd = lj.wrap(model.apply)

    def step(base, lora, opt, x, y):
        loss, g = jax.value_and_grad(lambda l: xent(fwd(base, l, x), y))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    bases = {"float": params}
    for q in QTYPES:
        bases[q] = lj.quantize(params, q, pattern=r".*/(q|k|v|o|up|down)/kernel")
    runs = {}
    for name, base in bases.items():
        b, lora = lj.split(jax.random.key(2), base, cfg)
        runs[name] = (b, lora)
    return model, params, runs, jax.jit(step, donate_argnums=(1, 2)), tx, (x, y), fwd


def memory(step, runs, tx, xy):
    out = {}
    for name, (base, lora) in runs.items():
        m = step.lower(base, lora, tx.init(lora), *xy).compile().memory_analysis()
        out[name] = (m.argument_size_in_bytes, m.temp_size_in_bytes,
                     m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return out


def timing(step, runs, tx, xy, rounds, iters):
    state = {n: [b, jax.tree.map(jnp.copy, l), tx.init(l)] for n, (b, l) in runs.items()}

    def run(n):
        b, l, o = state[n]
        l, o, loss = step(b, l, o, *xy)
        state[n][1:] = [l, o]
        jax.block_until_ready(loss)

    for n in runs:
        run(n)
        run(n)
    times = {n: [] for n in runs}
    for _ in range(rounds):
        for n in runs:
            t0 = time.perf_counter()
            for _ in range(iters):
                run(n)
            times[n].append((time.perf_counter() - t0) / iters)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}


def quant_stats(params, qbase):
    num = den = 0.0
    nbytes = count = 0
    largest = 0
    p_leaves = jax.tree.leaves(params)
    for w, q in zip(p_leaves, jax.tree.leaves(qbase, is_leaf=lj.is_quantized)):
        if lj.is_quantized(q):
            num += float(jnp.sum((q.dequantize().astype(jnp.float32) - w) ** 2))
            den += float(jnp.sum(w.astype(jnp.float32) ** 2))
            nbytes += q.nbytes
            count += q.size
            largest = max(largest, q.size * jnp.dtype(q.dtype).itemsize)
    return math.sqrt(num / den), nbytes / count, largest


def heldout(model, step, runs, tx, m, steps):
    xe, ye = task(jax.random.key(99), m["vocab"], 4 * m["batch"], m["seq"])
    out = {}
    for name, (base, lora) in runs.items():
        lora, opt = jax.tree.map(jnp.copy, lora), tx.init(lora)
        for i in range(steps):
            x, y = task(jax.random.key(1000 + i), m["vocab"], m["batch"], m["seq"])
            lora, opt, _ = step(base, lora, opt, x, y)
        out[name] = float(jax.jit(lambda b, l: xent(lj.wrap(model.apply)(b, l, xe), ye))(base, lora))
    return out


def report(name, m, args):
    model, params, runs, step, tx, xy, _ = build(m)
    print(f"\n== {name}: {m}")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    mem = memory(step, runs, tx, xy)
    t = timing(step, runs, tx, xy, args.rounds, args.iters)
    losses = heldout(model, step, runs, tx, m, args.train_steps)
    fa, ft, ftot = mem["float"]
    print(f"{'base':6} {'step/float':>10} {'(min-max)':>13} {'args':>6} {'temp':>6} {'total':>6} {'+temp/largest W':>15} "
          f"{'B/param':>8} {'rel.err':>8} {'held-out':>9}")
    for n in runs:
        a, tp, tot = mem[n]
        med, lo, hi = t[n]
        f_med = t["float"][0]
        if n == "float":
            extra, bpp, err, ratio = "", "", "", ""
        else:
            err_v, bpp_v, largest = quant_stats(params, runs[n][0])
            extra = f"{(tp - ft) / largest:15.2f}"
            bpp, err = f"{bpp_v:8.3f}", f"{err_v:8.4f}"
        print(f"{n:6} {med / f_med:10.3f} {lo / f_med:6.2f}-{hi / f_med:<6.2f} {a / fa:6.3f} {tp / max(ft, 1):6.3f} "
              f"{tot / ftot:6.3f} {extra:>15} {bpp:>8} {err:>8} {losses[n]:9.4f}")
    print(f"(float step {1e3 * t['float'][0]:.1f} ms; float memory: args {fa / 2**20:.1f} MiB, temp {ft / 2**20:.1f} MiB,"
          f" total {ftot / 2**20:.1f} MiB; held-out loss after {args.train_steps} steps)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=tuple(MODELS), default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=30)
    args = ap.parse_args(argv)
    for name, m in MODELS.items():
        if args.only in (None, name):
            report(name, m, args)


if __name__ == "__main__":
    main()
