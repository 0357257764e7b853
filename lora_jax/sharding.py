"""Sharding: adapters that follow their base weight's layout over a device mesh.

The distributed engine is JAX's own SPMD partitioner (``jit`` + ``NamedSharding`` over a
``Mesh``). This module only decides where A and B live, from the base weight's layout and
the axes recorded on each :class:`~lora_jax.LoraWeight`:

- ``a`` (``(*stack, r, *in)``) takes the base's entries for the stack and input axes;
- ``b`` (``(*stack, r, *out)``) takes the base's entries for the stack and output axes;
- the rank axis is replicated (r is small; sharding it would cost a collective per matmul).

A weight sharded on its input axis (FSDP, row-parallel) therefore has A sharded the same way
and B replicated; a weight sharded on its output axis (column-parallel) has A replicated and
B sharded like the output. ``x·A`` and ``(x·A)·B`` then need no gather of a full weight, and
neither does forming ``s·A⊗B`` next to W: the delta comes out with W's own layout.

The base's layout may be given as a tree of ``PartitionSpec``, of ``NamedSharding``, the
sharded base arrays themselves (or ``jax.ShapeDtypeStruct`` with shardings), Flax linen
boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned`` with logical axis rules) or NNX
variables carrying sharding metadata (``nnx.with_partitioning``) or the output of
``nnx.get_partition_spec``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta as flax_meta
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from .config import LoraConfig, path_str
from .quant import QuantizedWeight, is_quantized
from .split import split as _split
from .stacked import is_stacked, is_stacked_node
from .tree import fmt_paths, path_diff
from .tree import merge as _merge
from .weight import PER_ADAPTER, LoraWeight, is_adalora, is_lora

__all__ = ["specs", "shardings", "shard", "split", "merge", "state_shardings", "quantized_specs"]

Rules = Sequence[tuple[str, Any]]


def _is_spec_leaf(x) -> bool:
    return (
        x is None
        or is_lora(x)
        or is_quantized(x)
        or isinstance(x, (PartitionSpec, Sharding, flax_meta.AxisMetadata, nnx.Variable))
    )


def _variable_value(v):
    get = getattr(v, "get_value", None)
    return get() if callable(get) else v.value


def _logical(names, rules, path) -> PartitionSpec:
    try:
        return nn.logical_to_mesh_axes(tuple(names), rules)
    except ValueError as e:
        raise ValueError(f"{path}: logical axis names {tuple(names)} cannot be mapped: {e}") from None


def _needs_rules(path, names, what):
    return ValueError(
        f"{path}: the base is annotated with logical axis names {tuple(names)} ({what}) but "
        "no logical axis rules are known; pass rules=[('embed', 'data'), ('mlp', 'model'), "
        "...] or call inside `with nn.logical_axis_rules(rules):`"
    )


def _nnx_logical(path, names, rules, local) -> PartitionSpec:
    """Logical names mapped as NNX maps them (``flax.core.spmd``): a name without a rule is
    passed through unchanged, as a mesh axis name."""
    context = rules if rules is not None else flax_spmd.get_logical_axis_rules()
    try:
        table = dict(flax_spmd.composite_rules(tuple(context or ()), tuple(local or ())))
    except ValueError as e:
        raise ValueError(f"{path}: logical axis names {tuple(names)} cannot be mapped: {e}") from None
    return PartitionSpec(*(table.get(n, n) if n is not None else None for n in names))


def _value_sharding(value):
    """The sharding a concrete or abstract (untraced) array carries, else ``None``."""
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    return getattr(value, "sharding", None)


def _variable_spec(path: str, leaf, rules) -> PartitionSpec:
    """The mesh-level spec of an ``nnx.Variable``: its value's actual ``NamedSharding``
    when it has one, else its sharding metadata resolved as NNX resolves it, else its
    value's own (e.g. single-device) sharding."""
    value = _variable_value(leaf)
    meta = leaf.get_metadata()
    local = meta.get("sharding_rules")
    if isinstance(value, PartitionSpec):  # a State of specs (nnx.get_partition_spec)
        return _nnx_logical(path, tuple(value), rules, local)
    if isinstance(value, Sharding) or value is None:
        return _spec_of(path, value, rules)
    actual = _value_sharding(value)
    if isinstance(actual, NamedSharding):
        return actual.spec
    names = None
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key):
            names = meta[key]
            break
    if isinstance(names, NamedSharding):
        return names.spec
    if names is not None:
        return _nnx_logical(path, tuple(names), rules, local)
    if actual is not None:
        return _spec_of(path, actual, None)
    return PartitionSpec()


