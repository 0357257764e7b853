"""Algebra on adapters, computed on the factors: weighted combinations and PiSSA to LoRA.

Every adapter that comes out of here has the scale 1: the coefficients (the combination's
weights times each adapter's own scale) are folded into the factors, and the result is
expressed under the ``"lora"`` rule with ``alpha = rank``, which gives exactly
``alpha / rank = 1``. So it merges, exports to PEFT (``lora_alpha = r``,
``use_rslora = False``) and restores from a checkpoint as it is, whatever rules the inputs
used. (PEFT's ``add_weighted_adapter`` gives its result ``lora_alpha = r`` with the first
adapter's ``use_rslora``, so after folding the scales in, a result made from an rsLoRA
adapter is applied with ``r/sqrt(r) = sqrt(r)`` instead of 1.) The static fields that are
not about the scale (the weight's dtype name, dropout rate, rule pattern) come from the
first adapter that has the target.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from .config import path_str
from .split import path_fold
from .tree import _check_lora_arg, check_fits, fmt_paths, is_node, path_diff
from .weight import LoraWeight, is_lora

__all__ = ["combine", "pissa_to_lora", "METHODS"]

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
_HI = jax.lax.Precision.HIGHEST


def combine(
    loras: Sequence[Any],
    weights: Sequence[float],
    method: str = "cat",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> Any:
    """One lora tree from several made for the same base: ``sum_i w_i·s_i·A_i⊗B_i`` and kin.

    The trees must have the same structure (the base's); a target may be missing from some
    of them (``None`` there), and then counts as zero in those. The result holds an adapter
    wherever any input does, with scale 1 (see the module docstring). With ``c_i = w_i·s_i``
    (``w_i`` the weight, ``s_i`` the adapter's own ``scale``, so rsLoRA and mixed scales
    count as applied), each target gets:

    - ``"cat"``: the exact sum ``sum_i c_i·A_i⊗B_i``, by concatenating the factors along
      the rank axis (B_i multiplied by c_i); rank = the sum of the ranks present.
    - ``"svd"``: the best rank-``rank`` approximation (Frobenius and spectral) of that sum,
      per layer for a stacked target (``rank`` is required; PEFT defaults to the largest).
      The stacked factors are QR-factorized, ``Aᵀ = Qa·Ra`` and ``Bᵀ = Qb·Rb``, and only the
      small core ``Ra·Rbᵀ`` (at most R×R for the total rank R) goes through an SVD, so the
      d_in×d_out sum is never formed. The singular values are split as their square roots
      over A and B. Where the sum has fewer than ``rank`` components the rest are zeros.
    - ``"ties"`` (Yadav et al. 2023), ``"dare_linear"`` and ``"dare_ties"`` (Yu et al.
      2023), on the factors as PEFT's ``add_weighted_adapter`` applies them: A and B are
      merged separately, elementwise over adapters of one rank, with the coefficient split
      over the two, ``sign(c_i)·sqrt(|c_i|)`` for A and ``sqrt(|c_i|)`` for B. For one factor
      with tensors ``T_i`` and factor weights ``v_i``:

      * trim: ``"ties"`` keeps the ``int(density·n)`` entries of largest magnitude of each
        ``T_i`` (``n`` its size, per layer for a stacked target) and zeros the rest; the
        dare methods keep each entry with probability ``density`` and divide by ``density``
        (``P_i = T_i·m_i/density``, ``m_i`` Bernoulli), which keeps the expectation.
      * ``"dare_linear"``: ``sum_i v_i·P_i``.
      * ``"ties"``, ``"dare_ties"``: elect a sign per entry, ``sign(sum_i P_i)``
        (``majority_sign_method="total"``) or ``sign(sum_i sign(P_i))`` (``"frequency"``),
        zero counting as +; then the disjoint mean ``sum_i v_i·P_i·[sign(P_i) = e] /
        max(#{i: sign(P_i) = e}, 1)``. The election reads the trimmed, unweighted ``P_i``.

      The rank stays the adapters' rank. Unlike PEFT, a single adapter is trimmed too (PEFT
      falls back to a plain weighted sum for one adapter); PEFT too refuses different
      ranks for these methods.

    DARE's masks: adapter ``i`` (its index in ``loras``) at target ``path`` keeps the entries
    where ``jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key,
    path_fold(path)), i), density, (a.size + b.size,))`` is True (``path_fold`` from
    ``lora_jax.split``: the path's CRC-32 in 31 bits):
    the first ``a.size`` entries in ``a``'s shape for ``a``, the rest for ``b``. So a mask
    can be reproduced, and no target's or adapter's masks depend on the others.

    Args:
      loras: a list of lora trees (from :func:`split`, a checkpoint, PEFT).
      weights: one number per tree; negative weights subtract.
      method: one of ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``.
      rank: the result's rank, for ``"svd"`` only (at most min(in, out) of every target).
      density: the fraction kept, in (0, 1], for the ties and dare methods only.
      majority_sign_method: ``"total"`` or ``"frequency"`` (ties and dare_ties).
      key: a PRNG key, for the dare methods only.

    Returns:
      A lora tree of the inputs' structure.

    Raises:
      ValueError: an empty list, a weights length that differs, an unknown method, trees of
        different structures, adapters for one path with different shapes or axes, a
        missing or impossible ``rank``, a bad ``density``, different ranks for ties/dare, a
        parameter given to a method that does not use it.
      TypeError: a missing ``key`` for dare, or arguments of the wrong type.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    >>> cfg = lambda r: lj.LoraConfig(rules=(lj.Rule("w", rank=r, alpha=4.0),), init="gaussian")
    >>> _, la = lj.split(jax.random.key(1), params, cfg(2))
    >>> _, lb = lj.split(jax.random.key(2), params, cfg(3))
    >>> la = jax.tree.map(lambda w: w.replace(b=jnp.ones_like(w.b)), la, is_leaf=lj.is_lora)
    >>> lb = jax.tree.map(lambda w: w.replace(b=-jnp.ones_like(w.b)), lb, is_leaf=lj.is_lora)
    >>> both = lj.combine([la, lb], [0.7, 0.3])
    >>> both["w"].rank, both["w"].scale
    (5, 1.0)
    >>> want = 0.7 * la["w"].delta() + 0.3 * lb["w"].delta()
    >>> bool(jnp.allclose(both["w"].delta(), want, atol=1e-5))
    True
    >>> lj.combine([la, lb], [0.7, 0.3], "svd", rank=1)["w"].rank
    1
    """
    method, rank, density, key = _check_options(method, rank, density, majority_sign_method, key)
    loras, weights = _check_trees(loras, weights)
    paths, groups, treedef = _gather(loras)
    out = []
    for path, group in zip(paths, groups):
        if not group:
            out.append(None)
            continue
        if method == "svd":
            _check_rank(path, group[0][1], rank)
        elif method != "cat":
            _check_same_rank(path, group, method)
        first = group[0][1]
        dare = method.startswith("dare")
        a, b = _combine_factors(
            tuple((w.a, w.b) for _, w in group),
            jnp.asarray([weights[i] * w.scale for i, w in group]),
            jax.random.fold_in(key, path_fold(path)) if dare else None,
            jnp.asarray([i for i, _ in group], jnp.int32),
            method=method, rank=rank, density=density, sign_method=majority_sign_method,
            layout=_layout_of(first),
        )
        out.append(_scale_one(first, a, b))
    return jax.tree.unflatten(treedef, out)


def pissa_to_lora(lora: Any, pissa_base: Any, base: Any) -> Any:
    """A PiSSA-trained adapter as a plain LoRA adapter (rank 2r) for the original ``base``.

    ``lj.split(..., init="pissa")`` returns the residual ``pissa_base`` (``W_res = W -
    s·A0⊗B0``, A0 and B0 from the top-r SVD of W) and the adapter starting at ``A0, B0``.
    After training to ``A', B'`` the adapted weight is ``W_res + s·A'⊗B' = W + s·A'⊗B' -
    (W - W_res)``, and ``W - W_res`` has rank r: its top-r thin SVD ``U·S·Vᵀ`` gives it in
    factor form, and the result is ``[A', sqrt(S)·Uᵀ] ⊗ [s·B', -sqrt(S)·Vᵀ]`` with scale 1.
    ``merge(base, result)`` equals ``merge(pissa_base, lora)`` up to the rounding that
    ``W - W_res`` carries. That SVD is of the dense d_in×d_out difference (one per target,
    and per layer of a stack): fine offline, once; it runs on whatever device holds the
    weights. A target whose base equals its residual (an adapter not made with PiSSA)
    gets zero extra components.

    Args:
      lora: the trained adapter tree.
      pissa_base: the residual base that ``lj.split(..., init="pissa")`` returned.
      base: the original parameters (what ``split`` was given).

    Returns:
      A lora tree of ``lora``'s structure for ``base``.

    Raises:
      ValueError: ``lora`` does not fit ``base`` or ``pissa_base``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),), init="pissa")
    >>> residual, lora = lj.split(jax.random.key(1), params, cfg)
    >>> lora = jax.tree.map(lambda w: w.replace(b=w.b + 0.1), lora, is_leaf=lj.is_lora)  # "trained"
    >>> plain = lj.pissa_to_lora(lora, residual, params)
    >>> plain["w"].rank
    4
    >>> bool(jnp.allclose(lj.merge(params, plain)["w"], lj.merge(residual, lora)["w"], atol=1e-5))
    True
    """
    triples = check_fits(base, lora)
    residuals = check_fits(pissa_base, lora)
    out = []
    for (_, x, w), (_, res, _) in zip(triples, residuals):
        if w is None:
            out.append(None)
            continue
        perm = (*w.stack_axes, *w.in_axes, *w.out_axes)
        a, b = _pissa_factors(x, res, w.a, w.b, jnp.asarray(w.scale), layout=_layout_of(w), perm=perm)
        out.append(_scale_one(w, a, b))
    return jax.tree.unflatten(jax.tree.structure(lora, is_leaf=is_node), out)


# -- checks -------------------------------------------------------------------------------
def _check_options(method, rank, density, sign_method, key):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}; e.g. method='cat' for the exact sum")
    uses = {"rank": method == "svd", "density": method in ("ties", "dare_linear", "dare_ties"),
            "key": method.startswith("dare")}
    given = {"rank": rank, "density": density, "key": key}
    for name, used in uses.items():
        if used and given[name] is None:
            what = {"rank": "rank=8 (the result's rank)", "density": "density=0.5 (the fraction kept)",
                    "key": "key=jax.random.key(0) (DARE drops entries at random)"}[name]
            err = TypeError if name == "key" else ValueError
            raise err(f"method={method!r} needs {name}; pass e.g. {what}")
        if not used and given[name] is not None:
            raise ValueError(
                f"{name}={given[name]!r} does not apply to method={method!r}; drop it (rank is "
                "for 'svd', density for 'ties'/'dare_*', key for 'dare_*')"
            )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {rank!r}; e.g. rank=8")
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}; e.g. rank=8")
        rank = int(rank)
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}; e.g. density=0.5")
        density = float(density)
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={sign_method!r} is not one of {SIGN_METHODS}")
    if key is not None:
        typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
        if not (typed and key.shape == ()) and not raw:
            raise TypeError(f"key must be one PRNG key, e.g. jax.random.key(0); got {key!r}")
    return method, rank, density, key


def _check_trees(loras, weights):
    if isinstance(loras, dict) or is_lora(loras) or not isinstance(loras, Sequence):
        raise TypeError(
            f"loras must be a list of lora trees, got {type(loras).__name__}; "
            "e.g. lj.combine([lora_a, lora_b], [0.5, 0.5])"
        )
    if not loras:
        raise ValueError(
            "loras is empty; pass at least one lora tree, e.g. lj.combine([lora_a, lora_b], [0.5, 0.5])"
        )
    for i, t in enumerate(loras):
        _check_lora_arg(t, f"combine: loras[{i}]")
    try:
        weights = list(weights) if not isinstance(weights, (str, bytes, dict)) else None
    except TypeError:
        weights = None
    if weights is None:
        raise TypeError("weights must be a list of numbers, one per lora tree; e.g. [0.5, 0.5]")
    if len(weights) != len(loras):
        raise ValueError(
            f"weights has {len(weights)} entries but loras has {len(loras)} trees; "
            "give one weight per tree, e.g. [0.5] * len(loras)"
        )
    for i, v in enumerate(weights):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise TypeError(f"weights[{i}] must be a finite Python number, got {v!r}")
    return list(loras), [float(v) for v in weights]


def _gather(loras, verb: str = "combine"):
    """The paths, per path the ``(i, adapter)`` of the trees that have one, and the treedef.

    ``verb`` names the caller's operation in the error messages."""
    flat = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_node) for t in loras]
    paths = [path_str(p) for p, _ in flat[0][0]]
    for i, (leaves, treedef) in enumerate(flat[1:], 1):
        if treedef != flat[0][1]:
            other = [path_str(p) for p, _ in leaves]
            detail = path_diff(paths, other, "loras[0]", f"loras[{i}]") or [
                f"same paths, different containers: {flat[0][1]} vs {treedef}"]
            raise ValueError(
                f"loras[{i}] does not have the structure of loras[0] (" + "; ".join(detail)
                + f"); {verb} adapters split from the same base (None marks a target an adapter lacks)"
            )
    groups = [[(i, f[0][j][1]) for i, f in enumerate(flat) if is_lora(f[0][j][1])] for j in range(len(paths))]
    if not any(groups):
        raise ValueError(
            "the lora trees hold no adapter (every leaf is None); pass the trees lj.split returned"
        )
    dora = [path for path, group in zip(paths, groups) if any(w.is_dora for _, w in group)]
    if dora:
        raise ValueError(
            f"{verb}: the adapters at {fmt_paths(dora, 4)} are DoRA adapters; {verb} takes plain LoRA "
            "adapters (a DoRA magnitude rescales the whole weight, which no sum or stack of low-rank "
            "factors expresses): merge each DoRA adapter into its base (lj.merge) instead"
        )
    for path, group in zip(paths, groups):
        _check_same_weight(path, group, verb)
    return paths, groups, flat[0][1]


