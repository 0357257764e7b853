"""Training the batch's adapters of a large stack: lj.batch_slots, lj.take_adapters and
lj.put_adapters against the dense step over the whole stack."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj

PARAMS = {"up": jax.random.normal(jax.random.key(0), (6, 5)), "down": jax.random.normal(jax.random.key(1), (5, 4))}


def f(p, x):
    return jnp.tanh(x @ p["up"]) @ p["down"]


@functools.lru_cache(maxsize=None)
def _stack(n, seed=0):
    loras = []
    for k in range(n):
        rule = lj.Rule("up|down" if k % 2 else "up", rank=1 + k % 3, alpha=2.0)
        _, lora = lj.split(jax.random.key(seed + k), PARAMS, lj.LoraConfig(rules=(rule,)))
        loras.append(jax.tree.map(lambda w: w.replace(b=0.1 * jnp.ones_like(w.b) * (k + 1)), lora, is_leaf=lj.is_lora))
    return lj.stack(loras)


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 5), ids=st.lists(st.integers(-1, 6), min_size=4, max_size=4))
def test_batch_slots_and_take_put_round_trip(n, ids):
    stacked = _stack(n)
    ids = jnp.array(ids, jnp.int32)
    slots, local = lj.batch_slots(stacked, ids)
    used = sorted({i for i in ids.tolist() if 0 <= i < n})
    assert slots.tolist() == used + [n] * (len(ids) - len(used))
    for i, j in zip(ids.tolist(), local.tolist()):
        assert (j == -1) if not 0 <= i < n else slots[j] == i
    part = jax.jit(lj.take_adapters)(stacked, slots)
    for k, s in enumerate(slots.tolist()):
        for w, p in zip(jax.tree.leaves(stacked, is_leaf=lj.stacked.is_stacked),
                        jax.tree.leaves(part, is_leaf=lj.stacked.is_stacked)):
            want = w.a[s] if s < n else jnp.zeros_like(w.a[0])
            np.testing.assert_array_equal(p.a[k], want)
            # (the per-adapter numbers become float32 arrays in a JAX operation, as documented)
            assert float(p.scale[k]) == (float(np.float32(w.scale[s])) if s < n else 0.0)
    back = jax.jit(lj.put_adapters)(stacked, slots, part)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(x, np.asarray(y, x.dtype))


def _steps(tx, sparse):
    def loss(s, x, ids):
        return jnp.sum(lj.wrap(f)(PARAMS, s, x, adapter_ids=ids) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(stacked, opt, x, ids):
        if not sparse:
            updates, opt = tx.update(jax.grad(loss)(stacked, x, ids), opt, stacked)
            return optax.apply_updates(stacked, updates), opt
        slots, local = lj.batch_slots(stacked, ids)
        sub, sub_opt = lj.take_adapters(stacked, slots), lj.take_adapters(opt, slots)
        updates, sub_opt = tx.update(jax.grad(loss)(sub, x, local), sub_opt, sub)
        return lj.put_adapters(stacked, slots, optax.apply_updates(sub, updates)), lj.put_adapters(opt, slots, sub_opt)

    return step


def _train(tx, sparse, batches, n=6):
    stacked = jax.tree.map(jnp.copy, _stack(n))  # (the steps donate it)
    opt = tx.init(stacked)
    step = _steps(tx, sparse)
    for x, ids in batches:
        stacked, opt = step(stacked, opt, x, ids)
    return stacked, opt


BATCHES = [(jax.random.normal(jax.random.key(10 + i), (3, 6)), jnp.array(ids, jnp.int32))
           for i, ids in enumerate([[4, 1, 4], [0, -1, 1], [1, 4, 4]])]


def test_sparse_sgd_step_equals_the_dense_one():
    """With SGD an adapter absent from a batch gets no update either way: the two agree on
    every slot, and the slots no batch uses stay bit for bit."""
    dense, _ = _train(optax.sgd(0.1), False, BATCHES)
    sparse, _ = _train(optax.sgd(0.1), True, BATCHES)
    start = _stack(6)
    for a, b, s in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse), jax.tree.leaves(start)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for w, w0 in zip(jax.tree.leaves(sparse, is_leaf=lj.stacked.is_stacked),
                     jax.tree.leaves(start, is_leaf=lj.stacked.is_stacked)):
        for k in (2, 3, 5):
            np.testing.assert_array_equal(w.b[k], w0.b[k])
    assert float(jnp.abs(sparse["up"].b[4] - start["up"].b[4]).max()) > 0


def test_sparse_adam_is_lazy():
    """Adam through take/put updates the batch's slots as the dense step does on a first
    step, and leaves the moments of absent adapters as they were (lazy Adam), where the
    dense step keeps moving them."""
    tx = lj.optimizer(optax.adam(0.05))
    one = BATCHES[:1]

    def run(sparse, batches):
        stacked = _stack(6)
        state = {"base": PARAMS, "lora": stacked}
        opt = tx.init(state)
        loss = lambda l, x, ids: jnp.sum(lj.wrap(f)(PARAMS, l, x, adapter_ids=ids) ** 2)  # noqa: E731

        @jax.jit
        def step(state, opt, x, ids):
            zeros = jax.tree.map(jnp.zeros_like, PARAMS)
            if not sparse:
                grads = {"base": zeros, "lora": jax.grad(loss)(state["lora"], x, ids)}
                updates, opt = tx.update(grads, opt, state)
                return lj.apply_updates(state, updates), opt
            slots, local = lj.batch_slots(state["lora"], ids)
            sub = {"base": state["base"], "lora": lj.take_adapters(state["lora"], slots)}
            sub_opt = lj.take_adapters(opt, slots)
            grads = {"base": zeros, "lora": jax.grad(loss)(sub["lora"], x, local)}
            updates, sub_opt = tx.update(grads, sub_opt, sub)
            sub = lj.apply_updates(sub, updates)
            return ({"base": state["base"], "lora": lj.put_adapters(state["lora"], slots, sub["lora"])},
                    lj.put_adapters(opt, slots, sub_opt))

        for x, ids in batches:
            state, opt = step(state, opt, x, ids)
        return state["lora"]

    for a, b in zip(jax.tree.leaves(run(False, one)), jax.tree.leaves(run(True, one))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    dense, sparse, start = run(False, BATCHES[:2]), run(True, BATCHES[:2]), _stack(6)
    up = lambda t: t["up"]  # noqa: E731
    np.testing.assert_array_equal(up(sparse).b[4], up(run(True, one)).b[4])  # slot 4 absent from batch 2: kept
    assert float(jnp.abs(up(dense).b[4] - up(run(False, one)).b[4]).max()) > 0  # dense Adam moved it on
    np.testing.assert_array_equal(up(sparse).b[2], up(start).b[2])
    for w, w0 in zip(jax.tree.leaves(sparse, is_leaf=lj.stacked.is_stacked),
                     jax.tree.leaves(start, is_leaf=lj.stacked.is_stacked)):
        for name in lj.weight.PER_ADAPTER:  # frozen by lj.optimizer, through take and put
            np.testing.assert_allclose(getattr(w, name), getattr(w0, name), rtol=1e-7)


def test_bad_input():
    stacked = _stack(3)
    with pytest.raises(ValueError, match="ids must be a 1-D integer array.*shape \\(2, 2\\)"):
        lj.batch_slots(stacked, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        lj.batch_slots(stacked, jnp.array([0]), size=0)
    _, plain = lj.split(jax.random.key(0), PARAMS, lj.LoraConfig(rules=(lj.Rule("up", rank=1),)))
    with pytest.raises(ValueError, match="holds no stacked adapter"):
        lj.batch_slots(plain, jnp.array([0]))
