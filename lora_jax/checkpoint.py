"""Orbax checkpoints: adapters with their metadata, merged models, and training state.

An adapter checkpoint is an orbax composite checkpoint directory with two items::

    path/
      lora/        the factors A and B of every target (orbax PyTree, a list of {"a", "b"})
      lora_jax/    JSON metadata (:mod:`lora_jax.metadata`): every target's path, shape,
                   dtype, axes, rank, alpha, scale, scaling rule, dropout, kind and rule;
                   the config; the container structure of the lora tree; the library version

so :func:`restore` rebuilds the exact lora tree (every ``LoraWeight`` static field) from
the directory alone. Orbax writes into a temporary directory and renames it into place
when everything is on disk, so an interrupted save never leaves a checkpoint at ``path``
that restores; :func:`restore` refuses orbax's unfinished temporary directories.

:func:`merge` turns a base checkpoint plus an adapter into a plain orbax checkpoint of the
merged parameters, and :class:`Manager` keeps training checkpoints (lora, optimizer
state, step) with ``orbax.checkpoint.CheckpointManager``.

This is the only module of the library that imports orbax.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import uuid
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .config import LoraConfig, path_str
from .metadata import FORMAT, abstract_weights, check_format, encode, lam_specs, rebuild, restore_targets, stored_arrays
from . import quant
from .tree import check_fits, is_node, targets
from .tree import merge as _merge_trees

__all__ = ["save", "restore", "metadata", "merge", "save_params", "restore_params", "check_output", "Manager",
           "Restored", "FORMAT"]

_ARRAYS = "lora"  # orbax item holding the factors
_META = "lora_jax"  # orbax item holding the JSON metadata
_QUANTIZED = "lora_jax_quantized"  # custom metadata of a params checkpoint: its quantized weights
_OPT = "opt_state"  # orbax item holding the optimizer state (training checkpoints)
_PARTIAL_ITEM = "state"  # where an orbax partial save puts the tree


# ---------------------------------------------------------------------------------------
# paths, checkpointers, restore targets


def _path(path: str | os.PathLike) -> epath.Path:
    """``path`` as orbax wants it: local paths made absolute (``~`` expanded); URLs (gs://) kept."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _check_new(path: epath.Path, what: str):
    if path.exists():
        raise FileExistsError(
            f"{what} {path} already exists; write to a new directory (e.g. one per step) or "
            "delete the old one first"
        )


def check_output(out: str | os.PathLike, **inputs: str | os.PathLike) -> None:
    """A ``ValueError`` when the output directory ``out`` is one of the ``inputs`` (named by
    keyword) or lies inside one, comparing real paths (links and ``..`` resolved): writing
    there would change the checkpoint being read.

    >>> import os, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> check_output(os.path.join(tmp, "merged"), adapter=os.path.join(tmp, "adapter"))
    >>> check_output(os.path.join(tmp, "adapter", "merged"), adapter=os.path.join(tmp, "adapter"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the output .../adapter/merged is inside the adapter checkpoint .../adapter; writing there ...
    """
    text = os.fspath(out)
    if "://" in text:
        return
    real = os.path.realpath(os.path.expanduser(text))
    for name, path in inputs.items():
        if "://" in os.fspath(path):
            continue
        src = os.path.realpath(os.path.expanduser(os.fspath(path)))
        if real == src or real.startswith(src.rstrip(os.sep) + os.sep):
            where = "is" if real == src else "is inside"
            raise ValueError(
                f"the output {out} {where} the {name} checkpoint {path}; writing there would change "
                "the checkpoint being read: choose an output directory outside it"
            )


def _check_complete(path: epath.Path, what: str):
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{what} {path} is a file, not a checkpoint directory (orbax checkpoints are "
            "directories); pass the directory that lj.checkpoint.save or save_params wrote"
        )
    if not path.exists():
        partial = sorted(str(p) for p in path.parent.glob(path.name + ".orbax-checkpoint-tmp*"))
        hint = f"; an interrupted save left {partial}, which is incomplete" if partial else ""
        raise FileNotFoundError(f"{what} {path} does not exist{hint}")
    if not ocp.step.is_path_finalized(path):
        raise ValueError(
            f"{what} {path} is an unfinished orbax checkpoint (a save was interrupted); use "
            "the last complete checkpoint instead"
        )


def _is_damage(e: BaseException) -> bool:
    """Whether an error orbax raised while reading says the files are damaged (a checksum or
    decoding failure), rather than that the request did not fit them."""
    kinds = (KeyError, IndexError, UnicodeDecodeError, RecursionError, json.JSONDecodeError, NotImplementedError)
    return isinstance(e, kinds) or "DATA_LOSS" in str(e) or "Invalid JSON" in str(e)


@contextlib.contextmanager
def _reading(path: epath.Path, what: str):
    """Reading the checkpoint ``path``: damaged files become one ``ValueError`` that says so."""
    message = None
    hook = sys.unraisablehook
    try:
        yield
    except Exception as e:
        if not _is_damage(e):
            raise
        message = (f"{what} {path} is damaged: reading it failed a checksum or decoding check "
                   f"({type(e).__name__}: {str(e)[:300]}); restore it from a copy or write it again")
        # orbax leaves the other reads of the failed restore as coroutines that were never
        # awaited; they are freed with the error's frames, each reporting itself on stderr:
        # the error above says all there is to say
        sys.unraisablehook = lambda unraisable: None
    if message is not None:
        try:
            gc.collect()
        finally:
            sys.unraisablehook = hook
        raise ValueError(message)


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _read_meta(restore_fn, where) -> dict:
    """The checkpoint's metadata, checked against its schema (errors name its file)."""
    file = where / _META / "metadata"
    try:
        meta = restore_fn(ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        if not file.exists():
            raise _not_an_adapter(where, e) from None
        raise ValueError(
            f"{file}: the adapter metadata is damaged (not valid JSON: {type(e).__name__}: {str(e)[:200]}); "
            "the checkpoint cannot be trusted: save the adapter again (lj.checkpoint.save)"
        ) from None
    except (FileNotFoundError, KeyError) as e:
        raise _not_an_adapter(where, e) from None
    return check_format(meta, file)


def _not_an_adapter(where, e: Exception) -> ValueError:
    return ValueError(
        f"{where} is not a lora_jax adapter checkpoint (no readable '{_META}' metadata: {e}); "
        "adapters are written by lj.checkpoint.save or lj.checkpoint.Manager.save"
    )


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(x, sharding: jax.sharding.Sharding | None = None) -> jax.ShapeDtypeStruct:
    """What orbax restores ``x`` (an array, ``ShapeDtypeStruct`` or orbax array metadata) as:
    its shape and dtype, placed by ``sharding``, else by x's own jax sharding, else on the
    first local device."""
    own = getattr(x, "sharding", None)
    own = own if isinstance(own, jax.sharding.Sharding) else None
    sharding = sharding or own or _default_sharding()
    return jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype, sharding=sharding)


# ---------------------------------------------------------------------------------------
# save / restore


def save(path: str | os.PathLike, lora: Any, config: LoraConfig | None = None) -> None:
    """Save an adapter tree (arrays and metadata) as an orbax checkpoint at ``path``.

    Only A and B of each target are written (size on disk ~ the adapter's bytes); the
    JSON metadata beside them records every target's path, weight shape and dtype, axes,
    rank, alpha, the scale as applied, the scaling rule's name, dropout, kind and rule,
    plus ``config`` when given and the library version. A custom scaling callable cannot
    be stored: its targets are marked ``scale_fixed`` and restore with the stored scale.

    The write is atomic: orbax writes into a temporary sibling directory and renames it to
    ``path`` when complete, so an interrupted save leaves no checkpoint at ``path``.

    Args:
      path: a new directory (an existing one is an error: checkpoints are never
        overwritten in place).
      lora: the lora tree from :func:`lora_jax.split` (sharded arrays are fine).
      config: the :class:`lora_jax.LoraConfig` that made it, stored for reference.

    >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax import checkpoint
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),))
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, cfg)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> checkpoint.save(path, lora, cfg)
    >>> sorted(os.listdir(path))
    ['_CHECKPOINT_METADATA', 'commit_success.txt', 'lora', 'lora_jax']
    """
    path = _path(path)
    meta, arrays = encode(lora, config)
    _check_new(path, "checkpoint path")
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(**_adapter_items(meta, arrays)))


