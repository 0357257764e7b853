"""One LoRA training step (rank 8) of lora_jax against its peers, in one process.

Every variant is the same step (forward, gradients, Adam) on the same model and batch, timed
side by side over interleaved rounds; times are medians and the spread (min-max) of the
rounds, as ratios to the frozen-model bound:

* ``bound``: forward + gradient w.r.t. the embedding output with every weight frozen (no
  weight gradients at all: the least work any adapter method must do; as in train_step.py);
* ``factored``: ``lj.wrap`` (default strategy), gradients w.r.t. the adapters only;
* ``qwix``: ``qwix.apply_lora_to_model`` with a ``qwix.LoraProvider``, the way google-tunix
  applies LoRA, gradients w.r.t. ``nnx.LoRAParam`` only (as tunix's PEFT trainer);
* ``full``: full fine-tune (gradients of every weight, Adam over all of them).

Models: the benchmark LM of train_step.py (bound, factored and full only: qwix applies to
NNX modules), and google-tunix's own Llama3, Gemma3 and Qwen3 NNX models with tiny random
configs (4 layers, d 256, GQA 4 query / 2 key-value heads, float32), adapters on the attention
and MLP projections (``--size 1b``: 16 layers, d 2048, 16 query / 8 key-value heads, ffn 8192,
vocab 32768, batch 1 x 1024, bfloat16 weights: 0.94 B parameters for the LM, 1.07-1.14 B for
tunix's models; for an accelerator).
``llama3-scan`` is tunix's Llama3 with its decoder layers stacked and run
under ``jax.lax.scan`` (each layer ``nnx.split``, stacked leaf by leaf, ``nnx.merge``-d in the
scan body; qwix is not run there, as its adapters apply only through the model's own call).
Without google-tunix only the LM runs; a peer that does not import is named and skipped.
Install the peers with ``pip install -e '.[bench]'``. PEFT on torch is not part of this
comparison.

    python benchmarks/peers.py                         # every model, 5 rounds x 3 steps
    python benchmarks/peers.py --models llama3,llama3-scan --rounds 7
    python benchmarks/peers.py --size 1b                # bfloat16, about 1 B parameters: for an accelerator
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_step import build as build_lm  # noqa: E402  (the benchmark LM and its steps)
from train_step import SIZE_1B, cast, memory, nonzero_b, timing_samples, xent  # noqa: E402

RANK, ALPHA = 8, 16.0
SIZES = {  # tiny: random configs a CPU runs in seconds; 1b: about 1 B parameters, for an accelerator
    "tiny": dict(layers=4, d=256, heads=4, kv_heads=2, head_dim=64, ffn=1024, vocab=2048, batch=4, seq=128,
                 window=64, dtype="float32"),
    "1b": dict(SIZE_1B, kv_heads=8, head_dim=128, window=512),
}
TARGETS = {  # module names of the attention and MLP projections
    "llama3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"),
}
CHAINED = {"full": (0, 1), "factored": (1, 2), "qwix": (0, 1)}


def optional(name):
    """The module, or None (and say so) when it does not import."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 -- any failure to import means: skip this peer
        print(f"not run: {name} does not import ({type(e).__name__}: {e})")
        return None


def tunix_model(family, s):
    """A random tunix model of ``family`` of shape ``s`` (one of :data:`SIZES`), its weights
    in float32 (``train_step.cast`` makes them ``s["dtype"]``)."""
    common = dict(num_layers=s["layers"], embed_dim=s["d"], hidden_dim=s["ffn"], num_heads=s["heads"],
                  head_dim=s["head_dim"], num_kv_heads=s["kv_heads"])
    from flax import nnx

    if family == "llama3":
        from tunix.models.llama3 import model as m
        cfg = m.ModelConfig(vocab_size=s["vocab"], rope_theta=500_000, norm_eps=1e-5, **common)
        return m.Llama3(cfg, rngs=nnx.Rngs(0))
    if family == "qwen3":
        from tunix.models.qwen3 import model as m
        cfg = m.ModelConfig(vocab_size=s["vocab"], rope_theta=1_000_000, norm_eps=1e-6, **common)
        return m.Qwen3(cfg, rngs=nnx.Rngs(0))
    from tunix.models.gemma3 import model as m
    cfg = m.ModelConfig(num_embed=s["vocab"], sliding_window_size=s["window"], param_dtype=jnp.float32, **common)
    return m.Gemma3(cfg, rngs=nnx.Rngs(0))


