"""Many adapters of one base in one tree: ``StackedLoraWeight``, ``stack`` and ``unstack``.

A stacked lora tree has the structure of the base, with a :class:`StackedLoraWeight` at
every path that any of the stacked adapters targets. Its factors gain a leading adapter axis
and are padded with zeros to the largest rank (zero rows of A and B add nothing, so padding
is exact); an adapter that lacks a target holds zeros there. ``lj.wrap(f)(base, stacked,
*args, adapter_ids=ids)`` applies adapter ``ids[i]`` to example ``i``.

What is data and what is static: the factors, each adapter's scale and its alpha are arrays
(children). The static metadata are the weight's shape and axes, and per adapter its rank
and descriptive fields (scaling rule name, rule pattern, dropout rate, kind, dtypes), which
:func:`unstack` needs to give the adapters back exactly. So replacing adapter ``k`` with
another adapter of the same rank and the same descriptive fields (another checkpoint of the
same training setup, say, with any alpha) keeps the tree's structure and static metadata, and
a ``jax.jit`` function taking the stacked tree does not retrace; a different rank (or
scaling rule name, rule pattern, ...) changes the static metadata and retraces once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .combine import _gather
from .tree import _check_lora_arg, is_node
from .weight import LoraWeight, is_lora

__all__ = ["AdapterInfo", "StackedLoraWeight", "is_stacked", "is_stacked_node", "stack", "unstack", "template"]


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """The static fields of one stacked adapter at one target (hashable): its rank, the
    name of its scaling rule, dropout rate, kind, rule pattern, the weight's dtype name and
    the dtypes of its own factors.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> info = lj.stack([lora])["w"].adapters[0]
    >>> info.rank, info.scaling, info.a_dtype
    (2, 'lora', 'float32')
    """

    rank: int
    scaling: str
    dropout: float
    kind: str
    rule: str
    dtype: str
    a_dtype: str
    b_dtype: str


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class StackedLoraWeight:
    """The adapters of ``n`` lora trees at one weight W, along a leading adapter axis.

    Children (arrays)::

        a.shape == (n, *W.shape[stack_axes], r_max, *W.shape[in_axes])
        b.shape == (n, *W.shape[stack_axes], r_max, *W.shape[out_axes])
        scale.shape == alpha.shape == (n,)

    ``r_max`` is the largest rank; adapter ``k``'s own factors are ``a[k]`` and ``b[k]``
    cut to its rank, the rest is zeros. An adapter without this target has rank 0, zero
    factors and scale 0. ``scale`` and ``alpha`` are data, so swapping an adapter of the
    same rank keeps the static metadata (see the module docstring). ``stack`` makes them
    float64 NumPy arrays, so :func:`unstack` gives the scales and alphas back exactly; once
    they pass through ``jit`` (or any JAX operation) they are JAX arrays, float32 unless
    x64 is on. They are constants of the adapters: their gradient through ``wrap`` is zero.

    Static fields: ``shape``, ``in_axes``, ``out_axes``, ``stack_axes`` (W's, shared by
    all adapters) and ``adapters``, one :class:`AdapterInfo` (or None where absent) per
    adapter.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> _, l2 = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=1.0),)))
    >>> _, l3 = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=3, alpha=1.0),)))
    >>> s = lj.stack([l2, l3])["w"]
    >>> s.a.shape, s.b.shape, s.ranks, s.scale.tolist()
    ((2, 3, 6), (2, 3, 4), (2, 3), [0.5, 0.3333333333333333])
    """

    a: Any
    b: Any
    scale: Any
    alpha: Any
    shape: tuple[int, ...] = _static(default=())
    in_axes: tuple[int, ...] = _static(default=())
    out_axes: tuple[int, ...] = _static(default=())
    stack_axes: tuple[int, ...] = _static(default=())
    adapters: tuple[AdapterInfo | None, ...] = _static(default=())

    @property
    def n(self) -> int:
        """The number of stacked adapters."""
        return len(self.adapters)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Each adapter's own rank (0 where it lacks this target)."""
        return tuple(0 if i is None else i.rank for i in self.adapters)

    @property
    def rank(self) -> int:
        """The padded rank ``r_max``."""
        return max(self.ranks)

    @property
    def name(self) -> str:
        """The rule patterns of the adapters present, joined with ``+``."""
        return "+".join(dict.fromkeys(i.rule for i in self.adapters if i is not None))


def is_stacked(x) -> bool:
    """True for a :class:`StackedLoraWeight`.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> is_stacked(lj.stack([lora, lora])["w"]), is_stacked(lora["w"])
    (True, False)
    """
    return isinstance(x, StackedLoraWeight)


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