def _adapter_items(meta: dict, arrays: list) -> dict:
    """The orbax save arguments of an adapter's factors and metadata."""
    return {_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}


def metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an adapter checkpoint (no arrays are read).

    Keys: ``format``, ``library_version``, ``targets`` (one dict per target: ``path``,
    ``weight`` (the LoraWeight static fields), ``scale_fixed``, ``a``/``b`` shapes and
    dtypes), ``structure``, ``config``.

    >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax import checkpoint
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),), scaling="rslora")
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8))}, cfg)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> checkpoint.save(path, lora, cfg)
    >>> t = checkpoint.metadata(path)["targets"][0]
    >>> t["path"], t["weight"]["rank"], t["weight"]["scaling"], t["a"]["shape"]
    ('w', 2, 'rslora', [2, 8])
    """
    path = _path(path)
    _check_complete(path, "adapter checkpoint")
    with _checkpointer() as ckptr:
        return _read_meta(lambda args: ckptr.restore(path, args), path)


def _restore_lora(meta: dict, like: Any, restore_fn, where, extra: dict | None = None):
    """Rebuild the lora tree from ``meta``; returns ``(lora, other restored items)``."""
    _check_stored(meta, where)
    weights = restore_targets(meta, like, where)
    factors = [{**{n: _abstract(x) for n, x in stored_arrays(w).items()},
                **({} if lam is None else {"lam": _abstract(lam)})}
               for w, lam in zip(weights, lam_specs(meta, like))]
    extra = extra or {}
    with _reading(where, "adapter checkpoint"):
        out = restore_fn(ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(factors), **extra}))
    return rebuild(meta, out[_ARRAYS], like), {k: out[k] for k in extra}


def _check_stored(meta: dict, where) -> None:
    """A ``ValueError`` naming ``where`` when the factors stored beside the metadata differ
    from it in number, shape or dtype (orbax would cast them to what the metadata says)."""
    stored = _stored_tree(where / _ARRAYS, "adapter checkpoint's factors")
    try:
        got = [{n: (tuple(x[n].shape), np.dtype(x[n].dtype).name) for n in ("a", "b", "lam", "m")
                if n in ("a", "b") or n in x}
               for x in stored]
    except (TypeError, KeyError, AttributeError):
        raise ValueError(f"{where}: the stored factors ({where / _ARRAYS}) are not a list of {{'a', 'b'}} "
                         "arrays; the checkpoint is damaged: save the adapter again") from None
    want = [{n: (tuple(e[n]["shape"]), e[n]["dtype"]) for n in ("a", "b", "lam", "m") if n in e} for e in meta["targets"]]
    if len(got) != len(want):
        raise ValueError(f"{where}: the metadata lists {len(want)} targets but {len(got)} are stored; the "
                         "checkpoint is damaged: save the adapter again")
    for e, w, g in zip(meta["targets"], want, got):
        for n in sorted(w.keys() | g.keys()):
            if w.get(n) != g.get(n):
                said = "no such array" if n not in w else f"shape {w[n][0]} dtype {w[n][1]}"
                found = "missing" if n not in g else f"{g[n][0]} {g[n][1]}"
                raise ValueError(
                    f"{where}: target {e['path']!r}: the metadata gives factor {n} {said} but the stored array "
                    f"is {found}; the checkpoint is damaged: save the adapter again"
                )


def restore(path: str | os.PathLike, like: Any = None) -> Any:
    """Restore an adapter tree saved by :func:`save` (or a :class:`Manager` step).

    Without ``like`` the tree is rebuilt from the checkpoint alone (containers, every
    ``LoraWeight`` static field, factor dtypes) with its arrays on the first local device.
    With ``like`` (a lora tree of the same targets whose factors are arrays or
    ``jax.ShapeDtypeStruct``), the factors are restored with like's shardings and dtypes
    and the result takes like's containers; the static fields still come from the
    checkpoint.

    Raises:
      FileNotFoundError: no checkpoint at ``path`` (the message names any interrupted save).
      ValueError: an unfinished checkpoint, a directory that is not an adapter checkpoint,
        or a ``like`` whose targets or factor shapes differ (each path and both shapes named).

    >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np, lora_jax as lj
    >>> from lora_jax import checkpoint
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=4.0),))
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, cfg)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> checkpoint.save(path, lora)
    >>> back = checkpoint.restore(path)
    >>> back["b"], back["w"].scale, np.array_equal(back["w"].a, lora["w"].a)
    (None, 2.0, True)
    >>> mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    >>> rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    >>> like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), lora)
    >>> checkpoint.restore(path, like)["w"].a.sharding == rep
    True
    """
    path = _path(path)
    _check_complete(path, "adapter checkpoint")
    with _checkpointer() as ckptr:
        fn = lambda args: ckptr.restore(path, args)
        return _restore_lora(_read_meta(fn, path), like, fn, path)[0]


# ---------------------------------------------------------------------------------------
# plain parameter trees (a base model, a merged model)


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Save a plain parameter tree as an orbax PyTree checkpoint (what :func:`merge` reads).

    A quantized tree (:func:`lora_jax.quantize`) is stored exactly: each
    :class:`~lora_jax.QuantizedWeight`'s codes and scales as arrays, and its static fields
    (qtype, shape, dtype, block size, input axes) in the checkpoint's custom metadata, so
    :func:`restore_params` gives the quantized tree back (plain orbax gives the arrays).

    The directory must not exist yet; the save is atomic (written to a temporary name,
    then renamed). Plain ``orbax.checkpoint.StandardCheckpointer().restore(path)`` or
    :func:`restore_params` reads it back.

    >>> import os, tempfile, jax.numpy as jnp
    >>> path = os.path.join(tempfile.mkdtemp(), "base")
    >>> save_params(path, {"dense": {"kernel": jnp.ones((2, 3))}})
    >>> restore_params(path)["dense"]["kernel"].shape
    (2, 3)
    """
    path = _path(path)
    _check_new(path, "checkpoint")
    recorded = quant.records(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, custom_metadata={_QUANTIZED: recorded} if recorded else None)
        ckptr.wait_until_finished()


