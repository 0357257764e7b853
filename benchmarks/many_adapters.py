"""Many adapters on one base: a mixed batch (each example its own adapter) against one adapter.

On the benchmark LM of ``train_step.py``, in one process, interleaved rounds (medians):

* ``single``: the batch with one adapter (rank 32, factored ``lj.wrap``): the reference;
* ``mixed/N``: 8 examples using 8 different adapters (ranks 4, 8, ..., 32) from a stack of
  N adapters (``lj.stack``; N = 1 puts every example on adapter 0), ``adapter_ids=``;
* ``merged``: the base with one adapter merged in (inference only: what a merged model
  costs, and what cannot serve a mixed batch);
* ``loop``: a loop over the 8 adapters, each running its own example (the way libraries
  without mixed batches serve one);
* ``take/N`` (training only): the mixed batch's step on a stack of N that takes the batch's
  slots out of the stack and of the Adam state (``lj.batch_slots``, ``lj.take_adapters``),
  trains those and writes them back in place (``lj.put_adapters``, the state donated).

Each for the forward pass (inference) and a training step (gradients w.r.t. the adapters,
Adam). The ids are arguments of the compiled functions, as in a loop whose batches change. Times are ratios to ``single``; compiled temporaries (``memory_analysis``) too.
First, one layer's adapter products two ways (:func:`kernels`): gathered factors (what
``wrap`` does) against ``lax.ragged_dot`` over rows sorted by adapter.

    python benchmarks/many_adapters.py            # 4 layers, d=256, vocab 4096, batch 8x128
    python benchmarks/many_adapters.py --lm       # train_step.py's LM: 6 layers, d=512, vocab 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from train_step import LM, xent

RANKS = (4, 8, 12, 16, 20, 24, 28, 32)
TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def adapters(params, model, x, n):
    """``n`` adapters of ranks cycling through RANKS, with non-zero B."""
    out = []
    for k in range(n):
        r = RANKS[k % len(RANKS)]
        cfg = lj.LoraConfig(rules=(lj.Rule(TARGETS, rank=r, alpha=2.0 * r),))
        _, lora = lj.split(jax.random.key(10 + k), params, cfg)
        out.append(jax.tree.map(
            lambda w: w.replace(b=0.01 * jax.random.normal(jax.random.key(k), w.b.shape)) if lj.is_lora(w) else w,
            lora, is_leaf=lj.is_lora))
    return out


def build(layers, d, heads, ffn, vocab, batch, seq):
    model = LM(vocab, d, heads, ffn, layers)
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(model.init)(jax.random.key(1), x)
    loras = adapters(params, model, x, 64)
    single = loras[len(RANKS) - 1]  # rank 32, the stacks' padded rank
    stacks = {n: lj.stack(loras[:n]) for n in (1, 8, 64)}
    mixed_ids = {1: jnp.zeros(batch, jnp.int32), 8: jnp.arange(batch, dtype=jnp.int32) % 8,
                 64: jnp.arange(batch, dtype=jnp.int32) % 8}
    fwd = lj.wrap(model.apply)
    tx = optax.adam(1e-3)

    def train(loss_fn):
        def step(lora, opt, x, y):
            loss, g = jax.value_and_grad(loss_fn)(lora, x, y)
            upd, opt = tx.update(g, opt, lora)
            return optax.apply_updates(lora, upd), opt, loss
        return step

    one = lambda l, x, y: xent(fwd(params, l, x), y)
    mixed = lambda ids: (lambda s, x, y: xent(fwd(params, s, x, adapter_ids=ids), y))

    def loop(ls, x, y):  # each adapter runs its own example
        return sum(xent(fwd(params, l, x[i:i + 1]), y[i:i + 1]) for i, l in enumerate(ls)) / len(ls)

    looped = loras[:batch]
    forward = {
        "single": (jax.jit(lambda l, x: fwd(params, l, x)), (single, x)),
        **{f"mixed/{n}": (jax.jit(lambda s, x, ids: fwd(params, s, x, adapter_ids=ids)), (stacks[n], x, mixed_ids[n]))
           for n in stacks},
        "merged": (jax.jit(model.apply), (lj.merge(params, single), x)),
        "loop": (jax.jit(lambda ls, x: [fwd(params, l, x[i:i + 1]) for i, l in enumerate(ls)]), (looped, x)),
    }
    def mixed_step(stacked, opt, x, y, ids):  # (the ids are an argument, as they change from batch to batch)
        return train(mixed(ids))(stacked, opt, x, y)

    def take_step(stacked, opt, x, y, ids):  # the batch's slots only
        slots, local = lj.batch_slots(stacked, ids)
        sub, sub_opt = lj.take_adapters(stacked, slots), lj.take_adapters(opt, slots)
        sub, sub_opt, loss = train(mixed(local))(sub, sub_opt, x, y)
        return lj.put_adapters(stacked, slots, sub), lj.put_adapters(opt, slots, sub_opt), loss

    training = {
        "single": (jax.jit(train(one)), (single, tx.init(single), x, y)),
        **{f"mixed/{n}": (jax.jit(mixed_step), (stacks[n], tx.init(stacks[n]), x, y, mixed_ids[n])) for n in stacks},
        **{f"take/{n}": (Threaded(jax.jit(take_step, donate_argnums=(0, 1)), 2),
                         (stacks[n], tx.init(stacks[n]), x, y, mixed_ids[n])) for n in (8, 64)},
        "loop": (jax.jit(train(loop)), (looped, tx.init(looped), x, y)),
    }
    return forward, training


class Threaded:
    """A jitted step whose first ``k`` arguments are donated state: each call feeds the
    previous call's state back in (the timing loop calls it with the same arguments)."""

    def __init__(self, step, k):
        self.step, self.k, self.state = step, k, None

    def lower(self, *args):
        return self.step.lower(*args)

    def __call__(self, *args):
        state = self.state if self.state is not None else [jax.tree.map(jnp.copy, a) for a in args[: self.k]]
        out = self.step(*state, *args[self.k:])
        self.state = list(out[: self.k])
        return out


