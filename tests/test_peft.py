"""PEFT adapter import/export against files and outputs made by real PEFT (torch-free).

The fixtures in tests/fixtures/peft/ come from tests/fixtures/make_peft_fixtures.py (torch +
peft): tiny GPT-2 (Conv1D, mixed ranks and alphas), BERT (rsLoRA, an embedding target, a
regex rank pattern) and Llama (all linear layers plus the token embedding) models, their PEFT
adapters, and PEFT's outputs on fixed inputs. The Flax twins are Hugging Face's Flax classes
with the same weights (tests/fixtures/flax_models.py).
"""

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from fixtures.flax_models import build
from lora_jax import peft
from reference import np_delta, np_delta_of

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft"
MAPS = {"gpt2": peft.GPT2, "bert": peft.BERT, "llama": peft.LLAMA}
# How each Flax model stores a weight the torch model holds as Linear/Conv1D/Embedding:
# HF Flax GPT-2 keeps Conv1D kernels (out, in); BERT and Llama Dense kernels are (in, out).
KERNEL_OUT_IN = {"gpt2": True, "bert": False, "llama": False}


@pytest.fixture(scope="module", params=sorted(MAPS))
def model(request):
    name = request.param
    f, params, io = build(name)
    return name, f, params, io


def _peft_value(patterns, module, default):
    """PEFT's get_pattern_key + dict.get, written out independently of lora_jax."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _modules(tensors):
    """{torch module: (kind, A, B)} from a PEFT tensor dict (ignoring stored base weights)."""
    out = {}
    for key, v in tensors.items():
        key = key.removeprefix("base_model.model.")
        for kind, fa, fb in (("linear", ".lora_A.weight", ".lora_B.weight"),
                             ("embed", ".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(fa):
                m = key[: -len(fa)]
                out[m] = (kind, v, tensors["base_model.model." + m + fb])
    return out


def _flax_path(name, module, kind):
    return module.replace(".", "/") + ("/embedding" if kind == "embed" else "/kernel")


# ---------------------------------------------------------------------------------------
# files written by real PEFT are read correctly


@pytest.mark.parametrize("strategy", ["factored", "merge"])
def test_load_matches_peft_outputs(model, strategy):
    name, f, params, io = model
    lora = peft.load(FIXTURES / name, params, MAPS[name])
    args = (io["input_ids"], io["attention_mask"])
    base_out = np.asarray(f(params, *args))
    np.testing.assert_allclose(base_out, io["base"], atol=1e-5)  # the Flax twin is the same model
    assert np.abs(io["adapted"] - io["base"]).max() > 0.3  # the adapter matters
    got = np.asarray(lj.wrap(f, strategy=strategy)(params, lora, *args))
    np.testing.assert_allclose(got, io["adapted"], atol=2e-5, rtol=0)


def test_load_factors_against_peft_delta(model):
    """Every adapter's s·A⊗B equals PEFT's delta (scale from the config's patterns)."""
    name, _, params, _ = model
    config = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    modules = _modules(load_file(FIXTURES / name / "adapter_model.safetensors"))
    lora = peft.load(FIXTURES / name, params, MAPS[name])
    got = dict(lj.targets(lora))
    assert sorted(got) == sorted(_flax_path(name, m, k) for m, (k, _, _) in modules.items())
    for module, (kind, A, B) in modules.items():
        r = A.shape[0]
        alpha = _peft_value(config["alpha_pattern"], module, config["lora_alpha"])
        assert r == _peft_value(config["rank_pattern"], module, config["r"])
        scale = alpha / (math.sqrt(r) if config["use_rslora"] else r)
        torch_delta = scale * (B.astype(np.float64) @ A)  # (out, in); embeddings (dim, vocab)
        want = torch_delta if (kind == "linear" and KERNEL_OUT_IN[name]) else torch_delta.T
        w = got[_flax_path(name, module, kind)]
        assert (w.rank, w.kind, w.scaling) == (r, kind, "rslora" if config["use_rslora"] else "lora")
        assert w.alpha == alpha and w.scale == pytest.approx(scale, rel=1e-12)
        np.testing.assert_allclose(np_delta_of(w), want, rtol=1e-6, atol=1e-6)
    assert len(modules) >= 7


def test_load_traced_axes_equal_name_map_axes():
    """The generic HF map plus tracing finds GPT-2's (out, in) kernels like the GPT2 map."""
    f, params, io = build("gpt2")
    by_map = dict(lj.targets(peft.load(FIXTURES / "gpt2", params, peft.GPT2)))
    traced = dict(lj.targets(peft.load(FIXTURES / "gpt2", params, peft.HF, apply_fn=f,
                                       args=(io["input_ids"], io["attention_mask"]))))
    assert sorted(by_map) == sorted(traced)
    for path, w in by_map.items():
        t = traced[path]
        assert (w.in_axes, w.out_axes, w.rank, w.alpha, w.scale) == (t.in_axes, t.out_axes, t.rank, t.alpha, t.scale)
        assert w.in_axes == (1,) and w.out_axes == (0,)
        np.testing.assert_array_equal(w.a, t.a)
        np.testing.assert_array_equal(w.b, t.b)
    # without tracing and without the GPT-2 axes the layout is wrong, and that is caught
    with pytest.raises(ValueError, match=r"c_attn/kernel: Flax weight \(96, 32\).*stored \(out, in\)"):
        peft.load(FIXTURES / "gpt2", params, peft.HF)


def test_load_abstract_params_equals_concrete():
    _, params, _ = build("llama")
    abstract = jax.eval_shape(lambda p: p, params)
    a = dict(lj.targets(peft.load(FIXTURES / "llama", params, peft.LLAMA)))
    b = dict(lj.targets(peft.load(FIXTURES / "llama", abstract, peft.LLAMA)))
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_array_equal(a[path].a, b[path].a)
        np.testing.assert_array_equal(a[path].b, b[path].b)
        assert a[path].shape == b[path].shape and a[path].kind == b[path].kind


# ---------------------------------------------------------------------------------------
# files we write are what PEFT writes


def test_save_reproduces_peft_files(model, tmp_path):
    name, _, params, _ = model
    orig_cfg = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    orig = load_file(FIXTURES / name / "adapter_model.safetensors")
    lora = peft.load(FIXTURES / name, params, MAPS[name])
    written = peft.save(tmp_path, lora, MAPS[name], base_model="tiny-" + name,
                        task_type=orig_cfg["task_type"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = load_file(tmp_path / "adapter_model.safetensors")

    lora_keys = {k for k in orig if ".lora_" in k}  # PEFT may also store embedding weights
    assert set(ours) == lora_keys
    for k in lora_keys:
        assert ours[k].dtype == orig[k].dtype and ours[k].shape == orig[k].shape, k
        np.testing.assert_array_equal(ours[k], orig[k], err_msg=k)
    for field in ("peft_type", "use_rslora", "bias", "lora_dropout", "task_type", "fan_in_fan_out",
                  "use_dora", "lora_bias"):
        assert cfg[field] == orig_cfg[field], field
    assert cfg["base_model_name_or_path"] == "tiny-" + name
    modules = sorted(_modules(orig))
    assert sorted(written) == modules == sorted(cfg["target_modules"])
    for m in modules:  # every module resolves to the same rank and alpha under PEFT's rules
        for field, pattern in (("r", "rank_pattern"), ("lora_alpha", "alpha_pattern")):
            assert _peft_value(cfg[pattern], m, cfg[field]) == _peft_value(orig_cfg[pattern], m, orig_cfg[field])
    # only the modules that differ from the defaults are listed
    assert all(v != cfg["r"] for v in cfg["rank_pattern"].values())
    assert all(v != cfg["lora_alpha"] for v in cfg["alpha_pattern"].values())


def _toy(scaling="rslora"):
    """A scanned 3-layer stack of DenseGeneral kernels (8 -> 2x4), an embedding and a head
    (abstract params) and random adapters for them."""
    params = {
        "layers": {"q": {"kernel": jax.ShapeDtypeStruct((3, 8, 2, 4), jnp.float32)}},
        "embed": {"embedding": jax.ShapeDtypeStruct((20, 8), jnp.float32)},
        "head": {"kernel": jax.ShapeDtypeStruct((8, 5), jnp.float32)},
    }
    cfg = lj.LoraConfig(scaling=scaling, rules=(
        lj.Rule("layers/q/kernel", rank=3, alpha=5.0, axes=lj.Axes((1,), (2, 3), (0,))),
        lj.Rule("embed/embedding", rank=2, alpha=4.0),
        lj.Rule("head/kernel", rank=3, alpha=6.0),
    ))
    _, lora = lj.split(jax.random.key(1), params, cfg)  # abstract: metadata only, no compiles
    rng = np.random.default_rng(5)
    lora = jax.tree.map(lambda w: w.replace(a=rng.standard_normal(w.a_shape).astype(np.float32),
                                            b=rng.standard_normal(w.b_shape).astype(np.float32)),
                        lora, is_leaf=lj.is_lora)
    return params, lora


TOY_MAP = peft.NameMap(
    rules=(("layers/q/kernel", "model.layers.{}.attn.q_proj"), ("embed/embedding", "model.embed_tokens"),
           ("head/kernel", "lm_head")),
    axes=(("layers/q/kernel", lj.Axes((1,), (2, 3), (0,))),),
)


def test_stacked_multi_axis_export_against_numpy_and_roundtrip(tmp_path):
    params, lora = _toy()
    written = peft.save(tmp_path, lora, TOY_MAP)
    assert written == ["model.embed_tokens", "lm_head"] + [f"model.layers.{i}.attn.q_proj" for i in range(3)]
    t = load_file(tmp_path / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 3 and cfg["rank_pattern"] == {"model.embed_tokens": 2}
    w = lora["layers"]["q"]["kernel"]
    for i in range(3):
        A = t[f"base_model.model.model.layers.{i}.attn.q_proj.lora_A.weight"]
        B = t[f"base_model.model.model.layers.{i}.attn.q_proj.lora_B.weight"]
        assert A.shape == (3, 8) and B.shape == (8, 3)  # out = 2 heads x 4, flattened in C order
        want = np_delta(np.asarray(w.a)[i], np.asarray(w.b)[i], (0,), (1, 2), (), 5.0 / math.sqrt(3), 3)
        alpha = _peft_value(cfg["alpha_pattern"], f"model.layers.{i}.attn.q_proj", cfg["lora_alpha"])
        got = alpha / math.sqrt(3) * (B @ A).T
        np.testing.assert_allclose(got.reshape(8, 2, 4), want, rtol=1e-6, atol=1e-6)
    E = lora["embed"]["embedding"]
    np.testing.assert_allclose(
        4.0 / math.sqrt(2) * (t["base_model.model.model.embed_tokens.lora_embedding_B"]
                              @ t["base_model.model.model.embed_tokens.lora_embedding_A"]).T,
        np_delta(E.a, E.b, (0,), (1,), (), 4.0 / math.sqrt(2), 2), rtol=1e-6, atol=1e-6)

    back = peft.load(tmp_path, params, TOY_MAP)
    for (p, x), (q, y) in zip(lj.targets(lora), lj.targets(back)):
        assert p == q
        for field in ("shape", "in_axes", "out_axes", "stack_axes", "rank", "alpha", "scale", "scaling", "kind"):
            assert getattr(x, field) == getattr(y, field), (p, field)
        np.testing.assert_array_equal(x.a, y.a)
        np.testing.assert_array_equal(x.b, y.b)
    # a layer PEFT left alone loads as a zero adapter for that layer (target_modules still
    # lists it: PEFT warns, and so does load)
    del t["base_model.model.model.layers.1.attn.q_proj.lora_A.weight"]
    del t["base_model.model.model.layers.1.attn.q_proj.lora_B.weight"]
    save_file(t, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"target_modules lists \['model\.layers\.1\.attn\.q_proj'\]"):
        part = peft.load(tmp_path, params, TOY_MAP)["layers"]["q"]["kernel"]
    d = np_delta_of(part)
    assert not d[1].any() and np.allclose(d[[0, 2]], np_delta_of(w)[[0, 2]], atol=1e-6)
    # a layer the Flax stack does not have is an error, not dropped (when target_modules lists it)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] += ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    t["base_model.model.model.layers.3.attn.q_proj.lora_A.weight"] = t["base_model.model.model.layers.0.attn.q_proj.lora_A.weight"]
    t["base_model.model.model.layers.3.attn.q_proj.lora_B.weight"] = t["base_model.model.model.layers.0.attn.q_proj.lora_B.weight"]
    save_file(t, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"layers/q/kernel: torch modules model\.layers\.3\.attn\.q_proj index past .* \(3,\)"), \
            pytest.warns(UserWarning, match="layers.1.attn.q_proj"):
        peft.load(tmp_path, params, TOY_MAP)


# ---------------------------------------------------------------------------------------
# errors name the path, the shapes and the fix


def test_module_name_that_is_a_suffix_of_others_gets_its_own_rank_and_alpha(tmp_path):
    # PEFT's key "q" would also match "a.q" and "b.q"; each module must resolve to its own value
    params = {m: {"kernel": jnp.ones((8, 8))} for m in ("q", "x")}
    params |= {"a": {"q": {"kernel": jnp.ones((8, 8))}}, "b": {"q": {"kernel": jnp.ones((8, 8))}}}
    cfg = lj.LoraConfig(rules=(lj.Rule("q/kernel|x/kernel", rank=2, alpha=3.0),
                               lj.Rule(".*/q/kernel", rank=4, alpha=5.0)))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda w: w.replace(b=jnp.full(w.b.shape, 0.5)), lora, is_leaf=lj.is_lora)
    name_map = [(r"(.+)/kernel", r"\1")]
    assert sorted(peft.save(tmp_path, lora, name_map)) == ["a.q", "b.q", "q", "x"]
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    want = {"q": (2, 3), "x": (2, 3), "a.q": (4, 5), "b.q": (4, 5)}
    for module, (r, alpha) in want.items():
        assert _peft_value(c["rank_pattern"], module, c["r"]) == r, module
        assert _peft_value(c["alpha_pattern"], module, c["lora_alpha"]) == alpha, module
    back = peft.load(tmp_path, params, name_map)
    for path in ("q", "x", "a/q", "b/q"):
        got = back
        for k in path.split("/") + ["kernel"]:
            got = got[k]
        r, alpha = want[path.replace("/", ".")]
        assert (got.rank, got.alpha) == (r, alpha), path


def test_load_into_params_with_none_leaves(tmp_path):
    params = {"q": {"kernel": jnp.ones((8, 6))}}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=2),)))
    name_map = [(r"(\w+)/kernel", r"\1_proj")]
    peft.save(tmp_path, lora, name_map)
    back = peft.load(tmp_path, {"a": None, "q": {"kernel": jnp.ones((8, 6))}, "z": None}, name_map)
    assert back["a"] is None and back["z"] is None
    w, want = back["q"]["kernel"], lora["q"]["kernel"]
    assert lj.is_lora(w) and w.rank == 2
    np.testing.assert_array_equal(w.a, want.a)
    np.testing.assert_array_equal(w.b, want.b)


