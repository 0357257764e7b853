"""``wrap``: run any ``f(params, *args)`` with LoRA adapters applied, without forming A⊗B.

The factored strategy traces ``f(base, *args)`` to a jaxpr (once per input signature) and
evaluates it with an interpreter in which every targeted weight is a symbolic value
:class:`Adapted`: ``W + s·A⊗B`` in W's current view. Each primitive that meets such a value
has one rule here:

* ``dot_general``: ``x·W + s·((x·A)·B)``, or ``(x·B)·A`` when the weight's output axes are
  contracted (tied-embedding ``attend``, transposed use); batch and stack axes included.
* ``gather`` along the input (or output) axes: ``W[idx] + s·A[idx]·B`` (embedding lookup);
  along stack axes (an expert per token): A and B are picked alike and stay symbolic.
* ``conv_general_dilated``: a conv with A (same window, in -> r), then B over the features.
* ``ragged_dot_general`` (``lax.ragged_dot``, experts stacked along W's group axis):
  ``ragged_dot(x, W, g) + s·ragged_dot(ragged_dot(x, A, g), B, g)`` with the same group
  sizes.
* ``mul`` by (or ``div`` by) a value constant along the weight's input axes, such as a
  per-output scale: ``W·c + s·A⊗(B·c)`` (constant along the output axes: ``(A·c)``).
* shape-only ops (transpose, reshape/squeeze that regroup axes of one role, casts, copies,
  sharding constraints, ``checkpoint_name``, ``optimization_barrier``) and windows (slice,
  dynamic_slice, split) stay symbolic; ``concatenate`` pads each adapted piece's factors
  with zeros (several adapted pieces join their ranks).
* ``jit``, custom_jvp/custom_vjp calls are inlined; ``remat`` is re-applied with its policy;
  ``scan`` slices A and B per step for a weight stacked along the scan axis; ``cond`` and
  ``while`` recurse; ``shard_map`` runs its body per shard again, A and B entering split
  like their weight (``pvary`` in the body is a view).
* anything else materializes ``W + s·A⊗B`` for that use only and warns once per weight
  and primitive, naming both (:class:`MaterializeWarning`); so do ``reduce_precision``
  and casts to int or bool, which round the adapted weight as a whole.

The primitives with a rule here are exactly those of the table in :mod:`lora_jax._jaxpr`,
which axis inference reads too.

Adapter-input dropout (``lora_rng``) is applied where the factored product reads its input.

Per-example adapters (a tree from :func:`lora_jax.stack` with ``adapter_ids=``) run this
interpreter under ``jax.vmap`` over the examples (:mod:`lora_jax.mixed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.sharding import PartitionSpec

from ._jaxpr import HIGHER, PRIMITIVES, SHAPE, WINDOW, bind, closed, reshape_groups, scan_counts, subcalls, trace
from .config import path_str
from .quant import QuantizedWeight, is_quantized
from . import mixed
from .tree import as_lora, check_fits, fmt_paths, merge
from .weight import LoraWeight, is_lora

__all__ = ["wrap", "STRATEGIES", "MaterializeWarning", "Adapted"]

STRATEGIES = ("factored", "merge")

_S, _I, _O = "s", "i", "o"  # roles of a weight's axes: stack, input, output
_LETTERS = "abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # "r" is the rank
_R = "r"


class MaterializeWarning(UserWarning):
    """A targeted weight met a primitive without a factored rule: ``W + s·A⊗B`` was formed
    for that use. Results are correct; speed and memory are those of merging."""


def _static():
    return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Adapted:
    """The symbolic value ``W + scale·(a ⊗ b)`` of one target, in W's current view.

    ``w`` is the base weight as the traced function currently sees it (after transposes,
    reshapes, slices, casts). ``roles[d] = (kind, k)`` says that dimension ``d`` of ``w`` is
    the ``k``-th stack (``"s"``), input (``"i"``) or output (``"o"``) axis of the factors:
    ``a`` is ``(*stack, r, *in)`` and ``b`` is ``(*stack, r, *out)``. ``key`` is the dropout
    key (or None). ``name`` is the target's parameter path (``params/mlp/up/kernel``; the
    paths joined by ``+`` when several targets are concatenated). ``g`` is DoRA's factor
    ``m / ||W + s·A⊗B||`` in the layout of ``b`` with a rank axis of size 1,
    ``(*stack, 1, *out)``, by which the value is multiplied along its stack and output
    axes (None for plain LoRA): the products apply it to their outputs, so neither
    ``W·g`` nor ``A⊗B`` is formed. The children are ``w``, ``a``, ``b``, ``key`` and
    ``g``; the rest is static.

    """

    w: Any
    a: Any
    b: Any
    key: Any
    g: Any
    roles: tuple = _static()
    scale: float = _static()
    dropout: float = _static()
    name: str = _static()

    @classmethod
    def of(cls, w, lw: LoraWeight, key, name: str | None = None):
        """The value of target ``w`` with adapter ``lw``, named ``name`` (its path; the
        adapter's rule pattern when None)."""
        roles = []
        for d in range(w.ndim):
            for kind, axes in ((_S, lw.stack_axes), (_I, lw.in_axes), (_O, lw.out_axes)):
                if d in axes:
                    roles.append((kind, axes.index(d)))
        g = None
        if lw.is_dora:
            g = jnp.expand_dims(lw.dora_factor(_value(w)), len(lw.stack_axes))
        return cls(w, lw.a, lw.b, key, g, tuple(roles), lw.scale, lw.dropout, lw.rule if name is None else name)

    def replace(self, **kw) -> "Adapted":
        if "roles" in kw:
            kw["roles"] = tuple(kw["roles"])
        return dataclasses.replace(self, **kw)

    @property
    def n_stack(self) -> int:
        return sum(kind == _S for kind, _ in self.roles)

    def dims(self, kind: str) -> list[int]:
        """Dimensions of ``w`` with role ``kind``, in factor order."""
        return sorted((d for d, r in enumerate(self.roles) if r[0] == kind), key=lambda d: self.roles[d][1])

    def axis(self, d: int) -> int:
        """The factor axis holding dimension ``d`` (in ``a`` for input, ``b`` for output,
        both for stack)."""
        kind, k = self.roles[d]
        return k if kind == _S else self.n_stack + 1 + k

    def letters(self, wl) -> tuple[str, str]:
        """einsum subscripts of ``a`` and ``b`` given letters ``wl`` for w's dimensions."""
        s = "".join(wl[d] for d in self.dims(_S))
        return (s + _R + "".join(wl[d] for d in self.dims(_I)),
                s + _R + "".join(wl[d] for d in self.dims(_O)))

    def materialize(self):
        """``w + scale·a⊗b`` (times ``g``) in w's view: float32 (or wider) accumulation,
        w's dtype."""
        w = _value(self.w)
        acc = jnp.promote_types(jnp.result_type(self.a, self.b, w), jnp.float32)
        wl = _LETTERS[: w.ndim]
        la, lb = self.letters(wl)
        d = jnp.einsum(f"{la},{lb}->{wl}", self.a.astype(acc), self.b.astype(acc),
                       precision=lax.Precision.HIGHEST)
        v = w.astype(acc) + self.scale * d
        if self.g is not None:
            v = v * self.g_along(wl, wl).astype(acc)
        return v.astype(w.dtype)

    def g_letters(self, wl) -> str:
        """The subscripts of ``g`` without its rank axis, given letters ``wl`` for w."""
        return "".join(wl[d] for d in self.dims(_S)) + "".join(wl[d] for d in self.dims(_O))

    def g_along(self, wl, target: str):
        """``g`` arranged to broadcast against an array with subscripts ``target`` (size 1
        where ``target`` has a letter that ``g`` lacks); None when ``target`` lacks one of
        g's letters (``wl``: the letters of w's dimensions)."""
        gl = self.g_letters(wl)
        if not set(gl) <= set(target):
            return None
        g = jnp.squeeze(self.g, self.n_stack)
        order = sorted(gl, key=target.index)
        g = jnp.transpose(g, [gl.index(c) for c in order])
        return jnp.reshape(g, [g.shape[order.index(c)] if c in gl else 1 for c in target])

    def normalized(self) -> "Adapted":
        """The same value with each role's factor axes in the order of w's dimensions."""
        a, b, g, roles = self.a, self.b, self.g, list(self.roles)
        for kind in (_S, _I, _O):
            dims = [d for d, r in enumerate(self.roles) if r[0] == kind]
            order = [self.roles[d][1] for d in dims]
            if order == sorted(order):
                continue
            base = 0 if kind == _S else self.n_stack + 1

            def moved(x):
                perm = list(range(x.ndim))
                perm[base: base + len(order)] = [base + k for k in order]
                return jnp.transpose(x, perm)

            if kind in (_S, _I):
                a = moved(a)
            if kind in (_S, _O):
                b = moved(b)
                g = None if g is None else moved(g)  # (b's layout)
            for new_k, d in enumerate(dims):
                roles[d] = (kind, new_k)
        return self.replace(a=a, b=b, g=g, roles=roles)

    def reshaped(self, w_new) -> "Adapted | None":
        """Follow a reshape of ``w`` to ``w_new``; None when a new dimension would mix roles."""
        old, new = self.w.shape, w_new.shape
        v = self.normalized()
        kinds: dict[int, str] = {d: _S for d, n in enumerate(new) if n == 1}
        for gi, gj in reshape_groups(old, new):
            group = {v.roles[d][0] for d in gi if old[d] != 1}
            if len(group) > 1:
                return None
            if group:  # (size-1 dimensions on their own stay stack axes)
                kind = group.pop()
                kinds.update((d, kind) for d in gj if new[d] != 1)
        roles, count = [], {_S: 0, _I: 0, _O: 0}
        for d in range(len(new)):
            roles.append((kinds[d], count[kinds[d]]))
            count[kinds[d]] += 1
        sizes = {kind: [new[d] for d in range(len(new)) if kinds[d] == kind] for kind in count}
        r = v.a.shape[v.n_stack]
        a = jnp.reshape(v.a, (*sizes[_S], r, *sizes[_I]))
        b = jnp.reshape(v.b, (*sizes[_S], r, *sizes[_O]))
        g = None if v.g is None else jnp.reshape(v.g, (*sizes[_S], 1, *sizes[_O]))
        return v.replace(w=w_new, a=a, b=b, g=g, roles=roles)


def _is_adapted(x) -> bool:
    return isinstance(x, Adapted)


@jax.tree_util.register_pytree_node_class
class Dequantized:
    """A quantized weight, or a view of one (transposed, reshaped, sliced, cast, joined with
    other arrays), that is dequantized only where a primitive other than a view uses it.

    ``parts`` (the children) are :class:`~lora_jax.QuantizedWeight` nodes and arrays;
    ``build`` (static) computes the value from them; ``aval`` is its shape and dtype.
    """

    def __init__(self, parts, build, aval):
        self.parts, self.build, self.aval = tuple(parts), build, aval

    def tree_flatten(self):
        return self.parts, (self.build, self.aval)

    @classmethod
    def tree_unflatten(cls, aux, parts):
        return cls(parts, *aux)

    @classmethod
    def of(cls, q: QuantizedWeight) -> "Dequantized":
        return cls((q,), QuantizedWeight.dequantize, q.abstract())

    shape = property(lambda self: tuple(self.aval.shape))
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: len(self.aval.shape))

    @property
    def source(self) -> QuantizedWeight | None:
        """The quantized weight when this is exactly its dequantized value (no view)."""
        return self.parts[0] if self.build is QuantizedWeight.dequantize else None

    def value(self, after=None):
        """The array; ``after`` (a float32 zero) makes the dequantization wait for it."""
        return self.build(*self.parts, after=after)


