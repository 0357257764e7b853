"""Quantized frozen weights: the :class:`QuantizedWeight` node and its codecs (NF4, int8, fp8).

A quantized weight keeps W's values as codes plus one scale per block of ``block_size``
consecutive inputs of one output (blocks run along W's input axes, the axes a matmul
contracts, as bitsandbytes does for torch's (out, in) weights):

* ``"nf4"``: the 16 NormalFloat-4 values of the QLoRA paper (Dettmers et al. 2023,
  Appendix E), the nearest to ``x / absmax`` per block; two codes per byte (the first in
  the high nibble); the scale is the block's absmax.
* ``"int8"``: symmetric absmax, ``round(127 · x / absmax)``; the scale is ``absmax / 127``.
* ``"fp8"``: float8 e4m3 values of ``x / scale`` with ``scale = absmax / 448``.

With double quantization the float32 block scales are quantized again: the mean is
subtracted and the rest is stored as int8 with one float32 scale per 256 block scales
(QLoRA's 0.5 -> 0.127 bits per parameter for NF4 at block size 64).

Layout: ``codes`` has W's non-input axes first (in W's order), then W's input axes
flattened (in W's order) and zero-padded to a whole number of blocks; ``scale`` has the
non-input axes and one entry per block. So slicing a stack (layer) axis of W slices the
codes and scales alike, and a sharded output axis shards them alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import path_str

__all__ = ["QTYPES", "NF4_VALUES", "QuantizedWeight", "is_quantized", "quantize_array", "dequantize",
           "records", "rebuild"]

QTYPES = ("nf4", "int8", "fp8")
SCALE_BLOCK = 256  # double quantization: block scales per second-level scale

#: The NF4 data type: QLoRA paper, Appendix E (the bitsandbytes table).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _static(default=None):
    return dataclasses.field(metadata=dict(static=True), default=default)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A frozen weight stored as block-quantized codes and scales (see the module docstring).

    Children (what orbax, sharding and ``jax.jit`` see): ``codes``, ``scale`` and, with
    double quantization, ``scale2`` (float32, one per 256 block scales) and ``offset`` (the
    float32 mean subtracted from the block scales). Static: ``qtype``, W's ``shape`` and
    ``dtype`` (a numpy dtype), ``block_size`` and W's ``in_axes`` (the axes the blocks run along).

    ``shape``, ``dtype`` and ``ndim`` describe W, so code that checks shapes sees the
    weight it stands for; :meth:`dequantize` gives W back (approximately).

    >>> import jax.numpy as jnp
    >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(64, 2), "int8", in_axes=(0,))
    >>> q.shape, q.codes.shape, q.scale.shape, str(q.codes.dtype)
    ((64, 2), (2, 64), (2, 1), 'int8')
    >>> float(jnp.abs(q.dequantize() - jnp.linspace(-1.0, 1.0, 128).reshape(64, 2)).max()) < 0.004
    True
    """

    codes: Any
    scale: Any
    scale2: Any = None
    offset: Any = None
    qtype: str = _static("nf4")
    shape: tuple[int, ...] = _static(())
    dtype: Any = _static(np.dtype("float32"))
    block_size: int = _static(64)
    in_axes: tuple[int, ...] = _static(())

    # -- what the weight looks like ----------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def row_axes(self) -> tuple[int, ...]:
        """W's axes that are not input axes (the codes' leading axes, in W's order)."""
        return tuple(d for d in range(self.ndim) if d not in self.in_axes)

    @property
    def n_in(self) -> int:
        return math.prod(self.shape[d] for d in self.in_axes)

    @property
    def double_quant(self) -> bool:
        return self.scale2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of codes and all scales."""
        return sum(math.prod(jnp.shape(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def replace(self, **kw) -> "QuantizedWeight":
        return dataclasses.replace(self, **kw)

    def abstract(self) -> jax.ShapeDtypeStruct:
        """The float weight this stands for, as a ``jax.ShapeDtypeStruct``."""
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))

    # -- values --------------------------------------------------------------------------------
    def block_scales(self) -> jax.Array:
        """The float32 block scales ``(*rows, n_blocks)`` (second level undone)."""
        if not self.double_quant:
            return jnp.asarray(self.scale, jnp.float32)
        shape = jnp.shape(self.scale)
        n = math.prod(shape)
        groups = -(-n // SCALE_BLOCK)
        c = jnp.pad(jnp.reshape(self.scale, (n,)), (0, groups * SCALE_BLOCK - n))
        s = c.reshape(groups, SCALE_BLOCK).astype(jnp.float32) * self.scale2[:, None]
        return (s.reshape(-1)[:n] + self.offset).reshape(shape)

    def single_level(self) -> "QuantizedWeight":
        """The same weight with float32 block scales (undoes double quantization)."""
        if not self.double_quant:
            return self
        return self.replace(scale=self.block_scales(), scale2=None, offset=None)

    def dequantize(self, after=None) -> jax.Array:
        """W from codes and scales, in W's shape, axis order and dtype (float32 math).

        No gradient flows to codes or scales: a quantized weight is frozen. ``after``, a
        float32 scalar that is exactly zero but computed from other values, makes the
        decoding wait for them, so a compiled program cannot decode ahead of the use.
        """
        return _dequantize(self, jnp.zeros((), jnp.float32) if after is None else after)

    def _dequantize(self, after) -> jax.Array:
        rows = tuple(self.shape[d] for d in self.row_axes)
        vals = _decode(self.qtype, self.codes, after)  # (*rows, n_pad) float32
        nb = vals.shape[-1] // self.block_size
        vals = vals.reshape(*rows, nb, self.block_size) * self.block_scales()[..., None]
        vals = vals.reshape(*rows, nb * self.block_size)[..., : self.n_in]
        w = vals.reshape(*rows, *(self.shape[d] for d in self.in_axes))
        w = jnp.transpose(w, np.argsort((*self.row_axes, *self.in_axes)))
        return lax.stop_gradient(w.astype(self.dtype))

    def layers(self) -> tuple["QuantizedWeight", dict]:
        """For stepping over W's leading axis (a scan over stacked layers): the static part of
        one step's weight, and the children to index along their axis 0 (single-level
        scales). The leading axis must not be an input axis."""
        if 0 in self.in_axes:
            raise ValueError(f"axis 0 of {self.shape} is an input axis (in_axes {self.in_axes}); only a "
                             "stack axis can be stepped over")
        one = self.single_level()
        step = self.replace(codes=None, scale=None, scale2=None, offset=None, shape=self.shape[1:],
                            in_axes=tuple(a - 1 for a in self.in_axes))
        return step, {"codes": one.codes, "scale": one.scale}


@jax.jit
def _dequantize(q: QuantizedWeight, after) -> jax.Array:
    return q._dequantize(after)


def is_quantized(x) -> bool:
    """True for a :class:`QuantizedWeight` (``is_leaf`` for quantized base trees).

    >>> is_quantized(quantize_array(jnp.ones((64, 4)), "int8", in_axes=(0,))), is_quantized(jnp.ones(3))
    (True, False)
    """
    return isinstance(x, QuantizedWeight)


# -- codecs -------------------------------------------------------------------------------------
def _encode(qtype: str, x):
    """(codes, scale) of blocks ``x`` (..., block) float32."""
    absmax = jnp.max(jnp.abs(x), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    if qtype == "nf4":
        mids = jnp.asarray((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
        idx = jnp.searchsorted(mids, x / safe, side="left").astype(jnp.uint8)
        idx = idx.reshape(*idx.shape[:-2], -1, 2)
        return (idx[..., 0] << 4) | idx[..., 1], absmax
    if qtype == "int8":
        q = jnp.clip(jnp.round(x / safe * 127.0), -127, 127).astype(jnp.int8)
        return q, absmax / 127.0
    scale = absmax / _FP8_MAX
    return _round_e4m3(x / jnp.where(scale > 0, scale, 1.0)[..., None]).astype(jnp.float8_e4m3fn), scale


def _round_e4m3(v):
    """``v`` (float32, |v| <= 448) rounded to the nearest float8 e4m3 value, ties to even
    (done here: XLA's own conversion may round twice, through float16)."""
    e = jnp.floor(jnp.log2(jnp.maximum(jnp.abs(v), 2.0**-6)))  # subnormals share 2^-6's spacing
    step = jnp.exp2(e - 3)  # 3 mantissa bits
    return jnp.clip(jnp.round(v / step) * step, -_FP8_MAX, _FP8_MAX)


def _decode(qtype: str, codes, after):
    """Float32 code values, ``(*rows, n_pad)``."""
    if qtype == "nf4":
        codes = codes + after.astype(codes.dtype)  # (exactly zero: see dequantize)
        # (..., n/2, 2) nibbles by one broadcast shift, high first, then a 16-entry lookup
        # (measured on XLA:CPU: 7x faster than a tree of selects, 1.6x than a per-byte table)
        shifts = jnp.array([4, 0], codes.dtype).reshape((1,) * codes.ndim + (2,))
        idx = ((codes[..., None] >> shifts) & 0xF).astype(jnp.int32)
        return jnp.asarray(NF4_VALUES)[idx].reshape(*codes.shape[:-1], -1)
    return codes.astype(jnp.float32) + after


def _double(scale):
    """(int8 codes like ``scale``, float32 per-256 scales, float32 offset)."""
    shape = scale.shape
    n = math.prod(shape)
    offset = jnp.mean(scale)
    groups = -(-n // SCALE_BLOCK)
    d = jnp.pad(scale.reshape(n) - offset, (0, groups * SCALE_BLOCK - n)).reshape(groups, SCALE_BLOCK)
    amax = jnp.max(jnp.abs(d), axis=-1)
    s2 = jnp.where(amax > 0, amax, 1.0) / 127.0
    c = jnp.clip(jnp.round(d / s2[:, None]), -127, 127).astype(jnp.int8)
    return c.reshape(-1)[:n].reshape(shape), s2.astype(jnp.float32), offset.astype(jnp.float32)


def check_qtype(qtype, block_size, where: str = "") -> None:
    """Raise for an unknown qtype or a block size the codec cannot use.

    >>> check_qtype("nf5", 64)
    Traceback (most recent call last):
    ...
    ValueError: qtype='nf5' is not a known quantization; use one of ('nf4', 'int8', 'fp8')
    """
    if qtype not in QTYPES:
        raise ValueError(f"{where}qtype={qtype!r} is not a known quantization; use one of {QTYPES}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"{where}block_size={block_size!r}; use an even int >= 2 (64 is QLoRA's)")


def quantize_array(w, qtype: str = "nf4", *, in_axes, block_size: int = 64, double_quant: bool = False,
                   path: str = "weight") -> QuantizedWeight:
    """Quantize one float array ``w`` in blocks along ``in_axes`` (see the module docstring).

    When the input axes' total size is not a multiple of ``block_size``, each output's
    inputs are padded with zeros to whole blocks (the padding dequantizes to zero and is
    dropped again).

    >>> import jax.numpy as jnp
    >>> w = jnp.arange(-64.0, 64.0).reshape(2, 64) / 64          # (out, in): blocks along axis 1
    >>> q = quantize_array(w, "nf4", in_axes=(1,))
    >>> q.codes.shape, str(q.codes.dtype), q.scale.tolist()
    ((2, 32), 'uint8', [[1.0], [0.984375]])
    """
    check_qtype(qtype, block_size, f"{path}: ")
    dtype = jnp.result_type(w)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{path}: dtype {dtype} cannot be quantized (only floating-point weights); "
                        "leave it out of the pattern")
    shape = tuple(jnp.shape(w))
    in_axes = tuple(sorted(int(d) % max(len(shape), 1) for d in in_axes))
    if not in_axes or len(set(in_axes)) != len(in_axes):
        raise ValueError(f"{path}: in_axes={in_axes} for shape {shape}; name each input axis once")
    codes, scale, scale2, offset = _quantize(w, qtype, in_axes, block_size, double_quant)
    return QuantizedWeight(codes=codes, scale=scale, scale2=scale2, offset=offset, qtype=qtype,
                           shape=shape, dtype=jnp.dtype(dtype), block_size=block_size, in_axes=in_axes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w, qtype, in_axes, block_size, double_quant):
    shape = w.shape
    rows = tuple(d for d in range(len(shape)) if d not in in_axes)
    n_in = math.prod(shape[d] for d in in_axes)
    n_pad = -(-n_in // block_size) * block_size
    x = jnp.transpose(jnp.asarray(w, jnp.float32), (*rows, *in_axes))
    x = x.reshape(*(shape[d] for d in rows), n_in)
    x = jnp.pad(x, [(0, 0)] * len(rows) + [(0, n_pad - n_in)])
    codes, scale = _encode(qtype, x.reshape(*x.shape[:-1], n_pad // block_size, block_size))
    codes = codes.reshape(*x.shape[:-1], -1)
    scale = scale.astype(jnp.float32)
    if not double_quant:
        return codes, scale, None, None
    return codes, *_double(scale)


def dequantize(tree: Any) -> Any:
    """``tree`` with every :class:`QuantizedWeight` replaced by its float weight.

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> qbase = lj.quantize({"kernel": jnp.full((64, 8), 0.5), "bias": jnp.ones(8)}, "int8")
    >>> float(lj.dequantize(qbase)["kernel"][0, 0]), lj.dequantize(qbase)["bias"].shape
    (0.5, (8,))
    """
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized)


# -- checkpoints: the static part as JSON ----------------------------------------------------
_CHILDREN = ("codes", "scale", "scale2", "offset")


def records(tree: Any) -> dict[str, dict]:
    """``{path: static fields}`` of every :class:`QuantizedWeight` in ``tree`` (JSON-able),
    what a checkpoint stores beside the arrays so they restore as quantized weights.

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> records(lj.quantize({"kernel": jnp.ones((64, 2))}, "int8"))["kernel"]["qtype"]
    'int8'
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return {path_str(p): dict(qtype=q.qtype, shape=list(q.shape), dtype=jnp.dtype(q.dtype).name,
                              block_size=q.block_size, in_axes=list(q.in_axes))
            for p, q in leaves if is_quantized(q)}


def rebuild(tree: Any, recorded: dict | None, where: str) -> Any:
    """``tree`` (as stored: a dict of codes and scales at each quantized path) with those
    dicts turned back into :class:`QuantizedWeight` nodes, checked against ``recorded``.

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> q = lj.quantize({"kernel": jnp.ones((64, 2))}, "int8")
    >>> stored = {"kernel": {"codes": q["kernel"].codes, "scale": q["kernel"].scale,
    ...                      "scale2": q["kernel"].scale2, "offset": q["kernel"].offset}}
    >>> rebuild(stored, records(q), "ckpt")["kernel"].shape
    (64, 2)
    """
    if not recorded:
        return tree
    if not isinstance(recorded, dict):
        raise ValueError(f"{where}: the quantization record is a {type(recorded).__name__}, not a "
                         "mapping of paths; the checkpoint's metadata is damaged")
    found: set = set()

    def node(x) -> bool:
        return isinstance(x, dict) and "codes" in x and set(x) <= set(_CHILDREN)

    def one(p, x):
        path = path_str(p)
        if not node(x) or path not in recorded:
            return x
        found.add(path)
        return _from_record(path, recorded[path], x, where)

    out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=node)
    missing = sorted(set(recorded) - found)
    if missing:
        raise ValueError(f"{where}: the metadata records quantized weights that the stored arrays "
                         f"lack: {', '.join(missing[:8])}; the checkpoint is damaged or incomplete")
    return out


def _from_record(path, rec, children: dict, where) -> QuantizedWeight:
    def bad(why):
        return ValueError(f"{where}: quantized weight {path}: {why}; the checkpoint's metadata is damaged")

    if not isinstance(rec, dict):
        raise bad(f"record is {rec!r}, not a mapping")
    try:
        qtype, block = rec["qtype"], rec["block_size"]
        shape, in_axes = tuple(rec["shape"]), tuple(rec["in_axes"])
        dtype = jnp.dtype(rec["dtype"])
    except (KeyError, TypeError) as e:
        raise bad(f"record {rec!r} lacks or mistypes {e}") from None
    if qtype not in QTYPES or not isinstance(block, int) or not all(isinstance(n, int) for n in (*shape, *in_axes)):
        raise bad(f"record {rec!r} has an unknown qtype or non-integer sizes")
    q = QuantizedWeight(**{k: children.get(k) for k in _CHILDREN}, qtype=qtype, shape=shape, dtype=dtype,
                        block_size=block, in_axes=in_axes)
    rows = tuple(shape[d] for d in q.row_axes if d < len(shape))
    n_pad = -(-q.n_in // block) * block if in_axes and max(in_axes) < len(shape) else -1
    want = (*rows, n_pad // 2 if qtype == "nf4" else n_pad)
    if tuple(jnp.shape(q.codes)) != want or tuple(jnp.shape(q.scale)) != (*rows, max(n_pad, 0) // block):
        raise bad(f"codes {tuple(jnp.shape(q.codes))} and scale {tuple(jnp.shape(q.scale))} do not fit "
                  f"shape {shape}, in_axes {in_axes}, block_size {block} (codes {want} expected)")
    return q
