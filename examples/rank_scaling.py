"""Rank scaling: alpha/r stalls as the rank grows, alpha/sqrt(r) keeps improving (rsLoRA).

Run: python examples/rank_scaling.py [--steps N] [--out rank_scaling.png] [--max-rank R]

Kalajdzievski (2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv:2312.03732) argues that LoRA's scale s = alpha/r shrinks the adapter's learning as the
rank r grows, so that at a fixed learning rate a larger rank buys (almost) nothing, while
s = alpha/sqrt(r) keeps the learning rank-stable and lets a larger rank learn more.

The experiment here, small enough for a laptop CPU: a frozen random base W0 (d x d) and a
target W* = W0 + dW with dW a random orthogonal matrix, i.e. a FULL-rank change whose
singular values are all equal (the best rank-r approximation leaves a share 1 - r/d of it,
the "floor" column). Inputs x ~ N(0, I); the loss is the MSE between x·(W0 + s·A⊗B) and
x·W*, so it starts at 1. Only A and B train, with Adam at one learning rate and one step
budget for every rank and both scaling rules (same alpha, same seeds, same data). The
final loss reported is the exact expected loss over x, ||W0 + s·A⊗B - W*||_F^2 / d, from
the merged weight, averaged over seeds.

What the table shows is learning speed at a fixed learning rate and budget. Under Adam the
adapter's product moves about equally fast at every rank with alpha/r (the |dW| columns,
||s·A⊗B||_F from ``lj.delta_norms``), so beyond a moderate rank the extra directions share
the same small budget; alpha/sqrt(r) lets the product move faster as the rank grows. A
learning rate high enough for every rank to converge within the budget (``--lr 3e-3``)
brings both rules to the floor: alpha/r then needs the learning rate retuned per rank,
alpha/sqrt(r) does not, which is the paper's practical point.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

RULES = ("lora", "rslora")


def make_problem(rng, d):
    """``(w0, w_target)``: a random base and the base plus a full-rank orthogonal change."""
    w0 = rng.standard_normal((d, d)) / math.sqrt(d)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diagonal(r))[None, :]  # a uniformly random orthogonal matrix
    return w0.astype(np.float32), (w0 + q).astype(np.float32)


def layer(params, x):
    """The model: one frozen linear map, adapted by LoRA through ``lj.wrap``."""
    return x @ params["w"]


def make_run(rank, alpha, tx, steps, batch, d):
    """One jitted, seed-vmapped experiment per rank, both scaling rules side by side.

    ``(w0, w_target, key) -> {rule: (lora, loss, curve, delta_norm)}``: for each rule, split
    the base into the frozen weight and a fresh adapter, train the adapter for ``steps``
    Adam steps, and evaluate the exact expected loss of the merged weight. Both rules start
    from the same A (B = 0) and see the same batches.
    """
    forward = lj.wrap(layer)

    def one_seed(w0, w_target, key):
        k_adapter, k_data = jax.random.split(key)

        def loss_fn(base, lora, x):
            return jnp.mean((forward(base, lora, x) - x @ w_target) ** 2)

        def train(base, lora):
            def step(carry, k):
                lora, opt = carry
                x = jax.random.normal(k, (batch, d))  # a fresh batch each step
                loss, grads = jax.value_and_grad(loss_fn, argnums=1)(base, lora, x)
                updates, opt = tx.update(grads, opt, lora)
                return (optax.apply_updates(lora, updates), opt), loss

            carry = (lora, tx.init(lora))
            (lora, _), curve = jax.lax.scan(step, carry, jax.random.split(k_data, steps))
            return lora, curve

        out = {}
        for scaling in RULES:
            config = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, alpha=alpha),), scaling=scaling)
            base, lora = lj.split(k_adapter, {"w": w0}, config)
            lora, curve = train(base, lora)
            # E_x MSE for x ~ N(0, I) is ||W0 + s·A⊗B - W*||_F^2 / d: no sampling noise
            loss = jnp.sum((lj.merge(base, lora)["w"] - w_target) ** 2) / d
            out[scaling] = (lora, loss, curve, lj.delta_norms(lora)["w"])
        return out

    return jax.jit(jax.vmap(one_seed))


def run(rank, problems, keys, settings):
    """Train both rules at one rank on every seed's problem; per-rule, per-seed results."""
    s = settings
    experiment = make_run(rank, s["alpha"], optax.adam(s["lr"]), s["steps"], s["batch"], s["d"])
    results = {}
    for scaling, (lora, loss, curve, norm) in experiment(*problems, keys).items():
        (_, weight), = lj.targets(lora)  # the trained adapter carries its rank, alpha, scale
        results[scaling] = {"loss": np.asarray(loss), "curve": np.asarray(curve),
                            "delta_norm": np.asarray(norm), "scale": weight.scale}
    return results


