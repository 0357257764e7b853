"""Axis inference: trace ``f(params, *args)`` once and record how each weight is consumed.

A targeted weight enters the traced jaxpr as an input variable. We follow it through
shape-only operations (transpose, reshape, dtype casts, copies, sharding constraints) and
into higher-order primitives (jit, remat, scan, cond, while, custom_jvp/vjp), tracking for
each dimension of the current value which axes of the original weight it holds. Where it
meets a ``dot_general``, ``gather`` or ``conv_general_dilated`` we read off which original
axes are contracted (in), produced (out) or batched (stack). A weight stacked along a
``scan`` axis has that axis recorded as a stack axis.

The same walk finds the output head for :meth:`LoraConfig.all_linear`: the weight whose
matmul output reaches the function's result through operations that mix in no other
activation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

__all__ = ["Use", "WeightUsage", "trace_usage", "SHAPE_ONLY", "subcalls"]

# Primitives that only move a weight's elements around (or change their dtype).
SHAPE_ONLY = frozenset(
    {
        "transpose",
        "reshape",
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "reduce_precision",
        "squeeze",
        "expand_dims",
        "optimization_barrier",
        "mesh_cast",
        "reshard",
    }
)


@dataclasses.dataclass
class Use:
    """One consumption of a weight: a primitive and the original axes in each role."""

    primitive: str
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    stack_axes: tuple[int, ...] = ()


@dataclasses.dataclass
class WeightUsage:
    """Everything tracing learned about one weight."""

    uses: list[Use] = dataclasses.field(default_factory=list)
    scanned: set = dataclasses.field(default_factory=set)  # axes sliced away by a scan
    head: bool = False

    @property
    def kind(self) -> str | None:
        names = {u.primitive for u in self.uses}
        if "gather" in names:
            return "embed"
        if "conv_general_dilated" in names:
            return "conv"
        if "dot_general" in names:
            return "linear"
        return None

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def axes(self, ndim: int | None = None):
        """(in, out, stack) from the defining use (gather > conv > first dot), or None.

        With ``ndim``, axes the use never saw (size-1 axes squeezed away) join ``out``."""
        kind = self.kind
        if kind is None:
            return None
        prim = {"embed": "gather", "conv": "conv_general_dilated", "linear": "dot_general"}[kind]
        use = next(u for u in self.uses if u.primitive == prim)
        stack = tuple(sorted(set(use.stack_axes) | self.scanned))
        ins = tuple(a for a in use.in_axes if a not in stack)
        outs = tuple(a for a in use.out_axes if a not in stack)
        if ndim is not None:
            # size-1 axes a reshape/squeeze dropped on the way carry nothing: count them as out
            outs = tuple(sorted(set(outs) | (set(range(ndim)) - set(ins) - set(outs) - set(stack))))
        return ins, outs, stack

    def other_primitives(self) -> list[str]:
        known = {"gather", "conv_general_dilated", "dot_general"}
        return sorted({u.primitive for u in self.uses if u.primitive not in known})


# Primitives that cut a window out of a weight.
SLICING = frozenset({"slice", "dynamic_slice"})

# A "view" of a weight: for each dimension of the current value, the tuple of original axes
# it holds (several after a reshape that merged axes). ``None`` marks a dimension that does
# not map cleanly (a reshape that split an axis), which makes any use of it opaque.
View = tuple


def _reshape_view(view: View, old_shape, new_shape) -> View | None:
    """Map a view through a reshape that only merges or splits contiguous axis groups."""
    out: list = []
    i = j = 0
    while i < len(old_shape) or j < len(new_shape):
        # skip size-1 dims, which carry no axis content
        if i < len(old_shape) and old_shape[i] == 1 and (j >= len(new_shape) or new_shape[j] != 1):
            i += 1
            continue
        if j < len(new_shape) and new_shape[j] == 1 and (i >= len(old_shape) or old_shape[i] != 1):
            out.append(())
            j += 1
            continue
        if i >= len(old_shape) or j >= len(new_shape):
            return None
        gi, gj = [i], [j]
        pi, pj = old_shape[i], new_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(old_shape):
                    return None
                gi.append(i)
                pi *= old_shape[i]
            else:
                j += 1
                if j >= len(new_shape):
                    return None
                gj.append(j)
                pj *= new_shape[j]
        merged = tuple(ax for k in gi for ax in (view[k] or ()))
        if any(view[k] is None for k in gi):
            return None
        if len(gj) == 1:
            out.append(merged)
        else:
            # an axis group split into several dims: clean only if one dim takes everything
            for k in gj:
                out.append(None if new_shape[k] != 1 else ())
        i += 1
        j += 1
    return tuple(out)


def _through_shape_op(eqn, view: View) -> View | None:
    name = eqn.primitive.name
    if name == "transpose":
        return tuple(view[p] for p in eqn.params["permutation"])
    if name == "reshape":
        return _reshape_view(view, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
    if name == "squeeze":
        dims = {d % len(view) for d in eqn.params["dimensions"]}
        return tuple(v for k, v in enumerate(view) if k not in dims)
    if name == "expand_dims":
        return _reshape_view(view, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
    return view


def _closed(j):
    return j if isinstance(j, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(j, ())


def _scan_counts(p) -> tuple[int, int] | None:
    """(number of consts, number of carries) of a scan, across JAX versions."""
    if "num_consts" in p:  # jax <= 0.10
        return p["num_consts"], p["num_carry"]
    # jax 0.11: ``ft_in`` packs three groups (consts, carry, xs); each group's len() is its
    # number of operands. Duck-typed: the group container is private to JAX.
    groups = getattr(p.get("ft_in"), "elts", p.get("ft_in"))
    try:
        return len(groups[0]), len(groups[1])
    except (TypeError, IndexError, KeyError):
        return None


def subcalls(eqn) -> list[tuple[Any, list, bool]]:
    """Sub-jaxprs of a higher-order equation and how operands feed them.

    Returns ``(closed_jaxpr, feeds, returns)`` triples: ``feeds[k]`` is ``(operand_index,
    sliced)`` for inner input ``k`` (``sliced`` when a scan slices the operand's leading
    axis), or ``None`` for an inner input fed by a loop carry; ``returns`` tells whether the
    inner outputs are the equation's outputs one to one.
    """
    name, p = eqn.primitive.name, eqn.params
    n = len(eqn.invars)
    if name == "scan":
        counts = _scan_counts(p)
        if counts is None:
            return []
        nc, ncarry = counts
        feeds = [(k, k >= nc + ncarry) for k in range(n)]
        return [(p["jaxpr"], feeds, False)]
    if name == "cond":
        return [(br, [(k + 1, False) for k in range(n - 1)], False) for br in p["branches"]]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        carry = [(cn + bn + k, False) for k in range(n - cn - bn)]
        return [
            (p["cond_jaxpr"], [(k, False) for k in range(cn)] + carry, False),
            (p["body_jaxpr"], [(cn + k, False) for k in range(bn)] + carry, False),
        ]
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in p and isinstance(p[key], (jcore.Jaxpr, jcore.ClosedJaxpr)):
            inner = _closed(p[key])
            if len(inner.jaxpr.invars) == n:
                return [(inner, [(k, False) for k in range(n)], True)]
    return []


class _Walker:
    def __init__(self, n_targets: int):
        self.usage = [WeightUsage() for _ in range(n_targets)]

    def walk(self, jaxpr, views: dict, taints: dict, derived: set):
        """views: var -> list[(tid, view)]; taints: var -> frozenset(tid); derived: vars
        depending on the function's non-parameter inputs."""
        for eqn in jaxpr.eqns:
            ins = [(k, v) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal)]
            tracked = [(k, tv) for k, v in ins for tv in views.get(v, ())]
            is_derived = any(v in derived for _, v in ins)
            name = eqn.primitive.name
            out_views: list = []
            subs = subcalls(eqn)
            if name in SHAPE_ONLY:
                for k, (tid, view) in tracked:
                    if k == 0 or name == "optimization_barrier":
                        nv = _through_shape_op(eqn, view)
                        if nv is None:
                            self.usage[tid].uses.append(Use(f"{name} (splits an axis)"))
                        else:
                            out_views.append((k, tid, nv))
            elif name in SLICING:
                for k, (tid, view) in tracked:
                    if k == 0:
                        out_views.append((k, tid, self._through_slice(eqn, tid, view)))
            elif subs:
                self._recurse(eqn, subs, views, taints, derived)
            else:
                for k, (tid, view) in tracked:
                    self._record(eqn, k, tid, view)
            # propagate views to outputs (shape-only ops)
            for k, tid, nv in out_views:
                ov = eqn.outvars[k] if name == "optimization_barrier" else eqn.outvars[0]
                views.setdefault(ov, []).append((tid, nv))
            # head taint: a matmul starts a fresh taint; other ops pass it on when every
            # activation operand carries the same one
            # (call-like primitives got their outputs' taints from the recursion; loops and
            # branches pass none on)
            if name in ("dot_general", "conv_general_dilated"):
                t = frozenset(tid for _, (tid, _) in tracked)
            elif subs:
                t = frozenset()
            else:
                act = [taints.get(v, frozenset()) for _, v in ins if v in derived]
                t = act[0] if act and all(x == act[0] for x in act) else frozenset()
            if t:
                taints.update((ov, t) for ov in eqn.outvars)
            if is_derived:
                derived.update(eqn.outvars)

    def _recurse(self, eqn, subs, views, taints, derived):
        for closed, feeds, returns in subs:
            inner = closed.jaxpr
            iv, it, idv = {}, {}, set()
            for k, feed in enumerate(feeds):
                if feed is None:
                    continue
                opk, sliced = feed
                outer = eqn.invars[opk]
                if isinstance(outer, jcore.Literal):
                    continue
                var = inner.invars[k]
                for tid, view in views.get(outer, ()):
                    if sliced:
                        if view[0] is None:
                            self.usage[tid].uses.append(Use("scan (splits an axis)"))
                            continue
                        self.usage[tid].scanned.update(view[0])
                        view = view[1:]
                    iv.setdefault(var, []).append((tid, view))
                if outer in taints and returns:
                    it[var] = taints[outer]
                if outer in derived:
                    idv.add(var)
            # loop carries: a value fed back in is derived if any input is
            if any(f is None for f in feeds) or eqn.primitive.name in ("while", "scan"):
                if any(v in derived for v in eqn.invars if not isinstance(v, jcore.Literal)):
                    idv.update(inner.invars)
            self.walk(inner, iv, it, idv)
            if returns:
                for ov_in, ov_out in zip(inner.outvars, eqn.outvars):
                    if isinstance(ov_in, jcore.Literal):
                        continue
                    for tid, view in iv.get(ov_in, ()):
                        views.setdefault(ov_out, []).append((tid, view))
                    if ov_in in it:
                        taints[ov_out] = it[ov_in]

    def _through_slice(self, eqn, tid, view: View) -> View:
        """A slice keeps each axis's role; an axis cut down to one entry (``W[i]`` of a layer
        stack, in a Python or ``fori_loop`` loop) becomes a stack axis."""
        old = eqn.invars[0].aval.shape
        new = eqn.outvars[0].aval.shape
        out = []
        for d, (o, n) in enumerate(zip(old, new)):
            if n == 1 and o > 1 and view[d]:
                self.usage[tid].scanned.update(view[d])
                out.append(())
            else:
                out.append(view[d])
        return tuple(out)

    def _record(self, eqn, k, tid, view):
        name, p = eqn.primitive.name, eqn.params
        usage = self.usage[tid]
        if any(v is None for v in view):
            usage.uses.append(Use(name))
            return
        ndim = len(view)

        def axes_of(dims):
            return tuple(sorted(ax for d in dims for ax in view[d]))

        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            contract, batch = (lc, lb) if k == 0 else (rc, rb)
            free = [d for d in range(ndim) if d not in contract and d not in batch]
            usage.uses.append(Use(name, axes_of(contract), axes_of(free), axes_of(batch)))
        elif name == "gather" and k == 0:
            dn = p["dimension_numbers"]
            indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
            batch = tuple(getattr(dn, "operand_batching_dims", ()))
            free = [d for d in range(ndim) if d not in indexed and d not in batch]
            usage.uses.append(Use(name, axes_of(sorted(indexed)), axes_of(free), axes_of(batch)))
        elif name == "conv_general_dilated" and k == 1:
            rhs = p["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            ins = (rhs[1], *rhs[2:])
            usage.uses.append(Use(name, axes_of(ins), axes_of([rhs[0]])))
        else:
            usage.uses.append(Use(name))


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    return x


def trace_usage(
    apply_fn: Callable,
    params: Any,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    targets: Sequence[int] | None = None,
) -> list[WeightUsage]:
    """Trace ``apply_fn(params, *args, **kwargs)`` abstractly; return one usage per leaf.

    Array leaves of ``args``/``kwargs`` (concrete or ``jax.ShapeDtypeStruct``) are traced;
    other leaves (flags, strings) are passed through as static values.

    >>> import jax.numpy as jnp
    >>> u = trace_usage(lambda p, x: x @ p["w"].T, {"w": jnp.ones((4, 3))}, (jnp.ones((2, 3)),))
    >>> u[0].axes()     # stored (out, in): the input axis is 1
    ((1,), (0,), ())
    """
    kwargs = kwargs or {}
    p_leaves, p_def = jax.tree.flatten(params)
    a_leaves, a_def = jax.tree.flatten((tuple(args), kwargs))
    is_arr = [hasattr(x, "shape") and hasattr(x, "dtype") for x in a_leaves]
    traced_args = [_abstract(x) for x, arr in zip(a_leaves, is_arr) if arr]

    def fn(p_flat, arg_flat):
        it = iter(arg_flat)
        leaves = [next(it) if arr else x for x, arr in zip(a_leaves, is_arr)]
        a, kw = jax.tree.unflatten(a_def, leaves)
        return apply_fn(jax.tree.unflatten(p_def, p_flat), *a, **kw)

    closed = jax.make_jaxpr(fn)([_abstract(x) for x in p_leaves], traced_args)
    jaxpr = closed.jaxpr
    n = len(p_leaves)
    walker = _Walker(n)
    wanted = range(n) if targets is None else targets
    views = {}
    for tid in wanted:
        var = jaxpr.invars[tid]
        views.setdefault(var, []).append((tid, tuple((d,) for d in range(var.aval.ndim))))
    derived = set(jaxpr.invars[n:])
    taints: dict = {}
    walker.walk(jaxpr, views, taints, derived)
    for ov in jaxpr.outvars:
        if not isinstance(ov, jcore.Literal):
            for tid in taints.get(ov, ()):
                walker.usage[tid].head = True
    return walker.usage
