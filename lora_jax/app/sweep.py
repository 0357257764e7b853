"""``lora-jax sweep``: the rank/alpha search practitioners run, with the adapter norms watched.

Stage 1 (rank): for each ``sweep.ranks`` value r, train with alpha = r (scale 1 under
alpha/r) and with rsLoRA at a fixed ``sweep.rslora_alpha`` (scale alpha/sqrt(r)).
With ``sweep.dora`` (the default) each rank's alpha = r run is also trained with DoRA
adapters (stage ``dora``, column ``dora`` true: the same run plus a magnitude per output).
Stage 2 (alpha): at the rank with the lowest held-out loss under plain LoRA at alpha = r,
try alpha/r in ``sweep.alpha_ratios``. Every trial trains ``sweep.steps`` steps on the same
batches and is scored on the target domain's held-out text (and the source domain's, for
forgetting). During training ``lj.delta_norms`` is logged every ``sweep.norm_every``
steps as ``||s·A⊗B||_F / ||W||_F`` per target; a trial whose largest ratio exceeds
``sweep.runaway`` (or whose loss is not finite) is flagged as a runaway scale; for DoRA
the ratio is that of its direction update ``s·A⊗B`` (the magnitude is not in it).

Outputs in ``output.dir/sweep``: ``results.csv``, ``results.md``, ``loss_vs_rank.png``
(LoRA vs rsLoRA vs DoRA), ``delta_norms.png`` (the largest ratio over steps per trial) and
``sweep.json`` (everything, including the norm logs, and ``series``: stage 1's losses per
rank for LoRA, rsLoRA and DoRA).
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..config import path_str, scale_for
from ..report import delta_norms
from ..transform import wrap
from ..tree import targets
from .files import output_dir, write_json
from .model import param_count
from .run_config import RunConfig, to_dict
from .train import Setup, train_lora

__all__ = ["sweep", "COLUMNS"]

COLUMNS = ("stage", "scaling", "dora", "rank", "alpha", "scale", "target_loss", "source_loss", "max_delta_ratio",
           "runaway", "trainable_params", "seconds")


def _trial(s: Setup, *, stage: str, scaling: str, rank: int, alpha: float, base_norms, log,
           dora: bool = False) -> dict[str, Any]:
    cfg = s.cfg
    lora_config = s.lora_config(rank=rank, alpha=alpha, scaling=scaling, dora=dora)
    base, lora = s.split(lora_config)
    norm_fn = jax.jit(lambda lora: {p: n / base_norms[p] for p, n in delta_norms(lora).items()})
    norms: list[tuple[int, float]] = []

    def on_step(step, lora, loss):
        if step % cfg.sweep.norm_every == 0 or step == cfg.sweep.steps:
            ratios = norm_fn(lora)
            norms.append((step, max(float(v) for v in ratios.values())))

    t0 = time.perf_counter()
    lora, _, history, _ = train_lora(s, base, lora, steps=cfg.sweep.steps, on_step=on_step,
                                     desc=f"{_name(scaling, dora)} r={rank} alpha={alpha:g}")
    seconds = time.perf_counter() - t0
    forward = wrap(s.model.apply)
    losses = s.evaluate(lambda p, ids: forward(p, lora, ids), base)
    max_ratio = max((r for _, r in norms), default=0.0)
    runaway = bool(max_ratio > cfg.sweep.runaway or not all(math.isfinite(x) for x in history))
    row = {
        "stage": stage, "scaling": scaling, "dora": dora, "rank": rank, "alpha": alpha,
        "scale": scale_for(scaling, alpha, rank),
        "target_loss": losses["target"], "source_loss": losses["source"],
        "max_delta_ratio": max_ratio, "runaway": runaway,
        "trainable_params": param_count(lora), "seconds": seconds,
    }
    if log:
        flag = "  RUNAWAY: ||s·A⊗B|| exceeds sweep.runaway x ||W||" if runaway else ""
        log(f"{stage:>5} {_name(scaling, dora):>6} r={rank:<4} alpha={alpha:<6g} target {losses['target']:.4f} "
            f"source {losses['source']:.4f} max ||dW||/||W|| {max_ratio:.3f}{flag}")
    return {**row, "norms": norms, "losses": history}


def _name(scaling: str, dora: bool) -> str:
    """A trial's adapter kind in logs and plot labels: ``dora`` or the scaling rule's name.

    >>> _name("lora", True), _name("rslora", False)
    ('dora', 'rslora')
    """
    return "dora" if dora else scaling


def _color(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 * i / max(n - 1, 1))


def _best(rows):
    ok = [r for r in rows if not r["runaway"]] or rows
    return min(ok, key=lambda r: r["target_loss"])


def _markdown(rows, base_loss) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r[c]
            cells.append(f"{v:.4f}" if isinstance(v, float) and c != "alpha" else f"{v:g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Base model (no adapter): target loss {base_loss['target']:.4f}, source loss {base_loss['source']:.4f}.")
    series = _series(rows)
    if series:
        lines += ["", "Target loss by rank (stage 1, " + " / ".join(series) + "):", ""]
        for r in sorted({e["rank"] for points in series.values() for e in points}):
            cells = [f"{name} {e['target_loss']:.4f}" for name, points in series.items() for e in points if e["rank"] == r]
            lines.append(f"- r={r}: " + ", ".join(cells))
    return "\n".join(lines) + "\n"


#: stage 1's series: (name, stage, scaling) of LoRA at alpha = r, rsLoRA and DoRA at alpha = r
_SERIES = (("LoRA", "rank", "lora"), ("rsLoRA", "rank", "rslora"), ("DoRA", "dora", "lora"))


def _series(rows) -> dict[str, list[dict]]:
    """Stage 1 by series: ``{"LoRA": [...], "rsLoRA": [...], "DoRA": [...]}``, one entry per
    rank (rank, alpha, target and source loss); a series with no trials is left out.

    >>> rows = [{"stage": "rank", "scaling": "lora", "rank": 2, "alpha": 2.0, "target_loss": 1.0, "source_loss": 2.0},
    ...         {"stage": "dora", "scaling": "lora", "rank": 2, "alpha": 2.0, "target_loss": 0.9, "source_loss": 2.0}]
    >>> {k: [e["target_loss"] for e in v] for k, v in _series(rows).items()}
    {'LoRA': [1.0], 'DoRA': [0.9]}
    """
    out = {}
    for name, stage, scaling in _SERIES:
        points = sorted(({k: x[k] for k in ("rank", "alpha", "target_loss", "source_loss")}
                         for x in rows if x["stage"] == stage and x["scaling"] == scaling), key=lambda e: e["rank"])
        if points:
            out[name] = points
    return out


def _base_norms(s: Setup) -> dict[str, Any]:
    """``||W||_F`` of every weight the adapters target (the same paths at every rank)."""
    _, probe = s.split(s.lora_config(rank=1, alpha=1.0))
    weights = {path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(s.variables)[0]}
    return {p: jnp.linalg.norm(weights[p].astype(jnp.float32)) for p, _ in targets(probe)}


def _trials(s: Setup, base_norms, log) -> tuple[list[dict], int]:
    """Stage 1 over ``sweep.ranks`` (LoRA, rsLoRA and, with ``sweep.dora``, DoRA at each),
    then stage 2 over ``sweep.alpha_ratios`` at the best plain-LoRA rank (a trial stage 1
    already ran is reused); returns the rows and the best rank."""
    cfg = s.cfg
    trial = lambda **kw: _trial(s, base_norms=base_norms, log=log, **kw)
    rows = []
    for r in cfg.sweep.ranks:
        rows.append(trial(stage="rank", scaling="lora", rank=r, alpha=float(r)))
        rows.append(trial(stage="rank", scaling="rslora", rank=r, alpha=cfg.sweep.rslora_alpha))
        if cfg.sweep.dora:
            rows.append(trial(stage="dora", scaling="lora", rank=r, alpha=float(r), dora=True))
    plain = [x for x in rows if x["stage"] == "rank" and x["scaling"] == "lora"]
    best_rank = _best(plain)["rank"]
    for ratio in cfg.sweep.alpha_ratios:
        alpha = float(ratio * best_rank)
        same = [x for x in plain if x["rank"] == best_rank and x["alpha"] == alpha]
        rows.append({**same[0], "stage": "alpha"} if same else
                    trial(stage="alpha", scaling="lora", rank=best_rank, alpha=alpha))
    return rows, best_rank


def _write_tables(out: str, cfg: RunConfig, rows, best_rank: int, best, base_loss) -> list[dict]:
    """``results.csv``, ``results.md`` and ``sweep.json``; returns the table (the :data:`COLUMNS` of each row)."""
    table = [{c: x[c] for c in COLUMNS} for x in rows]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(table, base_loss))
    write_json(os.path.join(out, "sweep.json"), {"rows": rows, "series": _series(rows), "best_rank": best_rank,
                                                 "base": base_loss,
                                                 "best": {c: best[c] for c in COLUMNS}, "config": to_dict(cfg)})
    return table


def _plot_ranks(out: str, cfg: RunConfig, rows, base_loss) -> None:
    """``loss_vs_rank.png``: stage 1's held-out target loss per rank, LoRA vs rsLoRA (vs DoRA,
    with ``sweep.dora``), and the base's."""
    from .plots import lines

    labels = {"LoRA": "LoRA, alpha = r (scale 1)",
              "rsLoRA": f"rsLoRA, alpha = {cfg.sweep.rslora_alpha:g} (scale alpha/sqrt(r))",
              "DoRA": "DoRA, alpha = r (scale 1, magnitude m)"}
    series = {labels[name]: ([e["rank"] for e in points], [e["target_loss"] for e in points])
              for name, points in _series(rows).items()}
    series["base model"] = (list(cfg.sweep.ranks), [base_loss["target"]] * len(cfg.sweep.ranks))
    lines(os.path.join(out, "loss_vs_rank.png"), series, xlabel="rank r", ylabel="held-out target loss (nats/byte)",
          title=f"{cfg.sweep.steps} steps on {cfg.data.corpus}", logx=True)


