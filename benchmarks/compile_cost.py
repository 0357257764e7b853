"""First-call cost: ``lj.split`` and the first factored call against the merge strategy and
the plain model, each from a cold start (``jax.clear_caches()`` before every measurement).

Every measurement is wall time of trace + jaxpr interpretation + XLA compile + one run. The
variants of a model run one after another within a round, and rounds repeat (interleaved);
the tables give medians and the spread (min-max) over rounds.

* ``split``: ``lj.split`` alone (usage tracing + adapter init), on a 12-layer MLP of distinct
  widths, a small conv net and a Hugging Face Flax BERT (tiny config built in code);
* on the benchmark LM of ``train_step.py`` (8, 16 and 32 unrolled layers, and 80 layers under
  ``nn.scan``), the forward under ``jit``:
  ``split+factored`` (``lj.split`` with axis inference, then ``jit(lj.wrap(f))``'s first call),
  ``factored`` (the first call alone), ``merge`` (``jit(lj.wrap(f, strategy="merge"))``'s
  first call) and ``plain`` (``jit(f)`` on the original parameters). Ratios are to ``merge``;
  per-layer times are ``time / layers`` and the slope between layer counts.

    python benchmarks/compile_cost.py                      # everything, 3 rounds
    python benchmarks/compile_cost.py --only split         # the split table only
    python benchmarks/compile_cost.py --only python        # interpretation and walk per layer, 8-64 layers
    python benchmarks/compile_cost.py --only lm --step     # the LM table for a training step's gradient
    python benchmarks/compile_cost.py --profile 32         # cProfile of split+factored, 32 layers
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_step import LM, Block  # noqa: E402  (the benchmark LM)

RULES = lj.LoraConfig(rules=(lj.Rule(r".*/(q|k|v|o|up|down)/kernel", rank=8, alpha=16.0),))
LM_SHAPE = dict(d=128, heads=4, ffn=256, vocab=512)


class ScannedLM(LM):
    """The benchmark LM with its blocks stacked under ``nn.scan``."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.d, name="embed")(ids)
        body = nn.scan(lambda blk, x, _: (blk(x), None), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=self.layers)
        h, _ = body(Block(self.d, self.heads, self.ffn, name="blocks"), h, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(h))


class MLP(nn.Module):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Dense(w, name=f"fc{i}")(x))
        return x


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, c in enumerate((16, 24, 32, 48, 64)):
            x = nn.relu(nn.Conv(c, (3, 3), strides=2 if i % 2 else 1, name=f"conv{i}")(x))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def split_models():
    """name -> (apply_fn, params, args, config) for the split table."""
    out = {}
    mlp = MLP(tuple(48 + 16 * i for i in range(12)))
    x = jnp.ones((4, 40))
    out["mlp12"] = (mlp.apply, jax.jit(mlp.init)(jax.random.key(0), x), (x,),
                    lj.LoraConfig(rules=(lj.Rule(r".*/fc\d+/kernel", rank=8),)))
    conv = ConvNet()
    img = jnp.ones((2, 32, 32, 3))
    out["convnet"] = (conv.apply, jax.jit(conv.init)(jax.random.key(0), img), (img,),
                      lj.LoraConfig(rules=(lj.Rule(r".*/conv\d/kernel", rank=2),)))
    try:
        from transformers import BertConfig, FlaxBertModel
    except ImportError as e:
        print(f"skipping bert: {e}")
    else:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        bert = FlaxBertModel(cfg, seed=0)
        ids = jnp.ones((2, 16), jnp.int32)
        out["bert"] = (lambda p, i: bert(i, params=p).last_hidden_state, bert.params, (ids,),
                       lj.LoraConfig.all_linear(rank=8))
    return out


def cold(fn):
    """Seconds for ``fn()`` (blocked on its result) after dropping every compiled program."""
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def summarize(samples):
    return statistics.median(samples), min(samples), max(samples)


def fmt(samples):
    med, lo, hi = summarize(samples)
    return f"{med:7.2f} ({lo:5.2f}-{hi:5.2f})"


