"""The metadata of an adapter checkpoint: its JSON schema, the lora tree's containers as
JSON, and the checks on metadata read back.

The metadata is one JSON object::

    format            FORMAT
    library_version   the lora_jax version that wrote it
    targets           one object per target, in tree order: path; weight (the LoraWeight
                      static fields: shape, dtype, in/out/stack axes, rank, alpha, the
                      scale as applied, the scaling rule's name, dropout, kind, rule);
                      scale_fixed (a custom scaling callable: the scale restores as
                      stored); a and b (shape, dtype)
    structure         the containers of the lora tree (None when they cannot be rebuilt)
    structure_note    why structure is None
    config            the LoraConfig that made the adapter (for reference), or None
    (per target, AdaLoRA adapters only) lam: the shape and dtype of λ, stored beside P and Q
                      (which are the target's a and b)
    (per target, DoRA adapters only) m: the shape and dtype of the magnitude, stored
                      beside a and b
    stack             (stacked trees from lj.stack only) one object per adapter, in order:
                      its targets, each with path, rank, alpha, scale, scaling and dropout

A stacked tree stores one entry per target in ``targets`` as the weight at the padded rank
(rank r_max, scale 1, rule ""), whose factors lead with the adapter axis; ``stack`` holds
every adapter's own numbers.

The factors themselves are stored beside it as a list of ``{"a", "b"}`` in target order
(with ``"lam"`` or ``"m"`` where the target has one).
Nothing here reads or writes files: :mod:`lora_jax.checkpoint` does the orbax I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from .config import SCALINGS, LoraConfig, path_str
from .stacked import StackedLoraWeight, adapter_numbers, is_stacked, is_stacked_node, stacked_targets, template
from .tree import fmt_paths, is_node, targets
from .version import __version__
from .weight import PER_ADAPTER, AdaLoraWeight, LoraWeight, is_adalora, is_lora

__all__ = [
    "FORMAT",
    "check_lora",
    "encode",
    "check_format",
    "abstract_weights",
    "restore_targets",
    "rebuild",
    "plain_form",
    "lam_specs",
    "stored_arrays",
]

FORMAT = "lora_jax.checkpoint/1"

_STATIC = tuple(f.name for f in dataclasses.fields(LoraWeight) if f.metadata.get("static"))
_FACTORS = ("a", "b")


# ---------------------------------------------------------------------------------------
# lora tree -> metadata


def check_lora(lora: Any, what: str = "lora") -> list[tuple[str, LoraWeight]]:
    """:func:`lora_jax.targets` of ``lora``, checked to be a lora tree a checkpoint can hold.

    ``lora`` must hold ``LoraWeight`` at targets and ``None`` elsewhere (``TypeError``
    otherwise), at least one target, and no two targets with the same path (``ValueError``).
    ``what`` names the tree in the messages.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> [p for p, _ in check_lora(lora)]
    ['w']
    >>> check_lora({"w": jnp.ones(2)}, "like")
    Traceback (most recent call last):
    ...
    TypeError: like must hold lj.LoraWeight at targets and None elsewhere, as lj.split returns; found other leaves at w (ArrayImpl)
    """
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_node)[0]
    others = [f"{path_str(p)} ({type(x).__name__})" for p, x in leaves if not is_node(x)]
    if others:
        raise TypeError(
            f"{what} must hold lj.LoraWeight at targets and None elsewhere, as lj.split returns; "
            f"found other leaves at {fmt_paths(others, 8)}"
        )
    found = targets(lora)
    if not found:
        raise ValueError(f"{what} holds no lj.LoraWeight; pass the lora tree returned by lj.split")
    dup = [p for p, n in collections.Counter(p for p, _ in found).items() if n > 1]
    if dup:
        raise ValueError(
            f"{what}: several targets share the path {dup}; key names containing '/' make "
            "paths ambiguous, rename those keys"
        )
    return found


def encode(lora: Any, config: LoraConfig | None = None) -> tuple[dict, list[dict]]:
    """The metadata of ``lora`` (and ``config``) and the factors to store beside it.

    Returns ``(metadata, [{"a": A, "b": B}, ...])`` with one factor pair per target, in the
    order of ``metadata["targets"]``. The factors must be arrays (not ``ShapeDtypeStruct``).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> meta, arrays = encode(lora)
    >>> meta["format"], [t["path"] for t in meta["targets"]], meta["targets"][0]["a"]
    ('lora_jax.checkpoint/1', ['w'], {'shape': [2, 4], 'dtype': 'float32'})
    >>> meta["structure"]
    {'dict': [['b', None], ['w', {'target': 0}]]}
    """
    stack = _stack_section(lora)
    lams = _lams(lora)
    lora = plain_form(lora)
    found = check_lora(lora)
    entries = [_entry(path, w) for path, w in found]
    for e in entries:
        if e["path"] in lams:
            e["lam"] = dict(shape=list(np.shape(lams[e["path"]])), dtype=np.dtype(lams[e["path"]].dtype).name)
    structure, why = _structure(lora, [w for _, w in found])
    meta = dict(
        format=FORMAT,
        library_version=__version__,
        targets=entries,
        structure=structure,
        structure_note=why,
        config=_config_json(config),
    )
    if stack is not None:
        meta["stack"] = stack
    arrays = [stored_arrays(w) for _, w in found]
    for (path, _), x in zip(found, arrays):
        if path in lams:
            x["lam"] = lams[path]
    return meta, arrays


def _lams(lora: Any) -> dict:
    """``{path: λ}`` of the AdaLoRA adapters in ``lora``."""
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=lambda x: is_node(x) or is_adalora(x))[0]
    return {path_str(p): w.lam for p, w in leaves if is_adalora(w)}


def plain_form(lora: Any) -> Any:
    """``lora`` with each :class:`StackedLoraWeight` as the ``LoraWeight`` of its weight at
    the padded rank whose factors lead with the adapter axis, and each AdaLoRA adapter as
    the ``LoraWeight`` whose factors are its P and Q (the forms a checkpoint stores and
    checks; λ is stored beside them); plain trees as they are.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> w = plain_form(lj.stack([lora, lora, lora]))["w"]
    >>> w.rank, w.a.shape
    (2, (3, 2, 4))
    """
    def plain(w):
        if is_stacked(w):
            return template(w, w.a, w.b)
        if is_adalora(w):  # P and Q as the factors; λ is stored beside them
            return w.spec.replace(a=w.p, b=w.q)
        return w

    return jax.tree.map(plain, lora, is_leaf=lambda x: is_stacked_node(x) or is_adalora(x))


def _stack_section(lora: Any) -> list[dict] | None:
    """Each stacked adapter's own targets and numbers (None for a plain tree)."""
    nodes = stacked_targets(lora)
    if not nodes:
        return None
    plain = [p for p, _ in targets(lora)]
    if plain:
        raise TypeError(f"a stacked lora tree to save holds plain adapters too, at {fmt_paths(plain, 4)}; "
                        "save a tree from one lj.stack call, or the plain trees one by one")
    if len({w.n for _, w in nodes}) > 1:
        raise ValueError("the stacked adapters hold different numbers of adapters; save a tree from one lj.stack call")
    if any(isinstance(getattr(w, f), jax.core.Tracer) for _, w in nodes for f in PER_ADAPTER):
        raise TypeError("a stacked lora tree to save has traced per-adapter numbers; save concrete arrays")
    out = []
    for k in range(nodes[0][1].n):
        numbers = [(path, adapter_numbers(w, k)) for path, w in nodes]
        out.append(dict(targets=[dict(path=path, **n) for path, n in numbers if n is not None]))
    return out


