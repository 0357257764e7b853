"""``split`` a parameter tree into a frozen base and LoRA adapters, the adapter inits, and
``quantize`` (the frozen base's targets as block-quantized weights): both pick weights with
the same rules and infer their axes the same way."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import HEAD_NAMES, Axes, LoraConfig, Rule, path_str, scaling_name
from .quant import check_qtype, is_quantized, quantize_array
from .tree import apply_delta, fmt_paths
from .usage import trace_usage
from .weight import LoraWeight

__all__ = ["split", "quantize"]


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _looks_linear(path: str, leaf) -> bool:
    """Untraced guess for ``linear_only`` rules: a >=2-D float ``kernel`` not in a head."""
    return path.split("/")[-1] == "kernel" and len(jnp.shape(leaf)) >= 2 and not _head_by_name(path)


def _untraced_kind(path: str) -> str:
    return "embed" if path.split("/")[-1] == "embedding" else "linear"


def split(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
) -> tuple[Any, Any]:
    """Split ``params`` into ``(base, lora)``: a frozen base tree and adapter tree.

    ``lora`` has the structure of ``params`` with an :class:`LoraWeight` at every targeted
    leaf and ``None`` elsewhere. ``base`` equals ``params`` except under ``init="pissa"``,
    where each target becomes the residual ``W - s·A⊗B``. ``merge(base, lora)``
    reproduces ``params`` (exactly for the zero-initialized inits).

    Args:
      key: PRNG key; each target gets its own key, folded in from its path, so adding a
        rule does not change the other adapters' initial values.
      params: the parameter tree (linen variables dict, NNX state, any pytree). Leaves may
        be ``jax.ShapeDtypeStruct``: then the whole split runs abstractly (no memory) and
        returns abstract trees.
      config: the :class:`LoraConfig`.
      apply_fn, args, kwargs: when given, ``apply_fn(params, *args, **kwargs)`` is traced
        once (abstractly) to learn how every target is consumed: which axes are contracted
        (in), produced (out) or stacked (scan/batch), and whether it is an embedding. A
        kernel stored (out, in) gets A over its axis 1. Without them, a rule's ``axes=`` or
        Flax's convention (last axis out, the rest in) applies.

    Returns:
      ``(base, lora)``.

    Raises:
      ValueError: a rule or exclude pattern that matches nothing, a rank larger than
        min(in, out) of a target, a traced target that no matmul consumes, a batch of keys.
      TypeError: a target that is not a floating-point array, a key that is not a PRNG key.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
    >>> cfg = lj.LoraConfig(rules=(lj.Rule(r"dense/kernel", rank=4, alpha=8.0),))
    >>> base, lora = lj.split(jax.random.key(0), params, cfg)
    >>> lora["dense"]["kernel"].a.shape, lora["dense"]["kernel"].b.shape, lora["dense"]["bias"]
    ((4, 16), (4, 32), None)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an lj.LoraConfig, got {type(config).__name__}")
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    if any(_is_abstract(x) for _, x in leaves):
        if any(not _is_abstract(x) for _, x in leaves):
            raise TypeError(
                "params mixes jax.ShapeDtypeStruct and concrete leaves; make all of them "
                "abstract (jax.eval_shape) or all concrete"
            )
        return jax.eval_shape(lambda k, p: split(k, p, config, apply_fn, args, kwargs), key, params)
    paths, arrays, hits, usages = _select(params, config, apply_fn, args, kwargs)

    # one adapter per target; their random draws share one compiled program (_init_all)
    lora_leaves: list = [None] * len(arrays)
    base_leaves = list(arrays)
    targets, folds, weights = [], [], []
    for i, rule in hits.items():
        path, w = paths[i], arrays[i]
        usage = usages[i] if usages is not None else None
        spec, dtype = _make_weight(path, w, rule, config, usage)
        if config.init == "pissa" and is_quantized(w):
            raise ValueError(
                f"{path}: rule {rule.pattern!r}: init='pissa' needs the float weight to move its "
                "top singular directions into the adapter, but the target is quantized; split "
                "the float base with init='pissa' and quantize the residual base afterwards"
            )
        targets.append((i, _Target(_static_fields(spec), dtype.name)))
        folds.append(path_fold(path))
        weights.append(w if config.init == "pissa" else None)
    if targets:
        plan = tuple(t for _, t in targets)
        for (i, _), (lora_leaves[i], base) in zip(targets, _init_all(key, np.asarray(folds, np.uint32), weights,
                                                                     plan, config.init)):
            if base is not None:
                base_leaves[i] = base
        dora = [i for i, rule in hits.items() if config.dora_for(rule)]
        if dora:  # DoRA's m starts at ||W + s·A⊗B|| of the (residual) base: merge(split(W)) is W
            ws = [base_leaves[i].dequantize() if is_quantized(base_leaves[i]) else base_leaves[i] for i in dora]
            for i, m in zip(dora, _magnitudes(ws, [lora_leaves[i] for i in dora])):
                lora_leaves[i] = lora_leaves[i].replace(m=m)
    treedef = jax.tree.structure(params, is_leaf=is_quantized)
    return jax.tree.unflatten(treedef, base_leaves), jax.tree.unflatten(treedef, lora_leaves)


