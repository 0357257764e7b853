"""``lora-jax finetune``: adapt the pretrained default model to a new domain with LoRA.

One run: load (or pretrain once and cache) the default model, measure its loss on the
target and source domains, train LoRA adapters on the target domain (orbax checkpoints
every ``train.save_every`` steps, resumable), measure again, and write

- ``adapter/``   the adapter (:func:`lora_jax.checkpoint.save`, with its config; with
  ``lora.method: adalora`` the plain LoRA adapter of the kept ranks,
  :func:`lora_jax.adalora.to_lora`; with ``lora.dora: true`` DoRA adapters, each with
  its magnitude ``m``),
- ``merged/``    the base with the adapter merged in (plain orbax, loads into ``TinyLM``),
- ``base/``      only with ``lora.init: pissa``: the residual base the adapter belongs to,
- ``metrics.json`` every number of the final table, the loss curves and the config,
- ``loss.png``   the training loss curves (LoRA, and the full fine-tune when compared),
- ``config.yaml`` the resolved config, ``checkpoints/`` the training checkpoints.

With ``compare_full=True`` a full fine-tune of the same model on the same batches is the
baseline ("LoRA learns less and forgets less", Biderman et al. 2024).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax

from .. import adalora, checkpoint
from ..config import path_str
from ..transform import wrap
from ..quant import dequantize, is_quantized
from ..tree import targets
from ..weight import is_adalora
from .files import disk_bytes, human_bytes, output_dir, read_json, remove, uninterrupted, write_json
from .model import param_count
from .run_config import RunConfig, to_dict
from .train import Setup, lora_optimizer, train_full, train_lora

__all__ = ["finetune", "format_table"]

_OUTPUTS = ("adapter", "merged", "base", "metrics.json", "loss.png", "config.yaml", "checkpoints")


# keys a resumed run may change (and the output section); any other difference from the saved
# config.yaml is refused
_RESUMABLE = {("train", "steps"), ("train", "progress"), ("train", "save_every"), ("train", "keep")}


def _check_out(out: str, cfg: RunConfig, resume: bool, overwrite: bool) -> list[str]:
    """The outputs already in ``out``; raises when they may not be continued or replaced."""
    existing = [name for name in _OUTPUTS if os.path.exists(os.path.join(out, name))]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"output.dir {out} already holds a run ({', '.join(existing)}); pass --resume to continue "
            f"it, --overwrite to start over, or --set output.dir=<new dir>"
        )
    if resume and overwrite:
        raise ValueError("--resume continues the run in output.dir and --overwrite deletes it; pass one of them")
    if resume:
        _check_resumable(out, cfg)
        _history(out, _latest_step(out, cfg))  # a damaged or short loss history, before any work
    return existing


def _latest_step(out: str, cfg: RunConfig) -> int | None:
    ckpt_dir = os.path.join(out, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    with checkpoint.Manager(ckpt_dir, max_to_keep=cfg.train.keep) as mgr:
        return mgr.latest_step()


def _check_resumable(out: str, cfg: RunConfig) -> None:
    """Raises when ``cfg`` differs from the run saved in ``out`` in a key that may not change on resume."""
    import yaml

    saved = os.path.join(out, "config.yaml")
    if not os.path.exists(saved):
        return
    with open(saved) as f:
        old = yaml.safe_load(f) or {}
    # a key the saved config lacks (a run made before the key existed) had its default
    default = to_dict(RunConfig())
    was = lambda sec, key: (old.get(sec) or {}).get(key, default[sec][key])
    changed = sorted(
        f"{sec}.{key} ({was(sec, key)!r} -> {value!r})"
        for sec, values in to_dict(cfg).items() for key, value in values.items()
        if sec != "output" and (sec, key) not in _RESUMABLE and was(sec, key) != value
    )
    if not changed and cfg.lora.method == "adalora" and was("train", "steps") != cfg.train.steps:
        raise ValueError(
            f"--resume: train.steps is {cfg.train.steps} but the run in {out} ({saved}) has train.steps="
            f"{was('train', 'steps')}; with lora.method=adalora the rank budget's schedule runs over train.steps, "
            f"so it may not change on resume: resume with --set train.steps={was('train', 'steps')}, or start a "
            "new output.dir"
        )
    if changed:
        raise ValueError(
            f"--resume: the config differs from the run in {out} ({saved}) in {', '.join(changed)}; "
            f"only {', '.join(sorted(f'{a}.{b}' for a, b in _RESUMABLE))} may change on resume. Use the "
            "same settings, or start a new output.dir"
        )


class _Start(NamedTuple):
    """Where the adapters' training starts: the step, the adapters, optimizer state, losses so far."""

    step: int
    lora: Any
    opt: Any = None
    history: Sequence[float] = ()