def stored_arrays(w: LoraWeight) -> dict:
    """The arrays a checkpoint stores for adapter ``w``: ``a`` and ``b``, and ``m`` for DoRA.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),), dora=True))
    >>> sorted(stored_arrays(lora["w"]))
    ['a', 'b', 'm']
    """
    return {n: getattr(w, n) for n in ((*_FACTORS, "m") if w.is_dora else _FACTORS)}


def _entry(path: str, w: LoraWeight) -> dict:
    """The metadata of one target: its path, static fields and the shapes and dtypes of its
    stored arrays (:func:`stored_arrays`)."""
    arrays = stored_arrays(w)
    for name, x in arrays.items():
        if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "dtype"):
            raise TypeError(
                f"{path}: factor {name} is {type(x).__name__}, not an array; save concrete "
                "adapters (abstract trees are for restore(like=...))"
            )
    factor = lambda x: dict(shape=list(np.shape(x)), dtype=np.dtype(x.dtype).name)
    return dict(
        path=path,
        weight={f: _json_value(getattr(w, f)) for f in _STATIC},
        # The scale is stored as applied; a custom scaling callable cannot be rebuilt
        # from a file, so its adapters restore with this fixed scale.
        scale_fixed=w.scaling not in SCALINGS,
        **{n: factor(x) for n, x in arrays.items()},
    )


