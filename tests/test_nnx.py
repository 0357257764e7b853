"""lj.nnx: NNX modules get the functional split / call / merge face."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Linear(12, 12, rngs=rngs)
        self.v = nnx.Linear(12, 12, rngs=rngs)
        self.norm = nnx.BatchNorm(12, use_running_average=True, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.out = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        h = self.norm(jnp.tanh(self.q(x)) + self.v(x))
        return self.out(self.drop(h))


def _split():
    model = Block(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 12))
    cfg = lj.LoraConfig(rules=(lj.Rule(r"(q|v)/kernel", rank=3, alpha=6.0),))
    graphdef, base, lora = lj.nnx.split(model, cfg, jax.random.key(2), args=(x,))
    return model, x, graphdef, base, lora


def test_split_paths_and_untouched_state():
    model, x, graphdef, base, lora = _split()
    assert sorted(p for p, _ in lj.targets(lora)) == ["q/kernel", "v/kernel"]
    # base is the module's full state, unchanged (RNG keys and batch stats included)
    _, state = nnx.split(model)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, base),
                                jax.tree.map(lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, state))
    # at init the adapted module computes exactly what the module computes
    np.testing.assert_array_equal(np.asarray(lj.nnx.call(graphdef, base, lora, x)), np.asarray(model(x)))


def test_call_equals_merged_module_after_training():
    model, x, graphdef, base, lora = _split()
    y = jax.random.normal(jax.random.key(3), (6, 3))
    tx = optax.adam(3e-2)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        loss, g = jax.value_and_grad(lambda l: jnp.mean((lj.nnx.call(graphdef, base, l, x) - y) ** 2))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    losses = []
    for _ in range(25):
        lora, opt, loss = step(lora, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    merged_model = lj.nnx.merge(graphdef, base, lora)
    chex.assert_trees_all_close(merged_model(x), lj.nnx.call(graphdef, base, lora, x), rtol=1e-5, atol=1e-5)
    # numpy reference for the q kernel
    w = lora["q"]["kernel"].get_value()
    ref = np.asarray(base["q"]["kernel"].get_value(), np.float64) + w.scale * np.asarray(w.a, np.float64).T @ np.asarray(w.b, np.float64)
    np.testing.assert_allclose(np.asarray(merged_model.q.kernel[...]), ref, rtol=1e-5, atol=1e-6)


def test_combined_tree_training_with_rng_state_in_base():
    # the base holds Dropout's RNG key and BatchNorm statistics: lj.apply_updates leaves it be
    model, x, graphdef, base, lora = _split()
    y = jax.random.normal(jax.random.key(3), (6, 3))
    tx = lj.optimizer(optax.adam(3e-2))
    state = {"base": base, "lora": lora}
    opt = tx.init(state)

    def loss(lora):
        return jnp.mean((lj.nnx.call(graphdef, base, lora, x) - y) ** 2)

    @jax.jit
    def step(state, opt):
        # any tree of the base's structure serves as its "gradient": it is discarded
        g = {"base": state["base"], "lora": jax.grad(loss)(state["lora"])}
        upd, opt = tx.update(g, opt, state)
        return lj.apply_updates(state, upd), opt

    l0 = float(loss(lora))
    for _ in range(10):
        state, opt = step(state, opt)
    assert float(loss(state["lora"])) < l0
    keyed = lambda t: jax.tree.map(lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, t)
    chex.assert_trees_all_equal(keyed(state["base"]), keyed(base))


def test_call_reuses_its_trace_across_calls():
    from flax import nnx

    traced = []

    class Counting(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(6, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            traced.append(x.shape)
            return self.lin(x)

    cfg = lj.LoraConfig(rules=(lj.Rule(r"lin/kernel", rank=2),))
    graphdef, base, lora = lj.nnx.split(Counting(), cfg, jax.random.key(1))
    for _ in range(3):
        lj.nnx.call(graphdef, base, lora, jnp.ones((2, 6)))
    assert traced == [(2, 6)]