def _plot_norms(out: str, rows, best_rank: int) -> None:
    """``delta_norms.png``: the largest ``||s·A⊗B||_F / ||W||_F`` over steps, one line per trial run."""
    from .plots import lines

    norm_series, styles = {}, {}
    runs = [x for x in rows if not (x["stage"] == "alpha" and x["alpha"] == float(best_rank))]  # no repeats
    for i, x in enumerate(runs):
        label = f"{_name(x['scaling'], x['dora'])} r={x['rank']} alpha={x['alpha']:g}"
        norm_series[label] = ([n[0] for n in x["norms"]], [max(n[1], 1e-12) for n in x["norms"]])
        # one color per run along a colormap; rsLoRA dashed, DoRA dash-dotted, the alpha stage dotted
        styles[label] = {"color": _color(i, len(runs)),
                         "linestyle": "--" if x["scaling"] == "rslora" else "-." if x["dora"] else
                         ":" if x["stage"] == "alpha" else "-"}
    lines(os.path.join(out, "delta_norms.png"), norm_series, xlabel="step", styles=styles,
          ylabel="max over targets of ||s·A⊗B||_F / ||W||_F", title="adapter delta norms", logy=True, markers=False)


def sweep(cfg: RunConfig, *, log: Callable | None = print, overwrite: bool = False) -> dict[str, Any]:
    """Run the rank then alpha sweep of ``cfg`` and write the tables and plots.

    Returns ``{"rows": [...], "best_rank": r, "best": row, "base": losses, "dir": path}``;
    each row has the :data:`COLUMNS` (plus its loss and norm logs in ``sweep.json``).
    The trials are plain LoRA, and DoRA in its own stage: ``lora.method: adalora`` is
    refused (AdaLoRA picks the ranks itself; run ``lora-jax finetune`` with it), and so is
    ``lora.dora: true`` (``sweep.dora`` says whether the DoRA series runs).

    >>> import tempfile
    >>> from lora_jax.app.run_config import from_dict
    >>> tmp = tempfile.mkdtemp()
    >>> cfg = from_dict({}, [f"output.dir={tmp}/run", f"output.cache_dir={tmp}/cache",
    ...     "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.context=16",
    ...     "pretrain.steps=2", "train.batch_size=2", "train.eval_batches=1", "train.progress=false",
    ...     "data.max_bytes=30000", "sweep.ranks=[1]", "sweep.alpha_ratios=[1]", "sweep.steps=2"])
    >>> result = sweep(cfg, log=None)
    >>> [(r["stage"], r["scaling"], r["rank"], r["alpha"]) for r in result["rows"]]
    [('rank', 'lora', 1, 1.0), ('rank', 'rslora', 1, 8.0), ('dora', 'lora', 1, 1.0), ('alpha', 'lora', 1, 1.0)]
    >>> [r["dora"] for r in result["rows"]]
    [False, False, True, False]
    >>> sorted(os.listdir(result["dir"]))
    ['delta_norms.png', 'loss_vs_rank.png', 'results.csv', 'results.md', 'sweep.json']
    """
    if cfg.lora.method != "lora":
        raise ValueError(
            f"config key lora.method: got {cfg.lora.method!r}; lora-jax sweep trains plain LoRA at each of "
            "sweep.ranks, expected 'lora'. AdaLoRA allocates the ranks itself: run lora-jax finetune "
            "with lora.method=adalora, or set lora.method=lora for the sweep")
    if cfg.lora.dora:
        raise ValueError(
            "config key lora.dora: got True; lora-jax sweep trains plain LoRA in its rank and alpha stages and "
            "DoRA in a stage of its own (sweep.dora), expected false. Set lora.dora=false (and sweep.dora=true "
            "for the DoRA series), or run lora-jax finetune with lora.dora=true")
    out = os.path.join(os.path.abspath(os.path.expanduser(cfg.output.dir)), "sweep")
    with output_dir(out):  # one sweep per directory; a sweep that fails its checks leaves none
        return _sweep(out, cfg, log, overwrite)