def path_fold(path: str) -> int:
    """The number folded into the PRNG key for the target at ``path`` (its CRC-32, 31 bits):
    one key per path, the same whatever else the tree holds.

    >>> path_fold("w")
    476252946
    """
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def target_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of the target at ``path``: ``key`` with the path's CRC-32 folded in.

    >>> import jax
    >>> bool((jax.random.key_data(target_key(jax.random.key(0), "w")) == jax.random.key_data(
    ...     jax.random.fold_in(jax.random.key(0), 476252946))).all())
    True
    """
    return jax.random.fold_in(key, path_fold(path))


def _select(params, config: LoraConfig, apply_fn, args, kwargs):
    """The leaves' paths and values, ``{leaf index: rule}`` of the targets (first matching
    rule wins; unmatched rules and excludes are errors), and what tracing found per leaf
    (None without ``apply_fn``)."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    paths = [path_str(p) for p, _ in leaves]
    arrays = [x for _, x in leaves]
    candidates = [i for i, p in enumerate(paths) if any(r.matches(p) for r in config.rules)]
    usages = None
    if apply_fn is not None:
        usages = trace_usage(apply_fn, params, args, kwargs)  # every leaf: the head needs the embeddings
    hits: dict[int, Rule] = {}
    heads = [paths[i] for i in candidates if usages is not None and (usages[i].head or usages[i].router)]
    for i in candidates:
        path = paths[i]
        if usages is not None:
            linear = usages[i].is_linear and not usages[i].head and not usages[i].router  # names: untraced fallback
        else:
            linear = _looks_linear(path, arrays[i])
        rule = config.rule_for(path, linear=linear)
        if rule is not None:
            hits[i] = rule
    _check_all_used(config, paths, hits, heads)
    return paths, arrays, hits, usages


