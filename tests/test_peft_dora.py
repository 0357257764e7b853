"""PEFT DoRA adapters (``use_dora: true``): import/export against files and outputs made by
real PEFT (torch-free).

The fixtures ``tests/fixtures/peft/llama_dora`` (DoRA on every linear layer and the token
embedding) and ``gpt2_dora`` (Conv1D weights, fan_in_fan_out, rsLoRA) come from
tests/fixtures/make_peft_fixtures.py: PEFT adapters with random factors and magnitudes
``||W + s·ΔW|| * (1 + 0.3·randn)`` on the base models of the ``llama`` and ``gpt2`` fixtures,
and PEFT's outputs on those fixtures' inputs.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from fixtures.flax_models import build
from lora_jax import peft

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft"
# DoRA fixture -> (the fixture whose base model it adapts, name map)
DORA = {"llama_dora": ("llama", peft.LLAMA), "gpt2_dora": ("gpt2", peft.GPT2)}
PREFIX = "base_model.model."
MAG = ".lora_magnitude_vector"


@pytest.fixture(scope="module", params=sorted(DORA))
def dora_model(request):
    name = request.param
    base_name, name_map = DORA[name]
    f, params, _ = build(base_name)
    io = load_file(FIXTURES / name / "outputs.safetensors")
    lora = peft.load(FIXTURES / name, params, name_map)
    return name, name_map, f, params, io, lora


def _args(io):
    return io["input_ids"], io["attention_mask"]


def _plain(lora):
    """The same factors without DoRA's magnitudes."""
    return jax.tree.map(lambda w: w.replace(m=None) if lj.is_lora(w) else w, lora, is_leaf=lj.is_lora)


# ---------------------------------------------------------------------------------------
# files written by real PEFT are read correctly


def test_dora_fixture_merged_matches_peft_outputs(dora_model):
    name, _, f, params, io, lora = dora_model
    targets = lj.targets(lora)
    assert len(targets) >= 8 and all(w.is_dora and w.dora_detach for _, w in targets)
    for path, w in targets:
        assert w.m.shape == w.m_shape and w.m.dtype == w.a.dtype == jnp.float32, path
    assert np.abs(io["adapted"] - io["base"]).max() > 0.3  # the adapter matters
    got = np.asarray(f(lj.merge(params, lora), *_args(io)))
    np.testing.assert_allclose(got, io["adapted"], atol=2e-5, rtol=0)
    # and DoRA's rescaling matters: the same factors as plain LoRA give another output
    plain = np.asarray(f(lj.merge(params, _plain(lora)), *_args(io)))
    assert np.abs(plain - io["adapted"]).max() > 0.1


def test_dora_fixture_wrap_merge_matches_peft_outputs(dora_model):
    _, _, f, params, io, lora = dora_model
    got = np.asarray(lj.wrap(f, strategy="merge")(params, lora, *_args(io)))
    np.testing.assert_allclose(got, io["adapted"], atol=2e-5, rtol=0)


def test_dora_fixture_factored_matches_peft_outputs(dora_model):
    # factored: lj.wrap's default strategy applies DoRA without forming the merged weight
    _, _, f, params, io, lora = dora_model
    got = np.asarray(lj.wrap(f)(params, lora, *_args(io)))
    np.testing.assert_allclose(got, io["adapted"], atol=2e-5, rtol=0)