def _resume_point(s: Setup, out: str, lora, tx, log) -> _Start:
    """The newest checkpoint in ``out/checkpoints`` (step 0 and ``lora`` itself when there is none)."""
    steps, ckpt_dir = s.cfg.train.steps, os.path.join(out, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return _Start(0, lora)
    with checkpoint.Manager(ckpt_dir, max_to_keep=s.cfg.train.keep) as mgr:
        latest = mgr.latest_step()
        if latest is None:
            return _Start(0, lora)
        if latest > steps:
            raise ValueError(
                f"train.steps={steps} but the checkpoints in {out} are at step {latest}; resume "
                f"with --set train.steps={latest} or more"
            )
        start, lora, opt = mgr.restore(lora=lora, opt_state=jax.eval_shape(tx.init, lora))
    history = _history(out, start)
    if log and start:
        log(f"resuming from step {start} of {steps} ({ckpt_dir})")
    return _Start(start, lora, opt, history)


def _history(out: str, start: int | None) -> list[float]:
    """The first ``start`` losses of the run in ``out``, from ``checkpoints/history.json``
    (written before each checkpoint)."""
    path = os.path.join(out, "checkpoints", "history.json")
    if not start:
        return []
    if not os.path.exists(path):
        raise ValueError(
            f"the checkpoints in {os.path.dirname(path)} are at step {start} but their loss history {path} "
            "is missing; "
            "the loss curve cannot be completed: start over with --overwrite"
        )
    losses = read_json(path, "the loss history").get("losses")
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) for x in losses):
        raise ValueError(f"the loss history {path} is damaged: 'losses' is not a list of numbers; start over with --overwrite")
    if len(losses) < start:
        raise ValueError(
            f"the loss history {path} holds {len(losses)} losses but the last checkpoint is at step {start}; "
            "the loss curve cannot be completed: start over with --overwrite"
        )
    return [float(x) for x in losses[:start]]


def _begin_output(out: str, cfg: RunConfig, old: list[str]) -> None:
    """Create ``out`` with the resolved ``config.yaml``, the ``old`` outputs removed first."""
    import yaml

    for name in old:
        remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


class _Trained(NamedTuple):
    """What a training run leaves: parameters, per-step losses, median step and total seconds,
    and the optimizer state."""

    params: Any
    history: list
    step_seconds: float | None
    seconds: float
    opt: Any = None


def _timed(train: Callable, *args, **kwargs) -> _Trained:
    t0 = time.perf_counter()
    params, opt, history, step_seconds = train(*args, **kwargs)
    return _Trained(params, history, step_seconds, time.perf_counter() - t0, opt)


def _plain(cfg: RunConfig, run: _Trained) -> tuple[Any, dict | None]:
    """The trained adapters as a plain lora tree, and with ``lora.method: adalora`` the
    ranks: ``{"target_rank", "ranks": [{"path", "initial", "kept"}, ...]}`` (else None)."""
    if cfg.lora.method != "adalora":
        return run.params, None
    kept = {path_str(p): k for p, k in jax.tree_util.tree_flatten_with_path(adalora.ranks(run.params, run.opt))[0]}
    rows = [{"path": path_str(p), "initial": int(w.spec.rank), "kept": kept[path_str(p)]}
            for p, w in jax.tree_util.tree_flatten_with_path(run.params, is_leaf=is_adalora)[0] if is_adalora(w)]
    return adalora.to_lora(run.params, run.opt), {"target_rank": cfg.lora.target_rank, "ranks": rows}


def _train_adapters(s: Setup, out: str, base, start: _Start, tx) -> _Trained:
    """Train from ``start`` to ``train.steps``, checkpointing to ``out/checkpoints``."""
    with checkpoint.Manager(os.path.join(out, "checkpoints"), max_to_keep=s.cfg.train.keep) as mgr:
        return _timed(train_lora, s, base, start.lora, steps=s.cfg.train.steps, tx=tx, manager=mgr,
                      start=start.step, opt=start.opt, history=start.history)