def _spec_of(path: str, leaf, rules) -> PartitionSpec:
    """The base's mesh-level ``PartitionSpec`` from one leaf of ``base_specs``."""
    if leaf is None:
        return PartitionSpec()
    if is_quantized(leaf):  # the layout of a quantized weight's codes: the weight's own
        return _weight_spec(path, leaf, rules)
    if is_lora(leaf):
        raise TypeError(
            f"base_specs: {path} holds an lj.LoraWeight; base_specs describes the base "
            "weights (the tree of params), not the adapters"
        )
    if isinstance(leaf, PartitionSpec):
        return _logical(leaf, rules, path) if rules is not None else leaf
    if isinstance(leaf, NamedSharding):
        return leaf.spec
    if isinstance(leaf, Sharding):
        if leaf.is_fully_replicated:
            return PartitionSpec()
        raise TypeError(
            f"base_specs: {path} has a {type(leaf).__name__}, which names no mesh axes; use "
            "a NamedSharding or a PartitionSpec"
        )
    if isinstance(leaf, nn.LogicallyPartitioned):
        names = tuple(leaf.names)
        use = rules if rules is not None else leaf.rules
        if use is None:
            use = nn.get_logical_axis_rules()
            if not use and any(isinstance(n, str) for n in names):
                raise _needs_rules(path, names, "nn.LogicallyPartitioned")
        return _logical(names, use, path)
    if isinstance(leaf, flax_meta.AxisMetadata):
        get = getattr(leaf, "get_partition_spec", None)
        if get is None:
            raise TypeError(
                f"base_specs: {path} is a {type(leaf).__name__} box without a partition spec; "
                "use nn.Partitioned / nn.LogicallyPartitioned or a PartitionSpec"
            )
        return get()
    if isinstance(leaf, nnx.Variable):
        return _variable_spec(path, leaf, rules)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        return _spec_of(path, sharding, None)
    if hasattr(leaf, "shape"):
        return PartitionSpec()  # an unannotated array: replicated, as in Flax
    raise TypeError(
        f"base_specs: {path} is a {type(leaf).__name__}; expected a PartitionSpec, a "
        "NamedSharding, a sharded array, an nn.Partitioned box or an nnx.Variable"
    )


def _spec_table(lora, base_specs, rules) -> dict[str, PartitionSpec]:
    """``{path: mesh-level PartitionSpec}`` for every leaf path of ``lora``."""
    if rules is not None and not isinstance(rules, (tuple, list)):
        raise TypeError(
            f"rules must be a sequence of (logical_name, mesh_axes) pairs, got {type(rules).__name__}"
        )
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=lambda x: is_stacked_node(x) or is_quantized(x))[0]
    l_paths = [path_str(p) for p, _ in leaves]
    s_leaves = jax.tree_util.tree_flatten_with_path(base_specs, is_leaf=_is_spec_leaf)[0]
    s_paths = [path_str(p) for p, _ in s_leaves]
    detail = path_diff(l_paths, s_paths, "lora", "base_specs")
    if detail:
        raise ValueError(
            "base_specs does not have the structure of the parameters lora was split from ("
            + "; ".join(detail)
            + "). Pass the spec tree of the same tree given to lj.split, e.g. "
            "nn.get_partition_spec(variables) or jax.tree.map(lambda x: x.sharding, params)"
        )
    table, problems = {}, []
    for path, leaf in zip(s_paths, (x for _, x in s_leaves)):
        try:
            table[path] = _spec_of(path, leaf, rules)
        except (TypeError, ValueError) as e:
            problems.append(e)
    if problems:
        kind = TypeError if all(isinstance(e, TypeError) for e in problems) else ValueError
        raise kind("; ".join(str(e) for e in problems))
    return table


def _derive(path: str, w: LoraWeight, spec: PartitionSpec) -> tuple[PartitionSpec, PartitionSpec]:
    entries = _entries(path, w.shape, spec)
    stack = [entries[i] for i in w.stack_axes]
    a = PartitionSpec(*stack, None, *(entries[i] for i in w.in_axes))
    b = PartitionSpec(*stack, None, *(entries[i] for i in w.out_axes))
    return a, b


