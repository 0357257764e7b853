"""Axis inference: trace ``f(params, *args)`` once and record how each weight is consumed.

A targeted weight enters the traced jaxpr as an input variable. We follow it through
shape-only operations (transpose, reshape, casts, copies, broadcasts, sharding
constraints), through elementwise rescaling by values not computed from the arguments
(``W·c``, ``W/c``), through windows cut out of it (slices, splits, ``W[i]``, gathers) and
into higher-order primitives (jit, remat, scan, cond, while, custom_jvp/vjp). For each dimension
of the current value we know which axes of the original weight it holds; axes indexed away
on the way (a scan over a layer stack, ``W[i]``, an expert picked by a gather) are "cut".
Where the value meets a ``dot_general``, ``gather``, ``conv_general_dilated`` or
``ragged_dot_general`` we read off which original axes are contracted (in), produced (out)
or batched/cut/grouped (stack: a ragged dot's experts).

Which primitive is which comes from the table in :mod:`lora_jax._jaxpr` that ``wrap``
shares; a primitive outside it is an opaque use (:meth:`WeightUsage.unknown`).

The same walk finds the output head for :meth:`LoraConfig.all_linear` (:func:`_heads`).
A weight's product is an *output* when its result reaches a value the function returns
through operations other than products with weights and sums with other activations:
bias adds, activations, masks, casts, reshapes, normalizations, softmax and a loss on
labels keep it an output; a later layer (a product with another weight) or a residual sum
ends it. Calls (jit, remat, custom_jvp/vjp) pass this on; loops and branches (scan, while,
cond) do not. The output products that do not also feed another weight's product (a hidden
layer returned beside the logits) are the candidates; of them the head is

* each candidate whose output size is the vocabulary: the number of rows of the largest
  embedding table the function looks up with indices computed from its arguments (tokens;
  position tables looked up with constant positions do not count): an LM's output
  embedding, tied or not; else
* the only candidate, when it changes the width (input size != output size: a classifier,
  a logits layer); else
* none: several output layers side by side (CLIP's text and visual projections, which
  PEFT's ``all-linear`` adapts too), or one that keeps the width (a pooler).

The same taint finds routers: a weight whose product's result reaches ``top_k`` (or
``approx_max_k``), ``argmax``/``argmin`` or a sort (a mixture-of-experts gate choosing
experts) is a router, which :meth:`LoraConfig.all_linear` leaves out too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore

from ._jaxpr import HIGHER, PRODUCT, SCALE, SHAPE, WINDOW, kind, reshape_groups, subcalls, trace
from .quant import is_quantized

__all__ = ["Use", "WeightUsage", "trace_usage"]

# Elementwise primitives where an operand that carries no head taint (a mask, one-hot
# labels) is neutral; for add/sub it is not (a residual stream mixes layers).
_MIXING = frozenset({"add", "sub", "add_any"})
# Primitives that turn scores into choices: a weight whose product reaches one is a router.
_ROUTING = frozenset({"top_k", "approx_top_k", "argmax", "argmin", "sort"})


def _is_product(name: str) -> bool:
    return kind(name) == PRODUCT


@dataclasses.dataclass
class Use:
    """One consumption of a weight: a primitive and the original axes in each role."""

    primitive: str
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    stack_axes: tuple[int, ...] = ()
    cut: frozenset = frozenset()  # axes indexed away before this use (scan, W[i])
    indexed: frozenset = frozenset()  # axes picked by index in a gather on the way
    opaque: bool = False  # the weight reached this use in a shape we cannot map


@dataclasses.dataclass
class WeightUsage:
    """Everything tracing learned about one weight."""

    uses: list[Use] = dataclasses.field(default_factory=list)
    head: bool = False  # the weight is the function's output head (see the module docstring)
    router: bool = False  # the weight's product picks experts (reaches top_k, argmax, a sort)

    def _defining(self) -> tuple[str, Use] | None:
        """The use that decides the axes, and the weight's kind."""
        gathers = [u for u in self.uses if u.primitive == "gather" and not u.opaque]
        looked_up = set().union(*(u.in_axes for u in gathers)) if gathers else set()
        weight = [
            u
            for u in self.uses
            if _is_product(u.primitive) and not u.opaque and u.in_axes and u.out_axes
        ]
        kind_of = lambda u: "conv" if u.primitive == "conv_general_dilated" else "linear"
        for u in weight:  # a stack indexed by a gather (MoE experts picked per token)
            if u.indexed:
                return kind_of(u), u
        if gathers:
            return "embed", gathers[0]
        for u in weight:
            if u.primitive == "conv_general_dilated":
                return "conv", u
        if weight:
            return "linear", weight[0]
        # a single row/column picked out of a small kernel (W[:, 0]): the cut axis is the
        # missing side
        for u in self.uses:
            if _is_product(u.primitive) and not u.opaque and u.cut - looked_up:
                if bool(u.in_axes) != bool(u.out_axes):
                    return kind_of(u), u
        return None

    @property
    def kind(self) -> str | None:
        d = self._defining()
        return None if d is None else d[0]

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def axes(self, ndim: int | None = None):
        """(in, out, stack) from the defining use, or None.

        With ``ndim``, axes the use never saw (size-1 axes squeezed away) join ``out``."""
        d = self._defining()
        if d is None:
            return None
        _, use = d
        ins, outs, stack = set(use.in_axes), set(use.out_axes), set(use.stack_axes) | set(use.cut)
        if not outs:
            outs, stack = stack, set()
        elif not ins:
            ins, stack = stack, set()
        ins, outs = ins - stack, outs - stack
        if ndim is not None:
            outs |= set(range(ndim)) - ins - outs - stack
        return tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(stack))

    def unknown(self) -> list[str]:
        """Primitives outside the walkers' shared table that consume this weight (``wrap``
        materializes the weight for each of them). Rows an embedding lookup read out are
        activations to ``wrap``, so what happens to them later does not count."""
        embed = self.kind == "embed"
        return sorted({u.primitive for u in self.uses
                       if kind(u.primitive) is None and not (embed and u.indexed)})

    def other_primitives(self) -> list[str]:
        return sorted(
            {u.primitive + (" (opaque view)" if u.opaque else "") for u in self.uses
             if u.opaque or not (_is_product(u.primitive) or u.primitive == "gather")}
        )


