"""The adapter pytree node: ``LoraWeight`` and the low-rank delta it stands for."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LoraWeight", "AdaLoraWeight", "StackedLoraWeight", "PER_ADAPTER", "is_lora", "is_adalora", "is_stacked"]


class _WeightAxes:
    """The weight's shape split by role, from the fields ``shape``, ``stack_axes``,
    ``in_axes`` and ``out_axes`` (shared by the adapter nodes)."""

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.stack_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.out_axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class LoraWeight(_WeightAxes):
    """The adapter of one weight W: arrays ``a`` and ``b`` plus static metadata.

    The adapted weight is ``W + scale * (a ⊗ b)``. The children (what ``jax.grad``,
    optimizers, orbax and sharding see) are only ``a`` and ``b`` (and ``m`` for DoRA);
    everything else is static aux data, so a ``LoraWeight`` carries all it needs to merge,
    export or shard itself without the model.

    DoRA (Liu et al. 2024, arXiv 2402.09353): with a magnitude ``m`` (not None) the adapted
    weight is ``m · V / ||V||`` with ``V = W + scale * (a ⊗ b)``, the norm taken over W's
    input axes for every stack and output entry (:meth:`dora_factor`).

    Layout (rank-major, fast on XLA:CPU): with W's axes split into ``stack_axes``,
    ``in_axes`` and ``out_axes``::

        a.shape == (*W.shape[stack_axes], rank, *W.shape[in_axes])
        b.shape == (*W.shape[stack_axes], rank, *W.shape[out_axes])

    Fields:
      a, b: the factors.
      m: DoRA's magnitude, shape ``(*W.shape[stack_axes], *W.shape[out_axes])``, or None
        (plain LoRA).
      shape: W's shape; dtype: W's dtype name.
      in_axes, out_axes, stack_axes: W's axes (non-negative ints).
      rank, alpha, scale: r, alpha and the scale s actually applied.
      scaling: name of the scaling rule that gave ``scale``.
      dropout: adapter-input dropout rate.
      kind: "linear", "conv" or "embed" (how the weight is used; embeddings init swapped).
      rule: the pattern of the rule that made this adapter.
      dora_detach: for DoRA, whether ``||V||`` is treated as a constant in the gradient
        (the paper's §4.3 and PEFT do so).

    >>> import jax.numpy as jnp
    >>> w = LoraWeight(a=jnp.ones((2, 3)), b=jnp.ones((2, 4)), shape=(3, 4), dtype="float32",
    ...                in_axes=(0,), out_axes=(1,), rank=2, alpha=4.0, scale=2.0)
    >>> w.delta().shape, float(w.delta()[0, 0])
    ((3, 4), 4.0)
    """

    a: Any
    b: Any
    m: Any = None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    out_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    stack_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    rank: int = dataclasses.field(metadata=dict(static=True), default=1)
    alpha: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    scaling: str = dataclasses.field(metadata=dict(static=True), default="lora")
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)
    kind: str = dataclasses.field(metadata=dict(static=True), default="linear")
    rule: str = dataclasses.field(metadata=dict(static=True), default="")
    dora_detach: bool = dataclasses.field(metadata=dict(static=True), default=True)

    # -- shapes -------------------------------------------------------------------------
    @property
    def a_shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, self.rank, *self.in_shape)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, self.rank, *self.out_shape)

    @property
    def m_shape(self) -> tuple[int, ...]:
        """The shape of DoRA's magnitude ``m``: W's stack and output axes."""
        return (*self.stack_shape, *self.out_shape)

    @property
    def is_dora(self) -> bool:
        """Whether this adapter has a DoRA magnitude ``m``."""
        return self.m is not None

    @property
    def num_params(self) -> int:
        """Trainable parameters of this adapter (a and b, and m for DoRA)."""
        return math.prod(self.a_shape) + math.prod(self.b_shape) + (math.prod(self.m_shape) if self.is_dora else 0)

    def replace(self, **kw) -> "LoraWeight":
        """A copy with some fields replaced (new factors after training, say).

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.zeros((1, 2)), b=jnp.zeros((1, 3)), shape=(2, 3), in_axes=(0,), out_axes=(1,))
        >>> w.replace(b=jnp.ones((1, 3))).delta().sum().item()
        0.0
        """
        return dataclasses.replace(self, **kw)

    # -- math -----------------------------------------------------------------------------
    def matrices(self, dtype=jnp.float32):
        """``a`` as (*stack, r, in) and ``b`` as (*stack, r, out), flattened, in ``dtype``.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.ones((2, 3, 4)), b=jnp.ones((2, 5)), shape=(3, 4, 5),
        ...                in_axes=(0, 1), out_axes=(2,), rank=2)
        >>> [m.shape for m in w.matrices()]
        [(2, 12), (2, 5)]
        """
        s = self.stack_shape
        a = jnp.reshape(self.a, (*s, self.rank, math.prod(self.in_shape))).astype(dtype)
        b = jnp.reshape(self.b, (*s, self.rank, math.prod(self.out_shape))).astype(dtype)
        return a, b

    def accumulation_dtype(self, *others):
        """float32, or wider when the factors or ``others`` are wider (float64 under x64).

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.ones((1, 2), jnp.bfloat16), b=jnp.ones((1, 2), jnp.bfloat16))
        >>> w.accumulation_dtype()
        dtype('float32')
        """
        return jnp.promote_types(jnp.result_type(self.a, self.b, *others), jnp.float32)

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """``scale * (a ⊗ b)`` in W's shape and axis order (float32 accumulation, or
        float64 when the factors are float64), cast to ``dtype``.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.ones((1, 2)), b=jnp.arange(3.0)[None], shape=(3, 2),
        ...                in_axes=(1,), out_axes=(0,), rank=1, scale=0.5)   # W stored (out, in)
        >>> w.delta().tolist()
        [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
        """
        a, b = self.matrices(self.accumulation_dtype())
        d = jnp.einsum("...ri,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
        d = (self.scale * d).reshape(*self.stack_shape, *self.in_shape, *self.out_shape)
        perm = (*self.stack_axes, *self.in_axes, *self.out_axes)
        return jnp.transpose(d, np.argsort(perm)).astype(dtype)

    def delta_norm(self) -> jax.Array:
        """``||scale * a ⊗ b||_F`` from the r×r Gram matrices, never forming a ⊗ b.

        For A (r, in) and B (r, out), ``||Aᵀ B||_F² = sum((A Aᵀ) ∘ (B Bᵀ))``; stacked
        adapters sum over the stack.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.ones((1, 4)), b=jnp.ones((1, 9)), shape=(4, 9),
        ...                in_axes=(0,), out_axes=(1,), rank=1, scale=2.0)
        >>> float(w.delta_norm())   # 2 * sqrt(4 * 9)
        12.0
        """
        a, b = self.matrices(self.accumulation_dtype())
        hi = jax.lax.Precision.HIGHEST
        ga = jnp.einsum("...ri,...si->...rs", a, a, precision=hi)
        gb = jnp.einsum("...ri,...si->...rs", b, b, precision=hi)
        sq = jnp.sum(ga * gb)
        return abs(self.scale) * jnp.sqrt(jnp.maximum(sq, 0.0))

    # -- DoRA -----------------------------------------------------------------------------
    def dora_norm_sq(self, w) -> jax.Array:
        """``||W + scale·a⊗b||²`` over W's input axes, shape :attr:`m_shape`, never forming
        ``a⊗b`` or any other value of W's size:
        ``||W||² + 2·scale·<W, a⊗b> + scale²·||a⊗b||²`` per stack and output entry, where
        the cross term needs only ``a·W`` (rank × out) and the last ``a·aᵀ`` (rank × rank).
        ``w`` is W in its own layout and dtype; the sums are float32 (or wider).

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.ones((1, 2)), b=jnp.array([[1.0, 0.0, 2.0]]), shape=(2, 3),
        ...                in_axes=(0,), out_axes=(1,), rank=1, scale=1.0)
        >>> W = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> w.dora_norm_sq(W).tolist()   # columns of W + a⊗b: (2, 1), (0, 1), (2, 2)
        [5.0, 1.0, 8.0]
        """
        acc = self.accumulation_dtype(w)
        wl = "abcdefghijklmnopstuvwxyz"[: len(self.shape)]  # (r and q are the ranks)
        s = "".join(wl[d] for d in self.stack_axes)
        i = "".join(wl[d] for d in self.in_axes)
        o = "".join(wl[d] for d in self.out_axes)
        hi = dict(precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
        a, b = self.a.astype(acc), self.b.astype(acc)
        ww = jnp.einsum(f"{wl},{wl}->{s}{o}", w, w, **hi)
        aw = jnp.einsum(f"{s}r{i},{wl}->{s}r{o}", self.a.astype(jnp.result_type(w)), w, **hi)
        gram = jnp.einsum(f"{s}r{i},{s}q{i}->{s}rq", a, a, **hi)
        gb = jnp.einsum(f"{s}rq,{s}q{o}->{s}r{o}", gram, b, **hi)
        # (sums over the rank of rank x out products: as dot_generals batched over the
        # outputs they ran several times slower on XLA:CPU)
        r_axis = len(s)
        return ww + jnp.sum((2 * self.scale) * aw * b + self.scale ** 2 * gb * b, axis=r_axis)

    def dora_factor(self, w) -> jax.Array:
        """DoRA's per-output factor ``m / ||W + scale·a⊗b||`` (shape :attr:`m_shape`,
        float32 or wider): the adapted weight is ``(W + scale·a⊗b)`` times it along W's
        stack and output axes. The norm is detached from the gradient when
        :attr:`dora_detach`. An output whose weights are all zero (norm 0) gets the factor
        ``m`` (its adapted weights are zero whatever the factor), so nothing is NaN, in
        the value or the gradient.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.zeros((1, 2)), b=jnp.zeros((1, 2)), m=jnp.array([6.0, 0.0]),
        ...                shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
        >>> w.dora_factor(jnp.array([[3.0, 0.0], [4.0, 0.0]])).tolist()
        [1.2000000476837158, 0.0]
        """
        sq = self.dora_norm_sq(w)
        if self.dora_detach:
            sq = jax.lax.stop_gradient(sq)
        pos = sq > 0
        norm = jnp.sqrt(jnp.where(pos, sq, 1.0))
        return self.m.astype(norm.dtype) / norm

    def dora_factor_in_w(self, w) -> jax.Array:
        """:meth:`dora_factor` broadcast against W: in W's axis order, size 1 on its input
        axes.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.zeros((1, 2)), b=jnp.zeros((1, 3)), m=jnp.ones(3), shape=(3, 2),
        ...                in_axes=(1,), out_axes=(0,), rank=1)   # W stored (out, in)
        >>> w.dora_factor_in_w(jnp.ones((3, 2))).shape
        (3, 1)
        """
        f = self.dora_factor(w)
        kept = sorted((*self.stack_axes, *self.out_axes))
        order = (*self.stack_axes, *self.out_axes)
        f = jnp.transpose(f, [order.index(d) for d in kept])
        return jnp.reshape(f, [self.shape[d] if d in kept else 1 for d in range(len(self.shape))])

    def dora_merged(self, w) -> jax.Array:
        """``m · V / ||V||`` with ``V = W + scale·a⊗b``, float32 (or wider) accumulation,
        in W's dtype: the DoRA-adapted weight.

        >>> import jax.numpy as jnp
        >>> w = LoraWeight(a=jnp.zeros((1, 2)), b=jnp.zeros((1, 2)), m=jnp.array([10.0, 1.0]),
        ...                shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
        >>> w.dora_merged(jnp.array([[3.0, 0.0], [4.0, 2.0]])).tolist()
        [[6.0, 0.0], [8.0, 1.0]]
        """
        acc = self.accumulation_dtype(w)
        v = jnp.asarray(w, acc) + self.delta(acc)
        return (v * self.dora_factor_in_w(w)).astype(jnp.result_type(w))


def is_lora(x) -> bool:
    """True for a :class:`LoraWeight` (use as ``is_leaf`` when mapping over lora trees).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                    lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> jax.tree.map(lambda w: w.rank if is_lora(w) else w, lora, is_leaf=is_lora)
    {'b': None, 'w': 1}
    """
    return isinstance(x, LoraWeight)



# LoraWeight's static fields: what an AdaLoraWeight carries for the LoraWeight it stands for
_STATIC = tuple(f.name for f in dataclasses.fields(LoraWeight) if f.metadata.get("static"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AdaLoraWeight:
    """An adapter in SVD form (AdaLoRA, Zhang et al. 2023): ``W + scale * (P·diag(λ) ⊗ Q)``.

    The children are ``p`` (the layout of a LoraWeight's ``a``: (*stack, rank, *in)), ``lam``
    (*stack, rank) and ``q`` (the layout of ``b``: (*stack, rank, *out)). ``meta`` holds the
    static fields of the equivalent :class:`LoraWeight` as ``(name, value)`` pairs;
    :attr:`spec` gives them as a LoraWeight without factors, and :meth:`lora` the
    equivalent LoraWeight, ``a = p·λ`` (differentiable, so gradients reach p, λ and q).
    Make them with :func:`lora_jax.adalora.split`.

    >>> import jax.numpy as jnp
    >>> spec = LoraWeight(a=None, b=None, shape=(3, 4), in_axes=(0,), out_axes=(1,), rank=2)
    >>> w = AdaLoraWeight.of(spec, p=jnp.ones((2, 3)), lam=jnp.array([2.0, 0.0]), q=jnp.ones((2, 4)))
    >>> w.spec.rank, w.lora().a.tolist()
    (2, [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    """

    p: Any
    lam: Any
    q: Any
    meta: tuple = dataclasses.field(metadata=dict(static=True), default=())

    @classmethod
    def of(cls, spec: LoraWeight, p, lam, q) -> "AdaLoraWeight":
        """The SVD-form adapter with ``spec``'s static fields (its factors are ignored).

        >>> import jax.numpy as jnp
        >>> spec = LoraWeight(a=None, b=None, shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
        >>> AdaLoraWeight.of(spec, jnp.ones((1, 2)), jnp.zeros(1), jnp.ones((1, 2))).spec.shape
        (2, 2)
        """
        return cls(p=p, lam=lam, q=q, meta=tuple((k, getattr(spec, k)) for k in _STATIC))

    @property
    def spec(self) -> LoraWeight:
        """The static fields as a :class:`LoraWeight` whose factors are None."""
        return LoraWeight(a=None, b=None, **dict(self.meta))

    def replace(self, **kw) -> "AdaLoraWeight":
        """A copy with some children replaced.

        >>> import jax.numpy as jnp
        >>> spec = LoraWeight(a=None, b=None, shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
        >>> w = AdaLoraWeight.of(spec, jnp.ones((1, 2)), jnp.zeros(1), jnp.ones((1, 2)))
        >>> w.replace(lam=jnp.ones(1)).lora().delta().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        return dataclasses.replace(self, **kw)

    def problems(self, path: str) -> list[str]:
        """What is wrong with the children's shapes (empty when they fit the metadata).

        >>> import jax.numpy as jnp
        >>> spec = LoraWeight(a=None, b=None, shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
        >>> AdaLoraWeight.of(spec, jnp.ones((1, 2)), jnp.zeros(2), jnp.ones((1, 2))).problems("w")
        ['w: lam has shape (2,), expected (1,) for rank 1 and weight shape (2, 2)']
        """
        s = self.spec
        want = (("p", self.p, s.a_shape), ("lam", self.lam, (*s.stack_shape, s.rank)), ("q", self.q, s.b_shape))
        return [f"{path}: {name} has shape {tuple(jnp.shape(x))}, expected {tuple(shape)} for rank "
                f"{s.rank} and weight shape {tuple(s.shape)}"
                for name, x, shape in want if tuple(jnp.shape(x)) != tuple(shape)]

    def lora(self) -> LoraWeight:
        """The equivalent :class:`LoraWeight`: ``a = p`` with row i scaled by ``lam[i]``, ``b = q``.

        >>> import jax.numpy as jnp
        >>> spec = LoraWeight(a=None, b=None, shape=(2, 3), in_axes=(0,), out_axes=(1,), rank=1, scale=0.5)
        >>> w = AdaLoraWeight.of(spec, jnp.ones((1, 2)), jnp.full(1, 4.0), jnp.ones((1, 3)))
        >>> w.lora().delta().tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        """
        s = self.spec
        lam = jnp.reshape(self.lam, (*jnp.shape(self.lam), *(1,) * len(s.in_axes)))
        return s.replace(a=self.p * lam.astype(jnp.result_type(self.p)), b=self.q)


def is_adalora(x) -> bool:
    """True for an :class:`AdaLoraWeight` (use as ``is_leaf`` when mapping over AdaLoRA trees).

    >>> import jax.numpy as jnp
    >>> spec = LoraWeight(a=None, b=None, shape=(2, 2), in_axes=(0,), out_axes=(1,), rank=1)
    >>> is_adalora(AdaLoraWeight.of(spec, jnp.ones((1, 2)), jnp.zeros(1), jnp.ones((1, 2)))), is_adalora(spec)
    (True, False)
    """
    return isinstance(x, AdaLoraWeight)


# The fields of a StackedLoraWeight that hold one number per adapter (data, not static).
PER_ADAPTER = ("scale", "alpha", "rank", "dropout")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class StackedLoraWeight(_WeightAxes):
    """The adapters of ``n`` lora trees at one weight W, along a leading adapter axis.

    Children (arrays)::

        a.shape == (n, *W.shape[stack_axes], r_max, *W.shape[in_axes])
        b.shape == (n, *W.shape[stack_axes], r_max, *W.shape[out_axes])
        scale.shape == alpha.shape == rank.shape == dropout.shape == (n,)

    ``r_max`` is the largest rank; adapter ``k``'s own factors are ``a[k]`` and ``b[k]``
    cut to ``rank[k]``, the rest is zeros. An adapter without this target has rank 0, zero
    factors and scale 0. :func:`stack` makes the per-adapter numbers float64 NumPy arrays
    (ranks are whole numbers stored as floats, so ``jax.grad`` accepts the tree), and
    :func:`unstack` gives them back exactly; once they pass through ``jit`` (or any JAX
    operation) they are JAX arrays, float32 unless x64 is on. They are constants of the
    adapters: their gradient through ``wrap`` is zero, and :func:`lora_jax.optimizer`
    keeps them frozen (a bare optax optimizer with weight decay would shrink them).

    Static fields: ``shape``, ``dtype``, ``in_axes``, ``out_axes``, ``stack_axes`` and
    ``kind``: W's, shared by all adapters.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"w": jnp.ones((6, 4))}
    >>> _, l2 = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2, alpha=1.0),)))
    >>> _, l3 = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=3, alpha=1.0),)))
    >>> s = lj.stack([l2, l3])["w"]
    >>> s.a.shape, s.b.shape, s.ranks, s.scale.tolist()
    ((2, 3, 6), (2, 3, 4), (2, 3), [0.5, 0.3333333333333333])
    """

    a: Any
    b: Any
    scale: Any
    alpha: Any
    rank: Any
    dropout: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    out_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    stack_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    kind: str = dataclasses.field(metadata=dict(static=True), default="linear")

    @property
    def n(self) -> int:
        """The number of stacked adapters."""
        return int(jnp.shape(self.a)[0])

    @property
    def r_max(self) -> int:
        """The padded rank: the largest adapter's."""
        return int(jnp.shape(self.a)[1 + len(self.stack_axes)])

    @property
    def ranks(self) -> tuple[int, ...]:
        """Each adapter's own rank (0 where it lacks this target); needs concrete arrays."""
        if isinstance(self.rank, jax.core.Tracer):
            raise TypeError("StackedLoraWeight.ranks reads the ranks as Python ints and cannot run under "
                            "jit/grad tracing; use the array .rank there")
        return tuple(int(r) for r in np.asarray(self.rank))

    def replace(self, **kw) -> "StackedLoraWeight":
        """A copy with some fields replaced.

        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
        >>> s = lj.stack([lora])["w"]
        >>> s.replace(b=s.b + 1).b.sum().item()
        4.0
        """
        return dataclasses.replace(self, **kw)


def is_stacked(x) -> bool:
    """True for a :class:`StackedLoraWeight`.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    >>> is_stacked(lj.stack([lora, lora])["w"]), is_stacked(lora["w"])
    (True, False)
    """
    return isinstance(x, StackedLoraWeight)