def _weight_fields(w: LoraWeight):
    return dict(shape=tuple(w.shape), in_axes=w.in_axes, out_axes=w.out_axes, stack_axes=w.stack_axes,
                kind=w.kind)


def _check_same_weight(path, group, verb: str = "combine"):
    if not group:
        return
    i0, w0 = group[0]
    for i, w in group[1:]:
        if _weight_fields(w) != _weight_fields(w0):
            raise ValueError(
                f"{path}: the adapters are for different weights: loras[{i0}] has {_weight_fields(w0)} "
                f"but loras[{i}] has {_weight_fields(w)}; {verb} only adapters made for the same base"
            )


def _check_rank(path, w: LoraWeight, rank):
    most = min(math.prod(w.in_shape), math.prod(w.out_shape))
    if rank > most:
        raise ValueError(
            f"{path}: rank={rank} exceeds min(in, out) = {most} of the weight of shape "
            f"{tuple(w.shape)}; use rank <= {most}"
        )


def _check_same_rank(path, group, method):
    ranks = {f"loras[{i}]": w.rank for i, w in group}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"{path}: method={method!r} merges the factors entry by entry and needs one rank, "
            f"but the ranks are {ranks}; use method='cat' (exact) or 'svd' with rank=... instead"
        )


# -- the methods: one compiled program per target's shapes, method and options --------------
# (scales, weights, paths and which adapters are present are arguments, not part of the
# program, so the layers of a model that share shapes share one program)
@functools.partial(jax.jit, static_argnames=("method", "rank", "density", "sign_method", "layout"))
def _combine_factors(factors, coefs, path_key, ids, *, method, rank, density, sign_method, layout):
    """The combined factors of one target from its adapters' ``(a, b)`` and coefficients c_i."""
    dtype = jnp.result_type(*(x for ab in factors for x in ab))
    acc = jnp.promote_types(dtype, jnp.float32)
    mats = [(_flat(a, layout, acc), _flat(b, layout, acc)) for a, b in factors]
    coefs = coefs.astype(acc)
    if method == "cat":
        a, b = _concat(coefs, mats)
    elif method == "svd":
        a, b = _svd(*_concat(coefs, mats), rank)
    else:
        masks = None
        if method.startswith("dare"):
            masks = _dare_masks(path_key, ids, density, factors[0])
        a, b = _elementwise(mats, coefs, masks, method, density, sign_method)
    return _shaped(a, b, layout, dtype)


