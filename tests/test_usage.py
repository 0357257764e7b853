"""Axis inference on the less common ways models consume a weight."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from reference import np_delta_of, randomize

KEY = jax.random.key(0)


def _split(w, f, *args, rank=2, axes=None):
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, axes=axes),))
    return lj.split(jax.random.key(1), {"w": w}, cfg, apply_fn=f, args=args)


def _numpy_merged(base, w):
    return {"w": np.asarray(base["w"], np.float64) + np_delta_of(w)}


def _check(w, f, *args, expect, kind="linear", **kw):
    base, lora = _split(w, f, *args, **kw)
    got = lora["w"]
    assert (got.in_axes, got.out_axes, got.stack_axes, got.kind) == (*expect, kind)
    lora = randomize(lora, seed=7)
    merged = _numpy_merged(base, lora["w"])
    chex.assert_trees_all_close(lj.wrap(f, strategy="merge")(base, lora, *args),
                                f(jax.tree.map(jnp.asarray, merged), *args), rtol=1e-4, atol=1e-4)
    return lora["w"]


def test_experts_picked_by_gather_are_a_stack():
    W = jax.random.normal(KEY, (4, 8, 6))  # (experts, in, out)
    f = lambda p, x, e: jnp.einsum("bi,bio->bo", x, p["w"][e])
    w = _check(W, f, jnp.ones((2, 8)), jnp.array([1, 3]), expect=((1,), (2,), (0,)))
    assert w.a.shape == (4, 2, 8) and w.b.shape == (4, 2, 6)


def test_embedding_lookup_then_matmul_stays_an_embedding():
    E = jax.random.normal(KEY, (10, 6))
    W2 = jax.random.normal(jax.random.key(3), (6, 3))
    f = lambda p, ids: jnp.take(p["w"], ids, axis=0) @ W2
    _check(E, f, jnp.array([[1, 2, 9]]), expect=((0,), (1,), ()), kind="embed")


def test_fused_kernel_reshaped_into_heads():
    W = jax.random.normal(KEY, (8, 24))
    f = lambda p, x: jnp.einsum("bd,dthk->bthk", x, p["w"].reshape(8, 3, 2, 4))
    _check(W, f, jnp.ones((2, 8)), expect=((0,), (1,), ()))


def test_single_columns_of_a_kernel():
    W = jax.random.normal(KEY, (8, 2))  # start/end logits
    f = lambda p, x: (x @ p["w"][:, 0]) - (x @ p["w"][:, 1])
    _check(W, f, jnp.ones((2, 8)), expect=((0,), (1,), ()), rank=1)


@pytest.mark.parametrize(
    "name, f",
    [
        ("stop_gradient", lambda p, x: x @ jax.lax.stop_gradient(p["w"])),
        ("broadcast", lambda p, x: (x[None] @ p["w"][None])[0]),
        ("split", lambda p, x: x @ jnp.split(p["w"], 2, axis=1)[1]),
        ("concatenate", lambda p, x: x @ jnp.concatenate([p["w"], p["w"]], axis=1)),
        ("bf16 cast", lambda p, x: (x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)).astype(jnp.float32)),
    ],
)
def test_common_ops_before_the_matmul(name, f):
    W = jax.random.normal(KEY, (8, 6))
    if name == "bf16 cast":
        base, lora = _split(W, f, jnp.ones((2, 8)))
        assert (lora["w"].in_axes, lora["w"].out_axes) == ((0,), (1,))
    else:
        _check(W, f, jnp.ones((2, 8)), expect=((0,), (1,), ()))


def test_axis_split_across_roles_is_opaque_not_wrong():
    # (8, 6) reshaped to (8, 2, 3), contracting (d, 2): axis 1 is both in and out
    W = jax.random.normal(KEY, (8, 6))
    f = lambda p, x: jnp.einsum("bdt,dtk->bk", x, p["w"].reshape(8, 2, 3))
    with pytest.raises(ValueError, match=r"no dot_general, gather or conv consumes it.*opaque view"):
        _split(W, f, jnp.ones((2, 8, 2)))
    # an explicit rule still works
    base, lora = _split(W, f, jnp.ones((2, 8, 2)), axes=((0,), (1,)))
    assert lora["w"].a.shape == (2, 8)


@pytest.mark.parametrize(
    "shape, f, x_shape, in_axes, out_axes",
    [
        # a size-1 axis inside a merged group takes that group's role
        ((2, 1, 4, 8), lambda p, x: x @ p["w"].reshape(8, 8), (3, 8), (0, 1, 2), (3,)),
        # a size-1 axis that meets a size-1 axis keeps its place (here: contracted)
        ((4, 1, 8), lambda p, x: jnp.einsum("bijk,ijkl->bl", x, p["w"].reshape(2, 2, 1, 8)),
         (3, 2, 2, 1), (0, 1), (2,)),
    ],
)
def test_size_one_axes_through_reshapes_keep_their_group(shape, f, x_shape, in_axes, out_axes):
    W = jax.random.normal(KEY, shape)
    x = jnp.ones(x_shape)
    base, lora = _split(W, f, x, rank=1)
    assert (lora["w"].in_axes, lora["w"].out_axes) == (in_axes, out_axes)
    lora = randomize(lora)
    chex.assert_trees_all_close(lj.wrap(f)(base, lora, x), lj.wrap(f, "merge")(base, lora, x), rtol=1e-5)
