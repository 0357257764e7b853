"""Many adapters of one base in one tree: ``StackedLoraWeight``, ``stack``, ``swap`` and
``unstack``.

A stacked lora tree has the structure of the base, with a :class:`StackedLoraWeight` at
every path that any of the stacked adapters targets. Its factors gain a leading adapter axis
and are padded with zeros to the largest rank (zero rows of A and B add nothing, so padding
is exact); an adapter that lacks a target holds zeros and rank 0 there. ``lj.wrap(f)(base,
stacked, *args, adapter_ids=ids)`` applies adapter ``ids[i]`` to example ``i``.

What is data and what is static: everything that differs from one adapter to another is
data, arrays of one entry per adapter: the factors, and each adapter's scale, alpha, rank
and dropout rate. The static metadata describe the weight only (its shape, dtype, axes and
kind), so :func:`swap` can put any adapter of the same base into a slot (any rank up to the
stack's largest, any alpha, any scaling rule) and a ``jax.jit`` function taking the stacked
tree neither retraces nor recompiles. Only a larger largest rank or another set of targets
changes shapes.

Training a few adapters of a large stack: :func:`batch_slots` finds the slots a batch uses,
:func:`take_adapters` cuts those slots out of the stacked tree and out of its optimizer
state, and :func:`put_adapters` writes them back, so a step's gradient and optimizer update
cover the batch's adapters, not every slot.

Two descriptive fields of a plain adapter are not kept: the rule pattern that made it and
the name of a custom scaling callable. :func:`unstack` reads the scaling rule's name back
from the numbers (``"lora"`` when scale = alpha/r, ``"rslora"`` when scale = alpha/√r, else
``"custom"``) and gives each adapter the rule ``""``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .combine import _gather, _weight_fields
from .config import path_str
from .tree import _check_lora_arg, is_node
from .weight import PER_ADAPTER, LoraWeight, StackedLoraWeight, is_lora, is_stacked

__all__ = ["StackedLoraWeight", "is_stacked", "is_stacked_node", "stack", "swap", "unstack", "template", "scaling_of",
           "stacked_targets", "adapter_numbers", "batch_slots", "take_adapters", "put_adapters"]



def is_stacked_node(x) -> bool:
    """``is_leaf`` for lora trees that may hold stacked adapters: None, an adapter or a
    stacked adapter.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> jax.tree.map(lambda w: w and w.ranks, lj.stack([lora, lora]), is_leaf=is_stacked_node)
    {'b': None, 'w': (1, 1)}
    """
    return is_node(x) or is_stacked(x)


def template(w: StackedLoraWeight, a=None, b=None) -> LoraWeight:
    """A :class:`LoraWeight` of the stacked weight's shape, axes and kind at the padded
    rank, with factors ``a`` and ``b`` (default: adapter 0's) and scale 1: for the fit
    checks, the per-example factors that ``wrap`` gathers and the form checkpoints store.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> _, l1 = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> _, l3 = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=3),)))
    >>> t = template(lj.stack([l1, l3])["w"])
    >>> t.rank, t.a.shape, t.b.shape
    (3, (3, 6), (3, 4))
    """
    return LoraWeight(a=w.a[0] if a is None else a, b=w.b[0] if b is None else b, shape=w.shape, dtype=w.dtype,
                      in_axes=w.in_axes, out_axes=w.out_axes, stack_axes=w.stack_axes, rank=w.r_max,
                      alpha=float(w.r_max), scale=1.0, kind=w.kind)  # (alpha = r: scale 1 under "lora")


def _padded(w: LoraWeight, r_max: int, dtype):
    """``w``'s factors in ``dtype``, padded with zero rows to ``r_max``."""
    lead = len(w.stack_axes)
    out = []
    for f, rest in ((w.a, w.in_shape), (w.b, w.out_shape)):
        pad = [(0, 0)] * (lead + 1 + len(rest))
        pad[lead] = (0, r_max - w.rank)
        out.append(jnp.pad(jnp.asarray(f, dtype), pad))
    return out