@functools.partial(jax.jit, static_argnames=("layout", "perm"))
def _pissa_factors(x, res, a, b, scale, *, layout, perm):
    """``[A', A0] ⊗ [s·B', -B0]`` with ``A0ᵀ·B0`` the top-r thin SVD of ``x - res``."""
    stack, ins, outs = layout
    dtype = jnp.result_type(a, b)
    acc = jnp.promote_types(jnp.result_type(x, res, a, b), jnp.float32)
    diff = jnp.transpose(x.astype(acc) - res.astype(acc), perm)
    u, sv, vh = jnp.linalg.svd(diff.reshape(*stack, math.prod(ins), math.prod(outs)), full_matrices=False)
    r = a.shape[len(stack)]
    root = jnp.sqrt(sv[..., :r])[..., :, None]
    pair = (root * jnp.swapaxes(u[..., :, :r], -1, -2), root * vh[..., :r, :])
    a, b = _concat((scale.astype(acc), -1.0), [(_flat(a, layout, acc), _flat(b, layout, acc)), pair])
    return _shaped(a, b, layout, dtype)


def _flat(x, layout, dtype):
    """A factor (*stack, r, *axes) as (*stack, r, prod(axes)) in ``dtype``."""
    stack = layout[0]
    return x.reshape(*stack, x.shape[len(stack)], -1).astype(dtype)