def _write_adapter(s: Setup, out: str, base, lora) -> None:
    """``adapter/`` and ``merged/`` (written anew on resume); with PiSSA also ``base/``, the
    residual base, and with ``lora.quantize`` the quantized base."""
    with uninterrupted():
        _write_checkpoints(s, out, base, lora)


def _write_checkpoints(s: Setup, out: str, base, lora) -> None:
    for name in ("adapter", "merged"):
        remove(os.path.join(out, name))
    checkpoint.save(os.path.join(out, "adapter"), lora, s.lora_config())
    base_dir = s.base_dir
    # the adapter belongs to the residual W - s·A⊗B (PiSSA) or to the quantized weights
    # deq(W) (QLoRA), not to the pretrained weights: merge into that base
    if s.cfg.lora.init == "pissa" or s.cfg.lora.quantize != "none":
        base_dir = os.path.join(out, "base")
        if not os.path.exists(base_dir):
            checkpoint.save_params(base_dir, base)
    checkpoint.merge(base_dir, os.path.join(out, "adapter"), os.path.join(out, "merged"))


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree, is_leaf=is_quantized)))


def _losses(before: dict, after: dict) -> dict[str, float]:
    return {"target_before": before["target"], "target_after": after["target"],
            "source_before": before["source"], "source_after": after["source"]}


def _size(s: Setup, params) -> dict[str, Any]:
    n = param_count(params)
    return {"trainable_params": n, "trainable_percent": 100.0 * n / param_count(s.variables),
            "adapter_bytes": _nbytes(params)}


def _speed(s: Setup, run: _Trained) -> dict[str, Any]:
    tokens = s.cfg.train.batch_size * s.cfg.model.context
    return {"step_seconds": run.step_seconds, "train_seconds": run.seconds,
            "tokens_per_second": None if run.step_seconds is None else tokens / run.step_seconds}


def _metrics(s: Setup, out: str, start: int, before: dict, after: dict, run: _Trained, base, plain,
             ranks: dict | None) -> dict[str, Any]:
    """Every number of the LoRA run: losses, sizes, speed, the loss curve, the base and the config
    (``plain``: the written adapter; ``ranks``: AdaLoRA's, from :func:`_plain`)."""
    cfg = s.cfg
    return {
        "lora": {
            "steps": cfg.train.steps, "resumed_from": start, **_losses(before, after), **_size(s, run.params),
            "adapter_disk_bytes": disk_bytes(os.path.join(out, "adapter")), **_speed(s, run),
            "targets": [p for p, _ in targets(plain)], "dora": cfg.lora.dora, **({"adalora": ranks} if ranks else {}),
        },
        "base": {"params": param_count(s.variables), "bytes": _nbytes(s.variables),
                 "stored_bytes": _nbytes(base), "quantize": cfg.lora.quantize, "pretrain": {
            k: s.pretrain_info[k] for k in ("corpus", "heldout_loss", "seconds", "cached")}},
        "domains": {"target": cfg.data.corpus, "source": cfg.data.source},
        "losses": {"lora": run.history},
        "config": to_dict(cfg),
    }


def _add_full(s: Setup, metrics: dict, before: dict) -> None:
    """Train the full fine-tune baseline and add its column and loss curve to ``metrics``."""
    run = _timed(train_full, s, steps=s.cfg.train.steps)
    after = s.evaluate(s.model.apply, run.params)
    metrics["full"] = {"steps": s.cfg.train.steps, **_losses(before, after), **_size(s, run.params), **_speed(s, run)}
    metrics["losses"]["full"] = run.history


def _add_float_base(s: Setup, metrics: dict, before: dict) -> None:
    """With a quantized base: the same LoRA run on the float base, for the table's
    side-by-side column (what quantizing the base cost in target loss)."""
    base, lora = s.split(quantize="none")
    run = _timed(train_lora, s, base, lora, steps=s.cfg.train.steps, tx=lora_optimizer(s.cfg), desc="LoRA, float base")
    forward, plain = wrap(s.model.apply), _plain(s.cfg, run)[0]
    after = s.evaluate(lambda p, ids: forward(p, plain, ids), base)
    metrics["float_base"] = {"steps": s.cfg.train.steps, **_losses(before, after), **_size(s, run.params), **_speed(s, run)}
    metrics["losses"]["float_base"] = run.history