def restore_params(path: str | os.PathLike, like: Any = None) -> Any:
    """Restore a plain parameter tree saved by :func:`save_params`, :func:`merge` or orbax.

    Args:
      like: an abstract tree (``jax.eval_shape`` of the model's init, ``ShapeDtypeStruct``
        leaves, optionally with shardings) giving the structure, dtypes and placement; None
        restores the stored tree onto the default device.

    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> path = os.path.join(tempfile.mkdtemp(), "base")
    >>> save_params(path, {"w": jnp.arange(4.0)})
    >>> restore_params(path, like={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})["w"]
    Array([0., 1., 2., 3.], dtype=float32)
    """
    path = _path(path)
    _check_complete(path, "checkpoint")
    like = _stored_tree(path, "checkpoint") if like is None else jax.tree.map(_abstract, like)
    with ocp.StandardCheckpointer() as ckptr, _reading(path, "checkpoint"):
        return ckptr.restore(path, like)


# ---------------------------------------------------------------------------------------
# merge


def _stored_tree(base_dir: epath.Path, what: str = "base checkpoint"):
    """The tree of a plain orbax checkpoint as ``ShapeDtypeStruct`` leaves on the first
    local device, without reading arrays."""
    not_pytree = (
        f"{what} {base_dir} is not a plain orbax PyTree checkpoint (it has no {{}}); write it "
        "with orbax.checkpoint.StandardCheckpointer().save(dir, params), or pass the "
        "item directory inside a CheckpointManager step"
    )
    if not (base_dir / "_METADATA").exists():
        raise ValueError(not_pytree.format("_METADATA file"))
    # the handler itself, not StandardCheckpointer.metadata (which logs its errors and returns None)
    with _reading(base_dir, what):
        tree = ocp.PyTreeCheckpointHandler().metadata(base_dir)
    if tree is None:
        raise ValueError(not_pytree.format("tree metadata"))
    with ocp.StandardCheckpointer() as ckptr:  # (readable, as checked above) its quantized weights
        step = ckptr.metadata(base_dir)
    custom = (getattr(step, "custom_metadata", None) or {}) if step is not None else {}
    tree = jax.tree.map(_abstract, tree.tree if hasattr(tree, "tree") else tree)
    return quant.rebuild(tree, custom.get(_QUANTIZED), f"{what} {base_dir}")