def stack(loras: Sequence[Any]) -> Any:
    """One lora tree holding the adapters of several lora trees of one base, along a new
    leading adapter axis (a :class:`StackedLoraWeight` at every target).

    The adapters may differ in rank (their factors are padded with zeros to the largest;
    the padding adds nothing), in alpha, scale, scaling rule and dropout rate (per-adapter
    data), and in their targets (a target that some adapters lack holds zeros, rank 0 and
    scale 0 in those). Use the result with ``lj.wrap(f)(base, stacked, *args,
    adapter_ids=ids)``; replace one adapter with :func:`swap`; get the adapters back with
    :func:`unstack`.

    Args:
      loras: a non-empty list of lora trees split from the same base (plain adapters, not
        stacked ones).

    Returns:
      A tree of the base's structure: a :class:`StackedLoraWeight` where any adapter has a
      target, None elsewhere. The factors take the adapters' common dtype (a promotion,
      so no value changes).

    Raises:
      ValueError: an empty list, trees of different structures, or adapters made for
        different bases (a path whose weight shape, axes or kind differ), naming the path
        and both shapes.
      TypeError: a tree that is not a plain lora tree.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"q": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}
    >>> _, qv = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q|v", rank=2, alpha=1.0),)))
    >>> _, q = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("q", rank=4, alpha=8.0),), scaling="rslora"))
    >>> stacked = lj.stack([qv, q])
    >>> stacked["q"].ranks, stacked["v"].ranks, stacked["v"].scale.tolist()
    ((2, 4), (2, 0), [0.5, 0.0])
    """
    loras = list(loras)
    if not loras:
        raise ValueError("stack needs at least one lora tree, got an empty list; pass [lora_0, lora_1, ...]")
    for i, t in enumerate(loras):
        _check_plain(t, f"stack: loras[{i}]")
    n = len(loras)
    paths, groups, treedef = _gather(loras, "stack")
    out = []
    for group in groups:
        if not group:
            out.append(None)
            continue
        first = group[0][1]
        r_max = max(w.rank for _, w in group)
        dt = jnp.result_type(*(f for _, w in group for f in (w.a, w.b)))
        a = [jnp.zeros((*first.stack_shape, r_max, *first.in_shape), dt)] * n
        b = [jnp.zeros((*first.stack_shape, r_max, *first.out_shape), dt)] * n
        data = {k: np.zeros(n, np.float64) for k in PER_ADAPTER}
        for i, w in group:
            a[i], b[i] = _padded(w, r_max, dt)
            for k in PER_ADAPTER:
                data[k][i] = getattr(w, k)
        out.append(StackedLoraWeight(jnp.stack(a), jnp.stack(b), **data, shape=tuple(first.shape),
                                     dtype=first.dtype, in_axes=first.in_axes, out_axes=first.out_axes,
                                     stack_axes=first.stack_axes, kind=first.kind))
    return jax.tree.unflatten(treedef, out)


def _check_plain(tree, where: str):
    if any(is_stacked(x) for x in jax.tree.leaves(tree, is_leaf=is_stacked_node)):
        raise TypeError(f"{where} is already stacked; pass plain lora trees "
                        "(lj.unstack gives them back from a stacked one)")
    _check_lora_arg(tree, where.split(":")[0])