def _write_results(out: str, cfg: RunConfig, metrics: dict, log) -> None:
    """``metrics.json`` and ``loss.png``; the table and where the outputs are go to ``log``."""
    from .plots import loss_curves

    write_json(os.path.join(out, "metrics.json"), metrics)
    kind = "DoRA" if cfg.lora.dora else "LoRA"
    names = {"lora": kind, "full": "full fine-tune", "float_base": f"{kind}, float base"}
    loss_curves(os.path.join(out, "loss.png"), {names[k]: v for k, v in metrics["losses"].items()},
                title=f"{cfg.data.source} -> {cfg.data.corpus}: training loss (nats/byte)")
    if log:
        log(format_table(metrics))
        log(f"outputs in {out}: adapter/, merged/, metrics.json, loss.png, checkpoints/")


def finetune(cfg: RunConfig, *, compare_full: bool = False, resume: bool = False, overwrite: bool = False,
             log: Callable | None = print) -> dict[str, Any]:
    """Run the whole fine-tune described by ``cfg`` and write its outputs; returns the metrics.

    Args:
      compare_full: also train a full fine-tune baseline and report it side by side.
      resume: continue from the newest checkpoint in ``output.dir/checkpoints`` (the
        step count continues; the result equals an uninterrupted run).
      overwrite: delete a previous run's outputs in ``output.dir`` first.

    Raises:
      FileExistsError: ``output.dir`` holds a run and neither ``resume`` nor ``overwrite``.
      BlockingIOError: another run holds ``output.dir`` (each run locks it until it ends).
      OSError: ``output.dir`` is a file, or cannot be created or written.

    >>> import tempfile
    >>> from lora_jax.app.run_config import from_dict
    >>> tmp = tempfile.mkdtemp()
    >>> cfg = from_dict({}, [f"output.dir={tmp}/run", f"output.cache_dir={tmp}/cache",
    ...     "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.context=16",
    ...     "pretrain.steps=2", "train.steps=3", "train.warmup=1", "train.batch_size=2", "train.eval_batches=1",
    ...     "train.progress=false", "data.max_bytes=30000"])
    >>> m = finetune(cfg, log=None)
    >>> m["lora"]["steps"], sorted(os.listdir(f"{tmp}/run"))
    (3, ['adapter', 'checkpoints', 'config.yaml', 'loss.png', 'merged', 'metrics.json'])
    """
    out = os.path.abspath(os.path.expanduser(cfg.output.dir))
    with output_dir(out):  # one run per output.dir, for the whole run
        return _finetune(out, cfg, compare_full, resume, overwrite, log)


def _finetune(out: str, cfg: RunConfig, compare_full: bool, resume: bool, overwrite: bool, log) -> dict[str, Any]:
    existing = _check_out(out, cfg, resume, overwrite)
    s = Setup(cfg, log=log)  # every config, corpus and target problem surfaces here, before any write
    base, lora = s.split()
    tx = lora_optimizer(cfg)
    start = _resume_point(s, out, lora, tx, log) if resume else _Start(0, lora)
    _begin_output(out, cfg, existing if overwrite else [])
    before = s.evaluate(s.model.apply, s.variables)
    run = _train_adapters(s, out, base, start, tx)
    float_before = before
    if cfg.lora.quantize != "none":  # the run starts from the dequantized weights
        before = s.evaluate(s.model.apply, dequantize(base))
    plain, ranks = _plain(cfg, run)  # AdaLoRA: the kept ranks as a plain lora tree, from here on
    forward = wrap(s.model.apply)
    after = s.evaluate(lambda p, ids: forward(p, plain, ids), base)
    _write_adapter(s, out, base, plain)
    metrics = _metrics(s, out, start.step, before, after, run, base, plain, ranks)
    if cfg.lora.quantize != "none":
        _add_float_base(s, metrics, float_before)
    if compare_full:
        _add_full(s, metrics, before)
    _write_results(out, cfg, metrics, log)
    return metrics


