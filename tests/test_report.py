"""summary and delta_norms against independent counts and numpy."""


import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from reference import np_delta_of, randomize


def _split():
    params = {
        "q": {"kernel": jnp.ones((16, 40))},
        "stack": {"kernel": jnp.ones((3, 8, 5))},
        "norm": {"scale": jnp.ones(40)},
    }
    cfg = lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=4, alpha=8.0),
                               lj.Rule("stack/kernel", rank=2, alpha=1.0, axes=((1,), (2,), (0,)))),
                        scaling="rslora")
    return lj.split(jax.random.key(0), params, cfg)


def test_summary_counts_every_factor_element():
    base, lora = _split()
    n = sum(x.size for x in jax.tree.leaves(lora))  # a and b are the only pytree children
    base_n = sum(x.size for x in jax.tree.leaves(base))
    assert n == 4 * (16 + 40) + 3 * 2 * (8 + 5)
    text = lj.summary(lora, base)
    assert f"trainable params: {n:,} || all params: {base_n + n:,}" in text
    assert f"trainable%: {100 * n / (base_n + n):.4f}" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:-1]}
    for path, w in lj.targets(lora):
        assert rows[path][-1] == f"{w.a.size + w.b.size:,}"
        assert rows[path][-3] == f"{w.alpha:g}" and float(rows[path][-2]) == round(w.scale, 4)
    assert lj.summary(lora).splitlines()[-1] == f"trainable params: {n:,} in 2 adapters"


def test_delta_norms_match_numpy_for_stacked_adapters():
    _, lora = _split()
    lora = randomize(lora, seed=3)
    norms = jax.jit(lj.delta_norms)(lora)
    assert sorted(norms) == ["q/kernel", "stack/kernel"]
    for path, w in lj.targets(lora):
        np.testing.assert_allclose(float(norms[path]), np.linalg.norm(np_delta_of(w)), rtol=1e-5)
