"""One LoRA training step (rank 8, float32) of lora_jax against its peers, in one process.

Every variant is the same step (forward, gradients, Adam) on the same model and batch, timed
side by side over interleaved rounds; times are medians and the spread (min-max) of the
rounds, as ratios to the frozen-model bound:

* ``bound``: forward + gradient w.r.t. the embedding output with every weight frozen (no
  weight gradients at all: the least work any adapter method must do; as in train_step.py);
* ``factored``: ``lj.wrap`` (default strategy), gradients w.r.t. the adapters only;
* ``qwix``: ``qwix.apply_lora_to_model`` with a ``qwix.LoraProvider``, the way google-tunix
  applies LoRA, gradients w.r.t. ``nnx.LoRAParam`` only (as tunix's PEFT trainer);
* ``full``: full fine-tune (gradients of every weight, Adam over all of them).

Models: google-tunix's own Llama3, Gemma3 and Qwen3 NNX models with tiny random configs
(4 layers, d 256, GQA 4 query / 2 key-value heads, float32), adapters on the attention and MLP
projections. Without google-tunix the script runs the bound, factored and full steps on the
benchmark LM of train_step.py instead; a peer that does not import is named and skipped. Install
the peers with ``pip install -e '.[bench]'``. PEFT on torch is not part of this comparison.

    python benchmarks/peers.py                         # every model, 5 rounds x 3 steps
    python benchmarks/peers.py --models llama3 --rounds 7
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
from train_step import memory, timing_samples, xent  # noqa: E402

RANK, ALPHA = 8, 16.0
SHAPE = dict(layers=4, d=256, heads=4, kv_heads=2, head_dim=64, ffn=1024, vocab=2048, batch=4, seq=128)
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
    """A tiny random tunix model of ``family``."""
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
    cfg = m.ModelConfig(num_embed=s["vocab"], sliding_window_size=64, param_dtype=jnp.float32, **common)
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


def tunix_steps(family, s, qwix):
    """name -> (jitted step, thunk of its arguments), as train_step.build gives them."""
    from flax import nnx

    model = tunix_model(family, s)
    x, pos, mask, y = batch(s)
    tx = optax.adam(1e-3)
    graphdef, params = nnx.split(model)

    def full(params, opt, x, pos, mask, y):
        loss, g = jax.value_and_grad(lambda p: xent(logits_of(nnx.merge(graphdef, p), x, pos, mask), y))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    def bound(params, h, x, pos, mask, y):
        def loss(h):
            m = nnx.merge(graphdef, params)
            with embedded(m, h):
                return xent(logits_of(m, x, pos, mask), y)

        return jax.value_and_grad(loss)(h)

    h0 = jax.jit(lambda p, x: nnx.merge(graphdef, p).embedder.encode(x))(params, x)
    names = "|".join(TARGETS[family])
    cfg = lj.LoraConfig(rules=(lj.Rule(rf".*/({names})/(w|kernel)", rank=RANK, alpha=ALPHA),))
    f = lambda state, x, pos, mask: logits_of(nnx.merge(graphdef, state), x, pos, mask)  # noqa: E731
    base, lora = lj.split(jax.random.key(2), params, cfg, apply_fn=f, args=(x, pos, mask))
    lora = nonzero_b(lora)
    fwd = lj.wrap(f)

    def factored(base, lora, opt, x, pos, mask, y):
        loss, g = jax.value_and_grad(lambda l: xent(fwd(base, l, x, pos, mask), y))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    steps = {
        "bound": (jax.jit(bound, keep_unused=True), lambda: (params, h0, x, pos, mask, y)),
        "factored": (jax.jit(factored, donate_argnums=(1, 2)), lambda: (base, lora, tx.init(lora), x, pos, mask, y)),
        "full": (jax.jit(full, donate_argnums=(0, 1)), lambda: (params, tx.init(params), x, pos, mask, y)),
    }
    if qwix is not None:
        provider = qwix.LoraProvider(module_path="|".join(f".*{n}" for n in TARGETS[family]), rank=RANK, alpha=ALPHA)
        plain = tunix_model(family, s)
        qmodel = qwix.apply_lora_to_model(plain, provider, rngs=nnx.Rngs(3), **plain.get_model_input())
        qdef, qlora, qrest = nnx.split(qmodel, nnx.LoRAParam, ...)
        print(f"{family}: qwix {len(jax.tree.leaves(qlora)) // 2} targets, "
              f"{sum(v.size for v in jax.tree.leaves(qlora)):,} adapter parameters")

        def qwix_step(qlora, opt, qrest, x, pos, mask, y):
            def loss(l):
                return xent(logits_of(nnx.merge(qdef, l, qrest), x, pos, mask), y)

            loss, g = jax.value_and_grad(loss)(qlora)
            upd, opt = tx.update(g, opt, qlora)
            return optax.apply_updates(qlora, upd), opt, loss

        steps["qwix"] = (jax.jit(qwix_step, donate_argnums=(0, 1)), lambda: (qlora, tx.init(qlora), qrest, x, pos, mask, y))
    n_lora = sum(w.num_params for _, w in lj.targets(lora))
    print(f"{family}: {len(lj.targets(lora))} targets, {n_lora:,} adapter parameters")
    return steps


def nonzero_b(lora):
    """Small random B, so the adapter path is not trivially zero."""
    return jax.tree.map(
        lambda w: w.replace(b=0.01 * jax.random.normal(jax.random.key(3), w.b.shape)) if lj.is_lora(w) else w,
        lora, is_leaf=lj.is_lora)


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
    ap.add_argument("--models", default="llama3,gemma3,qwen3")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}, rank {RANK}, float32, shape {SHAPE}")
    tunix = optional("tunix")
    qwix = optional("qwix")
    if tunix is None:
        s = SHAPE
        steps, _, _, _ = build_lm(s["layers"], s["d"], s["heads"], s["ffn"], s["vocab"], s["batch"], s["seq"],
                                  rank=RANK, alpha=ALPHA)
        report("train_step.py LM (tunix missing)", {n: steps[n] for n in ("bound", "factored", "full")},
               a.rounds, a.iters)
        return
    for family in a.models.split(","):
        report(f"tunix {family}", tunix_steps(family, SHAPE, qwix), a.rounds, a.iters)


if __name__ == "__main__":
    main()