def quantize(
    base: Any,
    qtype: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    pattern: str | None = None,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
) -> Any:
    """The same tree with its matmul weights as :class:`~lora_jax.QuantizedWeight` leaves (QLoRA).

    Each chosen weight is stored as codes plus one scale per ``block_size`` consecutive
    inputs of one output (see :mod:`lora_jax.quant`): ``"nf4"`` (QLoRA's NormalFloat-4,
    two codes per byte), ``"int8"`` (symmetric absmax) or ``"fp8"`` (e4m3 with a block
    scale). ``double_quant`` quantizes the float32 block scales again (int8, one float32
    per 256 scales): NF4 then stores about 0.516 bytes per parameter.

    The result goes where the float base went: ``lj.split(key, qbase, config, ...)``,
    ``lj.wrap(f)(qbase, lora, x)`` (each quantized weight is dequantized at its use, and
    again in the backward pass: no dequantized weight is kept between them),
    ``lj.merge(qbase, lora)`` (a float tree), ``lj.sharding``, ``lj.checkpoint``. Uses of
    quantized weights differentiate in reverse mode (``jax.grad``, ``jax.vjp``), not in
    forward mode (``jax.jvp``).

    Args:
      base: the parameter tree (float leaves; leaves already quantized are an error).
      qtype: ``"nf4"``, ``"int8"`` or ``"fp8"``.
      block_size: inputs per scale; when a weight's inputs are not a multiple of it, each
        output's inputs are zero-padded to whole blocks.
      double_quant: quantize the block scales again.
      pattern: None quantizes every weight that :meth:`LoraConfig.all_linear` would target
        (the output head, embeddings, norms and biases keep their dtype); a regex
        (``re.fullmatch`` on the '/'-joined path) picks the weights instead.
      apply_fn, args, kwargs: as for :func:`split`: tracing ``apply_fn(base, *args)`` tells
        each weight's input axes (and the head); without it, Flax's convention (the last
        axis is the output) applies.

    Raises:
      ValueError: an unknown qtype, a bad block size, a pattern that matches nothing, a
        chosen weight with fewer than 2 dimensions or already quantized.
      TypeError: a chosen weight that is not floating-point.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((128, 32)), "bias": jnp.zeros(32)}}
    >>> qbase = lj.quantize(params, "nf4")
    >>> q = qbase["dense"]["kernel"]
    >>> q.shape, q.codes.shape, qbase["dense"]["bias"].shape
    ((128, 32), (32, 64), (32,))
    >>> float(jnp.abs(lj.dequantize(qbase)["dense"]["kernel"] - 1).max())
    0.0
    """
    check_qtype(qtype, block_size)
    if any(_is_abstract(x) for x in jax.tree.leaves(base, is_leaf=is_quantized)):
        return jax.eval_shape(lambda b: quantize(b, qtype, block_size=block_size, double_quant=double_quant,
                                                 pattern=pattern, apply_fn=apply_fn, args=args, kwargs=kwargs), base)
    if pattern is None:
        config = LoraConfig.all_linear(rank=1)
    else:
        config = LoraConfig(rules=(Rule(pattern, rank=1),))
    paths, arrays, hits, usages = _select(base, config, apply_fn, args, kwargs)
    leaves = list(arrays)
    done = [f"{paths[i]} ({arrays[i].qtype})" for i in hits if is_quantized(arrays[i])]
    if done:
        raise ValueError(f"already quantized: {fmt_paths(done)}; give lj.quantize a float tree "
                         "(lj.dequantize first), or narrow pattern= to leave them out")
    for i, rule in hits.items():
        path, w = paths[i], arrays[i]
        shape = tuple(jnp.shape(w))
        if len(shape) < 2:
            raise ValueError(f"{path}: shape {shape} has no input and output axes to quantize in "
                             f"blocks; narrow pattern={pattern!r} (e.g. to '.*/kernel')")
        axes, _ = _target_axes(path, shape, rule, usages[i] if usages is not None else None)
        leaves[i] = quantize_array(w, qtype, in_axes=axes.in_axes, block_size=block_size,
                                   double_quant=double_quant, path=path)
    return jax.tree.unflatten(jax.tree.structure(base, is_leaf=is_quantized), leaves)


def _head_by_name(path: str) -> bool:
    return any(p in HEAD_NAMES for p in path.split("/"))


def _check_all_used(config: LoraConfig, paths, hits, heads=()):
    used = {id(r) for r in hits.values()}
    problems = []
    for rule in config.rules:
        if id(rule) not in used:
            what = "matrix-multiplication weight" if rule.linear_only else "parameter"
            shadow = [p for p in paths if rule.matches(p)]
            if shadow:
                why = (
                    f"its paths are all excluded, taken by an earlier rule, or not a {what}: "
                    f"{fmt_paths(shadow, 5)}"
                )
            else:
                why = f"no {what} path fully matches it (re.fullmatch)"
            if rule.linear_only and heads:
                why += f" (tracing found the output head or routers: {fmt_paths(heads, 3)})"
            problems.append(f"rule {rule.pattern!r} matches nothing: {why}")
    for pat in config.exclude:
        if not any(re.fullmatch(pat, p) for p in paths):
            problems.append(f"exclude pattern {pat!r} matches no parameter path")
    if problems:
        raise ValueError(
            "; ".join(problems)
            + f". Parameter paths are: {fmt_paths(paths)}. Patterns must match the whole "
            "path, e.g. r'.*/attn/q/kernel'."
        )


def _make_weight(path, w, rule: Rule, config: LoraConfig, usage) -> tuple[LoraWeight, Any]:
    """The adapter's metadata (factors still None) for target ``w``, and its factors' dtype."""
    shape, dtype = tuple(jnp.shape(w)), jnp.result_type(w)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{path}: target has dtype {dtype}, but LoRA adapts floating-point weights only; "
            f"narrow rule {rule.pattern!r} or add the path to exclude="
        )
    if len(shape) < 2 and rule.axes is None:
        raise ValueError(
            f"{path}: target has shape {shape}; LoRA needs a weight with at least an input "
            f"and an output axis. Narrow rule {rule.pattern!r} (e.g. to '.*/kernel')"
        )
    axes, kind = _target_axes(path, shape, rule, usage)
    _check_rank(path, shape, axes, rule)
    adapter_dtype = config.dtype if config.dtype is not None else jnp.promote_types(dtype, jnp.float32)
    spec = LoraWeight(
        a=None,
        b=None,
        shape=shape,
        dtype=jnp.dtype(dtype).name,
        in_axes=axes.in_axes,
        out_axes=axes.out_axes,
        stack_axes=axes.stack_axes,
        rank=rule.rank,
        alpha=rule.alpha,
        scale=config.scale(rule),
        scaling=scaling_name(config.scaling),
        dropout=float(config.dropout if rule.dropout is None else rule.dropout),
        kind=kind,
        rule=rule.pattern,
        dora_detach=config.dora_detach,
    )
    return spec, jnp.dtype(adapter_dtype)