def test_llama_dora_merged_weights_against_numpy():
    """Each merged weight is PEFT's ``m · V / ||V||_row`` with ``V = W + s·B@A`` in torch's
    (out, in) layout (embedding: (dim, vocab)), written out in numpy."""
    _, params, _ = build("llama")
    base = load_file(FIXTURES / "llama" / "base.safetensors")
    t = load_file(FIXTURES / "llama_dora" / "adapter_model.safetensors")
    cfg = json.loads((FIXTURES / "llama_dora" / "adapter_config.json").read_text())
    merged = lj.merge(params, peft.load(FIXTURES / "llama_dora", params, peft.LLAMA))
    modules = sorted(k[len(PREFIX):-len(MAG)] for k in t if k.endswith(MAG))
    assert len(modules) == 15
    for module in modules:
        embed = module.endswith("embed_tokens")
        fa, fb = (".lora_embedding_A", ".lora_embedding_B") if embed else (".lora_A.weight", ".lora_B.weight")
        A, B, mag = (t[PREFIX + module + k].astype(np.float64) for k in (fa, fb, MAG))
        r = A.shape[0]
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if module.endswith(k)), cfg["lora_alpha"])
        W = base[module + ".weight"].astype(np.float64)
        W = W.T if embed else W  # (out, in): embedding (dim, vocab)
        V = W + alpha / r * (B @ A)
        want = mag[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
        got = merged
        for k in module.split("."):
            got = got[k]
        got = np.asarray(got["embedding" if embed else "kernel"])
        np.testing.assert_allclose(got.T, want, rtol=1e-5, atol=1e-5, err_msg=module)


# ---------------------------------------------------------------------------------------
# files we write are what PEFT writes


def test_save_reproduces_peft_dora_files(dora_model, tmp_path):
    name, name_map, _, _, _, lora = dora_model
    orig_cfg = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    orig = load_file(FIXTURES / name / "adapter_model.safetensors")
    written = peft.save(tmp_path, lora, name_map, task_type=orig_cfg["task_type"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = load_file(tmp_path / "adapter_model.safetensors")
    keys = {k for k in orig if ".lora_" in k}  # PEFT also stores the embedding's base weight
    assert set(ours) == keys and sum(k.endswith(MAG) for k in keys) == len(written)
    for k in keys:
        assert ours[k].dtype == orig[k].dtype and ours[k].shape == orig[k].shape, k
        np.testing.assert_array_equal(ours[k], orig[k], err_msg=k)
    for field in ("use_dora", "use_rslora", "fan_in_fan_out", "peft_type", "bias", "lora_bias"):
        assert cfg[field] == orig_cfg[field], field
    assert cfg["use_dora"] is True


# ---------------------------------------------------------------------------------------
# round trips, stacked and multi-axis weights


TOY_MAP = peft.NameMap(
    rules=(("layers/q/kernel", "model.layers.{}.attn.q_proj"), ("embed/embedding", "model.embed_tokens"),
           ("head/kernel", "lm_head")),
    axes=(("layers/q/kernel", lj.Axes((1,), (2, 3), (0,))),),
)


def _toy(**config):
    """A scanned 3-layer stack of DenseGeneral kernels (8 -> 2x4), an embedding and a head,
    and random DoRA adapters for them."""
    rng = np.random.default_rng(7)
    params = {
        "layers": {"q": {"kernel": jnp.asarray(rng.standard_normal((3, 8, 2, 4)), jnp.float32)}},
        "embed": {"embedding": jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)},
    }
    cfg = lj.LoraConfig(dora=True, rules=(
        lj.Rule("layers/q/kernel", rank=3, alpha=5.0, axes=lj.Axes((1,), (2, 3), (0,))),
        lj.Rule("embed/embedding", rank=2, alpha=4.0),
        lj.Rule("head/kernel", rank=3, alpha=6.0),
    ), **config)
    _, lora = lj.split(jax.random.key(1), params, cfg)
    lora = jax.tree.map(lambda w: w.replace(
        a=jnp.asarray(rng.standard_normal(w.a_shape), jnp.float32),
        b=jnp.asarray(rng.standard_normal(w.b_shape), jnp.float32),
        m=jnp.asarray(w.m * (1 + 0.3 * rng.standard_normal(w.m_shape)), jnp.float32)), lora, is_leaf=lj.is_lora)
    return params, lora


def _assert_same(lora, back, fields=("shape", "in_axes", "out_axes", "stack_axes", "rank", "alpha", "scale", "kind")):
    assert [p for p, _ in lj.targets(lora)] == [p for p, _ in lj.targets(back)]
    for (p, x), (_, y) in zip(lj.targets(lora), lj.targets(back)):
        assert y.is_dora and y.dora_detach, p
        for field in fields:
            assert getattr(x, field) == getattr(y, field), (p, field)
        for leaf in ("a", "b", "m"):
            np.testing.assert_array_equal(getattr(x, leaf), getattr(y, leaf), err_msg=f"{p}.{leaf}")


def test_stacked_multi_axis_dora_roundtrip_against_numpy(tmp_path):
    params, lora = _toy()
    written = peft.save(tmp_path, lora, TOY_MAP)
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    assert sorted(k for k in t if k.endswith(MAG)) == sorted(PREFIX + m + MAG for m in written)
    w = lora["layers"]["q"]["kernel"]
    merged = np.asarray(lj.merge(params, lora)["layers"]["q"]["kernel"])
    for i in range(3):  # torch's view of layer i: (out = 2 heads x 4 flattened in C order, in)
        key = f"{PREFIX}model.layers.{i}.attn.q_proj"
        A, B, mag = t[key + ".lora_A.weight"], t[key + ".lora_B.weight"], t[key + MAG]
        assert mag.shape == (8,)
        np.testing.assert_array_equal(mag, np.asarray(w.m)[i].reshape(-1))
        W = np.asarray(params["layers"]["q"]["kernel"][i], np.float64).reshape(8, 8).T
        V = W + 5.0 / 3 * (B.astype(np.float64) @ A)
        want = mag[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
        np.testing.assert_allclose(merged[i], want.T.reshape(8, 2, 4), rtol=1e-5, atol=1e-5)
    back = peft.load(tmp_path, params, TOY_MAP)
    _assert_same(lora, back)
    # abstract params load the same adapters (no layer is missing, so no norm is needed)
    _assert_same(lora, peft.load(tmp_path, jax.eval_shape(lambda p: p, params), TOY_MAP))


def test_dora_detach_false_saves_as_peft_detached(tmp_path):
    params, lora = _toy(dora_detach=False)
    assert all(not w.dora_detach for _, w in lj.targets(lora))
    peft.save(tmp_path, lora, TOY_MAP)
    back = peft.load(tmp_path, params, TOY_MAP)
    _assert_same(lora, back)  # and dora_detach=True: PEFT always detaches the norm
    for x, y in zip(jax.tree.leaves(lj.merge(params, lora)), jax.tree.leaves(lj.merge(params, back))):
        np.testing.assert_array_equal(x, y)


def test_skipped_stack_layer_gets_the_weight_norm(tmp_path):
    params, lora = _toy()
    peft.save(tmp_path, lora, TOY_MAP)
    t = load_file(tmp_path / "adapter_model.safetensors")
    for suffix in (".lora_A.weight", ".lora_B.weight", MAG):
        del t[f"{PREFIX}model.layers.1.attn.q_proj{suffix}"]
    save_file(t, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"target_modules lists \['model\.layers\.1\.attn\.q_proj'\]"):
        back = peft.load(tmp_path, params, TOY_MAP)
    merged = np.asarray(lj.merge(params, back)["layers"]["q"]["kernel"])
    np.testing.assert_allclose(merged[1], params["layers"]["q"]["kernel"][1], rtol=1e-5, atol=1e-6)
    full = np.asarray(lj.merge(params, lora)["layers"]["q"]["kernel"])
    np.testing.assert_allclose(merged[[0, 2]], full[[0, 2]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"layers/q/kernel: the DoRA file has no module for stack indices \[\(1,\)\].*concrete params"), \
            pytest.warns(UserWarning):
        peft.load(tmp_path, jax.eval_shape(lambda p: p, params), TOY_MAP)


def test_magnitude_key_with_weight_suffix_loads_the_same(tmp_path):
    _, params, _ = build("llama")
    d = tmp_path / "old"
    shutil.copytree(FIXTURES / "llama_dora", d)
    t = load_file(d / "adapter_model.safetensors")
    save_file({(k + ".weight" if k.endswith(MAG) else k): v for k, v in t.items()}, d / "adapter_model.safetensors")
    _assert_same(peft.load(FIXTURES / "llama_dora", params, peft.LLAMA), peft.load(d, params, peft.LLAMA))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file(t | {key + ".weight": t[key]}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: .*q_proj\.lora_magnitude_vector and .*"
                                         r"q_proj\.lora_magnitude_vector\.weight are both"):
        peft.load(d, params, peft.LLAMA)


# ---------------------------------------------------------------------------------------
# errors name the file, the key, the shapes and the fix


def test_save_rejects_a_mix_of_dora_and_plain_adapters(tmp_path):
    _, lora = _toy()
    mixed = {**lora, "head": {"kernel": lora["head"]["kernel"].replace(m=None)}}
    with pytest.raises(ValueError, match=r"use_dora is one setting.*DoRA adapters \(.*layers/q/kernel.*\) and "
                                         r"plain ones \(head/kernel\).*two adapters.*dora_norm_sq"):
        peft.save(tmp_path, mixed, TOY_MAP)
    bad = {**lora, "head": {"kernel": lora["head"]["kernel"].replace(m=jnp.ones(4))}}
    with pytest.raises(ValueError, match=r"head/kernel: DoRA magnitude m has shape \(4,\).*needs \(5,\)"):
        peft.save(tmp_path, bad, TOY_MAP)


def test_dora_load_errors(tmp_path):
    _, params, _ = build("llama")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"

    def variant(edit_tensors=None, edit_config=None):
        d = tmp_path / "variant"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(FIXTURES / "llama_dora", d)
        if edit_tensors:
            t = load_file(d / "adapter_model.safetensors")
            edit_tensors(t)
            save_file(t, d / "adapter_model.safetensors")
        if edit_config:
            c = json.loads((d / "adapter_config.json").read_text())
            edit_config(c)
            (d / "adapter_config.json").write_text(json.dumps(c))
        return d

    with pytest.raises(ValueError, match=r"variant/adapter_model\.safetensors: .*q_proj\.lora_magnitude_vector has "
                                         r"shape \(16,\), but the Flax weight \(32, 32\) .* needs \(32,\)"):
        peft.load(variant(lambda t: t.update({key: t[key][:16].copy()})), params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"variant/adapter_model\.safetensors: adapter_config\.json says use_dora=true, "
                                         r"but the modules model\.layers\.0\.self_attn\.q_proj have no DoRA magnitude "
                                         r"\(key '" + key.replace(".", r"\.") + r"', shape \(32,\)\)"):
        peft.load(variant(lambda t: t.pop(key)), params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.* are DoRA magnitudes, but adapter_config\.json has "
                                         r"use_dora=false.*Set use_dora to true"):
        peft.load(variant(edit_config=lambda c: c.update(use_dora=False)), params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"use_dora is 'yes'; expected true or false"):
        peft.load(variant(edit_config=lambda c: c.update(use_dora="yes")), params, peft.LLAMA)
    with pytest.raises(ValueError, match=r"hold DoRA adapters, which lj.stack cannot stack.*load each directory"):
        peft.load([FIXTURES / "llama_dora", FIXTURES / "llama_dora"], params, peft.LLAMA)