def swap(stacked: Any, k: int, lora: Any) -> Any:
    """``stacked`` with adapter ``k`` replaced by the adapters of the plain lora tree
    ``lora`` (hot-swap): the shapes and static metadata stay, so a jitted function taking
    the stacked tree neither retraces nor recompiles.

    ``lora`` may have any rank up to the stack's padded rank at each target, any alpha,
    scaling rule and dropout rate, and a subset of the stack's targets (slot ``k`` holds
    zeros, rank 0, where ``lora`` has none). Works on concrete and traced trees.

    Raises:
      ValueError: ``k`` out of range, ``lora`` of another base structure, a target the
        stack lacks or a rank above the stack's padded rank (each changes shapes:
        :func:`stack` the adapters again), naming the path and the shapes.
      TypeError: ``lora`` is not a plain lora tree.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> cfg = lambda r, a: lj.LoraConfig(rules=(lj.Rule("w", rank=r, alpha=a),))
    >>> l2, l4, l3 = (lj.split(jax.random.key(r), params, cfg(r, 8.0))[1] for r in (2, 4, 3))
    >>> s = lj.swap(lj.stack([l2, l4]), 0, l3)
    >>> s["w"].ranks, s["w"].scale.tolist(), s["w"].a.shape
    ((3, 4), [2.6666666666666665, 2.0], (2, 4, 6))
    """
    _check_plain(lora, "swap: lora")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(stacked, is_leaf=is_stacked_node)
    nodes = [w for _, w in leaves if is_stacked(w)]
    if not nodes:
        raise ValueError("swap: the first argument holds no stacked adapter; pass what lj.stack returned")
    n = nodes[0].n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n:
        raise ValueError(f"swap: k={k!r} is not an adapter slot of this stack; use an int in 0..{n - 1}")
    try:
        new = treedef.flatten_up_to(lora)
    except (ValueError, TypeError) as e:
        raise ValueError(f"swap: lora does not have the structure of the stacked tree ({e}); swap in an "
                         "adapter split from the same base") from None
    out = []
    for (p, w), lw in zip(leaves, new):
        path = path_str(p)
        if not is_stacked(w):
            if is_lora(lw):
                raise ValueError(f"swap: {path}: lora has an adapter where the stack has none; a new target "
                                 "changes shapes: lj.stack the adapters again")
            out.append(w)
            continue
        if lw is None:
            a, b = jnp.zeros_like(w.a[k]), jnp.zeros_like(w.b[k])
            data = dict.fromkeys(PER_ADAPTER, 0.0)
        else:
            if _weight_fields(lw) != _weight_fields(w):
                raise ValueError(f"swap: {path}: the adapter is for another weight: {_weight_fields(lw)}, the "
                                 f"stack's is {_weight_fields(w)}; swap in adapters made for the same base")
            if lw.rank > w.r_max:
                raise ValueError(f"swap: {path}: rank {lw.rank} exceeds the stack's padded rank {w.r_max} "
                                 f"(factors {tuple(w.a.shape[1:])}); a larger rank changes shapes: lj.stack "
                                 "the adapters again")
            a, b = _padded(lw, w.r_max, jnp.result_type(w.a, w.b))
            data = {f: getattr(lw, f) for f in PER_ADAPTER}
        out.append(w.replace(a=jnp.asarray(w.a).at[k].set(a), b=jnp.asarray(w.b).at[k].set(b),
                             **{f: _set(getattr(w, f), k, v) for f, v in data.items()}))
    return jax.tree.unflatten(treedef, out)


def _set(arr, k: int, value):
    if isinstance(arr, np.ndarray) and not isinstance(value, jax.core.Tracer):
        arr = arr.copy()
        arr[k] = value
        return arr
    return jnp.asarray(arr).at[k].set(value)


def unstack(stacked: Any) -> list[Any]:
    """The lora trees a :func:`stack` was made from, in order: each adapter with its own
    rank, alpha, scale and dropout rate, and None where it had no target.

    Needs concrete arrays (call it outside ``jit``). The numbers come back exactly from
    the float64 arrays ``stack`` makes; after a pass through JAX they are float32 (unless
    x64 is on) and come back rounded to float32. The factors keep the stack's dtype. The
    scaling rule's name is read from the numbers (``"lora"`` when scale = alpha/r, which a
    rank-1 rsLoRA adapter also satisfies; ``"rslora"`` when scale = alpha/√r; else
    ``"custom"``), and the rule pattern is ``""`` (see the module docstring).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> _, l2 = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=3.0),)))
    >>> _, l3 = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=3, alpha=1.0),), scaling="rslora"))
    >>> back = lj.unstack(lj.stack([l2, l3]))
    >>> [(t["w"].rank, t["w"].alpha, t["w"].scaling) for t in back]
    [(2, 3.0, 'lora'), (3, 1.0, 'rslora')]
    >>> bool((back[1]["w"].a == l3["w"].a).all())
    True
    """
    leaves, treedef = jax.tree.flatten(stacked, is_leaf=is_stacked_node)
    bad = [type(x).__name__ for x in leaves if x is not None and not is_stacked(x)]
    if bad:
        raise TypeError(f"unstack expects a tree from lj.stack (StackedLoraWeight at targets, None elsewhere); "
                        f"it holds {sorted(set(bad))} leaves")
    nodes = [x for x in leaves if is_stacked(x)]
    if not nodes:
        raise ValueError("unstack: the tree holds no stacked adapter (every leaf is None); pass what lj.stack returned")
    if any(isinstance(getattr(w, f), jax.core.Tracer) for w in nodes for f in PER_ADAPTER):
        raise TypeError("unstack reads the ranks, scales and alphas as Python numbers and cannot run under "
                        "jit/grad tracing; call it on concrete arrays")
    n = nodes[0].n
    return [jax.tree.unflatten(treedef, [None if w is None else _one(w, k) for w in leaves]) for k in range(n)]


