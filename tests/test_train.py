"""Training: adapters learn, the base never changes, no recompiles, no base optimizer state."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48, name="fc1")(x))
        x = nn.relu(nn.Dense(48, name="fc2")(x))
        return nn.Dense(4, name="head")(x)


def _setup():
    model = Net()
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 16))
    y = jax.random.normal(ky, (64, 4))
    variables = model.init(kp, x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r"params/fc\d/kernel", rank=4, alpha=8.0),
                               lj.Rule(r"params/head/kernel", rank=2, alpha=2.0)))
    base, lora = lj.split(jax.random.key(1), variables, cfg, apply_fn=model.apply, args=(x,))
    fwd = lj.wrap(model.apply)

    def loss_fn(base, lora):
        return jnp.mean((fwd(base, lora, x) - y) ** 2)

    return base, lora, loss_fn


def _sizes(tree):
    return sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("make_tx", [lambda: optax.sgd(0.5), lambda: optax.adam(1e-2)], ids=["sgd", "adam"])
def test_lora_only_and_combined_tree_train_identically(make_tx):
    base, lora0, loss_fn = _setup()
    base_before = jax.tree.map(np.asarray, base)
    traces = {"lora": 0, "combined": 0}

    # (1) canonical: grads w.r.t. lora only, base passed but not differentiated
    tx = make_tx()

    @jax.jit
    def step(base, lora, opt):
        traces["lora"] += 1
        loss, g = jax.value_and_grad(loss_fn, argnums=1)(base, lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    lora, opt = lora0, tx.init(lora0)
    losses = []
    for _ in range(20):
        lora, opt, loss = step(base, lora, opt)
        losses.append(float(loss))
    assert traces["lora"] == 1  # second step did not retrace
    assert losses[-1] < 0.8 * losses[0]
    # optimizer state: at most two moments per adapter element plus a step count
    lora_n = sum(_sizes(lora0))
    assert sum(_sizes(opt)) <= 2 * lora_n + 1 < sum(_sizes(base))

    # (2) lj.optimizer over the combined tree
    ctx = lj.optimizer(make_tx())

    @jax.jit
    def cstep(state, copt):
        traces["combined"] += 1
        loss, g = jax.value_and_grad(lambda s: loss_fn(s["base"], s["lora"]))(state)
        upd, copt = ctx.update(g, copt, state)
        return optax.apply_updates(state, upd), copt, loss

    state = {"base": base, "lora": lora0}
    copt = ctx.init(state)
    # set_to_zero: the base gets no state, so the state is exactly the lora-only one's
    assert sum(_sizes(copt)) == sum(_sizes(tx.init(lora0)))
    closses = []
    for _ in range(20):
        state, copt, loss = cstep(state, copt)
        closses.append(float(loss))
    assert traces["combined"] == 1
    np.testing.assert_allclose(closses, losses, rtol=1e-5)
    chex.assert_trees_all_close(state["lora"], lora, rtol=1e-5, atol=1e-6)

    # the base is bit-identical after both trainings
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, base), base_before)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["base"]), base_before)
    # and the adapters really moved
    assert float(jnp.abs(lora["params"]["fc1"]["kernel"].b).max()) > 0


def test_donated_step_keeps_working():
    base, lora, loss_fn = _setup()
    tx = optax.adam(1e-2)

    def step(lora, opt, base):
        g = jax.grad(loss_fn, argnums=1)(base, lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt

    jstep = jax.jit(step, donate_argnums=(0, 1))
    opt = tx.init(lora)
    l0 = float(loss_fn(base, lora))
    for _ in range(10):
        lora, opt = jstep(lora, opt, base)
    assert float(loss_fn(base, lora)) < l0
    assert jstep._cache_size() == 1