def _entries(path: str, shape, spec: PartitionSpec) -> tuple:
    entries = tuple(spec)
    ndim = len(shape)
    if len(entries) > ndim:
        raise ValueError(
            f"{path}: the base spec {spec} has {len(entries)} entries but the weight has shape "
            f"{tuple(shape)} ({ndim} axes); give at most one entry per axis, e.g. "
            f"{PartitionSpec(*entries[-ndim:])}"
        )
    return entries + (None,) * (ndim - len(entries))


def _codes_specs(path: str, q: QuantizedWeight, spec: PartitionSpec) -> QuantizedWeight:
    """The specs of ``q``'s children from its weight's spec: the codes and block scales keep
    the entries of the weight's non-input axes, and their last (flattened input) axis takes
    the first input axis's entry; the second-level scales are replicated."""
    entries = _entries(path, q.shape, spec)
    ins = [entries[d] for d in q.in_axes]
    if any(e is not None for e in ins[1:]):
        raise ValueError(
            f"{path}: spec {spec} splits input axis {q.in_axes[1 + [e is not None for e in ins[1:]].index(True)]} "
            f"of the quantized weight {q.shape} (input axes {q.in_axes}); its inputs are "
            "flattened into one codes axis, which can follow only the first input axis's split"
        )
    rows = [entries[d] for d in q.row_axes]
    second = PartitionSpec() if q.double_quant else None
    return q.replace(codes=PartitionSpec(*rows, ins[0]), scale=PartitionSpec(*rows, ins[0]),
                     scale2=second, offset=second)


def _weight_spec(path: str, leaf: QuantizedWeight, rules) -> PartitionSpec:
    """The weight's spec from a quantized weight whose children are specs or shardings."""
    codes = tuple(_spec_of(path, leaf.codes, rules))
    codes = codes + (None,) * (len(leaf.row_axes) + 1 - len(codes))
    entries = [None] * leaf.ndim
    for k, d in enumerate(leaf.row_axes):
        entries[d] = codes[k]
    entries[leaf.in_axes[0]] = codes[-1]
    return PartitionSpec(*entries)


def quantized_specs(qbase: Any, base_specs: Any, *, rules: Rules | None = None) -> Any:
    """``PartitionSpec`` s for a quantized base tree, from the float base's specs.

    Each :class:`~lora_jax.QuantizedWeight` gets a ``QuantizedWeight`` of specs: codes and
    block scales split like the weight along the axes they keep (its non-input axes, and
    the first input axis for their last axis); second-level scales are replicated. Other
    leaves keep their spec. Place the tree with
    ``jax.device_put(qbase, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))``.

    Args:
      qbase: the tree from :func:`lora_jax.quantize`.
      base_specs: the float base's layout, as for :func:`specs`.
      rules: logical axis rules, as for :func:`specs`.

    Raises:
      ValueError: a spec that splits an input axis other than the first of a quantized
        weight (its inputs are flattened into one codes axis); mismatched paths.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> qbase = lj.quantize({"w": {"kernel": jnp.ones((128, 64))}}, "nf4")
    >>> s = lj.sharding.quantized_specs(qbase, {"w": {"kernel": P("data", "model")}})["w"]["kernel"]
    >>> s.codes, s.scale, s.scale2
    (P('model', 'data'), P('model', 'data'), P())
    """
    table = _spec_table(qbase, base_specs, rules)
    problems = []

    def one(p, x):
        path = path_str(p)
        if not is_quantized(x):
            return table[path]
        try:
            return _codes_specs(path, x, table[path])
        except ValueError as e:
            problems.append(str(e))
            return None

    out = jax.tree_util.tree_map_with_path(one, qbase, is_leaf=is_quantized)
    if problems:
        raise ValueError("; ".join(problems))
    return out


