"""The lora tree: which leaves are adapters, whether a lora tree fits a base, merge/unmerge.

A lora tree has the structure of the parameter tree it was split from, with an
:class:`LoraWeight` at each target and ``None`` elsewhere. Everything that walks such a tree
(reports, sharding, checkpoints, PEFT files, the transform) uses the helpers here.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .config import path_str
from .quant import is_quantized, quantize_array
from .weight import LoraWeight, is_adalora, is_lora, is_stacked

__all__ = [
    "is_node",
    "as_lora",
    "is_array",
    "is_base_leaf",
    "fmt_paths",
    "path_diff",
    "targets",
    "check_fits",
    "apply_delta",
    "merge",
    "unmerge",
]


def is_node(x) -> bool:
    """``is_leaf`` for lora trees: an adapter or the ``None`` of a non-target."""
    return x is None or is_lora(x)


def as_lora(lora: Any) -> Any:
    """``lora`` with every :class:`~lora_jax.weight.AdaLoraWeight` as its equivalent
    :class:`LoraWeight` (differentiable); other trees come back as they are.

    Children whose shapes do not fit their metadata are one ``ValueError`` naming the paths.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                            lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> type(as_lora(lora)["w"]).__name__, as_lora(lora)["w"].a.shape
    ('LoraWeight', (2, 4))
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora, is_leaf=lambda x: is_node(x) or is_adalora(x))
    if not any(is_adalora(x) for _, x in leaves):
        return lora
    problems = [m for p, x in leaves if is_adalora(x) for m in x.problems(path_str(p))]
    if problems:
        raise ValueError("AdaLoRA adapters do not fit their metadata: " + "; ".join(problems)
                         + ". Use the tree from lj.adalora.split (or its optimizer updates)")
    return jax.tree.unflatten(treedef, [x.lora() if is_adalora(x) else x for _, x in leaves])


def is_array(x) -> bool:
    """True for a JAX or NumPy array or NumPy scalar: what ``wrap`` passes as data (other
    leaves of a parameter tree or of the arguments are static).

    >>> import numpy as np, jax.numpy as jnp
    >>> is_array(jnp.ones(2)), is_array(np.float32(1)), is_array(1.0)
    (True, True, False)
    """
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def is_base_leaf(x) -> bool:
    """``is_leaf`` for base trees: ``None`` entries (a layer without bias) and quantized
    weights (one :class:`~lora_jax.QuantizedWeight` stands for one weight) are leaves."""
    return x is None or is_quantized(x)


def fmt_paths(paths: Iterable, limit: int = 12) -> str:
    """The first ``limit`` items joined for an error message, and how many more there are.

    >>> fmt_paths(["a", "b", "c"], limit=2)
    'a, b, ... (1 more)'
    """
    paths = list(paths)
    shown = ", ".join(map(str, paths[:limit]))
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def path_diff(a: Iterable[str], b: Iterable[str], a_name: str, b_name: str, limit: int = 8) -> list[str]:
    """The message parts naming the paths in ``a`` but not ``b`` and the reverse (sorted).

    Empty when both hold the same paths.

    >>> path_diff(["x", "y"], ["y", "z"], "base", "lora")
    ['in base but not in lora: x', 'in lora but not in base: z']
    """
    a, b = set(a), set(b)
    parts = []
    if a - b:
        parts.append(f"in {a_name} but not in {b_name}: {fmt_paths(sorted(a - b), limit)}")
    if b - a:
        parts.append(f"in {b_name} but not in {a_name}: {fmt_paths(sorted(b - a), limit)}")
    return parts


def targets(lora: Any) -> list[tuple[str, LoraWeight]]:
    """``(path, LoraWeight)`` for every adapter in a lora tree, in tree order.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> [p for p, _ in lj.targets(lora)]
    ['w']
    """
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_node)[0]
    return [(path_str(p), w) for p, w in leaves if is_lora(w)]