def _is_deq(x) -> bool:
    return isinstance(x, Dequantized)


def _value(x):
    """``x`` as an array (a :class:`Dequantized` is dequantized)."""
    return x.value() if _is_deq(x) else x


# Primitives that only move, cast or cut a quantized weight: they stay lazy (Dequantized).
_VIEWS = frozenset(n for n, k in PRIMITIVES.items() if k in (SHAPE, WINDOW)) - {"gather", "optimization_barrier"}


def _eval(eqn, invals) -> list:
    """Evaluate ``eqn``. With quantized operands a view stays lazy, and any other use
    dequantizes at the use (:func:`_use`)."""
    if not any(map(_is_deq, invals)):
        return bind(eqn, invals)
    if eqn.primitive.name in _VIEWS:
        return _view(eqn, invals)
    return _use(eqn, invals)


def _use(eqn, invals) -> list:
    """``eqn`` on dequantized weights, differentiable in its other operands only.

    The forward pass dequantizes once the other operands (the activations) exist; the
    backward pass keeps the codes and dequantizes again once the output's cotangent
    exists, so no float weight lives from one pass to the other and compiled programs do
    not dequantize every weight ahead of its use."""
    at = [i for i, v in enumerate(invals) if _is_deq(v)]
    deqs = [invals[i] for i in at]
    others = [jnp.asarray(v) for i, v in enumerate(invals) if i not in at]

    def run(deqs, others, after):
        tie = _tie(after)
        vals, d, o = [], iter(deqs), iter(others)
        for i in range(len(invals)):
            vals.append(next(d).value(tie) if i in at else next(o))
        return bind(eqn, vals)

    @jax.custom_vjp
    def use(deqs, others):
        return run(deqs, others, others)

    def fwd(deqs, others):
        return run(deqs, others, others), (deqs, others)

    def bwd(res, ct):
        deqs, others = res
        _, pull = jax.vjp(lambda o: run(deqs, o, ct), others)
        return jax.tree.map(_no_cotangent, deqs), *pull(ct)

    use.defvjp(fwd, bwd)
    return use(deqs, others)


def _no_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _tie(vals):
    """An exact float32 zero computed from ``vals`` (from one element of each float array:
    ``e·0`` where ``e`` is finite, else 0, which a compiler cannot fold away)."""
    zero = jnp.zeros((), jnp.float32)
    for v in jax.tree.leaves(vals):
        if jnp.issubdtype(jnp.result_type(v), jnp.floating) and jnp.size(v):
            zero = zero + _zero_of(jnp.ravel(v)[0].astype(jnp.float32))
    return zero


@jax.custom_batching.custom_vmap
def _zero_of(e):
    return jnp.where(jnp.isfinite(e), 0 * e, 0.0)


@_zero_of.def_vmap
def _zero_of_batched(axis_size, in_batched, e):
    # Under vmap (per-example adapters) the zero comes from the first example alone and is
    # not batched, so a weight dequantized after it stays one weight, not one per example.
    return _zero_of(e[0] if in_batched[0] else e), False