def specs(lora: Any, base_specs: Any, *, rules: Rules | None = None) -> Any:
    """A ``PartitionSpec`` for every adapter factor, derived from its base weight's spec.

    ``a`` (``(*stack, r, *in)``) keeps the base's stack- and input-axis entries, ``b``
    (``(*stack, r, *out)``) the stack- and output-axis entries; the rank axis is
    replicated. A DoRA magnitude ``m`` (``(*stack, *out)``) shards like W's stack and
    output axes.

    Args:
      lora: the adapter tree from :func:`lora_jax.split` (arrays or abstract).
      base_specs: the layout of the base, a tree with the structure of the parameters
        ``lora`` was split from. Leaves may be ``PartitionSpec`` (``None`` entries and
        shorter specs mean replicated axes), ``NamedSharding``, sharded arrays or
        ``jax.ShapeDtypeStruct``, Flax ``nn.Partitioned`` / ``nn.LogicallyPartitioned``
        boxes, NNX variables with sharding metadata, or ``None`` (replicated).
      rules: logical axis rules ``[(logical_name, mesh_axes), ...]``. When given,
        ``PartitionSpec`` leaves hold logical names (as ``nn.get_partition_spec`` returns
        for ``nn.LogicallyPartitioned`` variables) and are mapped with
        ``nn.logical_to_mesh_axes``. Without it, ``nn.LogicallyPartitioned`` boxes use their
        own rules or those of an enclosing ``nn.logical_axis_rules`` context. Linen boxes
        and plain ``PartitionSpec`` leaves map a name without a rule to ``None``
        (replicated), as linen does; NNX variables resolve their names as NNX does
        (``rules`` or the context's, with the variable's own ``sharding_rules``), a name
        without a rule naming the mesh axis of that name. An NNX variable whose value is
        an array with a ``NamedSharding`` is taken at that actual layout.

    Returns:
      The structure of ``lora``: an :class:`~lora_jax.LoraWeight` whose ``a`` and ``b`` are
      ``PartitionSpec`` at every target, ``None`` elsewhere. For a stacked tree
      (:func:`lora_jax.stack`) each :class:`~lora_jax.StackedLoraWeight` gets the same
      specs behind a replicated adapter axis, and replicated per-adapter numbers.

    Raises:
      ValueError: ``base_specs`` misses or adds paths; a spec has more entries than its
        weight has axes; logical names that cannot be mapped.
      TypeError: a leaf of ``base_specs`` that is no kind of spec.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jnp.ones((8, 16)), "bias": jnp.ones(16)}
    >>> _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> s = lj.sharding.specs(lora, {"w": P("data", "model"), "bias": P("model")})
    >>> tuple(s["w"].a), tuple(s["w"].b), s["bias"]
    ((None, 'data'), (None, 'model'), None)
    """
    ada = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_adalora)[0] if is_adalora(x)]
    if ada:
        raise TypeError(f"sharding.specs: lora holds AdaLoRA adapters at {fmt_paths(ada, 4)}, which have no "
                        "derived specs; shard plain adapters (lj.adalora.to_lora(lora, opt_state))")
    table = _spec_table(lora, base_specs, rules)
    problems = []

    def one(p, w):
        if not (is_lora(w) or is_stacked(w)):
            return w
        path = path_str(p)
        try:
            a, b = _derive(path, w, table[path])
        except ValueError as e:
            problems.append(str(e))
            return w
        if is_stacked(w):  # the adapter axis and the per-adapter numbers are replicated
            return w.replace(a=PartitionSpec(None, *a), b=PartitionSpec(None, *b),
                             **dict.fromkeys(PER_ADAPTER, PartitionSpec()))
        if w.is_dora:  # DoRA's m: W's stack and output entries, like b without its rank
            return w.replace(a=a, b=b, m=PartitionSpec(*b[: len(w.stack_axes)], *b[len(w.stack_axes) + 1:]))
        return w.replace(a=a, b=b)

    out = jax.tree_util.tree_map_with_path(one, lora, is_leaf=is_stacked_node)
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _check_mesh(mesh):
    if not (hasattr(mesh, "axis_names") and hasattr(mesh, "shape")):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; e.g. "
            "jax.make_mesh((8,), ('data',))"
        )


def _check_on_mesh(path, name, spec, shape, mesh) -> str | None:
    sizes = dict(mesh.shape)
    used = []
    for dim, entry in enumerate(spec):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        unknown = [ax for ax in axes if ax not in sizes]
        if unknown:
            hint = (
                " If these are logical axis names, pass rules=[(logical, mesh_axis), ...]."
                if all(isinstance(ax, str) for ax in unknown)
                else ""
            )
            return (
                f"{path}: factor {name} {PartitionSpec(*spec)} names mesh axis "
                f"{', '.join(map(repr, unknown))}, but the mesh has axes {tuple(mesh.axis_names)}."
                + hint
            )
        used.extend(axes)
        n = math.prod(sizes[ax] for ax in axes)
        if shape[dim] % n:
            return (
                f"{path}: factor {name} of shape {tuple(shape)} cannot be split {n} ways along "
                f"axis {dim} (size {shape[dim]}) by {PartitionSpec(*spec)} on mesh "
                f"{dict(sizes)}; make the weight's dimension divisible by the mesh axes that "
                "shard it, or shard it over fewer devices"
            )
    dups = sorted({ax for ax in used if used.count(ax) > 1})
    if dups:
        return f"{path}: factor {name} {PartitionSpec(*spec)} uses mesh axis {dups[0]!r} twice"
    return None