def _config_json(config: LoraConfig | None):
    if config is None:
        return None
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an lj.LoraConfig or None, got {type(config).__name__}")
    rules = []
    for r in config.rules:
        axes = None if r.axes is None else [list(g) for g in r.axes]
        rules.append(dict(pattern=r.pattern, rank=r.rank, alpha=r.alpha, axes=axes,
                          dropout=r.dropout, linear_only=r.linear_only, dora=r.dora))
    if isinstance(config.scaling, str):
        scaling = config.scaling
    else:  # a callable cannot be stored; its scales are stored per target
        scaling = {"custom": getattr(config.scaling, "__qualname__", type(config.scaling).__name__)}
    return dict(
        rules=rules,
        scaling=scaling,
        init=config.init,
        dropout=config.dropout,
        exclude=list(config.exclude),
        dtype=None if config.dtype is None else np.dtype(config.dtype).name,
        dora=config.dora,
        dora_detach=config.dora_detach,
    )


def _json_value(v):
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return v


def _from_json(v):
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v


# ---------------------------------------------------------------------------------------
# the containers of a lora tree <-> JSON


class _Unsupported(Exception):
    pass


def _structure(lora, weights):
    """The JSON structure of ``lora``, or ``(None, why)`` when it cannot be rebuilt exactly."""
    try:
        enc = _encode(lora, {id(w): i for i, w in enumerate(weights)})
    except _Unsupported as e:
        return None, str(e)
    try:
        rebuilt = _decode(json.loads(json.dumps(enc)), weights)
    except Exception as e:  # noqa: BLE001 - any failure to rebuild means: restore needs like=
        return None, f"rebuilding the containers failed ({type(e).__name__}: {e})"
    if jax.tree.structure(rebuilt, is_leaf=is_node) != jax.tree.structure(lora, is_leaf=is_node):
        return None, "the rebuilt containers differ from the original"
    return enc, None


def _encode(node, index: dict[int, int]):
    """JSON form of the containers of a lora tree; LoraWeight -> {"target": i}."""
    if node is None:
        return None
    if is_lora(node):
        return {"target": index[id(node)]}
    if isinstance(node, nnx.Variable):
        return _encode_variable(node, index)
    kinds = ((nnx.State, "nnx_state"), (FrozenDict, "frozen_dict"))
    for cls, name in kinds:
        if type(node) is cls:
            items = node.raw_mapping.items() if cls is nnx.State else node.items()
            return {name: _encode_items(items, index)}
    if type(node) is dict:
        return {"dict": _encode_items(node.items(), index)}
    if type(node) in (list, tuple):
        return {type(node).__name__: [_encode(x, index) for x in node]}
    raise _Unsupported(f"container {type(node).__qualname__}")


def _encode_variable(node: nnx.Variable, index: dict[int, int]):
    cls = type(node)
    if getattr(nnx, cls.__name__, None) is not cls:
        raise _Unsupported(f"NNX variable type {cls.__qualname__} is not one of flax.nnx's")
    meta = node.get_metadata()
    try:
        json.dumps(meta)
    except TypeError:
        raise _Unsupported(f"metadata of an nnx.{cls.__name__} is not JSON") from None
    # the raw value is the variable's pytree child (get_value may apply hooks)
    value = node.get_raw_value() if hasattr(node, "get_raw_value") else node.value
    return {"nnx_variable": cls.__name__, "metadata": meta, "value": _encode(value, index)}