def _view(eqn, invals) -> list:
    spans, parts = [], []
    for x in invals:
        n = len(x.parts) if _is_deq(x) else 1
        spans.append((len(parts), n, x.build if _is_deq(x) else None))
        parts += x.parts if _is_deq(x) else [x]

    def output(k):
        def build(*ps, after=None):
            vals = [ps[i] if b is None else b(*ps[i: i + n], after=after) for i, n, b in spans]
            return bind(eqn, vals)[k]

        return build

    return [Dequantized(parts, output(k), jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
            for k, v in enumerate(eqn.outvars)]


def _scan_slices(w, length: int):
    """``(xs, step)`` for scanning over axis 0 of ``w``: what ``lax.scan`` slices, and the
    function giving one step's value from its slice.

    A quantized weight whose axis 0 is a stack axis stays whole (a loop constant) and the
    scan steps over the layer index instead: each step picks its layer's codes and scales
    inside the dequantization, so neither float weights nor per-step copies of the codes
    are kept for the backward pass. Other views of quantized weights are dequantized whole
    first."""
    if not _is_deq(w):
        return w, lambda x: x
    q = w.source
    if q is None or 0 in q.in_axes:
        return w.value(), lambda x: x
    step, whole = q.layers()

    def pick(whole, i, after=None):
        return step.replace(**{k: lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in whole.items()}
                            ).dequantize(after)

    def at(i):
        return Dequantized((whole, i), pick, step.abstract())

    return jnp.arange(length), at


_RULES: dict[str, Callable] = {}


def _rule(*names):
    def register(fn):
        for n in names:
            _RULES[n] = fn
        return fn

    return register


class _Interpreter:
    """Evaluates a jaxpr whose inputs may be :class:`Adapted` values."""

    def __init__(self, warned: set):
        self.warned = warned  # the (weight path, primitive) pairs already warned about
        self.uses = 0  # counts adapter uses, so each gets its own dropout mask
        self.frame: tuple = ((), {}, 0)  # (equations, environment, position) being evaluated
        self.shared: dict = {}  # id(eqn) -> its x·A, computed with a sibling's (same x)
        self.readers: dict = {}  # id(equation list) -> (the list, products_reading's index)

    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        outer = self.frame
        for pos, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            if any(map(_is_adapted, invals)):
                self.frame = (jaxpr.eqns, env, pos)
                outs = self.adapted(eqn, invals)
                self.frame = outer
            elif any(map(_is_deq, invals)):
                outs = self.dequantized(eqn, invals)
            else:
                outs = bind(eqn, invals)
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def siblings(self, eqn, x_pos: int, accept) -> list:
        """Later ``dot_general`` equations of this jaxpr with the same parameters that read
        the same input variable at ``x_pos`` and whose weight, already evaluated, is an
        :class:`Adapted` value that ``accept``s."""
        eqns, env, pos = self.frame
        x_var, found = eqn.invars[x_pos], []
        for at in self.products_reading(eqns).get(x_var, ()):
            other = eqns[at]
            if at <= pos or other.params != eqn.params:
                continue
            if other.invars[x_pos] is not x_var:
                continue
            w_var = other.invars[1 - x_pos]
            v = env.get(w_var) if not isinstance(w_var, jcore.Literal) else None
            if _is_adapted(v) and accept(v):
                found.append((other, v))
        return found

    def products_reading(self, eqns) -> dict:
        """``{variable: positions of the dot_general equations in eqns that read it}``, built
        once per equation list (a scan over each product's later equations would make the
        first call quadratic in the model's depth)."""
        held = self.readers.get(id(eqns))
        if held is None:
            index: dict = {}
            for at, e in enumerate(eqns):
                if e.primitive.name == "dot_general":
                    for var in e.invars:
                        if not isinstance(var, jcore.Literal):
                            index.setdefault(var, []).append(at)
            held = self.readers[id(eqns)] = (eqns, index)  # (eqns kept: its id stays its own)
        return held[1]

    def run_closed(self, sub, args) -> list:
        return self.run(sub.jaxpr, sub.consts, args)

    def adapted(self, eqn, invals) -> list:
        rule = _RULES.get(eqn.primitive.name)
        out = None if rule is None else rule(self, eqn, invals)
        if out is not None:
            return out
        return bind(eqn, [self.concrete(x, eqn.primitive.name) for x in invals])

    def dequantized(self, eqn, invals) -> list:
        """An equation reading quantized weights but no adapted one: higher-order primitives
        (and barriers) pass them on to their bodies; anything else goes to :func:`_eval`."""
        name = eqn.primitive.name
        if PRIMITIVES.get(name) == HIGHER or name == "optimization_barrier":
            out = _RULES[name](self, eqn, invals)
            if out is not None:
                return out
        return _eval(eqn, invals)

    def concrete(self, x, why: str):
        """A plain array for ``x``: materializes an :class:`Adapted` (warning once per weight
        and ``why``) and dequantizes a :class:`Dequantized`."""
        if _is_deq(x):
            return x.value()
        if not _is_adapted(x):
            return x
        if (x.name, why) not in self.warned:
            self.warned.add((x.name, why))
            warnings.warn(
                f"lora_jax.wrap: the adapted weight {x.name!r} reaches {why!r}, which has no "
                "factored rule; W + s*A@B is materialized for this use (correct, but with "
                "merge-like memory). Warned once per weight and primitive.",
                MaterializeWarning,
                stacklevel=2,
            )
        return x.materialize()

    def dropout(self, x, v: Adapted):
        """The adapter's input: ``x`` with inverted dropout when ``v`` has a key."""
        if v.key is None or v.dropout <= 0:
            return x
        self.uses += 1
        keep = 1.0 - v.dropout
        mask = jax.random.bernoulli(jax.random.fold_in(v.key, self.uses), keep, jnp.shape(x))
        return jnp.where(mask, x / jnp.asarray(keep, jnp.result_type(x)), jnp.zeros((), jnp.result_type(x)))




# -- shape-only ops and windows -------------------------------------------------------------
@_rule("transpose")
def _transpose(interp, eqn, invals):
    (v,) = invals
    (w,) = _eval(eqn, [v.w])
    return [v.replace(w=w, roles=[v.roles[d] for d in eqn.params["permutation"]])]


@_rule("reshape", "squeeze", "broadcast_in_dim")
def _reshape(interp, eqn, invals):
    v = invals[0]
    if len(invals) > 1 or (eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None):
        return None  # dynamic shapes / a reshape that transposes first
    out_shape = eqn.outvars[0].aval.shape
    if math.prod(out_shape) != math.prod(v.w.shape):
        return None  # a real broadcast
    (w,) = _eval(eqn, [v.w])
    new = v.reshaped(w)
    return None if new is None else [new]


@_rule("convert_element_type", "copy", "copy_p", "sharding_constraint", "mesh_cast",
       "reshard", "name", "pvary")
def _elementwise_view(interp, eqn, invals):
    (v,) = invals
    new_dtype = eqn.params.get("new_dtype")
    if new_dtype is not None and not jnp.issubdtype(new_dtype, jnp.inexact):
        return None  # a cast to int/bool rounds W + s·A⊗B as a whole: materialize first
    (w,) = _eval(eqn, [v.w])
    return [v.replace(w=w)]


@_rule("stop_gradient")
def _stop_gradient(interp, eqn, invals):
    (v,) = invals
    return [jax.tree.map(lax.stop_gradient, v)]


@_rule("reduce_precision")
def _reduce_precision(interp, eqn, invals):
    """Rounding is not linear: ``round(W + s·A⊗B)`` differs from any rounding of W, A and B
    apart, so the weight is materialized for this use, as for a cast to int (exact)."""
    return None


@_rule("optimization_barrier")
def _optimization_barrier(interp, eqn, invals):
    """One barrier over every operand, the adapted weights' base and factors included."""
    plain = tuple(x.replace(key=None) if _is_adapted(x) else x for x in invals)
    outs = lax.optimization_barrier(plain)
    return [o.replace(key=x.key) if _is_adapted(x) else o for o, x in zip(outs, invals)]


def _factor_slicer(v: Adapted, d: int, fn) -> Adapted:
    """``v`` with ``fn(factor, axis)`` applied to the factor(s) holding dimension ``d``
    (and to ``g`` with ``b``)."""
    kind = v.roles[d][0]
    ax = v.axis(d)
    if kind in (_S, _I):
        v = v.replace(a=fn(v.a, ax))
    if kind in (_S, _O):
        v = v.replace(b=fn(v.b, ax), g=None if v.g is None else fn(v.g, ax))
    return v


@_rule("slice")
def _slice(interp, eqn, invals):
    (v,) = invals
    (w,) = _eval(eqn, [v.w])
    p = eqn.params
    strides = p["strides"] or (1,) * w.ndim
    for d, (lo, hi, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
        if (lo, hi, st) != (0, v.w.shape[d], 1):
            v = _factor_slicer(v, d, lambda x, ax: lax.slice_in_dim(x, lo, hi, st, ax))
    return [v.replace(w=w)]


@_rule("dynamic_slice")
def _dynamic_slice(interp, eqn, invals):
    v, *starts = invals
    if any(map(_is_adapted, starts)):
        return None
    (w,) = _eval(eqn, [v.w, *starts])
    for d, size in enumerate(eqn.params["slice_sizes"]):
        if size != v.w.shape[d]:
            v = _factor_slicer(v, d, lambda x, ax: lax.dynamic_slice_in_dim(x, starts[d], size, ax))
    return [v.replace(w=w)]


@_rule("split")
def _split(interp, eqn, invals):
    (v,) = invals
    ws = _eval(eqn, [v.w])
    d, sizes = eqn.params["axis"], eqn.params["sizes"]
    bounds = np.cumsum((0, *sizes))
    outs = []
    for w, lo, hi in zip(ws, bounds[:-1], bounds[1:]):
        outs.append(_factor_slicer(v, d, lambda x, ax: lax.slice_in_dim(x, int(lo), int(hi), 1, ax)).replace(w=w))
    return outs


@_rule("concatenate")
def _concatenate(interp, eqn, invals):
    """A weight joined with other arrays along dimension ``d``: each adapted piece's factor
    holding ``d`` (both factors for a stack axis) is padded with zeros to the joined extent,
    so it adds nothing outside its own piece. Several adapted pieces (a fused q/k/v kernel)
    join their ranks, each scale folded into its B. Their roles must agree, and dropout
    needs a single adapted piece. DoRA factors join along stack and output axes (1 for
    the pieces without one); along input axes a piece's factor cannot apply to the whole
    product, so the weight is materialized."""
    d = eqn.params["dimension"]
    adapted = [x for x in invals if _is_adapted(x)]
    first = adapted[0]
    if any(x.roles != first.roles for x in adapted):
        return None
    if len(adapted) > 1 and any(x.key is not None for x in adapted):
        return None
    gs = [x.g for x in adapted if x.g is not None]
    if gs and first.roles[d][0] == _I:
        return None
    (w,) = _eval(eqn, [x.w if _is_adapted(x) else x for x in invals])
    sizes = [(x.w if _is_adapted(x) else x).shape[d] for x in invals]
    bounds = np.cumsum([0] + sizes)
    pieces = []
    for x, lo, hi in zip(invals, bounds[:-1], bounds[1:]):
        if _is_adapted(x):
            pad = (int(lo), int(bounds[-1] - hi))
            pieces.append(_factor_slicer(x.replace(g=None), d, lambda f, ax: _pad_axis(f, ax, pad)))
    g = None
    if gs:
        ax, like = first.axis(d), gs[0]
        ones = lambda n: jnp.ones((*like.shape[:ax], n, *like.shape[ax + 1:]), like.dtype)  # noqa: E731
        g = jnp.concatenate([x.g.astype(like.dtype) if _is_adapted(x) and x.g is not None else ones(n)
                             for x, n in zip(invals, sizes)], axis=ax)
    if len(pieces) == 1:
        return [first.replace(w=w, a=pieces[0].a, b=pieces[0].b, g=g)]
    r_axis = first.n_stack
    a = jnp.concatenate([x.a for x in pieces], axis=r_axis)
    b = jnp.concatenate([x.b * jnp.asarray(x.scale, x.b.dtype) for x in pieces], axis=r_axis)
    name = "+".join(dict.fromkeys(x.name for x in adapted))
    return [first.replace(w=w, a=a, b=b, g=g, scale=1.0, name=name)]


def _pad_axis(f, ax: int, pad: tuple[int, int]):
    widths = [(0, 0)] * f.ndim
    widths[ax] = pad
    return jnp.pad(f, widths)


# -- elementwise rescaling ---------------------------------------------------------------------
@_rule("mul", "div")
def _rescale(interp, eqn, invals):
    """``(W + s·A⊗B)·c = W·c + s·A⊗(B·c)`` when ``c`` is constant along W's input axes (a
    per-output scale: weight norm's ``g / ||v||``), ``W·c + s·(A·c)⊗B`` when it is constant
    along the output axes; division by such a ``c`` likewise. Constant means a scalar, or a
    broadcast (possibly cast) whose operand lacks those axes or has size 1 there. Any other
    ``c``, and ``c / W``, materialize."""
    k = 0 if _is_adapted(invals[0]) else 1
    v, c = invals[k], invals[1 - k]
    if _is_adapted(c) or _is_deq(c) or (eqn.primitive.name == "div" and k == 1):
        return None
    const = _constant_dims(interp, eqn.invars[1 - k], v.w.ndim)
    kind = _O if set(v.dims(_I)) <= const else _I if set(v.dims(_O)) <= const else None
    if kind is None:
        return None
    (w,) = _eval(eqn, [v.w, c] if k == 0 else [c, v.w])
    v = v.normalized()
    f = v.b if kind == _O else v.a
    if jnp.ndim(c):  # c over the stack and ``kind`` dimensions, in the factor's layout
        keep = [d for d in range(v.w.ndim) if v.roles[d][0] in (_S, kind)]
        c = c[tuple(slice(None) if d in keep else 0 for d in range(v.w.ndim))]
        c = jnp.transpose(c, [keep.index(d) for d in (*v.dims(_S), *v.dims(kind))])
        c = jnp.expand_dims(c, v.n_stack)  # the rank axis
    c = c.astype(f.dtype)
    f = f * c if eqn.primitive.name == "mul" else f / c
    return [v.replace(w=w, **{"b" if kind == _O else "a": f})]


def _constant_dims(interp, var, ndim: int) -> set[int]:
    """The dimensions along which the value of jaxpr variable ``var`` (an operand of an
    elementwise op on an ``ndim``-dimensional weight) is constant, as its producer in the
    jaxpr being evaluated shows: every one for a scalar; its size-1 dimensions (which the
    op broadcasts); and the new and size-1 dimensions of the ``broadcast_in_dim`` that made
    it (followed through casts and copies)."""
    shape = var.aval.shape
    if not shape:
        return set(range(ndim))
    ones = {d for d, n in enumerate(shape) if n == 1}
    if isinstance(var, jcore.Literal):
        return ones
    dims: set = set()
    eqns, _, pos = interp.frame
    for e in reversed(eqns[:pos]):
        if var not in e.outvars:
            continue
        name = e.primitive.name
        if name in ("convert_element_type", "copy", "copy_p") and not isinstance(e.invars[0], jcore.Literal):
            var = e.invars[0]
            continue
        if name == "broadcast_in_dim" and len(e.invars) == 1:
            bd, src = e.params["broadcast_dimensions"], e.invars[0].aval.shape
            dims = set(range(ndim)) - set(bd)
            dims |= {bd[j] for j, n in enumerate(src) if n == 1}
        break
    return dims | ones


# -- the products -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _contraction(subscripts: str, lhs_shape: tuple, rhs_shape: tuple):
    """How ``jnp.einsum(subscripts, lhs, rhs)`` contracts: ``(swap, dimension_numbers,
    permutation)`` for one ``dot_general`` (operands swapped when ``swap``) and the transpose
    after it (None: none), in the order ``jnp.einsum`` itself chooses, so the program is the
    same; None for what a single ``dot_general`` does not cover (a letter summed within one
    operand, repeated letters, a size-1 axis against a larger one)."""
    ins, out = subscripts.split("->")
    ln, rn = ins.split(",")
    if len(set(ln)) < len(ln) or len(set(rn)) < len(rn) or len(set(out)) < len(out):
        return None
    if any(c not in rn and c not in out for c in ln) or any(c not in ln and c not in out for c in rn):
        return None
    if any(lhs_shape[ln.index(c)] != rhs_shape[rn.index(c)] for c in ln if c in rn):
        return None
    contracted = sorted(c for c in ln if c in rn and c not in out)
    batch = [c for c in out if c in ln and c in rn]
    cont = (tuple(ln.index(c) for c in contracted), tuple(rn.index(c) for c in contracted))
    bat = (tuple(ln.index(c) for c in batch), tuple(rn.index(c) for c in batch))
    rest_l = [c for c in ln if c not in batch and c not in contracted]
    rest_r = [c for c in rn if c not in batch and c not in contracted]
    if "".join(batch + rest_l + rest_r) == out:
        return False, (cont, bat), None
    names = "".join(batch + rest_r + rest_l)
    return True, ((cont[1], cont[0]), (bat[1], bat[0])), None if names == out else tuple(names.index(c) for c in out)


def _einsum(subscripts: str, lhs, rhs, precision=None, preferred_element_type=None):
    """``jnp.einsum(subscripts, lhs, rhs, ...)`` of two operands of one dtype, emitting the
    same ``dot_general`` and transpose without its per-call path search (the factored
    products are many; this keeps ``wrap``'s first call short)."""
    plan = _contraction(subscripts, tuple(lhs.shape), tuple(rhs.shape))
    if plan is None or lhs.dtype != rhs.dtype or jax.typeof(lhs).weak_type or jax.typeof(rhs).weak_type:
        return jnp.einsum(subscripts, lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)
    swap, dims, perm = plan
    pet = lhs.dtype if preferred_element_type is None else preferred_element_type
    y = lax.dot_general(*((rhs, lhs) if swap else (lhs, rhs)), dims, precision, preferred_element_type=pet)
    return y if perm is None else lax.transpose(y, perm)


def _cast_factors(v: Adapted, first: str):
    """(first factor, second factor · scale) in the weight's current dtype."""
    dt = v.w.dtype
    f1, f2 = (v.a, v.b) if first == _I else (v.b, v.a)
    return _cast(f1, dt), _cast(lax.mul(f2, np.asarray(v.scale, f2.dtype)), dt)


def _cast(x, dtype):
    """``x.astype(dtype)`` (nothing when it has that dtype), without ``jnp``'s per-call checks."""
    return x if x.dtype == dtype and not jax.typeof(x).weak_type else lax.convert_element_type(x, dtype)


@_rule("dot_general")
def _dot_general(interp, eqn, invals):
    """``x·W + s·((x·A)·B)``, contracting A first when the product contracts W's input
    axes (B first for its output axes). A DoRA factor ``g`` multiplies the output when
    the stack and output axes it runs over are kept (batch or free), and the input ``x``
    when they are contracted (a transposed use); a product keeping some of them and
    contracting others materializes the weight."""
    lhs, rhs = invals
    if _is_adapted(lhs) and _is_adapted(rhs):
        lhs = interp.concrete(lhs, "dot_general of two adapted weights")
    v_lhs = _is_adapted(lhs)
    v, x = (lhs, rhs) if v_lhs else (rhs, lhs)
    p = eqn.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    wc, xc, wb, xb = (lc, rc, lb, rb) if v_lhs else (rc, lc, rb, lb)
    wl = _LETTERS[: v.w.ndim]
    n = _LETTERS[v.w.ndim]  # x's free dimensions, flattened into one
    pre = False  # DoRA's factor applied to x
    if v.g is not None:
        gl = set(v.g_letters(wl))
        if gl & {wl[d] for d in wc}:
            if not gl <= {wl[d] for d in (*wc, *wb)}:
                return None
            xl = [n] * x.ndim
            for dw, dx in zip((*wc, *wb), (*xc, *xb)):
                xl[dx] = wl[dw]
            x = x * v.g_along(wl, "".join(xl)).astype(x.dtype)
            v, pre = v.replace(g=None), True
    (base,) = _eval(eqn, [v.w, x] if v_lhs else [x, v.w])

    pairs = list(zip((*wc, *wb), (*xc, *xb)))
    x_sub = _flat_subscripts(x.ndim, wl, n, pairs)
    kinds = {v.roles[d][0] for d in wc}
    first = _I if _I in kinds or _O not in kinds else _O
    la, lb_ = v.letters(wl)
    l1, l2 = (la, lb_) if first == _I else (lb_, la)
    f1, f2 = _cast_factors(v, first)
    w_free = [wl[d] for d in range(v.w.ndim) if d not in wc and d not in wb]
    out = "".join(wl[d] for d in wb) + ("".join(w_free) + n if v_lhs else n + "".join(w_free))
    needed = set(out) | set(l2)
    mid = "".join(dict.fromkeys(c for c in x_sub + l1 if c in needed))
    kw = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    t = interp.shared.pop(id(eqn), None)  # (computed with a sibling's: no dropout)
    if t is None:
        xin = _flat_input(interp.dropout(x, v), pairs)
        if mid == n + _R and v.key is None and not pre:
            t = _shared_input_product(interp, eqn, v, 1 if v_lhs else 0, wc, f1, xin, f"{x_sub},{l1}->{mid}", kw)
        if t is None:
            t = _einsum(f"{x_sub},{l1}->{mid}", xin, f1, **kw)
    y = _einsum(f"{mid},{l2}->{out}", _cast(t, f2.dtype), f2, **kw)
    # (added in y's flat layout: under vmap, adding in base's layout made XLA:CPU copy the base product)
    total = lax.add(lax.reshape(base, y.shape), _cast(y, base.dtype))
    if v.g is not None:
        total = total * v.g_along(wl, out).astype(total.dtype)
    return [lax.reshape(total, base.shape)]


def _flat_subscripts(ndim: int, wl: str, n: str, pairs) -> str:
    """The einsum subscripts of :func:`_flat_input`'s result: letter ``n`` for the tokens,
    then ``wl[dw]`` for each dimension ``dx`` paired with weight dimension ``dw``, in order."""
    xl = dict((dx, wl[dw]) for dw, dx in pairs)
    return n + "".join(xl[d] for d in range(ndim) if d in xl)


def _flat_input(x, pairs):
    """``x`` with its free dimensions (those not in ``pairs``' ``(dw, dx)``) moved first and
    flattened into one: XLA:CPU runs the thin products faster over one token axis."""
    paired = {dx for _, dx in pairs}
    free = [d for d in range(x.ndim) if d not in paired]
    rest = [d for d in range(x.ndim) if d in paired]
    if free != list(range(len(free))):
        x = jnp.transpose(x, free + rest)
    if len(free) != 1:
        x = jnp.reshape(x, (math.prod(x.shape[:len(free)]), *x.shape[len(free):]))
    return x


def _shared_input_product(interp, eqn, v: Adapted, x_pos: int, wc, f1, xin, subscripts, kw):
    """``x·A`` for this product and for its siblings that read the same ``x`` (q, k and v):
    one ``x·[A_q; A_k; A_v]`` reads the activation once, forward and backward (dA and dx),
    instead of three times. The siblings' parts wait in ``interp.shared``. None when this
    product has no sibling."""
    pairing = [v.roles[d] for d in wc]
    group = interp.siblings(eqn, x_pos, lambda u: (
        u.key is None and u.n_stack == 0 and len(u.dims(_I)) == len(wc)
        and (u.g is None or all(u.roles[d][0] != _O for d in wc))  # (DoRA: no factor on x)
        and [u.roles[d] for d in wc] == pairing and u.a.shape[1:] == v.a.shape[1:]
        and u.w.dtype == v.w.dtype))
    if not group:
        return None
    factors = [f1] + [_cast(u.a, u.w.dtype) for _, u in group]
    t_all = _einsum(subscripts, xin, jnp.concatenate(factors, axis=0), **kw)
    bounds = np.cumsum([f.shape[0] for f in factors])
    t, *rest = jnp.split(t_all, bounds[:-1], axis=1)
    interp.shared.update((id(e), tt) for (e, _), tt in zip(group, rest))
    return t


@_rule("gather")
def _gather(interp, eqn, invals):
    v, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if _is_adapted(idx) or getattr(dn, "operand_batching_dims", ()):
        return None
    looked = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    kinds = {v.roles[d][0] for d in looked}
    full = all(p["slice_sizes"][d] == v.w.shape[d] for d in range(v.w.ndim) if d not in looked)
    if len(kinds) != 1 or not full:
        return None  # a window across roles
    (kind,) = kinds
    if kind == _S:
        return [_pick_from_stack(v, eqn, idx)]
    if v.g is not None and kind == _O:
        return None  # DoRA: rows picked along the outputs that the factor runs over
    (base,) = _eval(eqn, [v.w, idx])
    f, h = _cast_factors(v, kind)
    wl = _LETTERS[: v.w.ndim]
    la, lb_ = v.letters(wl)
    lf, lh = (la, lb_) if kind == _I else (lb_, la)
    ax = v.axis
    collapsed = tuple(sorted(ax(d) for d in dn.collapsed_slice_dims))
    sizes = list(f.shape)
    for d in looked | {d for d in range(v.w.ndim) if v.roles[d][0] == kind}:
        sizes[ax(d)] = p["slice_sizes"][d]
    n_batch = idx.ndim - 1
    kept = [i for i in range(f.ndim) if i not in collapsed]
    g = lax.gather(
        f, idx,
        lax.GatherDimensionNumbers(
            offset_dims=tuple(range(n_batch, n_batch + len(kept))),
            collapsed_slice_dims=collapsed,
            start_index_map=tuple(ax(d) for d in dn.start_index_map),
        ),
        tuple(sizes), indices_are_sorted=p["indices_are_sorted"],
        unique_indices=p["unique_indices"], mode=p["mode"],
        fill_value=0,  # where the base takes its fill value, the adapter adds nothing
    )
    bl = _LETTERS[v.w.ndim: v.w.ndim + n_batch]
    g_sub = bl + "".join(lf[i] for i in kept)
    out, batch = [], iter(bl)
    kept_w = iter(d for d in range(v.w.ndim) if d not in dn.collapsed_slice_dims)
    for pos in range(base.ndim):
        out.append(wl[next(kept_w)] if pos in dn.offset_dims else next(batch))
    y = _einsum(f"{g_sub},{lh}->{''.join(out)}", g, h)
    total = base + y.astype(base.dtype)
    if v.g is not None:
        total = total * v.g_along(wl, "".join(out)).astype(total.dtype)
    return [total]


def _pick_from_stack(v: Adapted, eqn, idx) -> Adapted:
    """A gather that picks entries of stack axes (an expert per token in a mixture of
    experts): the same picks from A and B, kept symbolic. The index's batch axes become new
    stack axes, so the product that follows batches over them."""
    p = eqn.params
    dn = p["dimension_numbers"]
    (w,) = _eval(eqn, [v.w, idx])
    n_batch = idx.ndim - 1
    collapsed_k = {v.roles[d][1] for d in dn.collapsed_slice_dims}
    kept_k = [k for k in range(v.n_stack) if k not in collapsed_k]

    def pick(f):
        sizes = list(f.shape)
        for d in range(v.w.ndim):
            if v.roles[d][0] == _S:
                sizes[v.roles[d][1]] = p["slice_sizes"][d]
        kept = [i for i in range(f.ndim) if i not in collapsed_k]
        return lax.gather(
            f, idx,
            lax.GatherDimensionNumbers(
                offset_dims=tuple(range(n_batch, n_batch + len(kept))),
                collapsed_slice_dims=tuple(sorted(collapsed_k)),
                start_index_map=tuple(v.roles[d][1] for d in dn.start_index_map),
            ),
            tuple(sizes), indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"], mode=p["mode"], fill_value=0,
        )

    roles, batch = [], iter(range(n_batch))
    kept_w = iter(d for d in range(v.w.ndim) if d not in dn.collapsed_slice_dims)
    for pos in range(w.ndim):
        if pos not in dn.offset_dims:
            roles.append((_S, next(batch)))
            continue
        kind, k = v.roles[next(kept_w)]
        roles.append((kind, n_batch + kept_k.index(k)) if kind == _S else (kind, k))
    return v.replace(w=w, a=pick(v.a), b=pick(v.b), g=None if v.g is None else pick(v.g), roles=roles)


@_rule("ragged_dot_general")
def _ragged_dot(interp, eqn, invals):
    """Experts stacked along W's group axis, tokens sorted by expert (``lax.ragged_dot``):
    ``ragged_dot(x, W, g) + s·ragged_dot(ragged_dot(x, A, g), B, g)`` with the same group
    sizes ``g``, so no (experts, in, out) value is formed; with the output axes contracted,
    B first. The weight must be the right operand, its group axis its one stack axis."""
    x, v, sizes = invals
    p = eqn.params
    dn = p["ragged_dot_dimension_numbers"]
    (xc, wc), (xb, wb) = dn.dot_dimension_numbers
    if (_is_adapted(x) or _is_adapted(sizes) or not _is_adapted(v) or wb or p.get("group_offset") is not None
            or len(dn.rhs_group_dimensions) != 1 or v.n_stack != 1):
        return None
    (group,) = dn.rhs_group_dimensions
    kinds = {v.roles[d][0] for d in wc}
    if v.roles[group][0] != _S or len(kinds) != 1 or _S in kinds:
        return None
    (first,) = kinds
    if v.g is not None and first == _O:
        return None  # DoRA's factor over contracted outputs, per expert
    (base,) = _eval(eqn, [x, v.w, sizes])
    v = v.normalized()
    f1, f2 = _cast_factors(v, first)  # (E, r, *contracted), (E, r, *produced)
    free = [d for d in range(jnp.ndim(x)) if d not in xc]
    (ragged,) = dn.lhs_ragged_dimensions
    kw = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    t = lax.ragged_dot_general(
        interp.dropout(x, v), f1, sizes,
        lax.RaggedDotDimensionNumbers((((*xc,), tuple(v.axis(d) for d in wc)), ((), ())), (ragged,), (0,)), **kw)
    y = lax.ragged_dot_general(
        t.astype(f2.dtype), f2, sizes,
        lax.RaggedDotDimensionNumbers((((t.ndim - 1,), (1,)), ((), ())), (free.index(ragged),), (0,)), **kw)
    total = base + y.astype(base.dtype)
    if v.g is not None:  # DoRA: each token's rows take its expert's factor
        g = jnp.repeat(jnp.squeeze(v.g, 1), sizes, axis=0, total_repeat_length=x.shape[ragged])
        g = jnp.moveaxis(jnp.reshape(g, (g.shape[0], *(1,) * (len(free) - 1), *g.shape[1:])), 0, free.index(ragged))
        total = total * g.astype(total.dtype)
    return [total]


@_rule("conv_general_dilated")
def _conv(interp, eqn, invals):
    x, v = invals
    p = eqn.params
    if _is_adapted(x) or p["batch_group_count"] != 1:
        return None
    rhs, out_spec = p["dimension_numbers"].rhs_spec, p["dimension_numbers"].out_spec
    if v.roles[rhs[0]][0] != _O or any(v.roles[d][0] != _I for d in rhs[1:]):
        return None
    (base,) = _eval(eqn, [x, v.w])
    groups = p["feature_group_count"]
    a, b = _cast_factors(v, _I)
    rank = a.shape[0]
    # A as a kernel in W's layout, with the rank where the output features were
    kernel = jnp.transpose(a, [0 if d == rhs[0] else 1 + v.roles[d][1] for d in range(v.w.ndim)])
    if groups > 1:
        kernel = jnp.concatenate([kernel] * groups, axis=rhs[0])
    t = eqn.primitive.bind(interp.dropout(x, v), kernel, **p)
    t = jnp.moveaxis(t, out_spec[1], -1)
    t = jnp.reshape(t, (*t.shape[:-1], groups, rank))
    bg = jnp.reshape(b, (rank, groups, b.shape[1] // groups))
    y = jnp.einsum("...gr,rgc->...gc", t, bg, precision=p["precision"],
                   preferred_element_type=p["preferred_element_type"])
    y = jnp.moveaxis(jnp.reshape(y, (*y.shape[:-2], b.shape[1])), -1, out_spec[1])
    total = base + y.astype(base.dtype)
    if v.g is not None:  # DoRA: per output channel
        total = total * jnp.reshape(v.g, [-1 if d == out_spec[1] else 1 for d in range(total.ndim)]).astype(total.dtype)
    return [total]


# -- higher-order primitives ---------------------------------------------------------------------
@_rule("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
       "custom_vjp_call_jaxpr")
def _inline(interp, eqn, invals):
    """Calls whose one sub-jaxpr maps operands to outputs one to one: evaluate the body.
    A custom derivative rule is dropped for a call an adapted weight enters: its primal is
    differentiated instead."""
    subs = subcalls(eqn)
    if len(subs) != 1:
        return None
    (sub, _, _), = subs
    return interp.run_closed(sub, invals)


@_rule("remat2", "checkpoint", "remat")
def _remat(interp, eqn, invals):
    p = eqn.params
    inner = closed(p["jaxpr"])

    def body(*args):
        return interp.run_closed(inner, list(args))

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))


@_rule("shard_map")
def _shard_map(interp, eqn, invals):
    """The body runs per shard as a new ``shard_map``: an adapted weight enters as its
    per-shard ``w`` with A and B split like it (A over W's stack and input axes, B over its
    stack and output axes, the rank axis whole), so a sharded contraction's partial sums
    (``psum`` in the body) add up the adapter's share too. Adapter-input dropout is refused
    there (one key per shard would repeat its masks on every shard)."""
    if any(map(_is_deq, invals)):
        return None
    keyed = [x.name for x in invals if _is_adapted(x) and x.key is not None]
    if keyed:
        raise ValueError(
            f"lj.wrap: adapter-input dropout (lora_rng) for {fmt_paths(keyed, 4)} inside shard_map is not "
            "applied: one key per shard would repeat the masks across shards; pass lora_rng=None, or "
            "leave these targets out of adapters with dropout"
        )
    p = eqn.params
    inner = closed(p["jaxpr"])
    vals, specs = [], []
    for x, spec in zip(invals, p["in_specs"]):
        if _is_adapted(x):
            x = x.normalized()
            entries = tuple(spec) + (None,) * (x.w.ndim - len(spec))
            pick = lambda kind: [entries[d] for d in x.dims(kind)]  # noqa: E731
            b_spec = PartitionSpec(*pick(_S), None, *pick(_O))
            spec = x.replace(w=spec, a=PartitionSpec(*pick(_S), None, *pick(_I)), b=b_spec,
                             g=None if x.g is None else b_spec)
        vals.append(x)
        specs.append(spec)

    def body(*args):
        return tuple(interp.concrete(o, "shard_map output") for o in interp.run_closed(inner, list(args)))

    return list(jax.shard_map(body, mesh=p["mesh"], in_specs=tuple(specs), out_specs=p["out_specs"],
                              check_vma=p["check_vma"], axis_names=set(p["newly_manual_axes"]))(*vals))


@_rule("scan")
def _scan(interp, eqn, invals):
    p = eqn.params
    counts = scan_counts(p)
    if counts is None:
        return None
    nc, ncarry = counts
    length = p["length"]
    consts = list(invals[:nc])
    carry = [interp.concrete(x, "scan carry") for x in invals[nc: nc + ncarry]]
    xs_in = invals[nc + ncarry:]

    # Per-step pieces: a weight stacked along the scan axis is sliced (w, and A and/or B);
    # dropout keys become one key per step.
    xs, plans = [], []
    for x in consts:
        if _is_adapted(x) and x.key is not None:
            xs.append(jax.random.split(x.key, length))
            plans.append(("const-key", x))
        else:
            plans.append(("const", x))
    for x in xs_in:
        if not _is_adapted(x):
            piece, step = _scan_slices(x, length)
            xs.append(piece)
            plans.append(("x", step))
            continue
        kind = x.roles[0][0]
        ax = x.axis(0)
        piece, step = _scan_slices(x.w, length)
        piece = {"w": piece}
        if kind in (_S, _I):
            piece["a"] = jnp.moveaxis(x.a, ax, 0)
        if kind in (_S, _O):
            piece["b"] = jnp.moveaxis(x.b, ax, 0)
            if x.g is not None:
                piece["g"] = jnp.moveaxis(x.g, ax, 0)
        if x.key is not None:
            piece["key"] = jax.random.split(x.key, length)
        xs.append(piece)
        plans.append(("x-adapted", (x, step)))

    def body(carry, step):
        step = iter(step)
        args = []
        for what, x in plans[:nc]:
            args.append(x.replace(key=next(step)) if what == "const-key" else x)
        args += list(carry)
        for what, plan in plans[nc:]:
            piece = next(step)
            if what == "x":
                args.append(plan(piece))
                continue
            x, w_step = plan
            kind, k = x.roles[0]
            roles = [(r, j - (r == kind and j > k)) for r, j in x.roles[1:]]
            args.append(x.replace(w=w_step(piece["w"]), a=piece.get("a", x.a), b=piece.get("b", x.b),
                                  g=piece.get("g", x.g), key=piece.get("key"), roles=roles))
        outs = interp.run_closed(p["jaxpr"], args)
        outs = [interp.concrete(o, "scan output") for o in outs]
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(body, carry, xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


@_rule("while")
def _while(interp, eqn, invals):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn: cn + bn]
    carry = [interp.concrete(x, "while carry") for x in invals[cn + bn:]]

    def cond(c):
        return interp.run_closed(p["cond_jaxpr"], [*cconsts, *c])[0]

    def body(c):
        outs = interp.run_closed(p["body_jaxpr"], [*bconsts, *c])
        return [interp.concrete(o, "while carry") for o in outs]

    return list(lax.while_loop(cond, body, carry))


@_rule("cond")
def _cond(interp, eqn, invals):
    index, *ops = invals

    def branch(closed):
        def run(*args):
            return [interp.concrete(o, "cond output") for o in interp.run_closed(closed, list(args))]

        return run

    return list(lax.switch(index, [branch(br) for br in eqn.params["branches"]], *ops))


# -- wrap -------------------------------------------------------------------------------------
def wrap(f: Callable, strategy: str = "factored") -> Callable:
    """Turn ``f(params, *args, **kwargs)`` into ``g(base, lora, *args, lora_rng=None, adapter_ids=None, example_axes=0, **kwargs)``.

    ``g`` computes what ``f`` computes with every targeted weight W replaced by
    ``W + s·A⊗B``. ``f`` is any function whose first argument is the parameter tree:
    ``model.apply`` (linen), ``lambda state, x: nnx.merge(graphdef, state)(x)`` (NNX), a
    Hugging Face Flax model's ``__call__`` with ``params=``, or hand-written JAX.

    Strategies:
      ``"factored"`` (default): ``f(base, *args)`` is traced to a jaxpr once per input
        signature (array shapes and dtypes, static values; the trace is shared with
        :func:`lora_jax.split`'s axis inference and other wraps of the same ``f``, as
        ``jax.jit`` shares it, and ``jax.clear_caches()`` drops it) and re-evaluated with each
        target as a symbolic ``W + s·A⊗B``: a matmul becomes ``x·W + s·((x·A)·B)``, an
        embedding lookup ``W[i] + s·A[i]·B``, a conv a conv with A then a 1×1 product with
        B. A⊗B is never formed and no gradient of W is computed. A use without a factored
        rule (see the module docstring) materializes the weight for that use only and
        warns once per weight and primitive (:class:`MaterializeWarning`, naming the
        weight's path). Non-array arguments (flags, strings)
        are static.
      ``"merge"``: materialize ``W + s·A⊗B`` (float32 accumulation, base dtype) for every
        target, then call ``f``. Simple and obviously correct: the reference the factored
        path is tested against.

    ``lora_rng``: a PRNG key enabling inverted dropout on the adapter's input (the ``x``
    of ``(x·A)·B``) for adapters whose rate is > 0; without it, no dropout. Each use of a
    weight, and each step of a scan, gets its own mask; a ``while`` loop reuses one mask
    per weight across iterations. The merged weight cannot express this dropout, so the
    merge strategy raises when asked for it.

    ``adapter_ids``: for a stacked lora tree (:func:`lora_jax.stack`), example ``i`` uses
    adapter ``adapter_ids[i]`` (an integer array of shape (E,); -1 is the base alone).
    ``example_axes`` says where the examples run in the arguments, as ``jax.vmap``'s
    ``in_axes``: an int for every array argument (default 0), or a tuple with one entry per
    positional argument (an int, None for an argument all examples share, or a tree of
    them); keyword arguments use axis 0, and 0-d arrays and non-array arguments are shared.
    Each stacked target's A and B are gathered per example and ``f``'s factored form runs
    under ``jax.vmap`` over the examples (:mod:`lora_jax.mixed`): never a merge per
    adapter, never a loop, through everything the factored strategy follows. ``f`` must
    treat the examples independently and give every output an example axis (found from
    ``f``'s shapes for one and two examples); a loss reduced over the batch is refused
    (reduce after ``wrap``). A stacked tree without ``adapter_ids`` is a ``ValueError`` (no
    adapter is a sensible default for a batch); so are ids of the wrong shape, ids out of
    range (checked on concrete ids; under tracing out-of-range ids act as -1), an array
    argument without the examples on its example axis, and ``strategy="merge"``. Ids that
    are not integers are a ``TypeError``. With ``lora_rng``, each example draws its own
    dropout masks; the adapters present at a target must share one dropout rate. The
    gradient w.r.t. the stacked tree gives each adapter the gradient of its own examples
    (zero for the padding and the per-adapter numbers). Swapping adapters
    (:func:`lora_jax.swap`) or changing the ids never retraces.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.eye(4)}
    >>> base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lora = {"w": lora["w"].replace(b=jnp.ones((2, 4)))}
    >>> y = lj.wrap(f)(base, lora, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(y, jnp.ones((1, 4)) @ lj.merge(base, lora)["w"]))
    True
    >>> print(jax.make_jaxpr(lambda l: lj.wrap(f)(base, l, jnp.ones((1, 4))))(lora))  # doctest: +ELLIPSIS
    { lambda ...dot_general...dot_general...dot_general...
    >>> other = {"w": lora["w"].replace(b=-jnp.ones((2, 4)))}
    >>> ys = lj.wrap(f)(base, lj.stack([lora, other]), jnp.ones((3, 4)), adapter_ids=jnp.array([1, -1, 0]))
    >>> bool(jnp.allclose(ys, jnp.stack([f(lj.merge(base, other), jnp.ones(4)), jnp.ones(4), y[0]])))
    True
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {STRATEGIES}")
    if not callable(f):
        raise TypeError(f"wrap expects a callable f(params, *args), got {type(f).__name__}")
    out_axes: dict = {}
    warned: set = set()

    @functools.wraps(f)
    def wrapped(base: Any, lora: Any, *args, lora_rng: jax.Array | None = None,
                adapter_ids: Any = None, example_axes: Any = 0, **kwargs):
        lora = as_lora(lora)
        ids = mixed.check_ids(lora, adapter_ids, strategy)
        if ids is not None:
            return mixed.call(wrapped, f, base, lora, ids, args, kwargs, lora_rng=lora_rng,
                              example_axes=example_axes, cache=out_axes)
        if strategy == "merge":
            if lora_rng is not None:
                rules = sorted({w.rule for w in jax.tree.leaves(lora, is_leaf=is_lora) if is_lora(w) and w.dropout > 0})
                if rules:
                    raise ValueError(
                        f"strategy='merge' cannot apply adapter-input dropout (rules {rules}): a "
                        "merged weight has no separate adapter input; use the default "
                        "strategy='factored', or pass lora_rng=None"
                    )
            return f(merge(base, lora), *args, **kwargs)
        check_fits(base, lora)
        base_leaves, base_def = jax.tree.flatten(base, is_leaf=is_quantized)
        targets = base_def.flatten_up_to(lora)
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(base, is_leaf=is_quantized)[0]]
        arg_leaves, arg_def = jax.tree.flatten((args, kwargs))
        closed, out_tree, is_arr = trace(f, base_def, base_leaves, arg_def, arg_leaves)
        inputs = []
        for i, (w, lw, arr) in enumerate(zip(base_leaves, targets, is_arr)):
            if is_quantized(w):
                w = Dequantized.of(w)
            if is_lora(lw):
                key = None if lora_rng is None or lw.dropout <= 0 else jax.random.fold_in(lora_rng, i)
                w = Adapted.of(w, lw, key, paths[i])
            if arr:
                inputs.append(w)
        inputs += [x for x, arr in zip(arg_leaves, is_arr[len(base_leaves):]) if arr]
        interp = _Interpreter(warned)
        outs = interp.run_closed(closed, inputs)
        outs = [interp.concrete(o, "the function's output") for o in outs]
        return jax.tree.unflatten(out_tree, outs)

    return wrapped