def template(w: StackedLoraWeight) -> LoraWeight:
    """A :class:`LoraWeight` of the stacked weight's shape and axes at the padded rank
    (the first adapter's factors), for the fit checks that take plain adapters.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> _, l1 = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> _, l3 = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=3),)))
    >>> t = template(lj.stack([l1, l3])["w"])
    >>> t.rank, t.a.shape, t.b.shape
    (3, (3, 6), (3, 4))
    """
    info = next(i for i in w.adapters if i is not None)
    return LoraWeight(a=w.a[0], b=w.b[0], shape=w.shape, dtype=info.dtype, in_axes=w.in_axes,
                      out_axes=w.out_axes, stack_axes=w.stack_axes, rank=w.rank, rule=w.name)


def stack(loras: Sequence[Any]) -> Any:
    """One lora tree holding the adapters of several lora trees of one base, along a new
    leading adapter axis (a :class:`StackedLoraWeight` at every target).

    The adapters may differ in rank (their factors are padded with zeros to the largest;
    the padding adds nothing) and in alpha, scale and scaling rule (the scale becomes
    per-adapter data). A target that some adapters lack holds zeros (scale 0) in those.
    Use the result with ``lj.wrap(f)(base, stacked, *args, adapter_ids=ids)``; get the
    adapters back with :func:`unstack`.

    Args:
      loras: a non-empty list of lora trees split from the same base (plain adapters, not
        stacked ones).

    Returns:
      A tree of the base's structure: a :class:`StackedLoraWeight` where any adapter has a
      target, None elsewhere. The factors take the adapters' common dtype.

    Raises:
      ValueError: an empty list, trees of different structures, or adapters made for
        different bases (a path whose weight shape or axes differ), naming the path and
        both shapes.
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
        if any(is_stacked(x) for x in jax.tree.leaves(t, is_leaf=is_stacked_node)):
            raise TypeError(f"stack: loras[{i}] is already stacked; pass plain lora trees "
                            "(lj.unstack gives them back from a stacked one)")
        _check_lora_arg(t, "stack")
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
        lead = len(first.stack_shape)
        zeros_a = jnp.zeros((*first.stack_shape, r_max, *first.in_shape), dt)
        zeros_b = jnp.zeros((*first.stack_shape, r_max, *first.out_shape), dt)
        a, b = [zeros_a] * n, [zeros_b] * n
        scale, alpha = np.zeros(n, np.float64), np.zeros(n, np.float64)
        infos: list[AdapterInfo | None] = [None] * n
        for i, w in group:
            pad = [(0, 0)] * (lead + 1 + len(first.in_shape))
            pad[lead] = (0, r_max - w.rank)
            a[i] = jnp.pad(jnp.asarray(w.a, dt), pad)
            pad = [(0, 0)] * (lead + 1 + len(first.out_shape))
            pad[lead] = (0, r_max - w.rank)
            b[i] = jnp.pad(jnp.asarray(w.b, dt), pad)
            scale[i], alpha[i] = w.scale, w.alpha
            infos[i] = AdapterInfo(w.rank, w.scaling, w.dropout, w.kind, w.rule, w.dtype,
                                   jnp.result_type(w.a).name, jnp.result_type(w.b).name)
        out.append(StackedLoraWeight(jnp.stack(a), jnp.stack(b), scale, alpha, tuple(first.shape),
                                     first.in_axes, first.out_axes, first.stack_axes, tuple(infos)))
    return jax.tree.unflatten(treedef, out)


def unstack(stacked: Any) -> list[Any]:
    """The lora trees a :func:`stack` was made from, in order: each adapter with its own
    rank, alpha, scale, scaling rule name, factors' dtypes, and None where it had no target.

    Needs concrete arrays (call it outside ``jit``). The scales and alphas come back exactly
    from the float64 arrays ``stack`` makes; after a pass through JAX they are float32
    (unless x64 is on) and come back rounded to float32.

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
    if any(isinstance(c, jax.core.Tracer) for w in nodes for c in (w.scale, w.alpha)):
        raise TypeError("unstack reads the scales and alphas as Python numbers and cannot run under "
                        "jit/grad tracing; call it on concrete arrays")
    n = nodes[0].n
    return [jax.tree.unflatten(treedef, [None if w is None else _one(w, k) for w in leaves]) for k in range(n)]


def _one(w: StackedLoraWeight, k: int) -> LoraWeight | None:
    info = w.adapters[k]
    if info is None:
        return None
    lead = len(w.stack_axes)
    a = jax.lax.slice_in_dim(jnp.asarray(w.a[k]), 0, info.rank, axis=lead).astype(info.a_dtype)
    b = jax.lax.slice_in_dim(jnp.asarray(w.b[k]), 0, info.rank, axis=lead).astype(info.b_dtype)
    return LoraWeight(a=a, b=b, shape=w.shape, dtype=info.dtype, in_axes=w.in_axes, out_axes=w.out_axes,
                      stack_axes=w.stack_axes, rank=info.rank, alpha=float(w.alpha[k]),
                      scale=float(w.scale[k]), scaling=info.scaling, dropout=info.dropout, kind=info.kind,
                      rule=info.rule)