def verdict(ranks, rules, floor):
    """Best rank per rule, and how much of the extra rank's possible gain each rule realizes.

    ``moderate`` is the middle tested rank (geometrically). ``realized`` is
    (loss(moderate) - loss(largest)) / (floor(moderate) - floor(largest)): 1 means the
    extra rank is fully used within the budget, 0 that it bought nothing.
    """
    moderate, largest = ranks[(len(ranks) - 1) // 2], ranks[-1]
    im, il = ranks.index(moderate), ranks.index(largest)
    possible = floor[im] - floor[il]
    out = {"moderate_rank": moderate, "largest_rank": largest}
    for name, res in rules.items():
        loss = res["loss"]
        out[name] = {
            "best_rank": ranks[int(np.argmin(loss))],
            "largest_beats_moderate": bool(loss[il] < loss[im]),
            "realized": float((loss[im] - loss[il]) / possible) if possible > 0 else float("nan"),
        }
    lo, rs = out["lora"], out["rslora"]
    # the claim: alpha/r leaves most of the extra rank unused; alpha/sqrt(r) improves up to
    # the largest rank and ends below alpha/r there
    out["claim_holds"] = bool(
        lo["realized"] < 0.25
        and rs["best_rank"] == largest
        and rs["largest_beats_moderate"]
        and rules["rslora"]["loss"][il] < rules["lora"]["loss"][il]
    )
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = result["ranks"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax0.plot(ranks, result["floor"], "k:", label="best rank-r loss (floor)")
    for name, style in zip(RULES, ("o-", "s-")):
        res = result["rules"][name]
        ax0.errorbar(ranks, res["loss"], yerr=res["loss_std"], fmt=style, capsize=3,
                     label=f"{name}: s = alpha/{'r' if name == 'lora' else 'sqrt(r)'}")
    ax0.set_xscale("log", base=2)
    ax0.set_xlabel("rank r")
    ax0.set_ylabel(f"final loss after {result['settings']['steps']} steps")
    ax0.set_title("final loss vs rank (mean over seeds)")
    ax0.legend(fontsize=8)
    colors = plt.cm.viridis(np.linspace(0, 1, len(ranks)))
    window = max(1, result["settings"]["steps"] // 30)
    smooth = lambda c: np.convolve(c, np.ones(window) / window, mode="valid")
    for c, rank, lo, rs in zip(colors, ranks, result["rules"]["lora"]["curve"], result["rules"]["rslora"]["curve"]):
        ax1.plot(smooth(lo), "--", color=c, lw=1)
        ax1.plot(smooth(rs), "-", color=c, lw=1, label=f"r={rank}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (batch, smoothed)")
    ax1.set_title("dashed: alpha/r, solid: alpha/sqrt(r)")
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    ranks: tuple[int, ...] | None = None,
    steps: int = 300,
    d: int = 256,
    out: str | None = None,
    seed: int = 0,
    *,
    seeds: int = 3,
    alpha: float = 8.0,
    lr: float = 3e-4,
    batch: int = 128,
) -> dict:
    """Train every rank under both scaling rules; print a table, optionally plot it.

    ``ranks`` defaults to 1, 2, 4, ..., d. Returns ``ranks``, ``floor`` (the best loss a
    rank-r update can reach), ``rules[name]`` with per-rank ``loss`` (mean over seeds),
    ``loss_std``, ``scale``, ``delta_norm`` and ``curve`` (mean training loss per step),
    the ``verdict`` (see :func:`verdict`), ``settings`` and ``seconds``.
    """
    start = time.perf_counter()
    if ranks is None:
        ranks = tuple(2**i for i in range(int(math.log2(d)) + 1))
    ranks = tuple(int(r) for r in ranks)
    if any(r > d for r in ranks):
        raise ValueError(f"ranks {ranks} must not exceed d = {d}")
    settings = dict(d=d, steps=steps, seeds=seeds, seed=seed, alpha=alpha, lr=lr, batch=batch)
    # one problem and one adapter/data key per seed, shared by every rank and both rules
    problems = [make_problem(np.random.default_rng([seed, i]), d) for i in range(seeds)]
    problems = tuple(np.stack(ws) for ws in zip(*problems))  # (w0s, w_targets)
    keys = jax.random.split(jax.random.key(seed), seeds)  # adapter init and batches

    rules = {name: {"loss": [], "loss_std": [], "scale": [], "delta_norm": [], "curve": []} for name in RULES}
    for rank in ranks:
        per_rule = run(rank, problems, keys, settings)
        for name in RULES:
            r, res = per_rule[name], rules[name]
            res["loss"].append(float(r["loss"].mean()))
            res["loss_std"].append(float(r["loss"].std()))
            res["scale"].append(r["scale"])
            res["delta_norm"].append(float(r["delta_norm"].mean()))
            res["curve"].append(r["curve"].mean(axis=0))
    for res in rules.values():
        res["curve"] = np.stack(res["curve"])
    floor = [1.0 - r / d for r in ranks]
    result = {
        "ranks": ranks,
        "floor": floor,
        "rules": rules,
        "verdict": verdict(ranks, rules, floor),
        "settings": settings,
    }
    result["seconds"] = time.perf_counter() - start

    print(f"d={d}, alpha={alpha:g}, Adam lr={lr:g}, {steps} steps of batch {batch}, "
          f"{seeds} seed(s); loss at init = 1")
    lo, rs = rules["lora"], rules["rslora"]
    print("rank   floor  lora loss  rslora loss  scale lora  scale rslora  |dW| lora  |dW| rslora")
    for i, rank in enumerate(ranks):
        print(f"{rank:4d}  {floor[i]:6.3f}  {lo['loss'][i]:9.4f}  {rs['loss'][i]:11.4f}  "
              f"{lo['scale'][i]:10.4g}  {rs['scale'][i]:12.4g}  {lo['delta_norm'][i]:9.3f}  "
              f"{rs['delta_norm'][i]:11.3f}")
    v = result["verdict"]
    for name in RULES:
        print(f"{name}: best rank {v[name]['best_rank']}; r={v['largest_rank']} vs r={v['moderate_rank']}: "
              f"{'lower' if v[name]['largest_beats_moderate'] else 'not lower'}, "
              f"{100 * v[name]['realized']:.0f}% of the possible gain realized")
    print(f"claim (alpha/r stalls, alpha/sqrt(r) keeps improving): "
          f"{'reproduced' if v['claim_holds'] else 'NOT reproduced'} ({result['seconds']:.1f} s)")
    if out is not None:
        plot(result, out)
        print(f"plot written to {out}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="write a PNG plot here")
    parser.add_argument("--max-rank", type=int, default=256, help="ranks 1, 2, 4, ... up to this")
    parser.add_argument("--d", type=int, default=256, help="width of the square weight")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (every rank, both rules)")
    ns = parser.parse_args()
    if ns.max_rank > ns.d:
        parser.error(f"--max-rank {ns.max_rank} exceeds --d {ns.d}")
    ranks = tuple(2**i for i in range(int(math.log2(ns.max_rank)) + 1))
    main(ranks, ns.steps, ns.d, ns.out, ns.seed, seeds=ns.seeds, lr=ns.lr)