# A tracked value is ``(tid, view, cut, indexed)``. ``view[d]`` is the tuple of original
# axes held by dimension d (several after a reshape merged axes; a dimension split off an
# axis by a reshape holds that axis too; a broadcast dimension holds none).


def _reshape_view(view, old_shape, new_shape):
    """Map a view through a reshape: each new dimension holds its group's original axes."""
    out: list = [()] * len(new_shape)
    for gi, gj in reshape_groups(tuple(old_shape), tuple(new_shape)):
        axes = tuple(sorted({ax for k in gi for ax in view[k]}))
        for d in gj:
            out[d] = axes
    return tuple(out)


def _shape_view(eqn, view):
    name, p = eqn.primitive.name, eqn.params
    if name == "transpose":
        return tuple(view[d] for d in p["permutation"])
    if name == "reshape":
        return _reshape_view(view, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
    if name == "squeeze":
        dims = {d % len(view) for d in p["dimensions"]}
        return tuple(v for k, v in enumerate(view) if k not in dims)
    if name == "broadcast_in_dim":
        out = [()] * len(eqn.outvars[0].aval.shape)
        for src, dst in enumerate(p["broadcast_dimensions"]):
            out[dst] = view[src]
        return tuple(out)
    return view


def _roles(view, dims):
    return {ax for d in dims for ax in view[d]}


class _Walker:
    def __init__(self, n_targets: int):
        self.usage = [WeightUsage() for _ in range(n_targets)]
        self.width: dict[int, tuple[int, int]] = {}  # tid -> (contracted, produced) sizes of its product
        self.fed: set[int] = set()  # tids whose product's result reaches another weight's product
        self.rows: dict[int, int] = {}  # tid -> rows an embedding lookup of the arguments picks from
        self.routers: set[int] = set()  # tids whose product's result reaches a routing choice

    def walk(self, jaxpr, views: dict, taints: dict, derived: set):
        """views: var -> list of entries; taints: var -> frozenset(tid) of the weights whose
        matmul output the var carries; derived: vars depending on non-parameter inputs."""
        for eqn in jaxpr.eqns:
            ins = [(k, v) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal)]
            tracked = [(k, e) for k, v in ins for e in views.get(v, ())]
            name = eqn.primitive.name
            what = kind(name)
            subs = subcalls(eqn) if what == HIGHER else []
            if what == SHAPE:
                for k, (tid, view, cut, idx) in tracked:
                    if k == 0 or name == "optimization_barrier":
                        ov = eqn.outvars[k] if name == "optimization_barrier" else eqn.outvars[0]
                        views.setdefault(ov, []).append((tid, _shape_view(eqn, view), cut, idx))
            elif what == SCALE:  # W·c, c·W, W/c keep W's roles (c not from the arguments)
                for k, entry in tracked:
                    other = eqn.invars[1 - k]
                    if (name == "div" and k == 1) or (not isinstance(other, jcore.Literal) and other in derived):
                        self._record(eqn, k, entry)
                    else:
                        views.setdefault(eqn.outvars[0], []).append(entry)
            elif what == WINDOW:
                for k, entry in tracked:
                    self._through_window(eqn, k, entry, views)
                    if name == "gather" and k == 0 and not isinstance(eqn.invars[1], jcore.Literal) \
                            and eqn.invars[1] in derived:
                        self._lookup(eqn, entry)
            elif subs:
                self._recurse(eqn, subs, views, taints, derived)
            else:
                for k, entry in tracked:
                    self._record(eqn, k, entry)
            self._taint(eqn, name, ins, tracked, subs, taints, derived)
            if any(v in derived for _, v in ins):
                derived.update(eqn.outvars)

    def _taint(self, eqn, name, ins, tracked, subs, taints, derived):
        if name in _ROUTING:
            self.routers.update(tid for _, v in ins for tid in taints.get(v, ()))
        if _is_product(name):
            t = frozenset(e[0] for k, e in tracked)
            if t:  # a layer: what flows into it is no longer an output
                self.fed.update(tid for _, v in ins if v in derived for tid in taints.get(v, ()))
        elif subs:
            return  # call-like: set by the recursion; loops and branches pass none on
        else:
            act = [taints.get(v, frozenset()) for _, v in ins if v in derived]
            if name not in _MIXING:
                act = [a for a in act if a]
            t = act[0] if act and all(a == act[0] for a in act) else frozenset()
        if t:
            taints.update((ov, t) for ov in eqn.outvars)

    def _lookup(self, eqn, entry):
        """A gather of rows of a weight by indices computed from the arguments (an embedding
        lookup of tokens): record the number of rows it picks from."""
        tid = entry[0]
        dn = eqn.params["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        rows = math.prod(shape[d] for d in set(dn.start_index_map) | set(dn.collapsed_slice_dims))
        self.rows[tid] = max(rows, self.rows.get(tid, 0))

    def _through_window(self, eqn, k, entry, views):
        tid, view, cut, idx = entry
        name, p = eqn.primitive.name, eqn.params
        in_shape = eqn.invars[k].aval.shape
        if name == "gather":
            if k != 0:
                self.usage[tid].uses.append(Use("gather (as indices)", opaque=True))
                return
            dn = p["dimension_numbers"]
            indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
            batch = set(getattr(dn, "operand_batching_dims", ()))
            free = [d for d in range(len(view)) if d not in indexed and d not in batch]
            looked = _roles(view, sorted(indexed))
            self.usage[tid].uses.append(
                Use("gather", tuple(sorted(looked)), tuple(sorted(_roles(view, free))),
                    tuple(sorted(_roles(view, sorted(batch)))), frozenset(cut), frozenset(idx))
            )
            # the gathered value keeps the kept dims' roles (offset dims, in operand order)
            kept = [d for d in range(len(view)) if d not in set(dn.collapsed_slice_dims) | batch]
            out = [()] * len(eqn.outvars[0].aval.shape)
            for dst, src in zip(dn.offset_dims, kept):
                out[dst] = view[src]
            new = (tid, tuple(out), cut | frozenset(looked), idx | frozenset(looked))
            views.setdefault(eqn.outvars[0], []).append(new)
            return
        outs = eqn.outvars if name == "split" else eqn.outvars[:1]
        for ov in outs:
            new_view, new_cut = [], set(cut)
            for d, (o, n) in enumerate(zip(in_shape, ov.aval.shape)):
                if n == 1 and o > 1 and name != "concatenate":
                    new_cut.update(view[d])  # W[i]: that axis is indexed away
                    new_view.append(())
                else:
                    new_view.append(view[d])
            views.setdefault(ov, []).append((tid, tuple(new_view), frozenset(new_cut), idx))

    def _recurse(self, eqn, subs, views, taints, derived):
        for closed, feeds, returns in subs:
            inner = closed.jaxpr
            iv, it, idv = {}, {}, set()
            for k, (opk, sliced) in enumerate(feeds):
                outer = eqn.invars[opk]
                if isinstance(outer, jcore.Literal):
                    continue
                var = inner.invars[k]
                for tid, view, cut, idx in views.get(outer, ()):
                    if sliced:  # a scan over the leading axis: one layer per step
                        cut, view = cut | frozenset(view[0]), view[1:]
                    iv.setdefault(var, []).append((tid, view, cut, idx))
                if outer in taints and returns:
                    it[var] = taints[outer]
                if outer in derived:
                    idv.add(var)
            if eqn.primitive.name in ("while", "scan") and any(
                v in derived for v in eqn.invars if not isinstance(v, jcore.Literal)
            ):
                idv.update(inner.invars)  # carries fed back in may become derived
            self.walk(inner, iv, it, idv)
            if returns:
                for ov_in, ov_out in zip(inner.outvars, eqn.outvars):
                    if isinstance(ov_in, jcore.Literal):
                        continue
                    views.setdefault(ov_out, []).extend(iv.get(ov_in, ()))
                    if ov_in in it:
                        taints[ov_out] = it[ov_in]

    def _record(self, eqn, k, entry):
        tid, view, cut, idx = entry
        name, p = eqn.primitive.name, eqn.params
        ndim = len(view)
        shape = eqn.invars[k].aval.shape
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            contract, batch = (lc, lb) if k == 0 else (rc, rb)
            free = [d for d in range(ndim) if d not in contract and d not in batch]
            groups = (contract, free, batch)
            self.width[tid] = (math.prod(shape[d] for d in contract), math.prod(shape[d] for d in free))
        elif name == "ragged_dot_general" and k == 1 and p["ragged_dot_dimension_numbers"].rhs_group_dimensions:
            dn = p["ragged_dot_dimension_numbers"]  # experts along the group axis: a stack axis
            (_, contract), (_, batch) = dn.dot_dimension_numbers
            stack = (*batch, *dn.rhs_group_dimensions)
            free = [d for d in range(ndim) if d not in contract and d not in stack]
            groups = (contract, free, stack)
            self.width[tid] = (math.prod(shape[d] for d in contract), math.prod(shape[d] for d in free))
        elif name == "conv_general_dilated" and k == 1:
            rhs = p["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            groups = ((rhs[1], *rhs[2:]), (rhs[0],), ())
            self.width[tid] = (shape[rhs[1]], shape[rhs[0]])
        else:
            self.usage[tid].uses.append(Use(name, cut=cut, indexed=idx, opaque=True))
            return
        ins, outs, stack = (_roles(view, g) for g in groups)
        opaque = bool(ins & outs or ins & stack or outs & stack)  # an axis split across roles
        self.usage[tid].uses.append(
            Use(name, tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(stack)), cut, idx, opaque)
        )


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
    p_leaves, p_def = jax.tree.flatten(params, is_leaf=is_quantized)
    a_leaves, a_def = jax.tree.flatten((tuple(args), kwargs or {}))
    traced = trace(apply_fn, p_def, p_leaves, a_def, a_leaves)  # wrap's first call reuses it
    jaxpr = traced.closed.jaxpr
    # leaf index -> its input variable (static leaves have none)
    invar = dict(zip((i for i, arr in enumerate(traced.is_arr) if arr), jaxpr.invars))
    n = len(p_leaves)
    walker = _Walker(n)
    views: dict = {}
    for tid in range(n) if targets is None else targets:
        var = invar.get(tid)
        if var is None:
            continue  # a static leaf: nothing to follow
        full = tuple((d,) for d in range(var.aval.ndim))
        views.setdefault(var, []).append((tid, full, frozenset(), frozenset()))
    taints: dict = {}
    walker.walk(jaxpr, views, taints, set(jaxpr.invars[sum(traced.is_arr[:n]):]))
    outputs = {tid for ov in jaxpr.outvars if not isinstance(ov, jcore.Literal) for tid in taints.get(ov, ())}
    for tid in _heads(walker, outputs):
        walker.usage[tid].head = True
    for tid in walker.routers:
        walker.usage[tid].router = True
    return walker.usage


def _heads(walker: _Walker, outputs: set) -> set:
    """The output head among the weights whose product is an output (``outputs``), by the
    rule in the module docstring."""
    candidates = {t for t in outputs - walker.fed if t in walker.width}
    vocab = max(walker.rows.values(), default=None)
    heads = {t for t in candidates if walker.width[t][1] == vocab}
    if not heads and len(candidates) == 1:
        heads = {t for t in candidates if walker.width[t][0] != walker.width[t][1]}
    return heads