def _shardings_for(abstract_tree, shardings):
    """A tree of shardings for ``abstract_tree``, from what :func:`merge` accepts."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        one = shardings or _default_sharding()
        return jax.tree.map(lambda _: one, abstract_tree)
    have = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    want = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]]
    missing = [p for p in want if p not in have]
    if missing or len(have) != len(want):  # (the lengths differ too when paths repeat)
        extra = sorted(set(have) - set(want))
        raise ValueError(
            f"shardings must be one jax.sharding.Sharding or a tree with a Sharding for every "
            f"leaf of the base checkpoint; missing: {missing[:8] or 'none'}, unknown: "
            f"{extra[:8] or 'none'}"
        )
    bad = [p for p in want if not isinstance(have[p], jax.sharding.Sharding)]
    if bad:
        raise TypeError(f"shardings at {bad[:8]} are not jax.sharding.Sharding objects")
    return jax.tree.unflatten(jax.tree.structure(abstract_tree), [have[p] for p in want])


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A fully replicated sharding over the devices of ``sharding``."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shardings: Any = None,
    *,
    stream: bool = True,
) -> list[str]:
    """Write a plain orbax checkpoint of the base parameters with the adapter merged in.

    ``base_dir`` is a plain orbax PyTree checkpoint of the parameter tree the adapter was
    made for (``orbax.checkpoint.StandardCheckpointer().save(base_dir, params)``);
    ``adapter_dir`` comes from :func:`save`. The adapter is checked against the base's
    stored shapes before any weight is read. The adapter's paths may carry a prefix the
    base's lack, or the reverse (``params/`` saved on one side only).

    The merge streams: the base is read, merged and written one group of leaves at a
    time, each group at most the largest weight's bytes (a weight is never split) and
    written before the next is read, so host memory peaks at a few copies of the largest
    weight (read, merged, orbax's write buffers) plus the adapter, whatever the model's
    size. Each group is restored alone (with ``shardings``: each process reads only its
    own shards), its targets merged under ``jit`` (float32 accumulation, the base
    donated, outputs keeping the base's shardings) and added to an orbax partial save in
    a temporary directory beside ``out_dir``, renamed to ``out_dir`` when everything is
    on disk: a merge that stops part-way leaves no ``out_dir``. The result is a plain
    orbax PyTree checkpoint that ``StandardCheckpointer`` restores into the original model.

    Whole-tree instead (the base restored at once, ~2x its bytes of memory): a base
    tree with containers other than string-keyed dicts (lists, tuples, empty dicts),
    ``stream=False``, and a quantized base (saved by :func:`save_params`), which is
    merged into its dequantized weights (one device) and written as a float checkpoint.

    Args:
      shardings: ``None`` (one local device), one ``jax.sharding.Sharding`` for every
        leaf, or a tree of shardings with the base's paths.
      stream: ``False`` restores, merges and saves the whole tree at once.

    Returns:
      the merged targets' paths.

    Raises:
      ValueError: an adapter target missing from the base under every path mapping
        tried (the mappings named), or a base weight of another shape (path and both
        shapes named).

    >>> import os, tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, lora_jax as lj
    >>> from lora_jax import checkpoint
    >>> params = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    >>> tmp = tempfile.mkdtemp()
    >>> with ocp.StandardCheckpointer() as ckptr:  # a plain orbax checkpoint of the params
    ...     ckptr.save(os.path.join(tmp, "base"), params)
    >>> base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lora = {"w": lora["w"].replace(b=jnp.ones((2, 8))), "b": None}
    >>> checkpoint.save(os.path.join(tmp, "adapter"), lora)
    >>> checkpoint.merge(os.path.join(tmp, "base"), os.path.join(tmp, "adapter"), os.path.join(tmp, "out"))
    ['w']
    >>> with ocp.StandardCheckpointer() as ckptr:  # plain orbax reads the merged parameters
    ...     merged = ckptr.restore(os.path.join(tmp, "out"))
    >>> bool(jnp.array_equal(merged["w"], lj.merge(base, lora)["w"]))
    True
    """
    base_dir, adapter_dir, out_dir = map(_path, (base_dir, adapter_dir, out_dir))
    check_output(out_dir, base=base_dir, adapter=adapter_dir)
    _check_complete(base_dir, "base checkpoint")
    _check_complete(adapter_dir, "adapter checkpoint")
    _check_new(out_dir, "output checkpoint")
    meta = metadata(adapter_dir)
    if "stack" in meta:
        raise ValueError(
            f"{adapter_dir} holds {len(meta['stack'])} stacked adapters (lj.stack); a merge takes one adapter: "
            "restore the stack, take lj.unstack(stacked)[k], save that with lj.checkpoint.save and merge it"
        )
    if any("lam" in e for e in meta["targets"]):
        raise ValueError(
            f"{adapter_dir} holds AdaLoRA adapters (P, λ, Q and no kept ranks); a merge takes a plain adapter: "
            "save lj.adalora.to_lora(lora, opt_state) with lj.checkpoint.save and merge that"
        )
    shapes = _stored_tree(base_dir)
    like = _fit_adapter(meta, shapes, adapter_dir, base_dir)  # shapes only: no weight is read yet
    merged = [p for p, _ in targets(like)]
    if quant.records(shapes):  # a quantized base: merged into its dequantized weights
        if shardings is not None:
            raise ValueError(
                f"base checkpoint {base_dir} holds quantized weights; merge it on one device "
                "(shardings=None): the merged float weights are written as a plain checkpoint"
            )
        lora = _restore_adapter(meta, like, None, adapter_dir)
        save_params(out_dir, _merge_trees(restore_params(base_dir, shapes), lora))
        return merged
    base_shardings = _shardings_for(shapes, shardings)
    lora = _restore_adapter(meta, like, base_shardings, adapter_dir)
    if stream and _plain_dicts(shapes):
        _merge_streamed(base_dir, shapes, lora, base_shardings, out_dir)
    else:
        save_params(out_dir, _merge_sharded(base_dir, shapes, lora, base_shardings))
    return merged


def _restore_adapter(meta: dict, like: Any, shardings: Any, adapter_dir: epath.Path) -> Any:
    """The adapter's factors restored into ``like`` (a lora tree of the base's structure and
    paths, which may differ from the stored ones by a prefix), replicated over each base
    weight's devices when ``shardings`` is given, else on the first local device."""
    _check_stored(meta, adapter_dir)
    found = targets(like)  # in the order of meta["targets"] (see _fit_adapter)
    placed = [w if shardings is None else jax.tree.map(lambda x, r=_replicated(s): _abstract(x, r), w)
              for (_, w), s in zip(found, _target_shardings(like, shardings))]
    factors = [{n: _abstract(x) for n, x in stored_arrays(w).items()} for w in placed]
    with _checkpointer() as ckptr, _reading(adapter_dir, "adapter checkpoint"):
        out = ckptr.restore(adapter_dir, ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(factors)}))
    return rebuild(meta, out[_ARRAYS], like)