def _sweep(out: str, cfg: RunConfig, log, overwrite: bool) -> dict[str, Any]:
    if os.path.exists(os.path.join(out, "sweep.json")) and not overwrite:
        raise FileExistsError(
            f"{out} already holds a sweep; pass --overwrite to replace it or --set output.dir=<new dir>"
        )
    s = Setup(cfg, log=log)
    for r in cfg.sweep.ranks:  # every rank fits every target, before the first trial runs
        s.check(s.lora_config(rank=r, alpha=float(r)))
    base_loss = s.evaluate(s.model.apply, s.variables)
    base_norms = _base_norms(s)
    if log:
        log(f"base model: target ({cfg.data.corpus}) loss {base_loss['target']:.4f}, "
            f"source ({cfg.data.source}) loss {base_loss['source']:.4f}; {len(base_norms)} targets, "
            f"{cfg.sweep.steps} steps per trial")
    rows, best_rank = _trials(s, base_norms, log)
    best = _best(rows)
    table = _write_tables(out, cfg, rows, best_rank, best, base_loss)
    _plot_ranks(out, cfg, rows, base_loss)
    _plot_norms(out, rows, best_rank)
    if log:
        log(_markdown(table, base_loss))
        log(f"best: {_name(best['scaling'], best['dora'])} r={best['rank']} alpha={best['alpha']:g} (target loss {best['target_loss']:.4f}); "
            f"results in {out}")
    return {"rows": rows, "best_rank": best_rank, "best": best, "base": base_loss, "dir": out}