def _shaped(a, b, layout, dtype):
    """Flat factors back in the adapter's layout (*stack, r, *in) / (*stack, r, *out)."""
    stack, ins, outs = layout
    r = a.shape[-2]
    return a.reshape(*stack, r, *ins).astype(dtype), b.reshape(*stack, r, *outs).astype(dtype)


def _concat(coefs, mats):
    """``[A_1; A_2; ...]`` and ``[c_1·B_1; c_2·B_2; ...]`` along the rank axis."""
    a = jnp.concatenate([a for a, _ in mats], axis=-2)
    b = jnp.concatenate([coefs[i] * b for i, (_, b) in enumerate(mats)], axis=-2)
    return a, b


def _svd(a, b, rank):
    """The best rank-``rank`` factors of ``a ⊗ b`` for a (*stack, R, in), b (*stack, R, out)."""
    qa, ra = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))  # (in, ka), (ka, R)
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))  # (out, kb), (kb, R)
    core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=_HI)  # (ka, kb)
    u, sv, vh = jnp.linalg.svd(core, full_matrices=False)
    k = min(rank, sv.shape[-1])
    root = jnp.sqrt(sv[..., :k])[..., :, None]
    new_a = root * jnp.swapaxes(jnp.matmul(qa, u[..., :, :k], precision=_HI), -1, -2)
    new_b = root * jnp.matmul(vh[..., :k, :], jnp.swapaxes(qb, -1, -2), precision=_HI)
    pad = [(0, 0)] * (new_a.ndim - 2) + [(0, rank - k), (0, 0)]
    return jnp.pad(new_a, pad), jnp.pad(new_b, pad)