def check_fits(base: Any, lora: Any) -> list[tuple[str, Any, LoraWeight | None]]:
    """Check that ``lora`` fits ``base``; return ``(path, base_leaf, lora_leaf)`` triples.

    Every mismatch (tree structure, a target's shape, a factor's shape) is collected and
    reported in one ``ValueError`` naming the paths and shapes.

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> w = lj.LoraWeight(a=jnp.zeros((2, 3)), b=jnp.zeros((2, 4)), shape=(3, 4),
    ...                   in_axes=(0,), out_axes=(1,), rank=2)
    >>> check_fits({"k": jnp.zeros((3, 5))}, {"k": w})
    Traceback (most recent call last):
    ...
    ValueError: lora does not fit base: k: the adapter was made for shape (3, 4) but the base weight has shape (3, 5)
    """
    lora = as_lora(lora)
    # None counts as a leaf on both sides, so a base with None entries (a layer without
    # bias) keeps its structure
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_base_leaf)
    l_leaves, l_def = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_node)
    if b_def != l_def:
        detail = path_diff((path_str(p) for p, _ in b_leaves), (path_str(p) for p, _ in l_leaves),
                           "base", "lora")
        if not detail:
            detail.append(f"same paths, different containers: base {b_def} vs lora {l_def}")
        raise ValueError(
            "lora does not have the structure of base (" + "; ".join(detail) + "). Use the "
            "(base, lora) pair returned by the same lj.split, or lj.checkpoint.restore(..., like=)"
        )
    problems, out = [], []
    for (p, x), (_, w) in zip(b_leaves, l_leaves):
        path = path_str(p)
        if w is not None:
            problems += _leaf_problems(path, x, w)
        out.append((path, x, w))
    if problems:
        raise ValueError("lora does not fit base: " + "; ".join(problems))
    return out


def _leaf_problems(path: str, x, w: LoraWeight) -> list[str]:
    """What is wrong with adapter ``w`` on base leaf ``x`` (empty when it fits)."""
    if x is None:
        return [f"{path}: the base has None where the adapter's weight {tuple(w.shape)} belongs"]
    shape, want = tuple(jnp.shape(x)), tuple(w.shape)
    if shape != want:
        hint = ""
        if len(shape) > len(want) and shape[len(shape) - len(want):] == want:
            lead = shape[: len(shape) - len(want)]
            hint = (f" (extra leading axes {lead}: for trees stacked over seeds or models, "
                    "map over them, e.g. jax.vmap(lj.merge)(base, lora))")
        return [f"{path}: the adapter was made for shape {want} but the base "
                f"weight has shape {shape}{hint}"]
    return [
        f"{path}: factor {name} has shape {tuple(got)}, expected {tuple(expect)} "
        f"for rank {w.rank} and weight shape {tuple(w.shape)}"
        for name, got, expect in (("a", jnp.shape(w.a), w.a_shape), ("b", jnp.shape(w.b), w.b_shape),
                                  ("m", jnp.shape(w.m) if w.is_dora else None, w.m_shape))
        if got is not None and tuple(got) != tuple(expect)
    ]


def apply_delta(x, w: LoraWeight, sign: int):
    """``x ± s·A⊗B`` accumulated in float32 (or wider), cast back to x's dtype.

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> w = lj.LoraWeight(a=jnp.ones((1, 2)), b=jnp.ones((1, 2)), shape=(2, 2),
    ...                   in_axes=(0,), out_axes=(1,), scale=0.5)
    >>> apply_delta(jnp.zeros((2, 2)), w, -1).tolist()
    [[-0.5, -0.5], [-0.5, -0.5]]
    """
    acc = w.accumulation_dtype(x)
    return (jnp.asarray(x, acc) + sign * w.delta(acc)).astype(jnp.result_type(x))


def merge(base: Any, lora: Any, safe: bool = False, requantize: bool = False) -> Any:
    """The plain parameter tree with every adapter folded in: ``W + s·A⊗B``, and for a
    DoRA adapter ``m · (W + s·A⊗B) / ||W + s·A⊗B||`` (:meth:`LoraWeight.dora_merged`).

    Accumulates in float32 and casts back to each base leaf's dtype. Works under ``jit``
    (pass ``donate_argnums=0`` to reuse the base's memory).

    An AdaLoRA tree (:func:`lj.adalora.split <lora_jax.adalora.split>`) merges as its
    equivalent LoRA tree (:func:`as_lora`): ``W + s·(P·diag(λ))⊗Q``.

    A quantized base (:func:`lj.quantize <lora_jax.quantize>`) gives a float tree: every
    :class:`~lora_jax.QuantizedWeight` is dequantized and targets become
    ``deq(W) + s·A⊗B``. A QLoRA adapter was trained against ``deq(W)``, not against the
    original weights, so merge it into the dequantized base (this), not into the float
    checkpoint the quantized base was made from.

    Args:
      base, lora: the pair from :func:`split` (or restored from a checkpoint).
      safe: check the merged targets for NaN/Inf and raise a ``ValueError`` naming every
        bad path. Needs concrete arrays (call it outside ``jit``).
      requantize: quantize the merged weights that were quantized again, with the same
        qtype, block size and double quantization (non-targets stay as they were). The
        result is a quantized tree again, with a second rounding on the targets.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.arange(12.0).reshape(3, 4)}
    >>> base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> bool((lj.merge(base, lora)["w"] == params["w"]).all())   # B starts at zero
    True
    """
    lora = as_lora(lora)
    _check_lora_arg(lora, "merge")
    triples = check_fits(base, lora)
    merged = []
    for _, x, w in triples:
        q = x if is_quantized(x) else None
        m = x.dequantize() if q is not None else x
        if w is not None:
            m = w.dora_merged(m) if w.is_dora else apply_delta(m, w, +1)
        if q is not None and requantize:
            m = q if w is None else quantize_array(m, q.qtype, in_axes=q.in_axes, block_size=q.block_size,
                                                    double_quant=q.double_quant)
        merged.append(m)
    if safe:
        _check_finite([(p, m) for (p, _, w), m in zip(triples, merged) if w is not None])
    return jax.tree.unflatten(jax.tree.structure(base, is_leaf=is_base_leaf), merged)


