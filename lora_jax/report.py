"""Human-facing reports on adapters: ``summary`` and ``delta_norms``."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .quant import is_quantized
from .stacked import is_stacked, is_stacked_node, stacked_targets
from .config import path_str
from .tree import _check_lora_arg, as_lora, targets
from .weight import is_adalora, is_lora

__all__ = ["summary", "delta_norms"]


def _size(x) -> int:
    return math.prod(getattr(x, "shape", ()))


def _nbytes(x) -> int:
    return x.nbytes if is_quantized(x) else _size(x) * np.dtype(getattr(x, "dtype", np.float32)).itemsize


def summary(lora: Any, base: Any = None) -> str:
    """A table of the adapters (path, weight shape, rank, alpha, scale, params) and totals.

    With ``base`` the totals also give the trainable share of all parameters, like PEFT's
    ``print_trainable_parameters``: ``trainable / (base + trainable)``; a quantized base
    (:func:`lora_jax.quantize`) adds a line with its bytes as stored and as the original
    float weights.

    A DoRA adapter's kind ends in ``+dora`` and its params count the magnitude ``m``.

    An AdaLoRA tree (:func:`lora_jax.adalora.split`) lists each adapter at its initial
    rank, its params counting P, λ and Q (the kept ranks are in
    :func:`lora_jax.adalora.ranks`).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"q": jnp.ones((64, 64)), "v": jnp.ones((64, 64))}
    >>> base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q|v", rank=4),)))
    >>> print(lj.summary(lora, base))
    path  shape     kind    rank  alpha  scale  params
    q     (64, 64)  linear     4     16      4     512
    v     (64, 64)  linear     4     16      4     512
    trainable params: 1,024 || all params: 9,216 || trainable%: 11.1111

    A stacked tree (:func:`lora_jax.stack`) has one row per target with each adapter's
    rank, alpha and scale joined by ``/`` (``-`` where an adapter lacks the target):

    >>> _, big = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("q", rank=8),), scaling="rslora"))
    >>> print(lj.summary(lj.stack([lora, big])))
    path  shape     kind    rank  alpha  scale   params
    q     (64, 64)  linear   4/8  16/16  4/5.657  2,048
    v     (64, 64)  linear   4/-   16/-    4/-    1,024
    trainable params: 3,072 in 2 targets
    stacked: 2 adapters per target, padded to the largest rank (params count the padding)
    """
    rows = [("path", "shape", "kind", "rank", "alpha", "scale", "params")]
    total = 0
    stacked = stacked_targets(lora)
    # AdaLoRA adapters (shown at their initial rank) also train their λ
    lams = {path_str(p): _size(w.lam) for p, w in jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_adalora)[0]
            if is_adalora(w)}
    rows_of = _targets_and_stacks(as_lora(lora)) if stacked else targets(as_lora(lora))
    for path, w in rows_of:
        if is_stacked(w):  # one row per target, each adapter's numbers joined by "/" (- where it has none)
            n = _size(w.a) + _size(w.b)
            ranks, alphas, scales = (np.asarray(getattr(w, f)) for f in ("rank", "alpha", "scale"))
            join = lambda vals, fmt: "/".join(fmt(v) if r else "-" for v, r in zip(vals, ranks))  # noqa: E731
            row = (join(ranks, lambda v: str(int(v))), join(alphas, lambda v: f"{v:g}"), join(scales, lambda v: f"{v:.4g}"))
        else:
            n = w.num_params + lams.get(path, 0)
            row = (str(w.rank), f"{w.alpha:g}", f"{w.scale:.4g}")
        total += n
        kind = w.kind + ("+dora" if is_lora(w) and w.is_dora else "")
        rows.append((path, str(tuple(w.shape)), kind, *row, f"{n:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6}
    lines = [
        "  ".join(c.rjust(wd) if i in right and k else c.ljust(wd) for i, (c, wd) in enumerate(zip(r, widths))).rstrip()
        for k, r in enumerate(rows)
    ]
    if base is not None:
        leaves = jax.tree.leaves(base, is_leaf=is_quantized)
        base_n = sum(_size(x) for x in leaves)
        all_n = base_n + total
        lines.append(
            f"trainable params: {total:,} || all params: {all_n:,} || "
            f"trainable%: {100.0 * total / max(all_n, 1):.4f}"
        )
        quantized = [x for x in leaves if is_quantized(x)]
        if quantized:
            stored = sum(_nbytes(x) for x in leaves)
            original = sum(_size(x) * np.dtype(x.dtype).itemsize for x in leaves)
            kinds = "/".join(sorted({q.qtype for q in quantized}))
            lines.append(
                f"base bytes: {stored:,} stored ({kinds}: {len(quantized)} quantized weights, "
                f"{8 * sum(q.nbytes for q in quantized) / sum(q.size for q in quantized):.3f} bits/param) "
                f"|| {original:,} as float ({stored / max(original, 1):.3f}x)"
            )
    else:
        lines.append(f"trainable params: {total:,} in {len(rows) - 1} {'targets' if stacked else 'adapters'}")
    if stacked:
        lines.append(f"stacked: {stacked[0][1].n} adapters per target, padded to the largest rank "
                     "(params count the padding)")
    return "\n".join(lines)


def _targets_and_stacks(lora: Any) -> list:
    """``(path, adapter)`` of every target, stacked or plain, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_stacked_node)[0]
    return [(path_str(p), w) for p, w in leaves if w is not None]


def delta_norms(lora: Any) -> dict[str, jax.Array]:
    """Per-target ``||s·A⊗B||_F``, computed from r×r Gram matrices (never the d×k product).

    For a DoRA adapter this is the norm of its low-rank direction update alone (the
    magnitude's effect depends on the base weight, which this function does not take).

    Returns ``{path: scalar}``; works under ``jit`` (log it during training to catch a
    runaway scale).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> {k: float(v) for k, v in lj.delta_norms(lora).items()}   # B starts at zero
    {'w': 0.0}
    """
    lora = as_lora(lora)
    _check_lora_arg(lora, "delta_norms")
    return {path: w.delta_norm() for path, w in targets(lora)}
