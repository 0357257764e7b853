"""LoraConfig.all_linear: every matmul weight but the output head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


class TinyLM(nn.Module):
    vocab: int = 32
    d: int = 16

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.d, name="embed")(tokens)
        for i in range(2):
            a = nn.Dense(self.d, name=f"attn_{i}")(nn.LayerNorm(name=f"ln_{i}")(h))
            h = h + a
            m = nn.Dense(2 * self.d, name=f"up_{i}")(h)
            h = h + nn.Dense(self.d, name=f"down_{i}")(nn.gelu(m))
        return nn.Dense(self.vocab, name="proj_out")(nn.LayerNorm(name="ln_f")(h))


def _targets(lora):
    return sorted(p for p, _ in lj.targets(lora))


def test_traced_all_linear_skips_embedding_norms_and_head():
    model = TinyLM()
    tokens = jnp.zeros((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    cfg = lj.LoraConfig.all_linear(rank=4, alpha=8.0)
    _, lora = lj.split(jax.random.key(1), variables, cfg, apply_fn=model.apply, args=(tokens,))
    expected = sorted(f"params/{n}_{i}/kernel" for i in range(2) for n in ("attn", "up", "down"))
    # proj_out is found as the head by tracing (its product is the output), not by name
    assert _targets(lora) == expected


def test_untraced_all_linear_uses_names():
    params = {
        "params": {
            "blk": {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}},
            "embed": {"embedding": jnp.ones((10, 8))},
            "lm_head": {"kernel": jnp.ones((8, 10))},
        }
    }
    _, lora = lj.split(jax.random.key(1), params, lj.LoraConfig.all_linear(rank=2))
    assert _targets(lora) == ["params/blk/q/kernel"]


def test_all_linear_exclude_and_errors():
    model = TinyLM()
    tokens = jnp.zeros((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    cfg = lj.LoraConfig.all_linear(rank=4, exclude=(r".*/up_\d/.*",))
    _, lora = lj.split(jax.random.key(1), variables, cfg, apply_fn=model.apply, args=(tokens,))
    assert not any("up_" in p for p in _targets(lora))
    with pytest.raises(ValueError, match="matches nothing"):
        lj.split(jax.random.key(1), {"w": jnp.ones(3)}, lj.LoraConfig.all_linear(rank=2))


def test_head_found_through_a_loss():
    # tracing a loss (log_softmax, labels picked by index) still finds the logits layer
    model = TinyLM()
    tokens = jnp.zeros((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)

    def loss(v, t):
        logits = model.apply(v, t)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], axis=-1))

    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=loss, args=(tokens,))
    assert "params/proj_out/kernel" not in _targets(lora)
    assert "params/down_1/kernel" in _targets(lora)


def test_head_found_through_masked_logits_and_beside_hidden_outputs():
    class Clf(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.relu(nn.Dense(16, name="fc1")(x))
            logits = jnp.where(mask, nn.Dense(5, name="proj")(h), -1e9)
            return {"logits": logits, "hidden": h}

    model = Clf()
    x, mask = jnp.ones((3, 8)), jnp.ones((3, 5), bool)
    variables = model.init(jax.random.key(0), x, mask)
    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=model.apply, args=(x, mask))
    assert _targets(lora) == ["params/fc1/kernel"]


def test_encoder_without_head_keeps_its_last_layer():
    # a residual stream ends the model: no weight is the head
    class Enc(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = x + nn.Dense(8, name=f"mlp_{i}")(nn.relu(x))
            return x

    model = Enc()
    x = jnp.ones((3, 8))
    variables = model.init(jax.random.key(0), x)
    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=model.apply, args=(x,))
    assert _targets(lora) == ["params/mlp_0/kernel", "params/mlp_1/kernel"]


def test_everything_is_head_error_names_the_head():
    model = nn.Dense(4)
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"output head.*params/kernel"):
        lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2), apply_fn=model.apply, args=(x,))


class _Block(nn.Module):
    """A residual MLP block: its layers never reach an output on their own."""

    @nn.compact
    def __call__(self, h):
        return h + nn.Dense(h.shape[-1], name="down")(nn.gelu(nn.Dense(2 * h.shape[-1], name="up")(h)))


class MaskedLM(nn.Module):
    """RoBERTa-style: a transform (lm_head/dense, hidden -> hidden) under the head's name,
    then the vocabulary projection (lm_head/decoder)."""

    @nn.compact
    def __call__(self, tokens):
        h = _Block(name="layer_0")(nn.Embed(40, 16, name="embed")(tokens))
        h = nn.LayerNorm(name="ln")(nn.gelu(nn.Dense(16, name="dense")(h)))
        return nn.Dense(40, name="decoder")(h)


class Classifier(nn.Module):
    """RoBERTa's classification head: classifier/dense (hidden -> hidden), tanh, then
    classifier/out_proj (hidden -> classes)."""

    @nn.compact
    def __call__(self, x):
        h = _Block(name="layer_0")(nn.Dense(16, name="stem")(x))
        h = jnp.tanh(nn.Dense(16, name="dense")(h[:, 0]))
        return nn.Dense(3, name="out_proj")(h)


class Pretraining(nn.Module):
    """BERT pretraining: masked-LM logits over the vocabulary and a 2-way next-sentence
    classifier, side by side: only the vocabulary projection is the head."""

    @nn.compact
    def __call__(self, tokens):
        h = _Block(name="layer_0")(nn.Embed(40, 16, name="embed")(tokens))
        t = nn.LayerNorm(name="ln")(nn.gelu(nn.Dense(16, name="transform")(h)))
        return nn.Dense(40, name="decoder")(t), nn.Dense(2, name="seq_relationship")(h[:, 0])


class TwoTower(nn.Module):
    """CLIP-like: a text and an image tower, each ending in a projection to a shared
    8-dimensional space; the normalized embeddings are returned with their similarity."""

    similarity: bool = True

    @nn.compact
    def __call__(self, tokens, patches):
        t = _Block(name="text_0")(nn.Embed(40, 16, name="embed")(tokens))
        i = _Block(name="image_0")(nn.Dense(12, name="patch")(patches))
        t = nn.Dense(8, use_bias=False, name="text_projection")(t[:, 0])
        i = nn.Dense(8, use_bias=False, name="visual_projection")(i.mean(axis=1))
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
        if not self.similarity:
            return t, i
        return t @ i.T * jnp.exp(self.param("logit_scale", nn.initializers.zeros, ())), t, i


class Pooled(nn.Module):
    """BERT's base model: the hidden states and a pooler (hidden -> hidden, tanh)."""

    @nn.compact
    def __call__(self, x):
        h = _Block(name="layer_0")(nn.Dense(16, name="stem")(x))
        return h, jnp.tanh(nn.Dense(16, name="pooler")(h[:, 0]))