def format_table(metrics: dict) -> str:
    """The end-of-run table: losses before/after per domain, parameters, bytes, step time;
    with AdaLoRA (``metrics["lora"]["adalora"]``) then each target's initial and kept rank.
    A DoRA run (``metrics["lora"]["dora"]``) heads its column ``DoRA``.

    >>> m = {"domains": {"target": "stdlib", "source": "pydoc"}, "base": {"params": 1000, "bytes": 4000},
    ...      "lora": {"target_before": 3.0, "target_after": 2.0, "source_before": 1.0, "source_after": 1.1,
    ...               "trainable_params": 50, "trainable_percent": 5.0, "adapter_bytes": 200,
    ...               "step_seconds": 0.01, "tokens_per_second": 1e5}}
    >>> print(format_table(m))
                                    LoRA
    target (stdlib) loss before    3.000
    target (stdlib) loss after     2.000
    source (pydoc) loss before     1.000
    source (pydoc) loss after      1.100
    trainable params            50 (5.00%)
    trained bytes vs base      200 B / 3.9 KiB
    step time                     10.0 ms
    tokens/s                     100,000
    """
    cols = [k for k in ("lora", "float_base", "full") if k in metrics]
    names = {"lora": "LoRA", "full": "full FT", "float_base": "float base"}
    if "adalora" in metrics["lora"]:
        names["lora"] = "AdaLoRA"
    if metrics["lora"].get("dora"):
        names["lora"] = "DoRA"
    if metrics["base"].get("quantize", "none") != "none":
        names["lora"] = f"{names['lora']}, {metrics['base']['quantize']} base"
    t, src = metrics["domains"]["target"], metrics["domains"]["source"]
    base_bytes = metrics["base"]["bytes"]
    rows = [
        (f"target ({t}) loss before", lambda m: f"{m['target_before']:.3f}"),
        (f"target ({t}) loss after", lambda m: f"{m['target_after']:.3f}"),
        (f"source ({src}) loss before", lambda m: f"{m['source_before']:.3f}"),
        (f"source ({src}) loss after", lambda m: f"{m['source_after']:.3f}"),
        ("trainable params", lambda m: f"{m['trainable_params']:,} ({m['trainable_percent']:.2f}%)"),
        ("trained bytes vs base", lambda m: f"{human_bytes(m['adapter_bytes'])} / {human_bytes(base_bytes)}"),
        ("step time", lambda m: "n/a" if m["step_seconds"] is None else f"{1e3 * m['step_seconds']:.1f} ms"),
        ("tokens/s", lambda m: "n/a" if m["tokens_per_second"] is None else f"{m['tokens_per_second']:,.0f}"),
    ]
    cells = [[fmt(metrics[c]) for c in cols] for _, fmt in rows]
    w0 = max(len(label) for label, _ in rows)
    widths = [max(len(names[c]), *(len(r[j]) for r in cells)) for j, c in enumerate(cols)]
    lines = [" " * w0 + "".join(f"  {names[c]:>{w}}" for c, w in zip(cols, widths))]
    for (label, _), row in zip(rows, cells):
        lines.append(f"{label:<{w0}}" + "".join(f"  {v:>{w}}" for v, w in zip(row, widths)))
    if metrics["base"].get("quantize", "none") != "none":
        stored = metrics["base"]["stored_bytes"]
        lines.append(f"base bytes ({metrics['base']['quantize']} vs float): {human_bytes(stored)} / "
                     f"{human_bytes(base_bytes)} ({stored / base_bytes:.3f}x)")
    if "adalora" in metrics["lora"]:
        lines += ["", *_rank_lines(metrics["lora"]["adalora"])]
    return "\n".join(line.rstrip() for line in lines)


def _rank_lines(info: dict) -> list[str]:
    """AdaLoRA's table: each target's initial and kept rank, then the totals.

    >>> info = {"target_rank": 1, "ranks": [{"path": "w1", "initial": 2, "kept": 2},
    ...                                     {"path": "w2", "initial": 2, "kept": 0}]}
    >>> print("\\n".join(_rank_lines(info)))
    AdaLoRA target  initial rank  kept rank
    w1                         2          2
    w2                         2          0
    kept ranks: 2 of 4 (target_rank 1 x 2 targets)
    """
    rows = info["ranks"]
    head = ("AdaLoRA target", "initial rank", "kept rank")
    w0 = max(len(head[0]), *(len(r["path"]) for r in rows))
    lines = [f"{head[0]:<{w0}}  {head[1]}  {head[2]}"]
    lines += [f"{r['path']:<{w0}}  {r['initial']:>{len(head[1])}}  {r['kept']:>{len(head[2])}}" for r in rows]
    lines.append(f"kept ranks: {sum(r['kept'] for r in rows)} of {sum(r['initial'] for r in rows)} "
                 f"(target_rank {info['target_rank']} x {len(rows)} targets)")
    return lines