def _encode_items(items, index):
    out = []
    for k, v in items:
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise _Unsupported(f"dict key {k!r}")
        out.append([k, _encode(v, index)])
    return out


def _decode(node, weights: Sequence[LoraWeight]):
    if node is None:
        return None
    (kind,) = (k for k in node if k not in ("metadata", "value"))
    if kind == "target":
        return weights[node["target"]]
    if kind == "nnx_variable":
        cls = getattr(nnx, node["nnx_variable"], None)
        if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
            raise ValueError(f"unknown NNX variable type {node['nnx_variable']!r} in checkpoint metadata")
        # JSON turns tuples (e.g. out_sharding's axis names) into lists: back to tuples, as
        # for the LoraWeight fields; the trial rebuild at save time checks the result
        metadata = {k: _from_json(v) for k, v in node["metadata"].items()}
        return _variable(cls, _decode(node["value"], weights), metadata)
    if kind in ("dict", "frozen_dict", "nnx_state"):
        d = {k: _decode(v, weights) for k, v in node[kind]}
        return {"dict": d, "frozen_dict": FrozenDict(d), "nnx_state": nnx.State(d)}[kind]
    if kind in ("list", "tuple"):
        items = [_decode(x, weights) for x in node[kind]]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown container {kind!r} in checkpoint metadata")


def _variable(cls, value, metadata: dict):
    """An ``nnx.Variable`` holding ``value`` with exactly ``metadata``, without side effects.

    The constructor would run creation hooks and, for variables annotated with a sharding
    (``nnx.with_partitioning``), shard the value eagerly, which fails on a ``LoraWeight``
    or ``None`` value; ``from_metadata`` (what flax's own unflattening uses) does neither.
    """
    if hasattr(cls, "from_metadata") and "hijax" in metadata:
        return cls.from_metadata(value, metadata)
    return cls(value, **{**metadata, "eager_sharding": False})


# ---------------------------------------------------------------------------------------
# metadata read back -> lora tree