def shardings(lora: Any, mesh: jax.sharding.Mesh, base_specs: Any, *, rules: Rules | None = None) -> Any:
    """``NamedSharding`` on ``mesh`` for every adapter factor, as :func:`specs` derives.

    Use it as ``in_shardings``/``out_shardings`` of a jitted step, or with
    ``jax.device_put``. Checks that every mesh axis exists and divides its dimension.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((16, 8))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lj.sharding.shardings(lora, mesh, {"w": P("data", None)})["w"].a.spec == P(None, "data")
    True
    """
    _check_mesh(mesh)
    tree = specs(lora, base_specs, rules=rules)
    problems = []

    def one(p, w, orig):
        if not (is_lora(w) or is_stacked(w)):
            return w
        path = path_str(p)
        shapes = (jax.numpy.shape(orig.a), jax.numpy.shape(orig.b)) if is_stacked(w) else (w.a_shape, w.b_shape)
        named = [("a", w.a, shapes[0]), ("b", w.b, shapes[1])]
        if is_lora(w) and w.is_dora:
            named.append(("m", w.m, w.m_shape))
        msgs = [_check_on_mesh(path, name, tuple(spec), shape, mesh) for name, spec, shape in named]
        if any(msgs):
            problems.extend(m for m in msgs if m)
            return w
        rest = {f: NamedSharding(mesh, getattr(w, f)) for f in PER_ADAPTER} if is_stacked(w) else {}
        if is_lora(w) and w.is_dora:
            rest["m"] = NamedSharding(mesh, w.m)
        return w.replace(a=NamedSharding(mesh, w.a), b=NamedSharding(mesh, w.b), **rest)

    out = jax.tree_util.tree_map_with_path(one, tree, lora, is_leaf=is_stacked_node)
    if problems:
        raise ValueError("; ".join(problems))
    return out


def shard(lora: Any, mesh: jax.sharding.Mesh, base_specs: Any, *, rules: Rules | None = None) -> Any:
    """``lora`` moved onto the shardings :func:`shardings` derives (``jax.device_put``).

    Arrays already on devices move device to device. To create adapters sharded from the
    start, use :func:`split`.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((16, 8))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lora = lj.sharding.shard(lora, mesh, {"w": P("data", "model")})
    >>> tuple(lora["w"].a.sharding.spec), lora["w"].b.sharding.shard_shape(lora["w"].b.shape)
    ((None, 'data'), (2, 2))
    """
    return jax.device_put(lora, shardings(lora, mesh, base_specs, rules=rules))


def _find_mesh(*trees):
    for tree in trees:
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Sharding)):
            s = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
            if isinstance(s, NamedSharding):
                return s.mesh
    return None