_TOKENS = np.arange(10, dtype=np.int32).reshape(2, 5)
_FEATURES = np.ones((2, 5, 6), np.float32)
_BLOCK = lambda n: [f"params/{n}/{k}/kernel" for k in ("down", "up")]  # noqa: E731
_HEADS = {
    "masked LM": (MaskedLM(), (_TOKENS,), _BLOCK("layer_0") + ["params/dense/kernel"]),
    "classifier": (Classifier(), (_FEATURES,), _BLOCK("layer_0") + ["params/dense/kernel", "params/stem/kernel"]),
    "pretraining": (Pretraining(), (_TOKENS,),
                    _BLOCK("layer_0") + ["params/seq_relationship/kernel", "params/transform/kernel"]),
    "two towers": (TwoTower(), (_TOKENS, _FEATURES), _BLOCK("image_0") + _BLOCK("text_0") + [
        "params/patch/kernel", "params/text_projection/kernel", "params/visual_projection/kernel"]),
    "two towers, embeddings only": (TwoTower(similarity=False), (_TOKENS, _FEATURES), _BLOCK("image_0") + _BLOCK(
        "text_0") + ["params/patch/kernel", "params/text_projection/kernel", "params/visual_projection/kernel"]),
    "pooler": (Pooled(), (_FEATURES,), _BLOCK("layer_0") + ["params/pooler/kernel", "params/stem/kernel"]),
}


@pytest.mark.parametrize("name", list(_HEADS))
def test_traced_head_is_the_output_embedding_or_the_classifier(name):
    model, args, expected = _HEADS[name]
    variables = model.init(jax.random.key(0), *args)
    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=model.apply, args=args)
    assert _targets(lora) == sorted(expected)


