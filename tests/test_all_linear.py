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


def test_loss_output_keeps_last_layers_linear():
    # when the function returns a loss mixing in labels, the head is found by name only:
    # proj_out is then adapted (a documented limit), the residual writers always are
    model = TinyLM()
    tokens = jnp.zeros((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)

    def loss(v, t):
        logits = model.apply(v, t)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], axis=-1))

    _, lora = lj.split(jax.random.key(1), variables, lj.LoraConfig.all_linear(rank=2),
                       apply_fn=loss, args=(tokens,))
    assert "params/down_1/kernel" in _targets(lora)
    assert "params/proj_out/kernel" in _targets(lora)