def test_save_rejects_what_peft_cannot_express(tmp_path):
    params, _ = _toy()
    cfg = lj.LoraConfig(rules=(lj.Rule("head/kernel", rank=2),), scaling=lambda a, r: a / r**0.25)
    _, lora = lj.split(jax.random.key(0), params, cfg)
    with pytest.raises(ValueError, match=r"custom.*w.replace\(alpha=w.scale \* w.rank, scaling='lora'\)"):
        peft.save(tmp_path, lora, TOY_MAP)
    _, lora = _toy()
    with pytest.raises(ValueError, match=r"head/kernel: the name map gives it no torch module path"):
        peft.save(tmp_path, lora, TOY_MAP.rules[:2])
    with pytest.raises(ValueError, match=r"layers/q/kernel: shape \(3, 8, 2, 4\) with stack axes \(0,\).*field"):
        peft.save(tmp_path, lora, [(r"(.*)/(kernel|embedding)", r"\1")])
    lora = {**lora, "head": {"kernel": lora["head"]["kernel"].replace(dropout=0.1)}}
    with pytest.raises(ValueError, match=r"one lora_dropout.*\[0.0, 0.1\]; pass dropout="):
        peft.save(tmp_path, lora, TOY_MAP)
    peft.save(tmp_path, lora, TOY_MAP, dropout=0.1)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_load_errors(tmp_path):
    _, params, _ = build("llama")
    with pytest.raises(ValueError, match=r"torch modules embeddings\.word_embeddings, encoder\.layer\.0\..* map to no Flax parameter"):
        peft.load(FIXTURES / "bert", params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"adapter_config\.json does not exist"):
        peft.load(tmp_path, params, peft.LLAMA)

    def variant(edit_config=None, edit_tensors=None):
        d = tmp_path / "variant"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(FIXTURES / "llama", d)
        if edit_config:
            c = json.loads((d / "adapter_config.json").read_text())
            edit_config(c)
            (d / "adapter_config.json").write_text(json.dumps(c))
        if edit_tensors:
            t = load_file(d / "adapter_model.safetensors")
            edit_tensors(t)
            save_file(t, d / "adapter_model.safetensors")
        return d

    # a DoRA config needs a magnitude for every module (tests/test_peft_dora.py has more)
    with pytest.raises(ValueError, match=r"use_dora=true, but the modules model\.embed_tokens.* no DoRA magnitude"):
        peft.load(variant(lambda c: c.update(use_dora=True)), params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: the tensors have rank 2 but r / rank_pattern give 4"):
        peft.load(variant(lambda c: c.update(rank_pattern={"embed_tokens": 6})), params, peft.LLAMA)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    with pytest.raises(ValueError, match=re.escape(key) + r" are DoRA magnitudes, but adapter_config\.json has use_dora=false"):
        peft.load(variant(edit_tensors=lambda t: t.update({key: np.ones(32, np.float32)})), params, peft.LLAMA)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=r"q_proj/kernel: Flax weight \(32, 32\).*needs lora_A \(4, 32\).*has \(4, 16\)"):
        peft.load(variant(edit_tensors=lambda t: t.update({q: t[q][:, :16].copy()})), params, peft.LLAMA)
    # the embedding copy PEFT stores next to an embedding adapter must equal params
    changed = jax.tree.map(lambda x: x, params)
    changed["model"]["embed_tokens"]["embedding"] = params["model"]["embed_tokens"]["embedding"] + 1.0
    with pytest.raises(ValueError, match=r"model/embed_tokens/embedding: the adapter stores its own base weight"):
        peft.load(FIXTURES / "llama", changed, peft.LLAMA)
    # an embedding adapter on a weight that is not an embedding
    with pytest.raises(ValueError, match=r"lora_embedding_A/lora_embedding_B.*used as 'linear'"):
        peft.load(FIXTURES / "llama", params, [("model/layers/0/mlp/up_proj/kernel", "model.embed_tokens"),
                                               ("model/embed_tokens/embedding", "model.layers.0.mlp.up_proj"),
                                               (r"(.*)/kernel", r"\1")])