def scaling_of(scale: float, alpha: float, rank: int) -> str:
    """The name of the scaling rule that gives ``scale`` from ``alpha`` and ``rank``:
    ``"lora"`` (alpha/r; checked first, so rank 1 gives it), ``"rslora"`` (alpha/√r) or
    ``"custom"`` (to float32 precision).

    >>> scaling_of(2.0, 8.0, 4), scaling_of(4.0, 8.0, 4), scaling_of(0.1, 8.0, 4)
    ('lora', 'rslora', 'custom')
    """
    for name, value in (("lora", alpha / rank), ("rslora", alpha / math.sqrt(rank))):
        if math.isclose(scale, value, rel_tol=1e-6):
            return name
    return "custom"


def stacked_targets(tree: Any) -> list[tuple[str, StackedLoraWeight]]:
    """``(path, StackedLoraWeight)`` of every stacked target of ``tree``, in tree order
    (empty for a plain lora tree).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> [p for p, _ in stacked_targets(lj.stack([lora]))], stacked_targets(lora)
    (['w'], [])
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stacked_node)[0]
    return [(path_str(p), w) for p, w in leaves if is_stacked(w)]


def adapter_numbers(w: StackedLoraWeight, k: int) -> dict | None:
    """Adapter ``k``'s own ``rank``, ``alpha``, ``scale``, ``scaling`` name (read from the
    numbers, :func:`scaling_of`) and ``dropout`` at ``w`` as Python numbers; None where it
    lacks this target (rank 0). Needs concrete arrays.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),), scaling="rslora"))
    >>> adapter_numbers(lj.stack([lora])["w"], 0)
    {'rank': 2, 'alpha': 4.0, 'scale': 2.82842712474619, 'scaling': 'rslora', 'dropout': 0.0}
    """
    rank = int(np.asarray(w.rank)[k])
    if rank == 0:
        return None
    scale, alpha, dropout = (float(np.asarray(getattr(w, f))[k]) for f in ("scale", "alpha", "dropout"))
    return dict(rank=rank, alpha=alpha, scale=scale, scaling=scaling_of(scale, alpha, rank), dropout=dropout)


def _one(w: StackedLoraWeight, k: int) -> LoraWeight | None:
    numbers = adapter_numbers(w, k)
    if numbers is None:
        return None
    lead = len(w.stack_axes)
    a = jax.lax.slice_in_dim(jnp.asarray(w.a[k]), 0, numbers["rank"], axis=lead)
    b = jax.lax.slice_in_dim(jnp.asarray(w.b[k]), 0, numbers["rank"], axis=lead)
    return LoraWeight(a=a, b=b, shape=w.shape, dtype=w.dtype, in_axes=w.in_axes, out_axes=w.out_axes,
                      stack_axes=w.stack_axes, kind=w.kind, rule="", **numbers)


def _slot_count(tree) -> int:
    ns = {w.n for w in jax.tree.leaves(tree, is_leaf=is_stacked) if is_stacked(w)}
    if len(ns) != 1:
        raise ValueError("the tree holds no stacked adapter" if not ns else
                         f"the tree's stacked adapters hold different numbers of slots {sorted(ns)}; pass a tree "
                         "from one lj.stack call")
    return ns.pop()


def batch_slots(stacked: Any, ids, size: int | None = None):
    """``(slots, local_ids)``: the distinct adapter slots a batch's ``ids`` use, sorted,
    and each example's id within them (-1 stays -1), for :func:`take_adapters`.

    ``size`` (static, default ``len(ids)``) is the number of slots returned; unused
    entries hold ``n``, the stack's size, which :func:`take_adapters` reads as an empty
    adapter and :func:`put_adapters` skips. Works under ``jit`` with traced ids.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> slots, local = lj.batch_slots(lj.stack([lora] * 5), jnp.array([3, -1, 1, 3]))
    >>> slots.tolist(), local.tolist()
    ([1, 3, 5, 5], [1, -1, 0, 1])
    """
    n = _slot_count(stacked)
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"batch_slots: ids must be a 1-D integer array (one adapter id per example), got "
                         f"shape {tuple(ids.shape)} dtype {ids.dtype}")
    size = ids.shape[0] if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"batch_slots: size must be an int >= 1 (how many slots to return), got {size!r}")
    valid = (ids >= 0) & (ids < n)
    slots = jnp.unique(jnp.where(valid, ids, n), size=size, fill_value=n)
    local = jnp.where(valid, jnp.searchsorted(slots, ids), -1).astype(ids.dtype)
    return slots.astype(ids.dtype), local


def _map_stacked(fn, *trees):
    return jax.tree.map(lambda w, *rest: fn(w, *rest) if is_stacked(w) else (rest[-1] if rest else w),
                        *trees, is_leaf=is_stacked)


def _arrays(w: StackedLoraWeight) -> dict:
    """The children of ``w`` that are arrays along the slots (an optimizer state may hold
    other leaves in their place, such as optax's masked nodes)."""
    names = ("a", "b", *PER_ADAPTER)
    return {f: getattr(w, f) for f in names if hasattr(getattr(w, f), "shape") and jnp.ndim(getattr(w, f))}


def take_adapters(tree: Any, slots) -> Any:
    """The adapters in ``slots`` of every :class:`StackedLoraWeight` in ``tree``: a stacked
    tree of ``len(slots)`` adapters (slot ``n`` or beyond gives an empty adapter: zeros,
    rank 0, scale 0). ``tree`` is a stacked lora tree or any tree holding one, such as the
    optax state of an optimizer over it (their per-slot arrays are cut alike; other leaves,
    a step count, stay). Works under ``jit`` with traced slots.

    With :func:`batch_slots` and :func:`put_adapters`, a training step on a batch of a
    large stack computes gradients and optimizer updates for the batch's adapters only, so
    its cost does not grow with the stack. The other slots, and their optimizer state, are
    left as they are (a lazy update: Adam's moments of an adapter absent from a batch do
    not decay, as in sparse or "lazy" Adam).

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> params = {"w": jnp.ones((4, 3))}
    >>> loras = [lj.split(jax.random.key(k), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))[1] for k in range(6)]
    >>> stacked, tx = lj.stack(loras), optax.adam(0.1)
    >>> opt = tx.init(stacked)
    >>> f = lambda p, x: x @ p["w"]
    >>> @jax.jit
    ... def step(stacked, opt, x, ids):
    ...     slots, local = lj.batch_slots(stacked, ids)
    ...     sub, sub_opt = lj.take_adapters(stacked, slots), lj.take_adapters(opt, slots)
    ...     loss = lambda s: jnp.sum(lj.wrap(f)(params, s, x, adapter_ids=local) ** 2)
    ...     updates, sub_opt = tx.update(jax.grad(loss)(sub), sub_opt, sub)
    ...     sub = optax.apply_updates(sub, updates)
    ...     return lj.put_adapters(stacked, slots, sub), lj.put_adapters(opt, slots, sub_opt)
    >>> new, opt = step(stacked, opt, jnp.ones((2, 4)), jnp.array([4, 1]))
    >>> [bool((new["w"].b[k] != 0).any()) for k in range(6)]   # B moved in the batch's slots only
    [False, True, False, False, True, False]
    """
    slots = jnp.asarray(slots)

    def cut(w):
        return w.replace(**{f: jnp.take(x, slots, axis=0, mode="fill", fill_value=0) for f, x in _arrays(w).items()})

    return _map_stacked(cut, tree)


def put_adapters(tree: Any, slots, part: Any) -> Any:
    """``tree`` with the adapters in ``slots`` replaced by those of ``part`` (what
    :func:`take_adapters` gave, after training): the inverse of ``take_adapters`` for the
    slots taken. Slots of ``n`` or beyond are skipped; leaves outside the stacked adapters
    (an optimizer's step count) come from ``part``. Pass ``tree`` as a donated argument of
    a jitted step to update it in place.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 3))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> stacked = lj.stack([lora] * 4)
    >>> part = lj.take_adapters(stacked, jnp.array([2, 4]))
    >>> part = jax.tree.map(lambda w: w.replace(b=w.b + 1), part, is_leaf=lj.stacked.is_stacked)
    >>> lj.put_adapters(stacked, jnp.array([2, 4]), part)["w"].b[:, 0].tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    slots = jnp.asarray(slots)

    def write(w, p):
        new = _arrays(p)
        return w.replace(**{f: jnp.asarray(x).at[slots].set(new[f].astype(jnp.result_type(x)), mode="drop")
                            for f, x in _arrays(w).items()})

    return _map_stacked(write, tree, part)
