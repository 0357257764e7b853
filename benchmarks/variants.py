"""LoRA variants against the LoRA step: DoRA's, and AdaLoRA's at the same initial rank.

On the benchmark LM of ``train_step.py``, in one process, interleaved rounds (medians):

* ``lora``: the factored LoRA step (``lj.wrap``, Adam): the reference;
* ``dora``: the same targets with DoRA (``dora=True``, the norm detached): magnitudes
  trained too, the norm of every adapted weight from ``a·W`` and ``a·aᵀ`` each step;
* ``dora-full-grad``: DoRA with ``dora_detach=False`` (the gradient through the norm);
* ``adalora``: the same step on an AdaLoRA tree (``lj.adalora.split``) with Adam inside
  ``lj.adalora.allocator`` (importance EMA, budget schedule, masking every ``delta_t``
  steps) and the orthogonality regularizer added to the loss;
* ``adalora-no-reg``: the same without the regularizer (what the allocator itself costs).

Times are ratios to ``lora``; compiled temporaries (``memory_analysis``) too. The AdaLoRA
steps run in the middle of the budget schedule, where the masks are recomputed. DoRA's
inference on merged weights is the base's own program: the script checks that the compiled
forward of ``lj.merge(params, dora)`` is the same program text as the base's.

    python benchmarks/variants.py           # 4 layers, d=256, vocab 4096, batch 8x128, rank 8
    python benchmarks/variants.py --lm      # train_step.py's LM: 6 layers, d=512, vocab 8192
"""

from __future__ import annotations

import dataclasses

import jax
import optax

import lora_jax as lj
from many_adapters import lm_args, timing
from train_step import LM, xent

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def build(layers, d, heads, ffn, vocab, batch, seq, rank=8):
    model = LM(vocab, d, heads, ffn, layers)
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(model.init)(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(TARGETS, rank=rank, alpha=2.0 * rank),))
    _, lora = lj.split(jax.random.key(2), params, cfg)
    _, dora = lj.split(jax.random.key(2), params, dataclasses.replace(cfg, dora=True))
    _, dora_full = lj.split(jax.random.key(2), params, dataclasses.replace(cfg, dora=True, dora_detach=False))
    _, ada = lj.adalora.split(jax.random.key(2), params, cfg)
    fwd = lj.wrap(model.apply)
    adam = optax.adam(1e-3)
    total = 1000
    alloc = lj.adalora.allocator(adam, target_rank=rank // 2, total_steps=total, t_init=100, t_final=100,
                                 delta_t=1)

    def step(tx, reg):
        def run(l, opt, x, y):
            loss_fn = lambda l: xent(fwd(params, l, x), y) + (0.1 * lj.adalora.orth_reg(l) if reg else 0.0)
            loss, g = jax.value_and_grad(loss_fn)(l)
            upd, opt = tx.update(g, opt, l)
            return optax.apply_updates(l, upd), opt, loss
        return jax.jit(run)

    state = alloc.init(ada)
    ada_opt = state._replace(count=state.count + total // 2)  # half-way through the budget schedule
    merged = lj.merge(params, dora)
    same = jax.jit(model.apply).lower(merged, x).as_text() == jax.jit(model.apply).lower(params, x).as_text()
    print(f"DoRA merged inference compiles to the base's program: {same}")
    return {
        "lora": (step(adam, False), (lora, adam.init(lora), x, y)),
        "dora": (step(adam, False), (dora, adam.init(dora), x, y)),
        "dora-full-grad": (step(adam, False), (dora_full, adam.init(dora_full), x, y)),
        "adalora": (step(alloc, True), (ada, ada_opt, x, y)),
        "adalora-no-reg": (step(alloc, False), (ada, ada_opt, x, y)),
    }


def main(argv=None):
    a, shape = lm_args(__doc__, argv)
    variants = build(**shape)
    mem = {n: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes for n, (fn, args) in variants.items()}
    t = timing(variants, a.rounds, a.iters)
    print(f"\ntraining step (median of {a.rounds} interleaved rounds x {a.iters}; spread = min..max over rounds)")
    print(f"{'variant':15s} {'ms':>8s} {'x lora':>8s} {'spread':>14s} {'temp MiB':>9s} {'x lora':>8s}")
    for name, (med, lo, hi) in t.items():
        ref = t["lora"][0]
        print(f"{name:15s} {med * 1e3:8.1f} {med / ref:8.3f} {lo / ref:6.3f}..{hi / ref:<6.3f} "
              f"{mem[name] / 2**20:9.1f} {mem[name] / mem['lora']:8.3f}")


if __name__ == "__main__":
    main()