def split_table(rounds):
    models = split_models()
    times = {name: [] for name in models}
    key = jax.random.key(1)
    for _ in range(rounds):
        for name, (f, params, args, cfg) in models.items():
            times[name].append(cold(lambda: lj.split(key, params, cfg, apply_fn=f, args=args)))
    print(f"\nlj.split, cold (s: median (min-max) of {rounds} interleaved rounds)")
    for name, (_, params, args, cfg) in models.items():
        _, lora = lj.split(jax.random.key(1), params, cfg, apply_fn=models[name][0], args=args)
        print(f"{name:8s} {len(lj.targets(lora)):3d} targets  {fmt(times[name])}")


def lm(layers, scanned):
    model = (ScannedLM if scanned else LM)(layers=layers, **LM_SHAPE)
    ids = jax.random.randint(jax.random.key(0), (2, 32), 0, LM_SHAPE["vocab"])
    return model.apply, jax.jit(model.init)(jax.random.key(1), ids), ids


def first_calls(f, params, ids, step=False):
    """name -> thunk of a cold first call: the forward under ``jit``, or with ``step`` the
    gradient of a loss (w.r.t. the adapters; the plain model's w.r.t. every weight, as full
    fine-tuning), the first call of a training loop."""
    key = jax.random.key(2)  # made here: seeding compiles a program of its own, the user's anyway
    base, lora = lj.split(key, params, RULES, apply_fn=f, args=(ids,))

    def first(g, *args):
        if not step:
            return jax.jit(g)(*args)
        return jax.jit(jax.grad(lambda p, *rest: jnp.mean(jnp.square(g(p, *rest)))))(*args)

    def adapted(strategy):
        wrapped = lj.wrap(f, strategy)
        return lambda l, b, x: wrapped(b, l, x)  # the adapters first: the gradient's argument

    def split_factored():
        b, l = lj.split(key, params, RULES, apply_fn=f, args=(ids,))
        return first(adapted("factored"), l, b, ids)

    return {
        "split+factored": split_factored,
        "factored": lambda: first(adapted("factored"), lora, base, ids),
        "merge": lambda: first(adapted("merge"), lora, base, ids),
        "plain": lambda: first(f, params, ids),
    }


def lm_table(rounds, depths, step=False):
    models = {(n, s): lm(n, s) for n, s in depths}
    calls = {k: first_calls(*m, step=step) for k, m in models.items()}
    names = list(next(iter(calls.values())))
    times = {k: {n: [] for n in names} for k in models}
    for _ in range(rounds):
        for k in models:
            for n in names:
                times[k][n].append(cold(calls[k][n]))
    what = "gradient of a loss under jit; plain: w.r.t. every weight" if step else "forward under jit"
    print(f"\nfirst call ({what}), cold; s: median (min-max) of {rounds} interleaved rounds; "
          f"LM {LM_SHAPE}, r=8 on q,k,v,o,up,down")
    print(f"{'model':12s}" + "".join(f"{n:>24s}" for n in names) + f"{'split+fact/merge':>18s}{'fact/merge':>12s}")
    med = {k: {n: summarize(v)[0] for n, v in t.items()} for k, t in times.items()}
    for (n_layers, scanned), t in times.items():
        m = med[(n_layers, scanned)]
        label = f"{n_layers}{' scanned' if scanned else ' layers'}"
        print(f"{label:12s}" + "".join(f"{fmt(t[n]):>24s}" for n in names)
              + f"{m['split+factored'] / m['merge']:18.2f}{m['factored'] / m['merge']:12.2f}")
    unrolled = sorted(n for n, s in models if not s)
    if len(unrolled) > 1:
        print("\nper layer (unrolled), ms: time/layers, and the slope between consecutive depths")
        for n in names:
            per = [1e3 * med[(d, False)][n] / d for d in unrolled]
            slopes = [1e3 * (med[(b, False)][n] - med[(a, False)][n]) / (b - a) for a, b in zip(unrolled, unrolled[1:])]
            flat = max(slopes) / min(slopes) if min(slopes) > 0 else float("inf")
            print(f"{n:16s} /layer " + " ".join(f"{d}:{p:6.1f}" for d, p in zip(unrolled, per))
                  + "   slope " + " ".join(f"{a}->{b}:{s:6.1f}" for (a, b), s in zip(zip(unrolled, unrolled[1:]), slopes))
                  + f"   slopes within 20%: {'yes' if flat <= 1.2 else 'no'} (max/min {flat:.2f})")