def batch(s):
    ids = jax.random.randint(jax.random.key(0), (s["batch"], s["seq"] + 1), 0, s["vocab"])
    x, y = ids[:, :-1], ids[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(s["seq"]), x.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s["seq"], s["seq"]), bool)), (s["batch"], s["seq"], s["seq"]))
    return x, pos, mask, y


def logits_of(model, x, pos, mask):
    return model(x, pos, None, mask)[0]


class embedded:
    """Within the block, ``model``'s embedder returns ``h`` whatever the tokens (the bound)."""

    def __init__(self, model, h):
        self.cls, self.h = type(model.embedder), h

    def __enter__(self):
        self.orig = self.cls.encode
        self.cls.encode = lambda _, tokens: self.h

    def __exit__(self, *exc):
        self.cls.encode = self.orig


def unrolled(model, *filters):
    """``(states, logits, embed)`` of ``model`` as it is: ``nnx.split(model, *filters)``'s
    states, ``logits(states, x, pos, mask, h=None)`` (``h``: the embedding output to start
    from) and ``embed(states, x)``, the embedding output of the tokens."""
    from flax import nnx

    graphdef, *states = nnx.split(model, *filters)

    def logits(states, x, pos, mask, h=None):
        m = nnx.merge(graphdef, *states)
        if h is None:
            return logits_of(m, x, pos, mask)
        with embedded(m, h):
            return logits_of(m, x, pos, mask)

    embed = lambda states, x: nnx.merge(graphdef, *states).embedder.encode(x)  # noqa: E731
    return states, logits, embed


def scanned(model):
    """:func:`unrolled` with the decoder layers stacked (each layer's ``nnx.split`` state,
    stacked leaf by leaf) and run under ``jax.lax.scan``, which merges one layer's state per
    step. The states are ``(rest, layers)``: ``rest`` maps the embedder, final norm and head to
    their states, ``layers`` is the stacked layer state."""
    from flax import nnx

    defs, rest = {}, {}
    for name in ("embedder", "final_norm", "lm_head"):
        if hasattr(model, name):
            defs[name], rest[name] = nnx.split(getattr(model, name))
    per_layer = [nnx.split(layer) for layer in model.layers]
    layer_def = per_layer[0][0]
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in per_layer))
    part = lambda rest, name: nnx.merge(defs[name], rest[name])  # noqa: E731

    def logits(states, x, pos, mask, h=None):
        rest, layers = states
        h = part(rest, "embedder").encode(x) if h is None else h

        def body(h, layer):
            return nnx.merge(layer_def, layer)(h, pos, None, mask)[1], None

        h, _ = jax.lax.scan(body, h, layers)
        h = part(rest, "final_norm")(h)
        return part(rest, "lm_head")(h) if "lm_head" in defs else part(rest, "embedder").decode(h)

    embed = lambda states, x: part(states[0], "embedder").encode(x)  # noqa: E731
    return (rest, layers), logits, embed


