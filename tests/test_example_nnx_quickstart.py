"""examples/nnx_quickstart.py: adapters learn, the merged NNX module matches, the base stays put."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora_jax as lj


def _example():
    import nnx_quickstart

    return nnx_quickstart


def test_nnx_quickstart_learns_merges_and_keeps_the_base(capsys):
    result = _example().main(steps=60)
    out = capsys.readouterr().out
    assert "trainable params" in out and "embed/embedding" in out

    # the adapters learn task 2
    assert result["after"] < 0.5 * result["before"]

    # the merged module is a plain NNX module computing the adapted forward
    merged, tokens = result["merged_model"], result["tokens"]
    assert isinstance(merged, nnx.Module)
    adapted = lj.nnx.call(result["graphdef"], result["base"], result["lora"], tokens)
    chex.assert_trees_all_close(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert result["max_diff"] < 1e-5
    assert abs(result["merged"] - result["after"]) < 1e-5

    # the base is exactly the pretrained state: training touched the adapters only
    pretrained = result["pretrained_state"]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, result["base"]), pretrained)
    assert sorted(p for p, _ in lj.targets(result["lora"])) == ["down/kernel", "embed/embedding", "up/kernel"]
    # the merged module: targets moved by the adapters, everything else as pretrained
    for module, name in (("up", "kernel"), ("down", "kernel"), ("embed", "embedding")):
        moved = getattr(getattr(merged, module), name)[...] - pretrained[module][name][...]
        assert float(jnp.max(jnp.abs(moved))) > 1e-3, (module, name)
    for module in ("up", "down"):
        np.testing.assert_array_equal(np.asarray(getattr(merged, module).bias[...]), pretrained[module]["bias"][...])