def _target_shardings(like: Any, shardings: Any) -> list:
    """The base sharding of every target of ``like`` (None each when ``shardings`` is None)."""
    leaves = jax.tree.leaves(like, is_leaf=is_node)
    if shardings is None:
        return [None for w in leaves if w is not None]
    return [s for w, s in zip(leaves, jax.tree.leaves(shardings)) if w is not None]


def _fit_adapter(meta: dict, shapes: Any, adapter_dir, base_dir) -> Any:
    """The adapter as a lora tree of the base's structure (``ShapeDtypeStruct`` factors),
    checked against the base's stored shapes. The adapter's paths are mapped onto the
    base's as they are, else with one prefix added or removed (``params/`` saved on one
    side only); its targets keep the order of ``meta["targets"]``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=quant.is_quantized)
    base_paths = [path_str(p) for p, _ in flat]
    adapter_paths = [e["path"] for e in meta["targets"]]
    mapping, tried = _path_mapping(adapter_paths, base_paths)
    if mapping is None:
        unknown = [p for p in adapter_paths if p not in set(base_paths)]
        raise ValueError(
            f"the adapter {adapter_dir} has targets that are not in the base checkpoint "
            f"{base_dir}: {unknown[:8]}; base paths are {base_paths[:12]}"
            f"{' ...' if len(base_paths) > 12 else ''}. Tried the paths as they are and "
            f"{tried}; none fits every target. Save the base with the same tree the adapter "
            "was split from (e.g. the whole linen variables dict, with 'params')"
        )
    by_path = {mapping(p): w for p, w in zip(adapter_paths, abstract_weights(meta))}
    order = [p for p in base_paths if p in by_path]
    if order != [mapping(p) for p in adapter_paths]:  # (a prefix keeps the order of sorted keys)
        raise ValueError(f"the adapter {adapter_dir}'s targets map onto the base checkpoint {base_dir} "
                         f"in another order ({order[:4]} ...); save the base with the tree the adapter "
                         "was split from")
    like = jax.tree.unflatten(treedef, [by_path.get(p) for p in base_paths])
    check_fits(shapes, like)
    return like


def _path_mapping(adapter_paths: list[str], base_paths: list[str]):
    """How adapter paths name base paths: ``(function, description of what was tried)``;
    the function is None when neither the paths as they are, nor one prefix added to every
    adapter path, nor one prefix removed from every adapter path names base paths only."""
    have = set(base_paths)
    if all(p in have for p in adapter_paths):
        return (lambda p: p), ""
    first = adapter_paths[0]
    added = sorted({b[: -len(first)] for b in base_paths if b.endswith("/" + first)})
    removed = [first[: i + 1] for i, c in enumerate(first) if c == "/"]
    for prefix in added:  # the base has a prefix the adapter lacks
        if all(prefix + p in have for p in adapter_paths):
            return (lambda p, q=prefix: q + p), ""
    for prefix in removed:  # the adapter has a prefix the base lacks
        if all(p.startswith(prefix) and p[len(prefix):] in have for p in adapter_paths):
            return (lambda p, q=prefix: p[len(q):]), ""
    add = (f"adding one of the prefixes {added}" if added else
           f"adding a prefix (none to try: no base path ends with '/{first}')")
    remove = f"removing one of the prefixes {removed}" if removed else "removing a prefix (none to try)"
    return None, f"{add} or {remove} to every adapter path"


def _plain_dicts(tree: Any) -> bool:
    """Whether ``tree`` is nested dicts with string keys only (no lists, tuples or empty
    containers): what :func:`merge` writes one group of leaves at a time."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat or not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)
                           for path, _ in flat for k in path):
        return False
    return jax.tree.structure(_nested([path for path, _ in flat], [0] * len(flat))) == treedef


