"""The one primitive table that axis inference and ``lj.wrap`` share.

Every family test in test_transform_families.py also checks that no primitive outside the
table meets a targeted weight (``assert_classified`` there); these tests check the table
itself and that the check can fail.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import _jaxpr, transform
from lora_jax.usage import trace_usage


def test_every_table_primitive_has_exactly_one_wrap_rule():
    # a wrap rule for a primitive outside the table would be invisible to inference, a
    # table entry without a rule would be followed by inference and materialized by wrap
    assert set(transform._RULES) == set(_jaxpr.PRIMITIVES)
    assert set(_jaxpr.PRIMITIVES.values()) == {_jaxpr.SHAPE, _jaxpr.WINDOW, _jaxpr.SCALE, _jaxpr.PRODUCT,
                                               _jaxpr.HIGHER}


def test_a_primitive_outside_the_table_is_named():
    params = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 2))}
    f = lambda p, x: jnp.tanh(x @ jnp.sin(p["w"])) @ jnp.cumsum(p["v"], axis=0)
    usages = trace_usage(f, params, (jnp.ones((2, 4)),))
    order = [lj.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unknown = {p: u.unknown() for p, u in zip(order, usages)}
    assert unknown == {"v": ["cumsum"], "w": ["sin"]}  # tanh meets an activation only


def test_known_primitives_are_not_reported():
    from jax.ad_checkpoint import checkpoint_name

    params = {"w": jnp.ones((4, 6))}

    def f(p, x):
        w = checkpoint_name(jax.lax.optimization_barrier(p["w"]), "w")
        a, b = jnp.split(jnp.concatenate([w, w], axis=1).astype(jnp.bfloat16), 2, axis=1)
        return x.astype(jnp.bfloat16) @ jax.lax.reduce_precision(a + 0 * b, 8, 7)

    (u,) = trace_usage(f, params, (jnp.ones((2, 4)),))
    assert u.unknown() == ["add"]  # the arithmetic on the weight (0 * b is a rescaled view of it)


def test_reduce_precision_rounds_the_adapted_weight_as_a_whole():
    # rounding is not linear, so wrap materializes for it, like the merge strategy
    params = {"w": jnp.arange(20.0).reshape(4, 5) / 10}
    lw = lj.LoraWeight(a=jnp.ones((2, 4)), b=jnp.ones((2, 5)), shape=(4, 5), in_axes=(0,),
                       out_axes=(1,), rank=2, scale=0.5)
    f = lambda p, x: x @ jax.lax.reduce_precision(p["w"], 3, 2)
    with pytest.warns(transform.MaterializeWarning, match="reduce_precision"):
        y = lj.wrap(f)(params, {"w": lw}, jnp.ones((1, 4)))
    np.testing.assert_array_equal(y, lj.wrap(f, "merge")(params, {"w": lw}, jnp.ones((1, 4))))


def test_concatenated_pieces_with_dropout_keys_materialize_rather_than_share_a_mask():
    params = {"q": jnp.ones((4, 3)), "k": jnp.ones((4, 3))}
    cfg = lj.LoraConfig(rules=(lj.Rule("q|k", rank=2, dropout=0.5),))
    base, lora = lj.split(jax.random.key(0), params, cfg)
    f = lambda p, x: x @ jnp.concatenate([p["q"], p["k"]], axis=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lj.wrap(f)(base, lora, jnp.ones((2, 4)), lora_rng=jax.random.key(1))
    assert any("concatenate" in str(w.message) for w in caught)