def python_table(depths, reps=5):
    """The Python side of the first call alone, per layer: interpreting the jaxpr (``lj.wrap``
    under ``jax.make_jaxpr``, with the model's trace already kept) and axis inference's walk
    (``trace_usage`` on a kept trace); no XLA compile in either. Python's cyclic garbage
    collector is off while timing: its passes add a jitter of 0-6 ms/layer here that depends
    on every live object of the process, not on this code."""
    import gc

    from lora_jax.usage import trace_usage

    print(f"\nPython per layer (trace kept, no compile, gc off while timing), ms: median of {reps}")
    for layers in depths:
        f, params, ids = lm(layers, False)
        base, lora = lj.split(jax.random.key(2), params, RULES, apply_fn=f, args=(ids,))
        interp, walk = [], []
        for _ in range(reps):
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                jax.make_jaxpr(lj.wrap(f))(base, lora, ids)
                t1 = time.perf_counter()
                trace_usage(f, params, (ids,))
                t2 = time.perf_counter()
            finally:
                gc.enable()
            interp.append(t1 - t0)
            walk.append(t2 - t1)
        print(f"{layers:3d} layers  interpretation {1e3 * statistics.median(interp) / layers:6.1f}"
              f"  axis-inference walk {1e3 * statistics.median(walk) / layers:5.2f}")


def profile(layers, scanned=False, top=25):
    f, params, ids = lm(layers, scanned)
    jax.clear_caches()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    base, lora = lj.split(jax.random.key(2), params, RULES, apply_fn=f, args=(ids,))
    t1 = time.perf_counter()
    jax.block_until_ready(jax.jit(lj.wrap(f))(base, lora, ids))
    prof.disable()
    t2 = time.perf_counter()
    stats = pstats.Stats(prof)
    by_file: dict[str, float] = {}
    for (file, _, fn), (_, _, tt, _, _) in stats.stats.items():
        key = file.split("lora_jax/")[-1] if "lora_jax/" in file else ("jax" if "/jax/" in file else "other")
        by_file[key] = by_file.get(key, 0.0) + tt
    total = sum(by_file.values())
    print(f"\ncProfile of split + first factored call, {layers} layers{' scanned' if scanned else ''}: "
          f"split {t1 - t0:.2f} s, first factored call {t2 - t1:.2f} s (under the profiler)")
    for k, v in sorted(by_file.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {k:28s} {v:6.2f} s own time ({v / total:5.1%})")
    cum = [(ct, f"{file.split('lora_jax/')[-1]}:{fn}") for (file, _, fn), (_, _, _, ct, _) in stats.stats.items()
           if "lora_jax/" in file]
    print("  lora_jax functions by cumulative time:")
    for ct, name in sorted(cum, reverse=True)[:top]:
        print(f"    {ct:6.2f} s  {name}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("split", "lm", "python"), default=None)
    ap.add_argument("--depths", default="8,16,32,80s", help="layer counts; a trailing 's' means nn.scan")
    ap.add_argument("--profile", type=int, default=None, metavar="LAYERS")
    ap.add_argument("--step", action="store_true", help="the LM table for a training step's gradient, not the forward")
    a = ap.parse_args(argv)
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}")
    if a.profile is not None:
        profile(a.profile)
        return
    if a.only in (None, "split"):
        split_table(a.rounds)
    if a.only in (None, "lm"):
        depths = [(int(d.rstrip("s")), d.endswith("s")) for d in a.depths.split(",")]
        lm_table(a.rounds, depths, a.step)
    if a.only in (None, "python"):
        python_table([8, 16, 32, 64])


if __name__ == "__main__":
    main()