def _nested(paths: list, values: list) -> dict:
    """Nested dicts holding ``values`` at the dict-key ``paths``."""
    out: dict = {}
    for path, value in zip(paths, values):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k.key, {})
        node[path[-1].key] = value
    return out


def _at(tree: dict, path) -> Any:
    """The value of nested dicts ``tree`` at the dict-key ``path``."""
    for k in path:
        tree = tree[k.key]
    return tree


def _groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices packed into groups whose sizes add up to at most ``budget`` (first fit,
    largest first; a larger size is a group of its own), each group in index order.

    >>> _groups([4, 1, 4, 2, 1], 4)
    [[0], [2], [1, 3, 4]]
    """
    groups: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        fit = next((g for g, left in enumerate(room) if sizes[i] <= left), None)
        if fit is None:
            groups.append([])
            room.append(budget)
            fit = len(groups) - 1
        groups[fit].append(i)
        room[fit] -= sizes[i]
    return [sorted(g) for g in groups]


def _merge_streamed(base_dir: epath.Path, shapes: Any, lora: Any, shardings: Any, out_dir: epath.Path):
    """Write the merged checkpoint one group of leaves at a time (each group at most the
    largest weight's bytes): restore the group's leaves alone (each process its own shards),
    merge its targets under ``jit``, and add the group to an orbax partial save; the
    finished checkpoint is renamed to ``out_dir`` last."""
    from orbax.checkpoint.experimental.v1 import partial as ocp_partial

    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    paths = [p for p, _ in flat]
    leaves = [_abstract(x, s) for (_, x), s in zip(flat, jax.tree.leaves(shardings))]
    weights = jax.tree.leaves(lora, is_leaf=is_node)
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves]
    token = np.uint32(uuid.uuid4().int & 0xFFFFFFFF)  # one name on every process (process 0's)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    work = out_dir.parent / f"{out_dir.name}.orbax-checkpoint-tmp-merge-{int(token):08x}"
    staged = work / "checkpoint"
    jitted = {}  # one merge function per output sharding (each compiles once per shape)
    def merge_one(x, w, s):
        if s not in jitted:
            jitted[s] = jax.jit(_merge_trees, donate_argnums=0, out_shardings=s)
        return jitted[s](x, w)

    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            for group in _groups(sizes, max(sizes)):
                want = set(group)
                item = [leaves[i] if i in want else ocp.PLACEHOLDER for i in range(len(leaves))]
                args = [ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
                        if i in want else ocp.PLACEHOLDER for i, x in enumerate(leaves)]
                with _reading(base_dir, "base checkpoint"):
                    got = ckptr.restore(base_dir, ocp.args.PyTreeRestore(
                        item=_nested(paths, item), restore_args=_nested(paths, args)))
                got = [_at(got, paths[i]) for i in group]
                values = [x if weights[i] is None else merge_one(x, weights[i], leaves[i].sharding)
                          for i, x in zip(group, got)]
                del got
                # written before the next group is read: one group in memory at a time
                ocp_partial.save(staged, _nested([paths[i] for i in group], values))
                del values
        ocp_partial.finalize(staged)
        if jax.process_index() == 0:
            marker = staged / "commit_success.txt"  # (what marks a finished checkpoint on gs://)
            if marker.exists():
                marker.rename(staged / _PARTIAL_ITEM / marker.name)
            (staged / _PARTIAL_ITEM).rename(out_dir)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("lora_jax_merge_renamed")
    finally:
        if jax.process_index() == 0 and work.exists():
            work.rmtree()


def _merge_sharded(base_dir: epath.Path, shapes: Any, lora: Any, shardings: Any) -> Any:
    """The base restored with ``shardings`` and ``lora`` merged in under ``jit``; the base's
    buffers are donated to the result, which keeps the base's shardings."""
    with ocp.StandardCheckpointer() as ckptr, _reading(base_dir, "base checkpoint"):
        base = ckptr.restore(base_dir, jax.tree.map(_abstract, shapes, shardings))
    return jax.jit(_merge_trees, donate_argnums=0, out_shardings=shardings)(base, lora)


# ---------------------------------------------------------------------------------------
# training checkpoints


class Restored(NamedTuple):
    """What :meth:`Manager.restore` returns."""

    step: int
    lora: Any
    opt_state: Any


class Manager:
    """Training checkpoints (lora, optimizer state, step) on ``orbax.checkpoint.CheckpointManager``.

    Each step directory ``directory/<step>`` holds the adapter exactly as :func:`save`
    writes it (so :func:`restore` and :func:`merge` read it directly) plus the optimizer
    state's arrays. The newest ``max_to_keep`` steps are kept; saves are atomic, and an
    interrupted save is invisible to :meth:`latest_step` and removed by the next manager.

    Args:
      directory: where the step directories go (created if missing).
      max_to_keep: how many of the newest checkpoints to keep (``None``: all).
      async_save: write in a background thread after copying the arrays to host memory
        (call :meth:`wait_until_finished` or :meth:`close`, or use ``with``).

    >>> import tempfile, jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> from lora_jax import checkpoint
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8))},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> tx = optax.adam(1e-3)
    >>> directory = tempfile.mkdtemp()
    >>> with checkpoint.Manager(directory, max_to_keep=2) as mgr:
    ...     for step in range(1, 4):
    ...         mgr.save(step, lora, tx.init(lora))
    >>> with checkpoint.Manager(directory) as mgr:
    ...     mgr.all_steps(), mgr.latest_step()
    ...     step, lora2, opt = mgr.restore(opt_state=jax.eval_shape(tx.init, lora))
    ([2, 3], 3)
    >>> step, lora2["w"].rank, type(opt[0]).__name__
    (3, 2, 'ScaleByAdamState')
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = False,
    ):
        self.directory = _path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _ARRAYS: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
                _OPT: ocp.StandardCheckpointHandler(),
            },
        )

    def save(self, step: int, lora: Any, opt_state: Any = None, *, config: LoraConfig | None = None) -> None:
        """Save ``lora`` (and ``opt_state``, and ``config`` for reference) as step ``step``.

        The optimizer state is stored as its list of array leaves; :meth:`restore` puts
        them back into the structure of the ``opt_state`` it is given (a state without
        array leaves is not stored). Steps must increase: saving a step that is already on
        disk (``FileExistsError``) or one below the latest step (``ValueError``) is an
        error. Steps older than the newest ``max_to_keep`` are deleted.

        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> from lora_jax import checkpoint
        >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
        ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
        >>> with checkpoint.Manager(tempfile.mkdtemp(), max_to_keep=1) as mgr:
        ...     mgr.save(1, lora); mgr.save(2, lora)
        ...     mgr.all_steps()
        [2]
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        items = _adapter_items(*encode(lora, config))
        opt_leaves = list(jax.tree.leaves(opt_state))
        if opt_leaves:  # a state without arrays (e.g. optax.sgd's) has nothing to store
            items[_OPT] = ocp.args.StandardSave(opt_leaves)
        step = int(step)
        if step in self._mgr.all_steps():
            raise FileExistsError(
                f"step {step} already exists in {self.directory}; save each step once (after a "
                "restore, continue from restored.step + 1)"
            )
        latest = self._mgr.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(self._old_step(step, latest))
        if not self._mgr.save(step, args=ocp.args.Composite(**items)):
            raise ValueError(self._old_step(step, self._mgr.latest_step()))

    def _old_step(self, step: int, latest: int | None) -> str:
        return (
            f"step {step} was not saved: steps must increase, and the latest step in "
            f"{self.directory} is {latest}; save a step after {latest}, or start a new "
            "directory to train from an earlier step"
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none.

        >>> import tempfile
        >>> from lora_jax import checkpoint
        >>> checkpoint.Manager(tempfile.mkdtemp()).latest_step() is None
        True
        """
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step kept on disk, ascending.

        >>> import tempfile
        >>> from lora_jax import checkpoint
        >>> checkpoint.Manager(tempfile.mkdtemp()).all_steps()
        []
        """
        return sorted(self._mgr.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        """The directory of ``step`` (an adapter checkpoint for :func:`restore` / :func:`merge`).

        >>> import tempfile
        >>> from lora_jax import checkpoint
        >>> checkpoint.Manager(tempfile.mkdtemp()).step_dir(7).name
        '7'
        """
        return self.directory / str(step)

    def restore(self, step: int | None = None, *, lora: Any = None, opt_state: Any = None) -> Restored:
        """Restore a step (default: the latest) as ``Restored(step, lora, opt_state)``.

        ``lora`` (optional) is a like tree as in :func:`restore`: its shardings and dtypes
        are used. ``opt_state`` is an optimizer state of the right structure (concrete, or
        abstract from ``jax.eval_shape(tx.init, lora)``): its leaves are replaced by the
        stored arrays, restored with its shardings. Without it, ``opt_state`` comes back None;
        an ``opt_state`` without array leaves (e.g. ``optax.sgd``'s) comes back unchanged.

        Raises:
          FileNotFoundError: no checkpoint (or no such step) in the directory.
          ValueError: an ``opt_state`` whose leaves differ in number or shape from the
            stored ones, or a ``lora`` like tree that does not fit.

        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> from lora_jax import checkpoint
        >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
        ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
        >>> with checkpoint.Manager(tempfile.mkdtemp()) as mgr:
        ...     mgr.save(5, lora)
        ...     mgr.restore().step, mgr.restore().opt_state
        (5, None)
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._mgr.all_steps():
            raise FileNotFoundError(
                f"step {step} is not in {self.directory}; steps there: {self.all_steps()}"
            )
        fn = lambda args: self._mgr.restore(step, args=args)
        where = self.step_dir(step)
        meta = _read_meta(fn, where)
        extra = {}
        # an optimizer state without arrays (e.g. optax.sgd's) was not stored: it is returned as is
        opt_arrays = opt_state is not None and bool(jax.tree.leaves(opt_state))
        if opt_arrays:
            extra[_OPT] = ocp.args.StandardRestore(self._abstract_opt(step, opt_state, where))
        lora_out, rest = _restore_lora(meta, lora, fn, where, extra)
        opt = opt_state
        if opt_arrays:
            opt = jax.tree.unflatten(jax.tree.structure(opt_state), rest[_OPT])
        return Restored(int(step), lora_out, opt)

    def _abstract_opt(self, step, opt_state, where):
        leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state)
        item = self._mgr.item_metadata(step)
        stored = item.get(_OPT) if item is not None else None
        if stored is None:
            raise ValueError(f"{where} holds no optimizer state; restore without opt_state=")
        stored = list(stored)
        problems = []
        if len(stored) != len(leaves):
            problems.append(f"{len(stored)} stored leaves but opt_state has {len(leaves)}")
        else:
            for (p, x), m in zip(leaves, stored):
                if tuple(np.shape(x)) != tuple(m.shape):
                    problems.append(f"{path_str(p)}: stored {tuple(m.shape)}, opt_state {tuple(np.shape(x))}")
        if problems:
            raise ValueError(
                f"opt_state does not fit the optimizer state in {where}: " + "; ".join(problems[:8])
                + ". Pass tx.init(lora) (or jax.eval_shape of it) for the optimizer and adapters "
                "that were saved"
            )
        return [_abstract(x) for _, x in leaves]

    def wait_until_finished(self) -> None:
        """Block until a background (``async_save=True``) save is on disk.

        >>> import tempfile
        >>> from lora_jax import checkpoint
        >>> checkpoint.Manager(tempfile.mkdtemp()).wait_until_finished()
        """
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's resources.

        >>> import tempfile
        >>> from lora_jax import checkpoint
        >>> checkpoint.Manager(tempfile.mkdtemp()).close()
        """
        self._mgr.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
