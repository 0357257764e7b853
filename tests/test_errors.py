"""Bad input: every error names the path, the shapes and the fix."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

PARAMS = {
    "params": {
        "q": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
        "steps": jnp.zeros((4, 4), jnp.int32),
    }
}


def _split(params, *rules, **cfg):
    return lj.split(jax.random.key(0), params, lj.LoraConfig(rules=rules, **cfg))


def test_rule_matching_nothing_names_the_rule_and_the_paths():
    with pytest.raises(ValueError) as e:
        _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2), lj.Rule(r".*/k/kernel", rank=2))
    msg = str(e.value)
    assert "'.*/k/kernel' matches nothing" in msg
    assert "params/q/kernel" in msg and "fullmatch" in msg


def test_prefix_pattern_is_not_enough():
    with pytest.raises(ValueError, match="matches nothing"):
        _split(PARAMS, lj.Rule(r"params/q", rank=2))


def test_shadowed_rule_is_reported():
    with pytest.raises(ValueError, match=r"'.*/q/kernel' matches nothing.*taken by an earlier rule"):
        _split(PARAMS, lj.Rule(r".*/kernel", rank=2), lj.Rule(r".*/q/kernel", rank=4))


def test_exclude_matching_nothing():
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no parameter path"):
        _split(PARAMS, lj.Rule(r".*/kernel", rank=2), exclude=("nope",))


def test_rank_too_large_names_path_and_shapes():
    with pytest.raises(ValueError) as e:
        _split(PARAMS, lj.Rule(r".*/q/kernel", rank=7))
    msg = str(e.value)
    assert "params/q/kernel" in msg and "(8, 6)" in msg and "min(8, 6)" in msg and "rank <= 6" in msg


def test_non_float_target():
    with pytest.raises(TypeError, match=r"params/steps: target has dtype int32"):
        _split(PARAMS, lj.Rule(r"params/steps", rank=2))


def test_vector_target():
    with pytest.raises(ValueError, match=r"params/q/bias: target has shape \(6,\)"):
        _split(PARAMS, lj.Rule(r".*/bias", rank=1))


def test_target_without_matmul_use():
    f = lambda p, x: x * p["w"].sum()
    with pytest.raises(ValueError, match=r"w: shape \(4, 4\) matched rule 'w', but no dot_general.*reduce_sum"):
        lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)),
                 apply_fn=f, args=(jnp.ones(()),))
    g = lambda p, x: x
    with pytest.raises(ValueError, match="never uses it"):
        lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)),
                 apply_fn=g, args=(jnp.ones(()),))


def test_lora_structure_mismatch():
    base, lora = _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2))
    other = {"params": {"q": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}}
    with pytest.raises(ValueError, match=r"in lora but not in base: params/steps"):
        lj.merge(other, lora)


def test_lora_shape_mismatch():
    base, lora = _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2))
    wrong = jax.tree.map(lambda x: x, base)
    wrong["params"]["q"]["kernel"] = jnp.ones((8, 7))
    with pytest.raises(ValueError, match=r"params/q/kernel: the adapter was made for shape \(8, 6\) but the base weight has shape \(8, 7\)"):
        lj.merge(wrong, lora)
    w = lora["params"]["q"]["kernel"]
    lora["params"]["q"]["kernel"] = w.replace(a=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match=r"params/q/kernel: factor a has shape \(3, 8\), expected \(2, 8\)"):
        lj.unmerge(base, lora)


def test_safe_merge_names_nan_paths():
    base, lora = _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2))
    w = lora["params"]["q"]["kernel"]
    lora["params"]["q"]["kernel"] = w.replace(b=w.b.at[0, 0].set(jnp.nan))
    lj.merge(base, lora)  # unchecked: no error
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/Inf\) after merging params/q/kernel"):
        lj.merge(base, lora, safe=True)
    with pytest.raises(TypeError, match="safe=True.*cannot run under jit"):
        jax.jit(lambda b, l: lj.merge(b, l, safe=True))(base, lora)
    lora["params"]["q"]["kernel"] = w
    assert np.isfinite(np.asarray(lj.merge(base, lora, safe=True)["params"]["q"]["kernel"])).all()


def test_wrong_config_type_and_mixed_abstract():
    with pytest.raises(TypeError, match="lj.LoraConfig"):
        lj.split(jax.random.key(0), PARAMS, {"rules": ()})
    mixed = {"a": jnp.ones((2, 2)), "b": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
    with pytest.raises(TypeError, match="mixes jax.ShapeDtypeStruct"):
        _split(mixed, lj.Rule("a", rank=1))


def test_wrap_rejects_bad_strategy_and_dropout_under_merge():
    with pytest.raises(ValueError, match="strategy="):
        lj.wrap(lambda p, x: x, strategy="fast")
    base, lora = _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2, dropout=0.1))
    f = lambda p, x: x @ p["params"]["q"]["kernel"]
    y = lj.wrap(f)(base, lora, jnp.ones((1, 8)))  # no key: no dropout, by definition
    assert y.shape == (1, 6)
    with pytest.raises(ValueError, match="strategy='merge' cannot apply adapter-input dropout"):
        lj.wrap(f, strategy="merge")(base, lora, jnp.ones((1, 8)), lora_rng=jax.random.key(1))


def test_optimizer_needs_base_lora_tree():
    import optax

    tx = lj.optimizer(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"\{'base': base, 'lora': lora\}"):
        tx.init({"params": PARAMS})


@pytest.mark.parametrize("name, bad", [("a", (8, 2)), ("a", (4, 4)), ("b", (6, 2)), ("b", (3, 4))])
def test_factor_of_the_right_size_but_wrong_layout(name, bad):
    base, lora = _split(PARAMS, lj.Rule(r".*/q/kernel", rank=2))
    w = lora["params"]["q"]["kernel"]
    lora["params"]["q"]["kernel"] = w.replace(**{name: jnp.ones(bad)})
    want = {"a": (2, 8), "b": (2, 6)}[name]
    pattern = rf"factor {name} has shape \({bad[0]}, {bad[1]}\), expected \({want[0]}, {want[1]}\)"
    with pytest.raises(ValueError, match=pattern):
        lj.merge(base, lora)
    with pytest.raises(ValueError, match=pattern):
        lj.unmerge(base, lora)


def test_stacked_factor_with_stack_and_rank_swapped():
    params = {"w": jnp.ones((3, 8, 5))}
    base, lora = lj.split(jax.random.key(0), params,
                          lj.LoraConfig(rules=(lj.Rule("w", rank=2, axes=((1,), (2,), (0,))),)))
    assert lora["w"].a.shape == (3, 2, 8)
    lora["w"] = lora["w"].replace(a=jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match=r"w: factor a has shape \(2, 3, 8\), expected \(3, 2, 8\)"):
        lj.merge(base, lora)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as e:
        _split(PARAMS, lj.Rule(r"nothing", rank=2), exclude=("nope",))
    msg = str(e.value)
    assert "rule 'nothing' matches nothing" in msg
    assert "exclude pattern 'nope' matches no parameter path" in msg


def test_merge_of_trees_stacked_over_seeds_suggests_vmap():
    split = lambda k: lj.split(k, {"w": jnp.ones((8, 8))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    base, lora = jax.vmap(split)(jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match=r"w: the adapter was made for shape \(8, 8\) but the base weight has "
                                         r"shape \(3, 8, 8\) \(extra leading axes \(3,\).*jax.vmap\(lj.merge\)"):
        lj.merge(base, lora)
    merged = jax.vmap(lj.merge)(base, lora)
    chex.assert_trees_all_close(merged["w"][1], lj.merge(jax.tree.map(lambda x: x[1], base),
                                                         jax.tree.map(lambda x: x[1], lora))["w"])


def test_split_names_a_key_that_is_not_one_prng_key():
    params = {"w": jnp.ones((8, 8))}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),))
    with pytest.raises(ValueError, match=r"key: lj.split takes one PRNG key, got a key array of shape \(3,\)"):
        lj.split(jax.random.split(jax.random.key(0), 3), params, cfg)
    with pytest.raises(TypeError, match=r"key: expected a PRNG key such as jax.random.key\(0\), got shape \(3,\) and dtype float32"):
        lj.split(jnp.zeros(3), params, cfg)
    with pytest.raises(TypeError, match=r"key: expected a PRNG key .*, got 0"):
        lj.split(0, params, cfg)