def split(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    mesh: jax.sharding.Mesh | None = None,
    base_specs: Any = None,
    *,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    rules: Rules | None = None,
    donate: bool = False,
) -> tuple[Any, Any]:
    """:func:`lora_jax.split` with every A and B created on its derived sharding.

    The adapters are initialized inside one ``jit`` whose ``out_shardings`` are
    :func:`shardings`: each device computes only its own shards (no host round trip and
    no gather). The values equal those of the unsharded ``lj.split`` bit for bit for the
    default init; the gaussian init's division by the rank, compiled into the same
    program as the draw, may round the last bit differently (within one float32 ulp). Under
    ``init="pissa"`` the residual base is computed in the same ``jit`` and keeps the
    base's shardings.

    Args:
      key, params, config, apply_fn, args, kwargs: as for :func:`lora_jax.split`.
      mesh: the device mesh; ``None`` takes the mesh of ``base_specs``' or ``params``'
        ``NamedSharding``.
      base_specs: the base's layout (see :func:`specs`); ``None`` reads the shardings of
        the ``params`` arrays themselves.
      rules: logical axis rules, as for :func:`specs`.
      donate: under ``init="pissa"``, donate ``params``' buffers to the residual base.

    Returns:
      ``(base, lora)``. Without PiSSA, ``base`` is ``params`` itself.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> params = {"w": jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data")))}
    >>> base, lora = lj.sharding.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> tuple(lora["w"].a.sharding.spec), tuple(lora["w"].b.sharding.spec)
    ((None, 'data'), (None, None))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an lj.LoraConfig, got {type(config).__name__}")
    if base_specs is None:
        base_specs = params
    if mesh is None:
        mesh = _find_mesh(base_specs, params)
        if mesh is None:
            raise ValueError(
                "lj.sharding.split needs a mesh: pass mesh=, or give base_specs (or params) "
                "with NamedSharding leaves"
            )
    types = getattr(mesh, "axis_types", ())
    explicit = [n for n, t in zip(mesh.axis_names, types) if "Explicit" in str(t)]
    if explicit and config.init == "pissa":
        raise ValueError(
            f"init='pissa' takes an SVD of each whole weight, which a mesh with Explicit axes "
            f"{explicit} does not allow on sharded weights; build the mesh with "
            "axis_types=(jax.sharding.AxisType.Auto,) * ndim, or split with init='default'"
        )

    def run(k, p):
        return _split(k, p, config, apply_fn, args, kwargs)

    _, abstract_lora = jax.eval_shape(run, key, params)
    lora_sh = shardings(abstract_lora, mesh, base_specs, rules=rules)
    if config.init != "pissa":
        lora = jax.jit(lambda k, p: run(k, p)[1], out_shardings=lora_sh)(key, params)
        return params, lora
    table = _spec_table(abstract_lora, base_specs, rules)

    def base_sharding(p, x):
        if x is None:
            return None
        return NamedSharding(mesh, table.get(path_str(p), PartitionSpec()))

    base_sh = jax.tree_util.tree_map_with_path(base_sharding, params)
    fn = jax.jit(run, out_shardings=(base_sh, lora_sh), donate_argnums=(1,) if donate else ())
    return fn(key, params)


def merge(base: Any, lora: Any, shardings: Any = None, *, donate: bool = True) -> Any:
    """:func:`lora_jax.merge` under ``jit``, the result laid out like the base.

    ``out_shardings`` are the base arrays' own shardings (or ``shardings``, a tree like
    ``base``), so each device adds its shard of ``s·A⊗B`` to its shard of W and nothing is
    gathered. With ``donate=True`` (the default) the base's buffers are reused for the
    result: ``base`` must not be used afterwards.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> w = jax.device_put(jnp.ones((4, 16)), NamedSharding(mesh, P(None, "model")))
    >>> base, lora = lj.sharding.split(jax.random.key(0), {"w": w}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> merged = lj.sharding.merge(base, lora)
    >>> tuple(merged["w"].sharding.spec), bool((merged["w"] == 1).all())
    ((None, 'model'), True)
    """
    if shardings is None:

        def own(x):
            s = getattr(x, "sharding", None)
            if s is None:
                raise TypeError(
                    f"lj.sharding.merge: a base leaf of type {type(x).__name__} has no sharding; "
                    "pass shardings= (a tree like base) or device_put the base first"
                )
            return s

        shardings = jax.tree.map(own, base)
    fn = jax.jit(_merge, out_shardings=shardings, donate_argnums=(0,) if donate else ())
    return fn(base, lora)


def state_shardings(state: Any, lora_shardings: Any) -> Any:
    """Shardings for a tree built from the adapters: optimizer state, gradients, an EMA.

    Every subtree with the structure of ``lora_shardings`` (Adam's ``mu`` and ``nu``, say)
    gets those shardings; every other leaf (step counts) is replicated on the same mesh.
    ``state`` may be abstract (``jax.eval_shape(tx.init, lora)``).

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((16, 8))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> sh = lj.sharding.shardings(lora, mesh, {"w": P("data")})
    >>> tx = optax.adam(1e-3)
    >>> opt_sh = lj.sharding.state_shardings(jax.eval_shape(tx.init, lora), sh)
    >>> opt = jax.jit(tx.init, out_shardings=opt_sh)(lj.sharding.shard(lora, mesh, {"w": P("data")}))
    >>> tuple(opt[0].mu["w"].a.sharding.spec), tuple(opt[0].count.sharding.spec)
    ((None, 'data'), ())
    """
    target = jax.tree.structure(lora_shardings)
    mesh = _find_mesh(lora_shardings)
    if mesh is None:
        raise ValueError(
            "lora_shardings holds no NamedSharding; build it with lj.sharding.shardings(lora, mesh, base_specs)"
        )
    replicated = NamedSharding(mesh, PartitionSpec())

    def matches(x):
        return x is not None and jax.tree.structure(x) == target

    def one(x):
        if matches(x):
            return lora_shardings
        return replicated

    return jax.tree.map(one, state, is_leaf=matches)
