"""Scaling rules, rule validation and the path matcher."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import lora_jax as lj


@pytest.mark.parametrize(
    "scaling, rank, alpha, expected",
    [
        ("lora", 8, 16.0, 2.0),  # RoBERTa-base NLU (Hu et al. 2021)
        ("lora", 16, 32.0, 2.0),  # DeBERTa XXL
        ("lora", 4, 128.0, 32.0),  # GPT-2 E2E, the repo's default alpha
        ("rslora", 64, 16.0, 2.0),  # Kalajdzievski 2023
    ],
)
def test_known_scales(scaling, rank, alpha, expected):
    assert lj.scale_for(scaling, alpha, rank) == expected
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, alpha=alpha),), scaling=scaling)
    params = {"w": jnp.zeros((128, 128))}
    _, lora = lj.split(jax.random.key(0), params, cfg)
    assert lora["w"].scale == expected
    assert lora["w"].scaling == scaling


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(0.01, 1e4), rank=st.integers(1, 4096))
def test_rslora_is_lora_with_rescaled_alpha(alpha, rank):
    rs = lj.scale_for("rslora", alpha, rank)
    assert math.isclose(rs, lj.scale_for("lora", alpha * math.sqrt(rank), rank), rel_tol=1e-12)
    assert math.isclose(rs, alpha / math.sqrt(rank), rel_tol=1e-12)


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.01, 1e4))
def test_rank_one_rules_agree(alpha):
    assert lj.scale_for("lora", alpha, 1) == lj.scale_for("rslora", alpha, 1) == alpha


def test_custom_scaling_callable():
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=4, alpha=8.0),), scaling=lambda a, r: a / r**0.25)
    _, lora = lj.split(jax.random.key(0), {"w": jnp.zeros((8, 8))}, cfg)
    assert math.isclose(lora["w"].scale, 8.0 / 4**0.25)
    assert lora["w"].scaling.startswith("custom:")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(rank=0), ValueError, "rank must be > 0"),
        (dict(rank=-3), ValueError, "rank must be > 0"),
        (dict(rank=2.5), TypeError, "rank must be an int"),
        (dict(alpha=0.0), ValueError, "alpha must be a finite number > 0"),
        (dict(alpha=-1.0), ValueError, "alpha must be a finite number > 0"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(axes="in"), TypeError, "axes must be"),
    ],
)
def test_bad_rules(kwargs, err, match):
    with pytest.raises(err, match=match):
        lj.Rule(r".*/kernel", **kwargs)


def test_bad_pattern_and_config():
    with pytest.raises(ValueError, match="not a valid regex"):
        lj.Rule("(unclosed")
    with pytest.raises(ValueError, match="at least one Rule"):
        lj.LoraConfig(rules=())
    with pytest.raises(ValueError, match="not a known rule"):
        lj.LoraConfig(rules=(lj.Rule("w"),), scaling="sqrt")
    with pytest.raises(ValueError, match="init="):
        lj.LoraConfig(rules=(lj.Rule("w"),), init="olora")
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        lj.LoraConfig(rules=(lj.Rule("w"),), scaling=lambda a, r: -1.0)
    with pytest.raises(TypeError, match="lj.Rule"):
        lj.LoraConfig(rules=("w",))


def test_fullmatch_and_first_rule_wins():
    cfg = lj.LoraConfig(
        rules=(
            lj.Rule(r".*/attn/(q|v)/kernel", rank=8, alpha=16.0),
            lj.Rule(r".*/kernel", rank=2, alpha=4.0),
        )
    )
    assert cfg.rule_for("params/blk/attn/q/kernel").rank == 8
    assert cfg.rule_for("params/blk/attn/k/kernel").rank == 2
    assert cfg.rule_for("params/blk/attn/q/kernel_extra") is None  # fullmatch, not prefix
    assert cfg.rule_for("params/blk/attn/q/bias") is None


def test_exclude_beats_rules():
    params = {"blk": {"q": {"kernel": jnp.zeros((4, 4))}, "k": {"kernel": jnp.zeros((4, 4))}}}
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2),), exclude=(r"blk/k/.*",))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    assert lora["blk"]["k"]["kernel"] is None
    assert isinstance(lora["blk"]["q"]["kernel"], lj.LoraWeight)


def test_path_str_matches_keystr_and_drops_nnx_value():
    tree = {"a": [{"kernel": 1}], "b": (2,)}
    paths = [lj.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0/kernel", "b/0"]
    nnx_path = (jax.tree_util.DictKey("lin"), jax.tree_util.DictKey("kernel"), jax.tree_util.GetAttrKey("value"))
    assert lj.path_str(nnx_path) == "lin/kernel"


def test_axes_normalization():
    assert lj.Axes((-1,), (0,)).normalized(2) == lj.Axes((1,), (0,), ())
    with pytest.raises(ValueError, match="exactly once"):
        lj.Axes((0,), (0,)).normalized(2)
    with pytest.raises(ValueError, match="out of range"):
        lj.Axes((0,), (2,)).normalized(2)
    assert lj.Rule("w", axes=((1,), (0,))).axes == lj.Axes((1,), (0,), ())
    assert lj.Rule("w", axes={"in": (1,), "out": (2,), "stack": (0,)}).axes == lj.Axes((1,), (2,), (0,))
