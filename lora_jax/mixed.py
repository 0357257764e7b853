"""Mixed batches: example ``i`` uses adapter ``ids[i]`` of a stacked lora tree.

``lj.wrap(f)(base, stacked, *args, adapter_ids=ids)`` gathers each stacked target's A and
B by the ids (the scale folded into B; -1 gives zeros, the base alone) and runs the
factored ``wrap`` of ``f`` under ``jax.vmap`` over the examples, ``f`` seeing each example
as a batch of one. Under vmap the factored products become ``x·W`` over all examples at
once (one product with the frozen weight, as without adapters) plus ``(x_e·A_e)·B_e``
batched over the examples: no merge per adapter, no loop, and nothing that grows with the
number of adapters in the stack. Because vmap batches every primitive, this follows
everything ``wrap`` follows: scan, remat, attention, embeddings, convs, reshaped, sliced
and quantized weights.

What it asks of ``f``: the examples are independent (what a per-example adapter means;
statistics across the batch, such as batch norm in training mode, become per example), it
accepts a batch of one (a ``shard_map`` that splits the batch axis cannot), and each output
has an example axis. The example axis of each output is found by evaluating
the shapes of ``f`` for batches of one and of two examples (once per input signature): the
one axis that grows. An output with none (a loss averaged over the batch) is refused:
reduce after ``wrap``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import path_str
from .quant import is_quantized
from .stacked import StackedLoraWeight, is_stacked, is_stacked_node, stacked_targets, template
from .tree import fmt_paths, is_array

__all__ = ["check_ids", "call"]

_SHARED = "shared"  # an argument that all examples share (example axis None)


def check_ids(lora, adapter_ids, strategy: str):
    """``adapter_ids`` as an int32 array, checked against the stacked adapters in ``lora``;
    None for a lora tree without stacked adapters.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> check_ids(lj.stack([lora, lora]), [1, -1], "factored").tolist()
    [1, -1]
    """
    nodes = stacked_targets(lora)
    if not nodes:
        if adapter_ids is not None:
            raise ValueError("adapter_ids is for stacked lora trees (lj.stack([lora_0, lora_1, ...])), but this "
                             "lora tree holds plain adapters; drop adapter_ids, or stack the trees first")
        return None
    if adapter_ids is None:
        raise ValueError(
            f"lora holds stacked adapters (lj.stack) at {fmt_paths([p for p, _ in nodes], 4)}: pass "
            "adapter_ids=ids, one adapter index per example (-1 for the base alone), e.g. "
            "adapter_ids=jnp.array([0, 1, -1]); or use lj.unstack(stacked)[k] to apply adapter k to the "
            "whole batch"
        )
    if strategy != "factored":
        raise ValueError(f"strategy={strategy!r} cannot apply per-example adapters (adapter_ids); use the "
                         "default strategy='factored'")
    counts = {w.n for _, w in nodes}
    if len(counts) > 1:
        raise ValueError(f"the stacked adapters hold different numbers of adapters {sorted(counts)} "
                         "(trees from different lj.stack calls?); stack all adapters in one lj.stack call")
    (n,) = counts
    ids = adapter_ids if isinstance(adapter_ids, jax.Array) else np.asarray(adapter_ids)
    if ids.size == 0:
        raise ValueError(f"adapter_ids is empty (shape {tuple(ids.shape)}); give one adapter index per example")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"adapter_ids must be integers (one adapter index per example), got dtype {ids.dtype}; "
                        "e.g. jnp.array([0, 1, -1], jnp.int32)")
    if ids.ndim != 1:
        raise ValueError(f"adapter_ids must be 1-D, one adapter index per example, got shape {tuple(ids.shape)}")
    if not isinstance(ids, jax.core.Tracer):
        vals = np.asarray(ids)
        bad = [f"adapter_ids[{i}] = {int(k)}" for i, k in enumerate(vals) if not -1 <= k < n]
        if bad:
            raise ValueError(f"{fmt_paths(bad, 4)} out of range for {n} stacked adapters; use 0..{n - 1}, "
                             "or -1 for the base alone")
    return jnp.asarray(ids, jnp.int32)


def _dropout_rate(path: str, w: StackedLoraWeight) -> float:
    """The one adapter-input dropout rate of the adapters present at ``w``."""
    if any(isinstance(x, jax.core.Tracer) for x in (w.dropout, w.rank)):
        raise ValueError(f"{path}: adapter-input dropout (lora_rng) with adapter_ids needs the dropout rates as "
                         "concrete arrays, but they are traced (the stacked tree is a jit argument); pass "
                         "lora_rng=None, or close over the stacked tree's rates")
    rates = {float(d) for d, r in zip(np.asarray(w.dropout), np.asarray(w.rank)) if r > 0}
    if len(rates) > 1:
        raise ValueError(f"{path}: the stacked adapters have different dropout rates {sorted(rates)}; one batch "
                         "applies one rate per target: pass lora_rng=None, or stack adapters of one rate")
    return rates.pop() if rates else 0.0


def _gathered(lora, ids, with_dropout: bool):
    """Each stacked target as a :class:`LoraWeight` whose factors lead with the examples
    (scale folded into B, zeros for -1), and the matching ``vmap`` axes (0 for those, None
    for plain adapters, which every example shares)."""

    def pick(p, w):
        if not is_stacked(w):
            return w
        idx = jnp.where(ids < 0, w.n, ids)  # n is out of range: the gather fills zeros
        scale = lax.stop_gradient(jnp.asarray(w.scale, jnp.result_type(w.b)))
        a_e, b_e, s_e = (jnp.take(f, idx, axis=0, mode="fill", fill_value=0) for f in (w.a, w.b, scale))
        b_e = b_e * jnp.reshape(s_e, (-1,) + (1,) * (jnp.ndim(b_e) - 1))  # (gathered first: no cost per stacked adapter)
        rate = _dropout_rate(path_str(p), w) if with_dropout else 0.0
        return template(w, a_e, b_e).replace(dropout=rate, rule=path_str(p))

    gathered = jax.tree_util.tree_map_with_path(pick, lora, is_leaf=is_stacked_node)
    axes = jax.tree.map(lambda w: 0 if is_stacked(w) else None, lora, is_leaf=is_stacked_node)
    return gathered, axes


def _arg_axes(example_axes, args, kwargs, treedef) -> list:
    """Per leaf of ``(args, kwargs)``, its example axis or :data:`_SHARED`."""
    if example_axes is None or (isinstance(example_axes, int) and not isinstance(example_axes, bool)):
        pos, kw = [example_axes] * len(args), example_axes
    elif isinstance(example_axes, (tuple, list)):
        if len(example_axes) != len(args):
            raise ValueError(f"example_axes has {len(example_axes)} entries but there are {len(args)} positional "
                             "arguments; give one per positional argument (an int, None for an argument all "
                             "examples share, or a tree of them), as jax.vmap's in_axes")
        pos, kw = list(example_axes), 0
    else:
        raise TypeError(f"example_axes must be an int, None or a tuple with one entry per positional argument, "
                        f"got {type(example_axes).__name__}")
    norm = lambda t: jax.tree.map(lambda a: _SHARED if a is None else a, t, is_leaf=lambda x: x is None)
    prefix = (tuple(norm(p) for p in pos), {k: norm(kw) for k in kwargs})
    try:
        full = jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub), prefix, (tuple(args), kwargs))
    except ValueError as e:
        raise ValueError(f"example_axes is not a tree prefix of the arguments ({e}); give each positional "
                         "argument an int, None or a tree of them matching that argument") from None
    return treedef.flatten_up_to(full)


def _where(p) -> str:
    return ("args" if p[0].idx == 0 else "kwargs") + jax.tree_util.keystr(p[1:])


def _mapped(leaves, axes, examples: int) -> list:
    """Per leaf, the axis it is mapped along (None: shared or static)."""
    out = []
    for (p, x), ax in zip(leaves, axes):
        if ax is _SHARED or not is_array(x) or np.ndim(x) == 0:
            out.append(None)
            continue
        if isinstance(ax, bool) or not isinstance(ax, int) or not -x.ndim <= ax < x.ndim:
            raise ValueError(f"example_axes gives {ax!r} for the argument {_where(p)} of shape {tuple(x.shape)}; "
                             f"use an axis in {-x.ndim}..{x.ndim - 1}, or None for an argument all examples share")
        ax %= x.ndim
        if x.shape[ax] != examples:
            fix = ("keyword arguments run along axis 0 (as in jax.vmap): pass an argument all examples share "
                   "positionally, with example_axes None for it" if p[0].idx == 1 else
                   "pass example_axes= for other layouts, None for an argument all examples share")
            raise ValueError(
                f"the argument {_where(p)} has shape {tuple(x.shape)}, but adapter_ids has {examples} examples: "
                f"each array argument needs the examples along its example axis (axis {ax}); {fix}"
            )
        out.append(ax)
    return out


def _out_axes(f: Callable, base, treedef, leaves, axes, cache: dict):
    """The example axis of each output of ``f``: the one axis that grows from a batch of
    one example to a batch of two."""
    base_leaves, base_def = jax.tree.flatten(base, is_leaf=is_quantized)
    abstract = lambda x: x.abstract() if is_quantized(x) else jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    is_arr = [is_quantized(x) or is_array(x) for x in base_leaves]
    arg_vals = [x for _, x in leaves]
    try:
        key = (base_def, treedef, tuple(axes), *(abstract(x) if a else ("static", x) for x, a in zip(base_leaves, is_arr)),
               *(jax.ShapeDtypeStruct(np.shape(x), x.dtype) if is_array(x) else ("static", x) for x in arg_vals))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in cache:
        return cache[key]

    def shapes(size):  # (a shared array argument enters as a value: f may branch on its shape only)
        def run(base_arrays, mapped_arrays):
            it, mt = iter(base_arrays), iter(mapped_arrays)
            b = [next(it) if a else x for x, a in zip(base_leaves, is_arr)]
            xs = [next(mt) if ax is not None else x for x, ax in zip(arg_vals, axes)]
            a, kw = jax.tree.unflatten(treedef, xs)
            return f(jax.tree.unflatten(base_def, b), *a, **kw)

        mapped = [jax.ShapeDtypeStruct(tuple(size if d == ax else s for d, s in enumerate(x.shape)), x.dtype)
                  for x, ax in zip(arg_vals, axes) if ax is not None]
        return jax.eval_shape(run, [abstract(x) for x, a in zip(base_leaves, is_arr) if a], mapped)

    try:
        one, two = shapes(1), shapes(2)
    except Exception as e:  # noqa: BLE001 - say why f ran on one example, keep the error as it is
        e.add_note("(lj.wrap with adapter_ids runs f on each example alone, as a batch of one, and on two to find "
                   "the outputs' example axes: f must accept batches of any size; a shard_map over the batch "
                   "axis cannot split one example)")
        raise
    out = []
    for (p, s1), s2 in zip(jax.tree_util.tree_flatten_with_path(one)[0], jax.tree.leaves(two)):
        grow = [d for d, (m, n) in enumerate(zip(s1.shape, s2.shape)) if m != n]
        if len(s1.shape) != len(s2.shape) or len(grow) != 1 or (s1.shape[grow[0]], s2.shape[grow[0]]) != (1, 2):
            raise ValueError(
                f"the output{jax.tree_util.keystr(p)} of f has shape {s1.shape} for one example and {s2.shape} "
                "for two: per-example adapters need every output to have one axis along the examples (f "
                "reduces over the batch, or mixes examples?); return per-example values and reduce after "
                "wrap, e.g. jnp.mean(lj.wrap(f)(base, stacked, x, adapter_ids=ids))"
            )
        out.append(grow[0])
    axes_out = jax.tree.unflatten(jax.tree.structure(one), out)
    if key is not None:
        cache[key] = axes_out
    return axes_out


def call(run: Callable, f: Callable, base, lora, ids, args, kwargs, *, lora_rng, example_axes, cache: dict):
    """``run(base, lora_e, *args, lora_rng=, **kwargs)`` (the factored ``wrap`` of ``f``)
    for each example under ``jax.vmap``, with example ``i``'s adapters ``ids[i]``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> f = lambda p, x: x @ p["w"]
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.eye(3)}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> lj.wrap(f)({"w": jnp.eye(3)}, lj.stack([lora]), jnp.ones((2, 3)), adapter_ids=jnp.array([0, -1])).shape
    (2, 3)
    """
    examples = int(ids.shape[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    axes = _mapped(leaves, _arg_axes(example_axes, args, kwargs, treedef), examples)
    out_axes = _out_axes(f, base, treedef, leaves, axes, cache)
    lora_e, lora_axes = _gathered(lora, ids, lora_rng is not None)
    keys = None if lora_rng is None else jax.random.split(lora_rng, examples)
    mapped = [x for (_, x), ax in zip(leaves, axes) if ax is not None]

    def one(lora_1, mapped_1, key):
        it = iter(mapped_1)
        xs = [jnp.expand_dims(next(it), ax) if ax is not None else x for (_, x), ax in zip(leaves, axes)]
        a, kw = jax.tree.unflatten(treedef, xs)
        out = run(base, lora_1, *a, lora_rng=key, **kw)
        return jax.tree.map(lambda o, ax: jnp.squeeze(o, ax), out, out_axes)

    in_axes = (lora_axes, [ax for ax in axes if ax is not None], None if keys is None else 0)
    return jax.vmap(one, in_axes=in_axes, out_axes=out_axes)(lora_e, mapped, keys)