def _dare_masks(path_key, ids, density, factors):
    """The keep masks of ``a`` and ``b`` for each adapter id (see :func:`combine`)."""
    size_a, size_b = (math.prod(x.shape) for x in factors)
    one = lambda i: jax.random.bernoulli(jax.random.fold_in(path_key, i), density, (size_a + size_b,))  # noqa: E731
    keep = jax.vmap(one)(ids)
    return keep[:, :size_a], keep[:, size_a:]


def _elementwise(mats, coefs, masks, method, density, sign_method):
    """PEFT's ties / dare on the factors: A and B each merged over the adapters."""
    root = jnp.sqrt(jnp.abs(coefs))
    merged = []
    for f, vs in ((0, jnp.sign(coefs) * root), (1, root)):
        tensors = [m[f] for m in mats]
        if method == "ties":
            trimmed = [_top_magnitude(t, density) for t in tensors]
        else:
            trimmed = [t * masks[f][i].reshape(t.shape) / density for i, t in enumerate(tensors)]
        weighted = [vs[i] * t for i, t in enumerate(trimmed)]
        if method == "dare_linear":
            merged.append(sum(weighted))
        else:
            merged.append(_disjoint_mean(trimmed, weighted, sign_method))
    return merged[0], merged[1]


def _top_magnitude(t, density):
    """``t`` with all but its ``int(density·n)`` largest-magnitude entries zeroed, per layer."""
    flat = t.reshape(*t.shape[:-2], -1)
    keep = int(density * flat.shape[-1])
    order = jnp.argsort(-jnp.abs(flat), axis=-1, stable=True)
    place = jnp.argsort(order, axis=-1, stable=True)  # each entry's position by magnitude
    return jnp.where(place < keep, flat, 0).reshape(t.shape)


def _disjoint_mean(trimmed, weighted, sign_method):
    signs = jnp.stack([jnp.sign(t) for t in trimmed])
    total = jnp.sum(jnp.stack(trimmed) if sign_method == "total" else signs, axis=0)
    agree = signs == jnp.where(total >= 0, 1, -1).astype(signs.dtype)[None]
    kept = jnp.sum(jnp.where(agree, jnp.stack(weighted), 0), axis=0)
    return kept / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(kept.dtype)


# -- shared -------------------------------------------------------------------------------
def _layout_of(w: LoraWeight):
    """The static shapes the compiled programs need: (stack, in, out)."""
    return (w.stack_shape, w.in_shape, w.out_shape)


def _scale_one(template: LoraWeight, a, b) -> LoraWeight:
    """``template`` with new factors, their rank, and scale exactly 1 (alpha = rank, "lora")."""
    r = a.shape[len(template.stack_axes)]
    return template.replace(a=a, b=b, rank=r, alpha=float(r), scale=1.0, scaling="lora")