def _check_lora_arg(lora: Any, fn: str) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(
        lora, is_leaf=lambda x: is_node(x) or is_stacked(x) or is_adalora(x))[0]
    stacked = [path_str(p) for p, x in leaves if is_stacked(x)]
    if stacked:
        raise TypeError(f"{fn}: the lora tree holds stacked adapters (lj.stack) at {fmt_paths(stacked, 4)}; "
                        f"{fn} takes one adapter: pass lj.unstack(stacked)[k]")
    ada = [path_str(p) for p, x in leaves if is_adalora(x)]
    if ada:
        raise TypeError(f"{fn}: the lora tree holds AdaLoRA adapters at {fmt_paths(ada, 4)}; {fn} takes plain "
                        "adapters: pass lj.adalora.to_lora(lora, opt_state)")
    bad = [path_str(p) for p, x in leaves if not is_node(x)]
    if bad:
        raise TypeError(f"{fn}: the second argument must be a lora tree from lj.split (lj.LoraWeight at targets, "
                        f"None elsewhere); it holds other leaves at {fmt_paths(bad, 4)} (a parameter tree?)")


def _check_finite(named):
    if not named:
        return
    if any(isinstance(m, jax.core.Tracer) for _, m in named):
        raise TypeError(
            "merge(safe=True) inspects values and cannot run under jit/grad tracing; call it "
            "on concrete arrays, or use safe=False inside jit"
        )
    flags = jax.device_get([jnp.isfinite(m.dequantize() if is_quantized(m) else m).all() for _, m in named])
    bad = [p for (p, _), ok in zip(named, flags) if not ok]
    if bad:
        raise ValueError(
            f"merge(safe=True): non-finite values (NaN/Inf) after merging {fmt_paths(bad)}; "
            "check the adapter's training (learning rate, scale) or the base checkpoint"
        )


def unmerge(merged: Any, lora: Any) -> Any:
    """Inverse of :func:`merge`: subtract ``s·A⊗B`` again (float32, cast back). DoRA
    adapters are refused (a ``ValueError``): their merge does not keep the norm it divided by.

    A quantized target in ``merged`` is dequantized first; other leaves are kept as they are.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((3, 4))}
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),), init="pissa")
    >>> base, lora = lj.split(jax.random.key(0), params, cfg)
    >>> bool(jnp.allclose(lj.unmerge(lj.merge(base, lora), lora)["w"], base["w"], atol=1e-6))
    True
    """
    lora = as_lora(lora)
    _check_lora_arg(lora, "unmerge")
    triples = check_fits(merged, lora)
    dora = [p for p, _, w in triples if w is not None and w.is_dora]
    if dora:
        raise ValueError(
            f"unmerge: the adapters at {fmt_paths(dora, 4)} are DoRA adapters; their merged weight "
            "m·V/||V|| keeps the direction of V = W + s·A⊗B but not its norm, so W cannot be recovered "
            "from it: keep the base tree (or its checkpoint) and use it instead of unmerging"
        )
    out = [x if w is None else apply_delta(x.dequantize() if is_quantized(x) else x, w, -1)
           for _, x, w in triples]
    return jax.tree.unflatten(jax.tree.structure(merged, is_leaf=is_base_leaf), out)