def test_name_maps():
    assert peft.GPT2.torch_name("transformer/h/11/mlp/c_proj/kernel") == "transformer.h.11.mlp.c_proj"
    assert peft.GPT2.torch_name("h/0/attn/c_attn/kernel") == "h.0.attn.c_attn"  # FlaxGPT2Model
    assert peft.GPT2.torch_name("transformer/h/0/attn/c_attn/bias") is None
    assert peft.BERT.torch_name("roberta/encoder/layer/3/attention/output/dense/kernel") == \
        "roberta.encoder.layer.3.attention.output.dense"
    assert peft.BERT.torch_name("classifier/out_proj/kernel") == "classifier.out_proj"
    assert peft.LLAMA.torch_name("params/model/layers/7/mlp/gate_proj/kernel") == "model.layers.7.mlp.gate_proj"
    assert peft.LLAMA.torch_name("model/norm/weight") is None
    assert peft.LLAMA.axes_for("model/layers/0/mlp/up_proj/kernel") is None
    assert peft.HF.torch_name("params/encoder/block/0/layer/0/SelfAttention/q/kernel") == \
        "encoder.block.0.layer.0.SelfAttention.q"
    with pytest.raises(TypeError, match="flax_regex, torch_template"):
        peft.NameMap(rules=(("a",),))
    with pytest.raises(ValueError, match=r"may not set \['r'\]"):
        peft.NameMap(rules=(), config={"r": 4})