def check_format(meta: Any, where) -> dict:
    """``meta`` when it is metadata of this format; a ``ValueError`` naming ``where`` otherwise.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> check_format(encode(lora)[0], "adapter")["format"]
    'lora_jax.checkpoint/1'
    >>> check_format({"format": "other/2"}, "adapter")
    Traceback (most recent call last):
    ...
    ValueError: adapter: metadata format 'other/2' is not 'lora_jax.checkpoint/1'; it was written by another program or library version
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{where}: metadata format {meta.get('format') if isinstance(meta, dict) else meta!r} "
            f"is not {FORMAT!r}; it was written by another program or library version"
        )
    _Check(where).meta(meta)
    return meta


# ---------------------------------------------------------------------------------------
# the schema of metadata read back

_KINDS = ("linear", "conv", "embed")
_MAX_DEPTH = 64  # containers nested deeper than any parameter tree


class _Check:
    """Checks metadata against its schema and against itself; each failure a ``ValueError``
    naming the checkpoint, the field, what it holds and what it should hold."""

    def __init__(self, where):
        self.where = where

    def fail(self, field: str, value: Any, wants: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(
            f"{self.where}: the adapter metadata is damaged: {field} is {shown}, expected {wants}; "
            "the checkpoint cannot be trusted: save the adapter again (lj.checkpoint.save)"
        )

    def field(self, d: dict, key: str, field: str, ok, wants: str):
        if key not in d:
            self.fail(field, "missing", wants)
        if not ok(d[key]):
            self.fail(field, d[key], wants)
        return d[key]

    def meta(self, meta: dict) -> None:
        for key, ok, wants in (("library_version", _is_str, "a string"), ("structure_note", _opt_str, "a string or null"),
                               ("config", _opt_dict, "an object or null")):
            if key in meta and not ok(meta[key]):
                self.fail(key, meta[key], wants)
        entries = self.field(meta, "targets", "targets", lambda v: isinstance(v, list) and v != [],
                             "a non-empty list of targets")
        if "stack" in meta and not (isinstance(meta["stack"], list) and meta["stack"]):
            self.fail("stack", meta["stack"], "a non-empty list with one object per stacked adapter")
        n = len(meta["stack"]) if "stack" in meta else None
        paths = [self.target(e, f"targets[{i}]", n) for i, e in enumerate(entries)]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            self.fail("targets", dup, "each path once")
        if "stack" in meta:
            self.stack(meta["stack"], {e["path"]: e["weight"]["rank"] for e in entries})
        if "structure" not in meta:
            self.fail("structure", "missing", "the containers of the lora tree, or null")
        if meta["structure"] is not None:
            used = []
            self.node(meta["structure"], "structure", len(entries), used, 0)
            if sorted(used) != list(range(len(entries))):
                self.fail("structure", f"targets {sorted(used)}", f"each of the {len(entries)} targets once")

    def stack(self, stack: list, r_max: dict) -> None:
        for k, adapter in enumerate(stack):
            if not isinstance(adapter, dict):
                self.fail(f"stack[{k}]", adapter, "an object with targets")
            entries = self.field(adapter, "targets", f"stack[{k}].targets", lambda v: isinstance(v, list),
                                 "a list of the adapter's targets")
            for e in entries:
                field = f"stack[{k}].targets"
                if not isinstance(e, dict):
                    self.fail(field, e, "objects with path, rank, alpha, scale, scaling and dropout")
                path = self.field(e, "path", f"{field}.path", lambda v: v in r_max, f"one of the targets {sorted(r_max)}")
                field = f"stack[{k}].targets[{path!r}]"
                self.field(e, "rank", f"{field}.rank", lambda v: _is_int(v) and 1 <= v <= r_max[path],
                           f"an int in 1..{r_max[path]} (the stack's padded rank)")
                self.field(e, "alpha", f"{field}.alpha", lambda v: _is_num(v) and v > 0, "a finite number > 0")
                self.field(e, "scale", f"{field}.scale", _is_num, "a finite number")
                self.field(e, "scaling", f"{field}.scaling", _is_str, "the scaling rule's name")
                self.field(e, "dropout", f"{field}.dropout", lambda v: _is_num(v) and 0 <= v < 1, "a rate in [0, 1)")

    def target(self, e: Any, field: str, n: int | None = None) -> str:
        if not isinstance(e, dict):
            self.fail(field, e, "an object with path, weight, scale_fixed, a and b")
        path = self.field(e, "path", f"{field}.path", _is_str, "the target's path (a string)")
        field = f"targets[{path!r}]"
        w = self.field(e, "weight", f"{field}.weight", lambda v: isinstance(v, dict), "an object of LoraWeight fields")
        fixed = self.field(e, "scale_fixed", f"{field}.scale_fixed", lambda v: isinstance(v, bool), "true or false")
        f = lambda key, ok, wants: self.field(w, key, f"{field}.weight.{key}", ok, wants)
        shape = f("shape", lambda v: _int_list(v, 0), "a list of ints >= 0")
        f("dtype", _is_dtype, "a numpy dtype name")
        axes = [f(k, lambda v: _int_list(v, 0), "a list of axis numbers") for k in ("in_axes", "out_axes", "stack_axes")]
        if sorted(sum(axes, [])) != list(range(len(shape))) or not axes[0] or not axes[1]:
            self.fail(f"{field}.weight in_axes/out_axes/stack_axes", axes,
                      f"every axis of the {len(shape)}-dimensional weight once, with input and output axes")
        rank = f("rank", lambda v: _is_int(v) and v >= 1, "an int >= 1")
        alpha = f("alpha", lambda v: _is_num(v) and v > 0, "a finite number > 0")
        scale = f("scale", lambda v: _is_num(v) and v > 0, "a finite number > 0")
        scaling = f("scaling", _is_str, "the scaling rule's name")
        f("dropout", lambda v: _is_num(v) and 0 <= v < 1, "a rate in [0, 1)")
        f("kind", lambda v: v in _KINDS, f"one of {_KINDS}")
        f("rule", _is_str, "the rule's pattern (a string)")
        if "dora_detach" in w:
            f("dora_detach", lambda v: isinstance(v, bool), "true or false")
        if fixed != (scaling not in SCALINGS):
            self.fail(f"{field}.scale_fixed", fixed, f"{not fixed} for the scaling rule {scaling!r}")
        if not fixed:
            want = SCALINGS[scaling](alpha, rank)
            if not np.isclose(scale, want, rtol=1e-6, atol=0):
                self.fail(f"{field}.weight.scale", scale, f"{want:g} ({scaling} scaling of alpha {alpha:g} at rank {rank})")
        stack = [shape[i] for i in axes[2]]
        for name, group in (("a", axes[0]), ("b", axes[1])):
            spec = self.field(e, name, f"{field}.{name}", lambda v: isinstance(v, dict), "an object with shape and dtype")
            want = [*([] if n is None else [n]), *stack, rank, *(shape[i] for i in group)]
            self.field(spec, "shape", f"{field}.{name}.shape", lambda v: v == want,
                       f"{want} (rank {rank} and weight shape {shape}" + ("" if n is None else f", {n} adapters") + ")")
            self.field(spec, "dtype", f"{field}.{name}.dtype", _is_float_dtype, "a float dtype name")
        if "lam" in e:  # an AdaLoRA adapter's λ: one value per layer and rank
            if n is not None:
                self.fail(f"{field}.lam", e["lam"], "no λ in a stacked checkpoint")
            spec = self.field(e, "lam", f"{field}.lam", lambda v: isinstance(v, dict), "an object with shape and dtype")
            want = [*stack, rank]
            self.field(spec, "shape", f"{field}.lam.shape", lambda v: v == want, f"{want} (rank {rank})")
            self.field(spec, "dtype", f"{field}.lam.dtype", _is_float_dtype, "a float dtype name")
        if "m" in e:  # a DoRA adapter's magnitude: W's stack and output axes
            if n is not None:
                self.fail(f"{field}.m", e["m"], "no DoRA magnitude in a stacked checkpoint")
            spec = self.field(e, "m", f"{field}.m", lambda v: isinstance(v, dict), "an object with shape and dtype")
            want = [*stack, *(shape[i] for i in axes[1])]
            self.field(spec, "shape", f"{field}.m.shape", lambda v: v == want, f"{want} (weight shape {shape})")
            self.field(spec, "dtype", f"{field}.m.dtype", _is_float_dtype, "a float dtype name")
        return path

    def node(self, node: Any, field: str, n: int, used: list, depth: int) -> None:
        if node is None:
            return
        if depth > _MAX_DEPTH:
            self.fail("structure", f"containers nested over {_MAX_DEPTH} levels deep", f"at most {_MAX_DEPTH} levels")
        kinds = [k for k in node if k not in ("metadata", "value")] if isinstance(node, dict) else []
        if len(kinds) != 1:
            self.fail(field, node, "null or an object with one container kind")
        kind, value = kinds[0], node[kinds[0]]
        if kind == "target":
            if not (_is_int(value) and 0 <= value < n):
                self.fail(f"{field}.target", value, f"a target number in [0, {n})")
            used.append(value)
        elif kind == "nnx_variable":
            if not (_is_str(value) and isinstance(node.get("metadata"), dict) and "value" in node):
                self.fail(field, node, "an NNX variable's type name, metadata and value")
            self.node(node["value"], f"{field}.value", n, used, depth + 1)
        elif kind in ("dict", "frozen_dict", "nnx_state"):
            if not (isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 and _is_key(kv[0]) for kv in value)):
                self.fail(f"{field}.{kind}", value, "a list of [key, value] pairs")
            for k, v in value:
                self.node(v, f"{field}/{k}", n, used, depth + 1)
        elif kind in ("list", "tuple"):
            if not isinstance(value, list):
                self.fail(f"{field}.{kind}", value, "a list")
            for i, v in enumerate(value):
                self.node(v, f"{field}/{i}", n, used, depth + 1)
        else:
            self.fail(field, kind, "a container kind (dict, frozen_dict, nnx_state, nnx_variable, list, tuple, target)")


def _is_str(v) -> bool:
    return isinstance(v, str)


def _opt_str(v) -> bool:
    return v is None or isinstance(v, str)


def _opt_dict(v) -> bool:
    return v is None or isinstance(v, dict)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_key(v) -> bool:
    return _is_int(v) or isinstance(v, str)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _int_list(v, low: int) -> bool:
    return isinstance(v, list) and all(_is_int(x) and x >= low for x in v)


def _is_dtype(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        np.dtype(v)
    except (TypeError, ValueError):
        return False
    return True


def _is_float_dtype(v) -> bool:
    return _is_dtype(v) and bool(jax.numpy.issubdtype(np.dtype(v), jax.numpy.floating))


def abstract_weights(meta: dict) -> list[LoraWeight]:
    """Every target's ``LoraWeight`` with ``jax.ShapeDtypeStruct`` factors of the stored
    shapes and dtypes (no sharding), in the order of ``meta["targets"]``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> w, = abstract_weights(encode(lora)[0])
    >>> w.rank, w.a
    (2, ShapeDtypeStruct(shape=(2, 4), dtype=float32))
    """
    spec = lambda f: jax.ShapeDtypeStruct(tuple(f["shape"]), np.dtype(f["dtype"]))
    return [_weight(e, spec(e["a"]), spec(e["b"]), spec(e["m"]) if "m" in e else None) for e in meta["targets"]]


def restore_targets(meta: dict, like: Any, where) -> list[LoraWeight]:
    """The adapters whose factors a restore reads, in the order of ``meta["targets"]``.

    With ``like``, its adapters, checked to have the stored targets and factor shapes;
    without, :func:`abstract_weights`, when the stored structure can rebuild the tree.
    Each mismatch is a ``ValueError`` naming ``where``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> meta = encode(lora)[0]
    >>> [w.a.shape for w in restore_targets(meta, None, "adapter")]
    [(2, 4)]
    >>> restore_targets(meta, {"w": None, "b": None}, "adapter")
    Traceback (most recent call last):
    ...
    ValueError: like holds no lj.LoraWeight; pass the lora tree returned by lj.split
    """
    if like is not None:
        if ("stack" in meta) != any(is_stacked(x) for x in jax.tree.leaves(like, is_leaf=is_stacked_node)):
            kind = "a stacked tree (lj.stack)" if "stack" in meta else "a plain lora tree"
            raise ValueError(f"like does not match the adapter checkpoint {where}: it holds {kind}, so like must "
                             "be one too (jax.eval_shape of how it was made gives an abstract one)")
        return _check_like(meta, plain_form(like), where)
    if meta.get("structure") is None:
        raise ValueError(
            f"the lora tree saved at {where} had containers that cannot be rebuilt from "
            f"metadata ({meta.get('structure_note')}); pass like= (the lora tree, or "
            "jax.eval_shape of the lj.split that made it)"
        )
    return abstract_weights(meta)


def _check_like(meta: dict, like: Any, where) -> list[LoraWeight]:
    entries, found = meta["targets"], check_lora(like, "like")
    saved, got = [e["path"] for e in entries], [p for p, _ in found]
    if saved != got:
        missing = [p for p in saved if p not in got]
        unexpected = [p for p in got if p not in saved]
        raise ValueError(
            f"like does not match the adapter checkpoint {where}: targets in the checkpoint "
            f"but not in like: {missing or 'none'}; in like but not in the checkpoint: "
            f"{unexpected or 'none'}. Build like from the same lj.split (jax.eval_shape "
            "gives an abstract one)"
        )
    problems = []
    for e, (p, w) in zip(entries, found):
        for name in _FACTORS:
            want, have = tuple(e[name]["shape"]), tuple(np.shape(getattr(w, name)))
            if want != have:
                problems.append(f"{p}: factor {name} is {want} in the checkpoint but {have} in like")
        if ("m" in e) != w.is_dora:
            problems.append(f"{p}: the checkpoint's adapter is {'a DoRA' if 'm' in e else 'a plain LoRA'} adapter "
                            f"but like's is {'a DoRA' if w.is_dora else 'a plain LoRA'} one (split like with "
                            f"dora={'m' in e})")
        elif w.is_dora and tuple(e["m"]["shape"]) != tuple(np.shape(w.m)):
            problems.append(f"{p}: the DoRA magnitude m is {tuple(e['m']['shape'])} in the checkpoint but "
                            f"{tuple(np.shape(w.m))} in like")
    if problems:
        raise ValueError(
            f"like does not fit the adapter checkpoint {where}: " + "; ".join(problems)
            + ". like must come from a split with the same ranks and weight shapes"
        )
    return [w for _, w in found]


def rebuild(meta: dict, arrays: Sequence[dict], like: Any = None) -> Any:
    """The lora tree of the restored factors ``arrays`` (``{"a", "b"}`` per target, in the
    order of ``meta["targets"]``): in ``like``'s containers, or in the stored structure.
    The static fields of every ``LoraWeight`` come from ``meta``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> meta, arrays = encode(lora)
    >>> back = rebuild(meta, arrays)
    >>> back["b"], back["w"].rank, back["w"].a is lora["w"].a
    (None, 2, True)
    """
    weights = [_weight(e, x["a"], x["b"], x.get("m")) for e, x in zip(meta["targets"], arrays)]
    if "stack" in meta:
        weights = _stacked_weights(meta, weights)
    weights = [AdaLoraWeight.of(w, p=w.a, lam=x["lam"], q=w.b) if "lam" in e else w
               for e, w, x in zip(meta["targets"], weights, arrays)]
    if like is None:
        return _decode(meta["structure"], weights)
    leaves, treedef = jax.tree.flatten(like, is_leaf=lambda x: is_stacked_node(x) or is_adalora(x))
    it = iter(weights)
    return jax.tree.unflatten(treedef, [next(it) if x is not None else None for x in leaves])


def lam_specs(meta: dict, like: Any) -> list:
    """Per stored target, the ``jax.ShapeDtypeStruct`` its λ restores to (like's λ, with
    its sharding, when ``like`` is given), or None for a target without λ.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, ada = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lam_specs(encode(ada)[0], None)
    [ShapeDtypeStruct(shape=(2,), dtype=float32)]
    """
    if like is not None:
        lams = _lams(like)
        return [None if "lam" not in e else lams.get(e["path"]) for e in meta["targets"]]
    return [None if "lam" not in e else jax.ShapeDtypeStruct(tuple(e["lam"]["shape"]), np.dtype(e["lam"]["dtype"]))
            for e in meta["targets"]]


def _stacked_weights(meta: dict, weights: list[LoraWeight]) -> list[StackedLoraWeight]:
    """The stored targets (at the padded rank, factors leading with the adapters) as
    :class:`StackedLoraWeight` with each adapter's numbers from ``meta["stack"]``."""
    stack = meta["stack"]
    index = {e["path"]: i for i, e in enumerate(meta["targets"])}
    data = [{f: np.zeros(len(stack), np.float64) for f in PER_ADAPTER} for _ in weights]
    for k, adapter in enumerate(stack):
        for e in adapter["targets"]:
            for f in data[index[e["path"]]]:
                data[index[e["path"]]][f][k] = e[f]
    return [StackedLoraWeight(w.a, w.b, **d, shape=w.shape, dtype=w.dtype, in_axes=w.in_axes, out_axes=w.out_axes,
                              stack_axes=w.stack_axes, kind=w.kind) for w, d in zip(weights, data)]


def _weight(entry: dict, a, b, m=None) -> LoraWeight:
    fields = {k: _from_json(v) for k, v in entry["weight"].items() if k in _STATIC}
    return LoraWeight(a=a, b=b, m=m, **fields)
