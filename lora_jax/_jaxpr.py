"""The JAX internals both jaxpr walkers share, and the one table of primitives they know.

Two walkers read jaxprs: axis inference (:mod:`lora_jax.usage`) follows each weight to
the products that consume it, and :func:`lora_jax.wrap` (:mod:`lora_jax.transform`)
evaluates the jaxpr with each target as a symbolic ``W + s·A⊗B``. Both classify every
primitive a weight meets by the same :data:`PRIMITIVES` table:

* ``SHAPE``: moves, casts, tags or broadcasts the weight's elements; the value keeps the
  weight's axis roles (transpose, reshape, casts, copies, sharding constraints, barriers).
* ``WINDOW``: cuts windows out of the weight or joins it with others (slices, gathers,
  concatenation); the pieces keep the roles.
* ``SCALE``: multiplies the weight elementwise by another value, or divides it by one
  (``mul``, ``div``; weight norm, per-output rescaling); the value keeps the weight's
  axis roles. ``wrap`` keeps it factored when the other value is constant along the
  weight's input axes (or its output axes): ``(W + s·A⊗B)·c = W·c + s·A⊗(B·c)``.
* ``PRODUCT``: a product whose weight operand defines an adapter (``dot_general``, convs,
  ``ragged_dot_general`` over experts).
* ``HIGHER``: higher-order primitives whose sub-jaxprs the walkers enter (see
  :func:`subcalls`).

A primitive outside the table that meets a targeted weight is unknown to both walkers:
inference records it as an opaque use and ``wrap`` materializes the weight for it. Names
that differ across JAX versions are listed under each spelling.

Both walkers read one trace of ``f(params, *args, **kwargs)`` (:func:`trace`): traced once
per function and input signature and kept in a small cache that ``jax.clear_caches()``
empties, so the trace :func:`lora_jax.split` makes to infer axes is the one the first call
of ``lora_jax.wrap(f)`` evaluates, as ``jax.jit`` reuses a trace for the same function.

The rest are shims over JAX internals whose layout changes between versions: sub-jaxprs
of higher-order equations, a scan's operand groups, evaluating one equation, and how a
reshape groups dimensions.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import jax
from jax.extend import core as jcore

from .quant import is_quantized
from .tree import is_array

__all__ = ["SHAPE", "WINDOW", "SCALE", "PRODUCT", "HIGHER", "PRIMITIVES", "kind", "Traced", "trace", "closed",
           "scan_counts", "subcalls", "bind", "reshape_groups"]

SHAPE, WINDOW, SCALE, PRODUCT, HIGHER = "shape", "window", "scale", "product", "higher-order"

PRIMITIVES: dict[str, str] = {
    **dict.fromkeys(
        ("transpose", "reshape", "squeeze", "broadcast_in_dim", "convert_element_type", "copy",
         "copy_p", "stop_gradient", "sharding_constraint", "mesh_cast", "reshard", "name",
         "reduce_precision", "optimization_barrier", "pvary"),
        SHAPE),
    **dict.fromkeys(("slice", "dynamic_slice", "split", "concatenate", "gather"), WINDOW),
    **dict.fromkeys(("mul", "div"), SCALE),
    **dict.fromkeys(("dot_general", "conv_general_dilated", "ragged_dot_general"), PRODUCT),
    **dict.fromkeys(
        ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat2", "checkpoint", "remat", "scan", "while", "cond", "shard_map"),
        HIGHER),
}


def kind(name: str) -> str | None:
    """The table's kind of primitive ``name``, or None for a primitive neither walker knows.

    >>> kind("dot_general"), kind("reshape"), kind("sin")
    ('product', 'shape', None)
    """
    return PRIMITIVES.get(name)


class Traced(NamedTuple):
    """One trace of ``f(params, *args, **kwargs)``: the jaxpr over the array leaves (params'
    leaves first, then the arguments'), the output's tree structure, and which leaves are
    arrays (``is_arr``, params' then the arguments'; the others were static values)."""

    closed: jcore.ClosedJaxpr
    out_tree: Any
    is_arr: list


class _Traces:
    """The last ``size`` traces by key, least recently used out first; registered with JAX's
    cache management, so ``jax.clear_caches()`` empties it."""

    def __init__(self, size: int):
        self.size, self.items = size, collections.OrderedDict()

    def get(self, key):
        if key is None or key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value):
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def cache_clear(self):
        self.items.clear()

    def cache_info(self):
        return f"{len(self.items)} of {self.size} traces"

    def cache_keys(self):
        return list(self.items)


_TRACES = _Traces(16)
try:  # so that jax.clear_caches() (cold-start measurements, freeing memory) drops them too
    from jax._src.util import register_cache as _register_cache

    _register_cache(_TRACES, "lora_jax traces")
except ImportError:  # pragma: no cover - JAX moved it; the cache still works, bounded
    pass


def _traced_value(x):
    """What the trace sees for an array leaf: a quantized weight's float stand-in, else ``x``."""
    return x.abstract() if is_quantized(x) else x


try:  # the configuration a trace depends on (x64, matmul precision, ...), as jit keys it
    from jax._src.config import trace_context as _trace_context
except ImportError:  # pragma: no cover - JAX moved it: the public settings that change a trace

    def _trace_context():
        return (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)


def trace(f: Callable, params_def, params_leaves: list, arg_def, arg_leaves: list) -> Traced:
    """Trace ``f(params, *args, **kwargs)`` once per function and input signature.

    ``params_leaves``/``params_def`` are the parameter tree flattened with quantized weights
    as leaves; ``arg_leaves``/``arg_def`` are ``(args, kwargs)`` flattened. Arrays (JAX,
    NumPy, ``jax.ShapeDtypeStruct``) and quantized weights (as the float weight they stand
    for) are traced; every other leaf is a static value, part of the signature. The
    signature is the function, both tree structures, each array's abstract value, the static
    values and JAX's trace configuration (a function without a hash counts by identity); the
    last 16 traces are kept (``jax.clear_caches()`` empties them). A trace whose jaxpr closes
    over values of an enclosing trace is not kept.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda p, x, flag: x @ p["w"] if flag else x
    >>> p_leaves, p_def = jax.tree.flatten({"w": jnp.ones((3, 2))})
    >>> a_leaves, a_def = jax.tree.flatten(((jnp.ones((4, 3)), True), {}))
    >>> t = trace(f, p_def, p_leaves, a_def, a_leaves)
    >>> [str(v.aval) for v in t.closed.jaxpr.invars], t.is_arr
    (['float32[3,2]', 'float32[4,3]'], [True, True, False])
    >>> trace(f, p_def, p_leaves, a_def, a_leaves) is t  # the same signature: the kept trace
    True
    """
    leaves = (*params_leaves, *arg_leaves)
    is_arr = [is_array(x) or is_quantized(x) or isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
    values = [_traced_value(x) for x, arr in zip(leaves, is_arr) if arr]
    try:
        hash(f)
    except TypeError:  # a callable without a hash (a dataclass instance): its identity, kept alive below
        fn_key = ("id", id(f))
    else:
        fn_key = f
    it = iter(values)
    signature = tuple(jax.api_util.shaped_abstractify(next(it)) if arr else ("static", type(x), x)
                      for x, arr in zip(leaves, is_arr))
    key = (fn_key, params_def, arg_def, _trace_context(), signature)
    try:
        hash(key)
    except TypeError:
        key = None  # an unhashable static value: trace every call
    found = _TRACES.get(key)
    if found is not None:
        return found[1]
    n_params = len(params_leaves)

    def flat(arrays):
        it = iter(arrays)
        full = [next(it) if arr else x for x, arr in zip(leaves, is_arr)]
        a, kw = jax.tree.unflatten(arg_def, full[n_params:])
        return f(jax.tree.unflatten(params_def, full[:n_params]), *a, **kw)

    closed_jaxpr, shape = jax.make_jaxpr(flat, return_shape=True)(values)
    out = Traced(closed_jaxpr, jax.tree.structure(shape), is_arr)
    if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed_jaxpr.consts):
        _TRACES.put(key, (f, out))  # (values f closes over from an enclosing trace are not reusable)
    return out


def closed(j) -> jcore.ClosedJaxpr:
    """``j`` as a ``ClosedJaxpr`` (higher-order equations hold either kind)."""
    return j if isinstance(j, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(j, ())


def scan_counts(p) -> tuple[int, int] | None:
    """(number of consts, number of carries) of a scan's params, across JAX versions.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda c, xs: jax.lax.scan(lambda c, x: (c + x, c), c, xs)
    >>> eqn = jax.make_jaxpr(f)(0.0, jnp.ones(3)).jaxpr.eqns[0]
    >>> scan_counts(eqn.params)
    (0, 1)
    """
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
    axis); ``returns`` tells whether the inner outputs are the equation's outputs one to one.

    >>> import jax
    >>> eqn = jax.make_jaxpr(lambda x: jax.jit(lambda y: y * 2)(x))(1.0).jaxpr.eqns[0]
    >>> [(feeds, returns) for _, feeds, returns in subcalls(eqn)]
    [([(0, False)], True)]
    """
    name, p = eqn.primitive.name, eqn.params
    n = len(eqn.invars)
    if name == "scan":
        counts = scan_counts(p)
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
            inner = closed(p[key])
            if len(inner.jaxpr.invars) == n:
                return [(inner, [(k, False) for k in range(n)], True)]
    return []


def bind(eqn, invals) -> list:
    """Evaluate one equation on ``invals`` as JAX would; always a list of outputs.

    >>> import jax, jax.numpy as jnp
    >>> eqn = jax.make_jaxpr(jnp.sin)(0.0).jaxpr.eqns[0]
    >>> [float(y) for y in bind(eqn, [0.0])]
    [0.0]
    """
    bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before jax 0.10
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """How a reshape from ``old`` to ``new`` regroups dimensions.

    Returns ``(old_dims, new_dims)`` pairs, in order, of the smallest runs of dimensions
    whose sizes multiply to the same number. A size-1 dimension inside such a run belongs to
    it, and one that meets a size-1 dimension on the other side pairs with it; any other
    size-1 dimension belongs to no group (it appears or vanishes without moving data).

    >>> reshape_groups((6, 4), (2, 3, 4))
    [([0], [0, 1]), ([1], [2])]
    >>> reshape_groups((2, 1, 3), (6, 1))
    [([0, 1, 2], [0])]
    """
    groups, i, j = [], 0, 0
    n_old, n_new = len(old), len(new)
    while i < n_old or j < n_new:
        if i < n_old and old[i] == 1 and (j >= n_new or new[j] != 1):
            i += 1
            continue
        if j < n_new and new[j] == 1 and (i >= n_old or old[i] != 1):
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = old[i], new[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= old[i]
            else:
                j += 1
                gj.append(j)
                pj *= new[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    return groups