def _target_axes(path, shape, rule: Rule, usage) -> tuple[Axes, str]:
    """The target's axes and kind: the rule's ``axes=``, else what tracing found, else
    Flax's convention (kind from the path's last name)."""
    if rule.axes is not None:
        axes = rule.axes.normalized(len(shape), f"{path}: rule {rule.pattern!r}: ")
        traced = usage.kind if usage is not None else None
        return axes, traced if traced is not None else _untraced_kind(path)
    if usage is None:
        return Axes.default(len(shape)), _untraced_kind(path)
    found = usage.axes(len(shape))
    if found is None:
        others = usage.other_primitives()
        used = f"it is only used by {others}" if others else "the traced function never uses it"
        raise ValueError(
            f"{path}: shape {shape} matched rule {rule.pattern!r}, but no dot_general, "
            f"gather or conv consumes it ({used}). Narrow the rule, or give "
            "Rule(axes=...) if it really is a matmul weight"
        )
    ins, outs, stack = found
    if not ins or not outs:
        raise ValueError(
            f"{path}: shape {shape} is used by a matmul with input axes {ins} and output "
            f"axes {outs}; one side is empty, so no low-rank update fits. Give "
            "Rule(axes=...) or narrow the rule"
        )
    return Axes(ins, outs, stack).normalized(len(shape), f"{path}: "), usage.kind


def _check_rank(path, shape, axes: Axes, rule: Rule):
    in_size = math.prod(shape[i] for i in axes.in_axes)
    out_size = math.prod(shape[i] for i in axes.out_axes)
    if rule.rank > min(in_size, out_size):
        raise ValueError(
            f"{path}: rank {rule.rank} exceeds min(in, out) = min({in_size}, {out_size}) of the "
            f"weight of shape {shape} (in axes {axes.in_axes}, out axes {axes.out_axes}); use "
            f"rank <= {min(in_size, out_size)} in rule {rule.pattern!r}"
        )


class _Target(NamedTuple):
    """What the init of one target depends on, hashable (a static argument of the jit)."""

    fields: tuple  # LoraWeight's static fields, as (name, value) pairs
    dtype: str  # the factors' dtype