def memory(variants):
    return {name: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
            for name, (fn, args) in variants.items()}


def timing(variants, rounds, iters):
    """Median seconds per call; each round runs every variant (side by side)."""
    for fn, args in variants.values():  # compile + warm up
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, args) in variants.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: (statistics.median(ts), min(ts), max(ts)) for name, ts in times.items()}


def report(title, variants, rounds, iters):
    mem, t = memory(variants), timing(variants, rounds, iters)
    ref_t, ref_m = t["single"][0], mem["single"]
    print(f"\n{title} (median of {rounds} interleaved rounds x {iters}; spread = min..max over rounds)")
    print(f"{'variant':10s} {'ms':>8s} {'x single':>9s} {'spread':>14s} {'temp MiB':>9s} {'x single':>9s}")
    for name, (med, lo, hi) in t.items():
        print(f"{name:10s} {med * 1e3:8.1f} {med / ref_t:9.3f} {lo / ref_t:6.3f}..{hi / ref_t:<6.3f} "
              f"{mem[name] / 2**20:9.1f} {mem[name] / ref_m:9.3f}")
    print(f"64 stacked vs 8 stacked: {t['mixed/64'][0] / t['mixed/8'][0]:.3f}x time, "
          f"{mem['mixed/64'] / mem['mixed/8']:.3f}x temporaries")
    if "take/64" in t:
        print(f"64 stacked vs 8 stacked, the batch's slots taken: {t['take/64'][0] / t['take/8'][0]:.3f}x time, "
              f"{mem['take/64'] / mem['take/8']:.3f}x temporaries")
    return t


def kernels(tokens_per_example, d, rank, examples=8, stacked=(8, 64), rounds=7, iters=3):
    """The adapter product of one layer, ``(x_e·A_e)·B_e`` for every example, two ways:
    ``gather`` (each example's factors gathered, products batched over the examples: what
    ``wrap`` does) and ``ragged`` (rows sorted by adapter, ``lax.ragged_dot`` over the
    stacked factors with the examples' counts per adapter as group sizes)."""
    x = jax.random.normal(jax.random.key(0), (examples, tokens_per_example, d))
    out = {}
    for n in stacked:
        a = jax.random.normal(jax.random.key(1), (n, rank, d))
        b = jax.random.normal(jax.random.key(2), (n, rank, d))
        ids = jnp.arange(examples, dtype=jnp.int32) % min(n, examples)

        def gather(x, a, b, ids):
            return jnp.einsum("etr,erd->etd", jnp.einsum("etd,erd->etr", x, a[ids]), b[ids])

        def ragged(x, a, b, ids):
            order = jnp.argsort(ids)
            rows = x[order].reshape(-1, d)
            sizes = jnp.bincount(ids, length=n).astype(jnp.int32) * tokens_per_example
            h = jax.lax.ragged_dot(rows, jnp.swapaxes(a, 1, 2), sizes)
            y = jax.lax.ragged_dot(h, b, sizes).reshape(x.shape)
            return jnp.zeros_like(y).at[order].set(y)

        fns = {f"gather/{n}": (jax.jit(gather), (x, a, b, ids)), f"ragged/{n}": (jax.jit(ragged), (x, a, b, ids))}
        np.testing.assert_allclose(fns[f"gather/{n}"][0](x, a, b, ids), fns[f"ragged/{n}"][0](x, a, b, ids),
                                   rtol=1e-3, atol=1e-2)
        out.update(timing(fns, rounds, iters))
    return out


def lm_args(doc: str, argv=None):
    """The command line of the LM benchmarks: ``--lm`` (train_step.py's LM), ``--rounds``,
    ``--iters``; returns the arguments and the model shape, and prints the backend."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--lm", action="store_true", help="train_step.py's LM (6 layers, d=512, vocab 8192)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args(argv)
    if a.lm:
        shape = dict(layers=6, d=512, heads=8, ffn=2048, vocab=8192, batch=8, seq=128)
    else:
        shape = dict(layers=4, d=256, heads=4, ffn=1024, vocab=4096, batch=8, seq=128)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, shape {shape}")
    return a, shape


def main(argv=None):
    a, shape = lm_args(__doc__, argv)
    print(f"adapters: ranks {RANKS} cycled, targets {TARGETS}; single = the rank-32 adapter")
    k = kernels(shape["seq"], shape["d"], 32, shape["batch"], rounds=a.rounds, iters=a.iters)
    print(f"\none layer's adapter product for {shape['batch']} examples x {shape['seq']} tokens, d={shape['d']}, "
          f"r=32 (median ms): " + ", ".join(f"{n} {t * 1e3:.2f}" for n, (t, _, _) in k.items()))
    forward, training = build(**shape)
    tf = report("forward (inference)", forward, a.rounds, a.iters)
    tt = report("training step", training, a.rounds, a.iters)
    print(f"\nmixed batch of 8 adapters vs one adapter: forward {tf['mixed/8'][0] / tf['single'][0]:.3f}x, "
          f"training step {tt['mixed/8'][0] / tt['single'][0]:.3f}x; merged-weight forward "
          f"{tf['merged'][0] / tf['single'][0]:.3f}x; loop forward {tf['loop'][0] / tf['single'][0]:.3f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