def test_traced_head_ignores_head_names():
    # the same masked LM with its layers under the head's name: the transform is adapted,
    # the decoder left out, and exactly as without the names
    class Named(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return MaskedLM(name="lm_head")(tokens)

    model = Named()
    variables = model.init(jax.random.key(0), _TOKENS)
    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=model.apply, args=(_TOKENS,))
    assert _targets(lora) == sorted(f"params/lm_head/{p}" for p in (
        "layer_0/down/kernel", "layer_0/up/kernel", "dense/kernel"))


def _hf(cls_name, config, shapes):
    transformers = pytest.importorskip("transformers")
    with jax.numpy_rank_promotion("allow"):  # Hugging Face's Flax models rely on rank promotion
        model = getattr(transformers, cls_name)(config, _do_init=False)
        return model, jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), shapes)


@pytest.mark.slow
def test_hugging_face_roberta_lm_head_dense_is_adapted_and_decoder_left_out():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, tie_word_embeddings=False)
    model, params = _hf("FlaxRobertaForMaskedLM", cfg, (1, 6))

    def f(p, ids):
        with jax.numpy_rank_promotion("allow"):
            return model(ids, params=p).logits

    _, lora = lj.split(jax.random.key(1), params, lj.LoraConfig.all_linear(rank=2), apply_fn=f,
                       args=(np.ones((1, 6), np.int32),))
    layer = "roberta/encoder/layer/0/"
    assert _targets(lora) == sorted([
        "lm_head/dense/kernel", *(layer + p + "/kernel" for p in (
            "attention/output/dense", "attention/self/key", "attention/self/query", "attention/self/value",
            "intermediate/dense", "output/dense"))])


@pytest.mark.slow
def test_hugging_face_clip_keeps_both_projections():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=8)  # as many as the text positions: a position table is no vocabulary
    model, params = _hf("FlaxCLIPModel", cfg, ((1, 8), (1, 8, 8, 3)))

    def f(p, ids, pixels):
        with jax.numpy_rank_promotion("allow"):
            out = model(ids, pixels, params=p)
            return out.logits_per_text, out.text_embeds, out.image_embeds

    _, lora = lj.split(jax.random.key(1), params, lj.LoraConfig.all_linear(rank=2), apply_fn=f,
                       args=(np.ones((1, 8), np.int32), np.ones((1, 3, 8, 8), np.float32)))
    layer = "encoder/layers/0/"
    tower = [layer + p + "/kernel" for p in ("mlp/fc1", "mlp/fc2", "self_attn/k_proj", "self_attn/out_proj",
                                               "self_attn/q_proj", "self_attn/v_proj")]
    # the patch embedding is a conv, which all_linear leaves alone
    assert _targets(lora) == sorted(["text_projection/kernel", "visual_projection/kernel",
                                     *(f"{m}/{p}" for m in ("text_model", "vision_model") for p in tower)])


class _Routed(nn.Module):
    """A mixture-of-experts layer: a router scores 4 experts, each token takes its top-k
    (``argmax`` for k = 1, ``top_k`` for k = 2, ``approx_max_k`` for k = 3, choosing 2) and
    the chosen experts' products are mixed."""

    k: int = 2

    @nn.compact
    def __call__(self, x):
        experts = self.param("experts", nn.initializers.lecun_normal(batch_axis=(0,)), (4, 8, 8))
        scores = nn.Dense(4, name="router")(x)
        if self.k == 1:
            picked, weights = jnp.argmax(scores, -1)[:, None], jnp.ones((x.shape[0], 1))
        elif self.k == 2:
            weights, picked = jax.lax.top_k(scores, 2)
        else:
            weights, picked = jax.lax.approx_max_k(scores, 2)
        y = jnp.einsum("td,tkdo->tko", x, experts[picked])
        return nn.Dense(8, name="out")(x + jnp.einsum("tko,tk->to", y, jax.nn.softmax(weights, -1)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_router_is_left_out_and_the_experts_adapted(k):
    model, x = _Routed(k), jnp.ones((6, 8))
    params = model.init(jax.random.key(0), x)
    _, lora = lj.split(jax.random.key(1), params, lj.LoraConfig.all_linear(rank=2), apply_fn=model.apply, args=(x,))
    assert _targets(lora) == ["params/experts", "params/out/kernel"]
    explicit = lj.LoraConfig(rules=(lj.Rule(r"params/router/kernel", rank=2),))   # asked for by name: adapted
    _, lora = lj.split(jax.random.key(1), params, explicit, apply_fn=model.apply, args=(x,))
    assert _targets(lora) == ["params/router/kernel"]