def _static_fields(spec: LoraWeight) -> tuple:
    return tuple((f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.name not in ("a", "b", "m"))


@jax.jit
def _magnitudes(weights: list, loras: list) -> list:
    """DoRA's initial ``m = ||W + s·A⊗B||`` (over the input axes) of every target, in one
    program, in the factors' dtype."""
    return [jnp.sqrt(lw.dora_norm_sq(w)).astype(lw.a.dtype) for w, lw in zip(weights, loras)]


def _init_all(key, folds, weights, plan: tuple, init: str) -> list:
    """``[(lora_weight, residual base or None)]`` for every target of ``plan``. Target ``j``
    draws from ``fold_in(key, folds[j])`` what the eager init draws; ``weights[j]`` is the
    float weight (PiSSA) or None."""
    specs = [LoraWeight(a=None, b=None, **dict(t.fields)) for t in plan]
    key = _one_key(key)
    if init == "pissa":
        return _pissa_all(weights, plan)
    pad = bool(jax.config.jax_threefry_partitionable) and str(jax.random.key_impl(key)) == "threefry2x32"
    groups = _draw_groups(specs, plan, init, pad)
    rows = np.asarray([j for *_, items in groups for j, _, _ in items])
    sides = np.asarray([g[1] for g in groups for _ in g[5]], np.uint32)
    drawn = _draw(_row_keys(key, folds[rows], sides), groups)
    divided = [i for i, g in enumerate(groups) if g[4] != 1]
    if divided:  # gaussian A = N(0, 1) / rank, in a program of its own (see _divide)
        for i, x in zip(divided, _divide([drawn[i] for i in divided], tuple(groups[i][4] for i in divided))):
            drawn[i] = x
    # Cut the rows apart outside the programs: a program that cuts all rows compiles a kernel
    # per target, and eager cuts compile one program per shape. Concrete draws are cut on the
    # host and placed in one transfer (no compile); traced ones (an abstract or jitted split)
    # are cut where they are.
    traced = any(isinstance(x, jax.core.Tracer) for x in drawn)
    xp = jnp if traced else np
    factors = []
    for (_, side, dtype, size, _, items), x in zip(groups, drawn):
        x = x if traced else np.asarray(x)
        for r, (j, shape, _) in enumerate(items):
            n = math.prod(shape)
            value = (x[r, :n] if n < size else x[r]).reshape(shape)
            spec = specs[j]
            zero = xp.zeros(spec.b_shape if side == 0 else spec.a_shape, dtype)
            factors.append((j, (value, zero) if side == 0 else (zero, value)))
    if not traced:
        factors = jax.device_put(factors)
    out: list = [None] * len(plan)
    for j, (a, b) in factors:
        out[j] = specs[j].replace(a=a, b=b), None
    return out


def _draw_groups(specs, plan, init: str, pad: bool) -> tuple:
    """The draws of every target, grouped: ``(distribution, side, dtype, size, divisor,
    ((j, shape, bound), ...))``, one sampler per group.

    XLA's compile time grows with the number of samplers in a program, so the draws share
    samplers: one per distribution, dtype and size, ``vmap``-ed over the targets' keys and
    bounds. With ``pad`` (threefry keys in partitionable mode, where element ``i`` of a draw
    depends only on the key and ``i``), a draw of ``n`` values is the first ``n`` of a draw
    of ``n`` rounded up to a power of two, so targets of different sizes share one sampler
    (and sizes are pooled further into the largest, see :func:`_pooled`). ``divisor`` is
    the rank that the gaussian init divides A by (1: none)."""
    draws: dict[tuple, list] = {}
    for j, (spec, target) in enumerate(zip(specs, plan)):
        divisor = 1
        if spec.kind == "embed":  # PEFT / loralib: the lookup side starts at zero, the other gaussian
            dist, side, shape, bound = "normal", 1, spec.b_shape, 0.0
        elif init == "gaussian":
            dist, side, shape, bound, divisor = "normal", 0, spec.a_shape, 0.0, spec.rank
        else:  # kaiming-uniform with a=sqrt(5), as torch.nn.Linear / PEFT: bound = 1/sqrt(fan_in)
            dist, side, shape, bound = "uniform", 0, spec.a_shape, 1.0 / math.sqrt(math.prod(spec.in_shape))
        n = math.prod(shape)
        size = 1 << (n - 1).bit_length() if pad else n
        draws.setdefault((dist, side, target.dtype, size, divisor), []).append((j, shape, bound))
    if pad:
        draws = _pooled(draws)
    return tuple((*k, tuple(items)) for k, items in draws.items())


def _pooled(draws: dict, waste: int = 4) -> dict:
    """``draws`` with the sizes of each distribution, side, dtype and divisor drawn by one
    sampler of the largest size, where that draws at most ``waste`` times the values asked
    for."""
    kinds: dict[tuple, list] = {}
    for (dist, side, dtype, size, divisor), items in draws.items():
        kinds.setdefault((dist, side, dtype, divisor), []).append((size, items))
    out = {}
    for (dist, side, dtype, divisor), groups in kinds.items():
        top = max(size for size, _ in groups)
        asked = sum(math.prod(shape) for _, items in groups for _, shape, _ in items)
        if top * sum(len(items) for _, items in groups) <= waste * asked:
            groups = [(top, [it for _, items in groups for it in items])]
        out.update({(dist, side, dtype, size, divisor): items for size, items in groups})
    return out


def _row_keys(key, folds: np.ndarray, sides: np.ndarray):
    """The key each row of the draws samples from: ``split(fold_in(key, folds[i]))[sides[i]]``,
    the key pair of the target's path and the side it draws.

    For a concrete threefry key the two hashes run on the host, in exact integer arithmetic,
    so the draw program holds one hash (its sampler's) instead of three; XLA:CPU compiles each
    in about 0.25 s. Other keys (another implementation, a traced key) derive in a program."""
    if isinstance(key, jax.core.Tracer) or str(jax.random.key_impl(key)) != "threefry2x32":
        return _derive(key, folds, sides)
    data = np.asarray(jax.random.key_data(key))
    k0, k1 = _threefry(data[0], data[1], 0, folds)  # fold_in: the hash of (0, fold)
    if jax.config.jax_threefry_partitionable:  # split: key i is the hash of (0, i)
        pair = np.stack(_threefry(k0, k1, 0, sides), -1)
    else:  # split: iota(4) hashed as the pairs (0, 2) and (1, 3); key i is the i-th output
        y = _threefry(k0[:, None], k1[:, None], np.uint32([0, 1]), np.uint32([2, 3]))
        pair = np.where(sides[:, None] == 0, y[0], y[1])
    return jax.random.wrap_key_data(pair, impl="threefry2x32")


def _one_key(key):
    """``key`` as a typed PRNG key (a raw one, as ``jax.random.PRNGKey`` makes, is data of the
    default implementation); an error unless it is one key."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        try:
            key = jax.random.wrap_key_data(key)
        except TypeError:
            got = repr(key) if dtype is None else f"shape {key.shape} and dtype {dtype}"
            raise TypeError(f"key: expected a PRNG key such as jax.random.key(0), got {got}") from None
    if key.shape != ():
        raise ValueError(f"key: lj.split takes one PRNG key, got a key array of shape {key.shape}; pass one of them")
    return key


def _threefry(k0, k1, x0, x1) -> tuple:
    """The Threefry-2x32 hash (20 rounds) of the counters ``(x0, x1)`` under the key ``(k0,
    k1)``, as ``jax.random``'s threefry2x32 computes it, in NumPy ``uint32`` arrays (which
    wrap on overflow)."""
    k0, k1, x0, x1 = np.broadcast_arrays(*(np.asarray(v, np.uint32) for v in (k0, k1, x0, x1)))
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


@jax.jit
def _derive(key, folds, sides):
    """:func:`_row_keys` in a program, for any key."""
    return jax.vmap(lambda fold, side: jax.random.split(jax.random.fold_in(key, fold))[side])(folds, sides)


@functools.partial(jax.jit, static_argnums=1)
def _draw(keys, groups: tuple) -> list:
    """One ``(len(items), size)`` array per group of :func:`_draw_groups`, in one program;
    row ``r`` is drawn as the target of ``items[r]`` draws it eagerly, from ``keys`` taken
    in order (see :func:`_row_keys`)."""
    out, start = [], 0
    for dist, _, dtype, size, _, items in groups:

        def draw(k, bound):
            if dist == "normal":
                return jax.random.normal(k, (size,), dtype)
            return jax.random.uniform(k, (size,), dtype, -bound, bound)

        bounds = jnp.asarray([bd for *_, bd in items], dtype)
        out.append(jax.vmap(draw)(keys[start : start + len(items)], bounds))
        start += len(items)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _divide(xs, divisors: tuple):
    """``[x / d]``, in a program apart from the sampler that made ``x``: XLA computes a
    division by a constant as a multiplication by its reciprocal, and after the sampler it
    would fold that reciprocal into the sampler's own last constant, which changes the last
    bit of the result; apart, the values equal those of dividing the sample eagerly."""
    return [x / d for x, d in zip(xs, divisors)]


@functools.partial(jax.jit, static_argnums=1)
def _pissa_all(weights, plan: tuple) -> list:
    """:func:`_pissa` of every target, in one program."""
    return [_pissa(w, LoraWeight(a=None, b=None, **dict(t.fields)), jnp.dtype(t.dtype)) for t, w in zip(plan, weights)]


def _to_matrix(w, spec: LoraWeight):
    """W as (*stack, in, out), in float32 or wider."""
    perm = (*spec.stack_axes, *spec.in_axes, *spec.out_axes)
    m = jnp.transpose(jnp.asarray(w, jnp.promote_types(jnp.result_type(w), jnp.float32)), perm)
    return m.reshape(*spec.stack_shape, math.prod(spec.in_shape), math.prod(spec.out_shape))


def _pissa(w, spec: LoraWeight, dtype):
    """A, B from the top-r SVD of W (sqrt of singular values on each side); base = residual."""
    m = _to_matrix(w, spec)
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    r = spec.rank
    root = jnp.sqrt(s[..., :r] / spec.scale)[..., :, None]  # (..., r, 1)
    a = root * jnp.swapaxes(u[..., :, :r], -1, -2)  # (..., r, in)
    b = root * vh[..., :r, :]  # (..., r, out)
    weight = spec.replace(
        a=a.reshape(spec.a_shape).astype(dtype), b=b.reshape(spec.b_shape).astype(dtype)
    )
    return weight, apply_delta(w, weight, -1)
