"""``lora-jax inspect``: the summary of a saved adapter checkpoint."""

from __future__ import annotations

import numpy as np

from .. import checkpoint
from ..report import summary
from ..tree import targets

__all__ = ["inspect_adapter"]


def inspect_adapter(path: str) -> str:
    """The text ``lora-jax inspect`` prints for the adapter checkpoint at ``path``.

    >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),))
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 6))}, cfg)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> lj.checkpoint.save(path, lora, cfg)
    >>> print(inspect_adapter(path))  # doctest: +ELLIPSIS
    adapter .../adapter (lora_jax 0.1.0)
    config: scaling=lora, init=default, dropout=0.0, rules: w (rank 2, alpha 4)
    path  shape   kind    rank  alpha  scale  params  ||s·A⊗B||_F
    w     (8, 6)  linear     2      4      2      28      0
    trainable params: 28; 112 B of factors (float32)

    A DoRA adapter's magnitudes count in the parameters and bytes, and a line says so:

    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),), dora=True)
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 6))}, cfg)
    >>> lj.checkpoint.save(path + "_dora", lora, cfg)
    >>> for line in inspect_adapter(path + "_dora").splitlines()[3:]:
    ...     print(line)
    w     (8, 6)  linear+dora     2      4      2      34      0
    trainable params: 34; 136 B of factors and magnitudes (float32)
    DoRA: 1 of 1 targets also have a magnitude m (W' = m·V/||V||, V = W + s·A⊗B); ||s·A⊗B||_F above is the direction update alone
    """
    meta = checkpoint.metadata(path)
    lora = checkpoint.restore(path)
    header = f"adapter {path} (lora_jax {meta.get('library_version', '?')})"
    return "\n".join([header, *_config_lines(meta.get("config")), *_target_lines(lora)])


def _config_lines(config: dict | None) -> list[str]:
    """The saved :class:`lora_jax.LoraConfig` in one line (and where a PiSSA adapter belongs)."""
    if not config:
        return []
    rules = ", ".join(
        f"{r.get('pattern')}{' [linear weights]' if r.get('linear_only') else ''} "
        f"(rank {r.get('rank')}, alpha {r.get('alpha'):g})"
        for r in config.get("rules", [])
    )
    scaling = config.get("scaling")
    lines = [
        f"config: scaling={scaling if isinstance(scaling, str) else 'custom'}, init={config.get('init')}, "
        f"dropout={config.get('dropout')}, rules: {rules or 'none'}"
    ]
    if config.get("init") == "pissa":
        lines.append("PiSSA: the adapter belongs to the residual base (W - s·A⊗B at init), not the "
                     "pretrained weights; merge it into that base (a finetune run's output.dir/base)")
    return lines


def _target_lines(lora) -> list[str]:
    """:func:`lora_jax.report.summary` with each target's ``||s·A⊗B||_F``, then the totals."""
    table = summary(lora).splitlines()
    norms = [f"{float(w.delta_norm()):.4g}" for _, w in targets(lora)]
    width = max([len("||s·A⊗B||_F")] + [len(n) for n in norms])
    lines = [f"{table[0]}  {'||s·A⊗B||_F':>{width}}"]
    for row, norm in zip(table[1 : 1 + len(norms)], norms):
        lines.append(f"{row}  {norm:>{width}}")
    arrays = [x for _, w in targets(lora) for x in (w.a, w.b, w.m) if x is not None]
    n_bytes = sum(np.asarray(x).nbytes for x in arrays)
    dtypes = sorted({str(x.dtype) for x in arrays})
    total = sum(w.num_params for _, w in targets(lora))
    dora = sum(w.is_dora for _, w in targets(lora))
    what = "factors and magnitudes" if dora else "factors"
    lines.append(f"trainable params: {total:,}; {n_bytes:,} B of {what} ({', '.join(dtypes)})")
    if dora:
        lines.append(f"DoRA: {dora} of {len(norms)} targets also have a magnitude m (W' = m·V/||V||, "
                     "V = W + s·A⊗B); ||s·A⊗B||_F above is the direction update alone")
    return lines
