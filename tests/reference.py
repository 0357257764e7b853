"""Independent numpy references shared by the tests (never calls LoraWeight.delta)."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj


def np_delta(a, b, ins, outs, stack, scale, ndim) -> np.ndarray:
    """float64 ``scale * a⊗b`` laid out over a weight of ``ndim`` axes, one letter per axis.

    ``a`` is (*stack, r, *ins) and ``b`` is (*stack, r, *outs), the axes given explicitly
    (a test passes the axes it expects, not the ones the library recorded).
    """
    assert sorted((*ins, *outs, *stack)) == list(range(ndim))
    letters = string.ascii_uppercase[:ndim]
    pick = lambda axes: "".join(letters[i] for i in axes)  # noqa: E731
    spec = f"{pick(stack)}z{pick(ins)},{pick(stack)}z{pick(outs)}->{letters}"
    return scale * np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))


def np_delta_of(w: lj.LoraWeight) -> np.ndarray:
    """:func:`np_delta` with the axes recorded on ``w``."""
    return np_delta(w.a, w.b, w.in_axes, w.out_axes, w.stack_axes, w.scale, len(w.shape))


def randomize(lora, seed=0):
    """Every adapter with random nonzero (gaussian) factors of its own shapes and dtypes."""
    rng = np.random.default_rng(seed)

    def fill(w):
        if not lj.is_lora(w):
            return w
        a = rng.standard_normal(np.shape(w.a)).astype(np.float32)
        b = rng.standard_normal(np.shape(w.b)).astype(np.float32)
        return w.replace(a=jnp.asarray(a, w.a.dtype), b=jnp.asarray(b, w.b.dtype))

    return jax.tree.map(fill, lora, is_leaf=lj.is_lora)
