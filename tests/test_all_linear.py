"""LoraConfig.all_linear: every matmul weight but the output head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
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