def tunix_steps(family, s, qwix, scan=False):
    """name -> (jitted step, thunk of its arguments), as train_step.build gives them; with
    ``scan``, the model's layers stacked and run under ``jax.lax.scan`` (:func:`scanned`)."""
    from flax import nnx

    form = scanned if scan else unrolled
    model = tunix_model(family, s)
    x, pos, mask, y = batch(s)
    tx = optax.adam(1e-3)
    params, logits, embed = form(model)
    params = cast(params, s["dtype"])

    def full(params, opt, x, pos, mask, y):
        loss, g = jax.value_and_grad(lambda p: xent(logits(p, x, pos, mask), y))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    def bound(params, h, x, pos, mask, y):
        return jax.value_and_grad(lambda h: xent(logits(params, x, pos, mask, h), y))(h)

    h0 = jax.jit(embed)(params, x)
    names = "|".join(TARGETS[family])
    # adapters in the weights' dtype, as qwix's are cast (lj.split's default keeps them at least float32)
    cfg = lj.LoraConfig(rules=(lj.Rule(rf".*/({names})/(w|kernel)", rank=RANK, alpha=ALPHA),), dtype=s["dtype"])
    base, lora = lj.split(jax.random.key(2), params, cfg, apply_fn=logits, args=(x, pos, mask))
    lora = nonzero_b(lora)
    fwd = lj.wrap(logits)

    def factored(base, lora, opt, x, pos, mask, y):
        loss, g = jax.value_and_grad(lambda l: xent(fwd(base, l, x, pos, mask), y))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    steps = {
        "bound": (jax.jit(bound, keep_unused=True), lambda: (params, h0, x, pos, mask, y)),
        "factored": (jax.jit(factored, donate_argnums=(1, 2)), lambda: (base, lora, tx.init(lora), x, pos, mask, y)),
        "full": (jax.jit(full, donate_argnums=(0, 1)), lambda: (params, tx.init(params), x, pos, mask, y)),
    }
    if qwix is not None and scan:
        # qwix applies its adapters by intercepting the model's own call: layers merged one by
        # one in a scan body run without them (that step's flops were 0.49x the bound's)
        print(f"not run: qwix on {family} under scan (its adapters apply only through the model's own call)")
    elif qwix is not None:
        provider = qwix.LoraProvider(module_path="|".join(f".*{n}" for n in TARGETS[family]), rank=RANK, alpha=ALPHA)
        plain = tunix_model(family, s)
        qmodel = qwix.apply_lora_to_model(plain, provider, rngs=nnx.Rngs(3), **plain.get_model_input())
        (qlora, frozen), qlogits, _ = unrolled(qmodel, nnx.LoRAParam, ...)
        qlora, frozen = cast(qlora, s["dtype"]), cast(frozen, s["dtype"])
        print(f"{family}: qwix {len(jax.tree.leaves(qlora)) // 2} targets, "
              f"{sum(v.size for v in jax.tree.leaves(qlora)):,} adapter parameters")

        def qwix_step(qlora, opt, frozen, x, pos, mask, y):
            loss, g = jax.value_and_grad(lambda l: xent(qlogits((l, frozen), x, pos, mask), y))(qlora)
            upd, opt = tx.update(g, opt, qlora)
            return optax.apply_updates(qlora, upd), opt, loss

        steps["qwix"] = (jax.jit(qwix_step, donate_argnums=(0, 1)),
                         lambda: (qlora, tx.init(qlora), frozen, x, pos, mask, y))
    n_lora = sum(w.num_params for _, w in lj.targets(lora))
    print(f"{family}: {len(lj.targets(lora))} targets, {n_lora:,} adapter parameters")
    return steps


def report(name, steps, rounds, iters):
    mem = memory(steps)
    times = timing_samples(steps, rounds, iters, CHAINED)
    ratios = {n: [t / b for t, b in zip(ts, times["bound"])] for n, ts in times.items()}
    print(f"\n{name}: step time, median of {rounds} interleaved rounds x {iters}; ratio to the bound per "
          "round, median (min-max); flops (cost_analysis) to the bound's")
    print(f"{'step':10s} {'ms':>8s} {'x bound':>8s} {'spread':>14s} {'flops x bound':>14s}")
    for n in times:
        r = ratios[n]
        print(f"{n:10s} {statistics.median(times[n]) * 1e3:8.1f} {statistics.median(r):8.3f} "
              f"{f'({min(r):.3f}-{max(r):.3f})':>14s} {mem[n][2] / mem['bound'][2]:14.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lm,llama3,gemma3,qwen3,llama3-scan",
                    help="lm: the benchmark LM of train_step.py; a tunix family, with -scan for its layers under scan")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny",
                    help="tiny: float32, 4 layers, d 256 (CPU); "
                         "1b: bfloat16, 16 layers, d 2048, seq 1024 (accelerator)")
    a = ap.parse_args(argv)
    s = SIZES[a.size]
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, rank {RANK}, "
          f"size {a.size}: {s}")
    tunix = optional("tunix")
    qwix = optional("qwix")
    for name in a.models.split(","):
        if name == "lm":
            steps, _, _, _ = build_lm(s["layers"], s["d"], s["heads"], s["ffn"], s["vocab"], s["batch"], s["seq"],
                                      rank=RANK, alpha=ALPHA, dtype=s["dtype"])
            report("train_step.py LM", {n: steps[n] for n in ("bound", "factored", "full")}, a.rounds, a.iters)
        elif tunix is None:
            print(f"not run: tunix {name} (google-tunix does not import)")
        else:
            family, _, scan = name.partition("-")
            report(f"tunix {name}", tunix_steps(family, s, qwix, scan=bool(scan)), a.rounds, a.iters)


if __name__ == "__main__":
    main()
