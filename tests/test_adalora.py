"""AdaLoRA: SVD-form adapters against numpy, the allocator's schedule and masks against a
numpy reimplementation of the paper's formulas, rank allocation on a task whose targets need
different ranks, to_lora against the SVD form, and the errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from reference import np_delta

PARAMS = {
    "w1": np.linspace(-1.0, 1.0, 48, dtype=np.float32).reshape(6, 8),  # (in, out)
    "w2": np.cos(np.arange(40.0, dtype=np.float32)).reshape(5, 8),  # stored (out, in)
    "s": np.sin(np.arange(60.0, dtype=np.float32)).reshape(2, 6, 5),  # two stacked layers
    "bias": np.zeros(8, np.float32),
}
RULES = (
    lj.Rule("w1", rank=4, alpha=8.0),
    lj.Rule("w2", rank=3, alpha=3.0, axes=lj.Axes(in_axes=(1,), out_axes=(0,))),
    lj.Rule("s", rank=4, alpha=2.0, axes=lj.Axes(in_axes=(1,), out_axes=(2,), stack_axes=(0,))),
)
CONFIG = lj.LoraConfig(rules=RULES)
AXES = {"w1": ((0,), (1,), ()), "w2": ((1,), (0,), ()), "s": ((1,), (2,), (0,))}


def _f(p, x):
    """x (B, 6) through all three targets."""
    h = x @ p["w1"] + p["bias"][None]  # (B, 8)
    h = h @ p["w2"].T  # (B, 5)
    return jnp.einsum("bi,lio->blo", x, p["s"]).sum(1) * h


def _random(lora, seed=0):
    """Every AdaLoRA adapter with random P, λ and Q (λ away from 0)."""
    rng = np.random.default_rng(seed)
    f = lambda w: w.replace(p=rng.standard_normal(w.p.shape).astype(np.float32),  # noqa: E731
                            lam=rng.uniform(0.5, 2.0, w.lam.shape).astype(np.float32),
                            q=rng.standard_normal(w.q.shape).astype(np.float32))
    return jax.tree.map(lambda w: f(w) if isinstance(w, lj.adalora.AdaLoraWeight) else w, lora,
                        is_leaf=lambda x: isinstance(x, lj.adalora.AdaLoraWeight))


def _np_merged(lora):
    """float64 W + s·(P·diag(λ)) ⊗ Q per target."""
    out = {}
    for k, w in PARAMS.items():
        ad = lora[k]
        if ad is None:
            out[k] = np.asarray(w, np.float64)
            continue
        spec = ad.spec
        a = np.asarray(ad.p, np.float64) * np.asarray(ad.lam, np.float64)[..., None]
        ins, outs, stack = AXES[k]
        out[k] = np.asarray(w, np.float64) + np_delta(a, ad.q, ins, outs, stack, spec.scale, w.ndim)
    return out


def test_split_shapes_init_and_scales():
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    w1, w2, s = lora["w1"], lora["w2"], lora["s"]
    assert (w1.p.shape, w1.lam.shape, w1.q.shape) == ((4, 6), (4,), (4, 8))
    assert (w2.p.shape, w2.lam.shape, w2.q.shape) == ((3, 8), (3,), (3, 5))
    assert (s.p.shape, s.lam.shape, s.q.shape) == ((2, 4, 6), (2, 4), (2, 4, 5))
    assert lora["bias"] is None
    assert [w.spec.scale for w in (w1, w2, s)] == [2.0, 1.0, 0.5]  # alpha / initial rank
    for w in (w1, w2, s):
        assert float(jnp.abs(w.lam).max()) == 0.0
        both = np.concatenate([np.ravel(w.p), np.ravel(w.q)])
        assert 0.01 < both.std() < 0.03 and abs(both.mean()) < 0.01
    merged = lj.merge(base, lora)
    for k in PARAMS:
        np.testing.assert_array_equal(merged[k], PARAMS[k])
    # same keys per target as a one-rule split: adding a rule changes no other adapter
    _, alone = lj.adalora.split(jax.random.key(0), PARAMS, lj.LoraConfig(rules=RULES[:1]))
    np.testing.assert_array_equal(alone["w1"].p, w1.p)
    # axes inferred by tracing, as lj.split does: w2 is used transposed
    _, traced = lj.adalora.split(jax.random.key(0), PARAMS, lj.LoraConfig(rules=(lj.Rule("w1|w2", rank=3),)),
                                 apply_fn=_f, args=(np.ones((2, 6), np.float32),))
    assert (traced["w2"].spec.in_axes, traced["w2"].spec.out_axes, traced["w2"].p.shape) == ((1,), (0,), (3, 8))
    rows = lj.summary(lora).splitlines()
    assert rows[2].split() == ["w1", "(6,", "8)", "linear", "4", "8", "2", f"{4 * 6 + 4 + 4 * 8}"]
    assert rows[-1] == f"trainable params: {60 + (3 * 8 + 3 + 3 * 5) + 2 * (4 * 6 + 4 + 4 * 5):,} in 3 adapters"


def test_wrap_factored_matches_merge_values_and_grads():
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    lora = _random(lora)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    loss = lambda strategy: lambda l: jnp.sum(jnp.tanh(lj.wrap(_f, strategy)(base, l, x)))  # noqa: E731
    v_f, g_f = jax.value_and_grad(loss("factored"))(lora)
    v_m, g_m = jax.value_and_grad(loss("merge"))(lora)
    np.testing.assert_allclose(v_f, v_m, rtol=1e-5)
    for k in ("w1", "w2", "s"):
        for name in ("p", "lam", "q"):
            got, want = getattr(g_f[k], name), getattr(g_m[k], name)
            assert float(jnp.abs(want).max()) > 0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # and the merged weights against numpy
    merged = lj.merge(base, lora)
    norms = lj.delta_norms(lora)
    for k, want in _np_merged(lora).items():
        np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-5)
        if k != "bias":
            np.testing.assert_allclose(norms[k], np.linalg.norm(want - PARAMS[k]), rtol=1e-5)
    np.testing.assert_allclose(lj.unmerge(merged, lora)["w1"], PARAMS["w1"], atol=1e-5)


def test_orth_reg_matches_numpy():
    _, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    lora = _random(lora, seed=3)
    want = 0.0
    for k in ("w1", "w2", "s"):
        w = lora[k]
        for m in (np.asarray(w.p, np.float64), np.asarray(w.q, np.float64)):
            for layer in m.reshape(-1, *m.shape[-2:]):  # (r, in) or (r, out) per layer
                want += np.sum((layer @ layer.T - np.eye(layer.shape[0])) ** 2)
    np.testing.assert_allclose(lj.adalora.orth_reg(lora), want, rtol=1e-5)
    grads = jax.grad(lj.adalora.orth_reg)(lora)
    assert float(jnp.abs(grads["s"].q).max()) > 0 and float(jnp.abs(grads["w1"].lam).max()) == 0


# -- the allocator against numpy ----------------------------------------------------------------


def _np_allocator(lora, grads_seq, *, target_rank, total_steps, t_init, t_final, delta_t, beta1, beta2):
    """The paper's formulas in float64: per update, the masks (kept = True) and λ after it.

    Params P, Q never change (the inner optimizer is set_to_zero); λ changes by masking only.
    """
    keys = ("w1", "w2", "s")
    theta = {k: [np.asarray(getattr(lora[k], n), np.float64) for n in ("p", "lam", "q")] for k in keys}
    ibar = {k: [np.zeros_like(x) for x in theta[k]] for k in keys}
    ubar = {k: [np.zeros_like(x) for x in theta[k]] for k in keys}
    b0 = sum(theta[k][1].size for k in keys)
    bT = target_rank * sum(math.prod(theta[k][1].shape[:-1]) for k in keys)
    mask = {k: np.ones(theta[k][1].shape, bool) for k in keys}
    stop = total_steps - t_final
    history = []
    for t, grads in enumerate(grads_seq):
        if t < stop:
            for k in keys:
                for j in range(3):
                    sens = np.abs(theta[k][j] * grads[k][j])
                    ibar[k][j] = beta1 * ibar[k][j] + (1 - beta1) * sens
                    ubar[k][j] = beta2 * ubar[k][j] + (1 - beta2) * np.abs(sens - ibar[k][j])
        if t <= t_init:
            budget = b0
        elif t >= stop:
            budget = bT
        else:
            budget = int((b0 - bT) * (1 - (t - t_init) / (total_steps - t_final - t_init)) ** 3 + bT)
        recompute = (t_init < t < stop and t % delta_t == 0) or t == stop
        if recompute:
            score = {}
            for k in keys:
                sp, sl, sq = (ibar[k][j] * ubar[k][j] for j in range(3))
                score[k] = sl + sp.mean(axis=-1) + sq.mean(axis=-1)
            allscores = np.sort(np.concatenate([score[k].ravel() for k in keys]))
            drop = b0 - budget
            thr = allscores[drop - 1] if drop > 0 else -np.inf
            mask = {k: score[k] > thr for k in keys}
        if recompute or t > stop:
            for k in keys:
                theta[k][1] = np.where(mask[k], theta[k][1], 0.0)
        history.append(({k: mask[k].copy() for k in keys}, {k: theta[k][1].copy() for k in keys}, budget))
    return history


def test_allocator_schedule_and_masks_match_numpy():
    hp = dict(target_rank=2, total_steps=14, t_init=2, t_final=3, delta_t=2, beta1=0.85, beta2=0.7)
    _, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    lora = jax.tree.map(jnp.asarray, _random(lora, seed=5))
    rng = np.random.default_rng(7)
    grads_seq = [{k: [rng.standard_normal(np.shape(getattr(lora[k], n))).astype(np.float32)
                      for n in ("p", "lam", "q")] for k in ("w1", "w2", "s")} for _ in range(hp["total_steps"] + 2)]
    want = _np_allocator(lora, grads_seq, **hp)
    tx = lj.adalora.allocator(optax.set_to_zero(), **hp)
    state = tx.init(lora)
    update = jax.jit(tx.update)
    for t, grads in enumerate(grads_seq):
        g = {"bias": None, **{k: lora[k].replace(p=v[0], lam=v[1], q=v[2]) for k, v in grads.items()}}
        updates, state = update(g, state, lora)
        lora = optax.apply_updates(lora, updates)
        masks, lams, budget = want[t]
        kept = lj.adalora.ranks(lora, state)
        for k in ("w1", "w2", "s"):
            got_mask = np.asarray(state.mask[_order(k)])
            np.testing.assert_array_equal(got_mask, masks[k], err_msg=f"update {t}, {k}")
            np.testing.assert_allclose(lora[k].lam, lams[k], rtol=1e-6, err_msg=f"update {t}, {k}")
            assert kept[k] == int(masks[k].sum(-1).max())
        total = sum(int(m.sum()) for m in masks.values())
        if t in (0, 1, 2, 3):  # warm-up and the first odd step: nothing masked
            assert total == 15
        if t >= hp["total_steps"] - hp["t_final"]:
            assert total == budget == 2 * 4  # target_rank x (w1, w2 and the two layers of s)
    assert update._cache_size() == 1  # one trace for every phase of the schedule
    # the reference's budgets by hand: b0 = 15, bT = 8, span 14 - 3 - 2 = 9; at t = 4,
    # floor(7·(7/9)³ + 8) = floor(11.29) = 11; t = 6: floor(7·(5/9)³ + 8) = 9
    assert [want[t][2] for t in (2, 4, 6, 8, 10, 11)] == [15, 11, 9, 8, 8, 8]


def _order(k):
    """Index of target ``k`` in the allocator's state (tree order: sorted dict keys)."""
    return ["s", "w1", "w2"].index(k)


def test_rank_allocation_follows_the_task():
    """y = x·(W1 + Δ1) and x·(W2 + Δ2): Δ1 of rank 1, Δ2 of rank 8; the allocator keeps
    clearly more rank for w2."""
    rng = np.random.default_rng(0)
    d = 16
    params = {"w1": rng.standard_normal((d, d)).astype(np.float32) / 4,
              "w2": rng.standard_normal((d, d)).astype(np.float32) / 4}
    u, v = rng.standard_normal((d, 1)), rng.standard_normal((1, d))
    q1, _ = np.linalg.qr(rng.standard_normal((d, 8)))
    q2, _ = np.linalg.qr(rng.standard_normal((d, 8)))
    deltas = {"w1": (u @ v / 4).astype(np.float32), "w2": (q1 @ np.diag(np.linspace(2, 1, 8)) @ q2.T).astype(np.float32)}
    x = rng.standard_normal((256, d)).astype(np.float32)
    y = {k: x @ (params[k] + deltas[k]) for k in params}
    f = lambda p, x: {k: x @ p[k] for k in ("w1", "w2")}  # noqa: E731
    config = lj.LoraConfig(rules=(lj.Rule("w.", rank=8, alpha=8.0),))
    base, lora = lj.adalora.split(jax.random.key(1), params, config)
    steps = 300
    tx = lj.optimizer(lj.adalora.allocator(optax.adam(2e-2), target_rank=5, total_steps=steps,
                                           t_init=60, t_final=60, delta_t=10))
    tree = {"base": base, "lora": lora}
    state = tx.init(tree)

    def loss(l):
        out = lj.wrap(f)(base, l, x)
        return sum(jnp.mean((out[k] - y[k]) ** 2) for k in out) + 0.1 * lj.adalora.orth_reg(l)

    @jax.jit
    def step(tree, state):
        g = jax.grad(loss)(tree["lora"])
        updates, state = tx.update({"base": jax.tree.map(jnp.zeros_like, tree["base"]), "lora": g}, state, tree)
        return lj.apply_updates(tree, updates), state

    first = float(loss(lora))
    for _ in range(steps):
        tree, state = step(tree, state)
    kept = lj.adalora.ranks(tree["lora"], state)
    assert kept["w1"] + kept["w2"] == 10
    assert kept["w2"] >= kept["w1"] + 4, kept
    assert float(loss(tree["lora"])) < 0.2 * first

    # to_lora: mixed ranks, the same merged weights as the SVD form with its masked λ at 0
    plain = lj.adalora.to_lora(tree["lora"], state)
    assert (plain["w1"].rank, plain["w2"].rank) == (kept["w1"], kept["w2"])
    merged = lj.merge(base, plain)
    ada = tree["lora"]
    for k in ("w1", "w2"):
        w = ada[k]  # the last update kept the final mask: the masked λ are 0
        assert int(np.sum(np.asarray(w.lam) != 0)) == kept[k]
        want = params[k] + np_delta(np.asarray(w.p, np.float64) * np.asarray(w.lam, np.float64)[:, None], w.q,
                                    (0,), (1,), (), w.spec.scale, 2)
        np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(merged[k], lj.merge(base, ada)[k], rtol=1e-5, atol=1e-5)
        assert plain[k].scale == w.spec.scale and plain[k].alpha == w.spec.scale * plain[k].rank


def test_to_lora_saves_and_exports(tmp_path):
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    lora = _random(lora, seed=2)
    tx = lj.adalora.allocator(optax.set_to_zero(), target_rank=1, total_steps=4, t_init=0, t_final=1, delta_t=1)
    state = tx.init(lora)
    rng = np.random.default_rng(0)
    for _ in range(4):
        grads = jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32), lora)
        updates, state = tx.update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
    plain = lj.adalora.to_lora(lora, state)
    ranks = lj.adalora.ranks(lora, state)
    assert ranks["bias"] is None and sum(int(m.sum()) for m in state.mask) == 4
    assert np.asarray(state.mask[_order("s")]).sum(-1).tolist() == [0, 1]  # layer 0 of s is padded
    assert [plain[k].rank for k in ("w1", "w2", "s")] == [max(ranks[k], 1) for k in ("w1", "w2", "s")]
    merged = lj.merge(base, plain)
    for k in ("w1", "w2", "s"):
        np.testing.assert_allclose(merged[k], lj.merge(base, lora)[k], rtol=1e-5, atol=1e-6)
    # a target with nothing kept: a rank-1 adapter of zeros
    none_kept = state._replace(mask=tuple(np.zeros_like(m) if i == _order("w1") else m for i, m in enumerate(state.mask)))
    empty = lj.adalora.to_lora(lora, none_kept)["w1"]
    assert empty.rank == 1 and float(jnp.abs(empty.a).max()) == 0.0
    assert lj.adalora.ranks(lora, none_kept)["w1"] == 0
    lj.checkpoint.save(tmp_path / "ckpt", plain)
    back = lj.checkpoint.restore(tmp_path / "ckpt")
    np.testing.assert_allclose(lj.merge(base, back)["s"], merged["s"], rtol=1e-6)
    names = lambda path: path.replace("/", ".")  # noqa: E731
    written = lj.peft.save(tmp_path / "peft", {k: plain[k] for k in ("w1", "w2")}, names)
    assert written == ["w1", "w2"]
    loaded = lj.peft.load(tmp_path / "peft", {k: PARAMS[k] for k in ("w1", "w2")}, names,
                          apply_fn=lambda p, x: (x @ p["w1"]) @ p["w2"].T, args=(np.ones((1, 6), np.float32),))
    for k in ("w1", "w2"):
        np.testing.assert_allclose(lj.merge({k: PARAMS[k]}, {k: loaded[k]})[k], merged[k], rtol=1e-5, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------


def test_errors():
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    with pytest.raises(ValueError, match=r"target_rank=4 exceeds the initial rank of w2 \(rank 3\)"):
        lj.adalora.allocator(optax.sgd(0.1), target_rank=4, total_steps=10, t_init=1, t_final=1, delta_t=1).init(lora)
    with pytest.raises(ValueError, match=r"t_init \+ t_final < total_steps"):
        lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=5, t_final=5, delta_t=1)
    with pytest.raises(ValueError, match="delta_t >= 1"):
        lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=1, t_final=1, delta_t=0)
    with pytest.raises(ValueError, match="keep at least rank 1"):
        lj.adalora.allocator(optax.sgd(0.1), target_rank=0, total_steps=10, t_init=1, t_final=1, delta_t=1)
    with pytest.raises(ValueError, match=r"beta1=1.0"):
        lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=1, t_final=1, delta_t=1, beta1=1.0)
    tx = lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=1, t_final=1, delta_t=1)
    state = tx.init(lora)
    with pytest.raises(ValueError, match=r"needs params"):
        tx.update(lora, state)
    with pytest.raises(ValueError, match=r"grads hold 2 AdaLoRA adapters, params 3 and the state 3"):
        tx.update({**lora, "s": None}, state, lora)
    _, plain = lj.split(jax.random.key(0), PARAMS, CONFIG)
    for fn in (lambda: tx.init(plain), lambda: lj.adalora.orth_reg(plain), lambda: lj.adalora.ranks(plain, state),
               lambda: lj.adalora.to_lora(plain, state)):
        with pytest.raises(TypeError, match=r"LoRA adapters or arrays at s, w1, w2.*lj.adalora.split"):
            fn()
    with pytest.raises(ValueError, match=r"holds 0 lj.adalora.allocator states"):
        lj.adalora.ranks(lora, optax.sgd(0.1).init(lora))
    _, other = lj.adalora.split(jax.random.key(0), PARAMS, lj.LoraConfig(rules=RULES[:1]))
    with pytest.raises(ValueError, match=r"pass the lora tree this optimizer state was trained with"):
        lj.adalora.to_lora(other, state)
    with pytest.raises(ValueError, match=r"init='default'"):
        lj.adalora.split(jax.random.key(0), PARAMS, lj.LoraConfig(rules=RULES, init="pissa"))
    bad = {**lora, "w1": lora["w1"].replace(lam=jnp.zeros(5))}
    with pytest.raises(ValueError, match=r"w1: lam has shape \(5,\), expected \(4,\) for rank 4"):
        lj.merge(base, bad)
    with pytest.raises(ValueError, match=r"w1: lam has shape"):
        lj.wrap(_f)(base, bad, np.ones((1, 6), np.float32))


def test_checkpoints_keep_adalora_trees_and_peft_files_and_sharding_say_what_they_take(tmp_path):
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    lora = _random(lora, seed=3)
    lj.checkpoint.save(tmp_path / "c", lora)
    entries = {e["path"]: e for e in lj.checkpoint.metadata(tmp_path / "c")["targets"]}
    assert entries["s"]["lam"]["shape"] == [2, entries["s"]["weight"]["rank"]]   # (layers, rank)
    for back in (lj.checkpoint.restore(tmp_path / "c"), lj.checkpoint.restore(tmp_path / "c", like=lora)):
        assert jax.tree.structure(back) == jax.tree.structure(lora)   # AdaLoraWeight nodes, same static fields
        for g, w in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
            np.testing.assert_array_equal(g, w)
    lj.checkpoint.save_params(tmp_path / "base", PARAMS)
    with pytest.raises(ValueError, match="AdaLoRA adapters.*lj.adalora.to_lora"):
        lj.checkpoint.merge(tmp_path / "base", tmp_path / "c", tmp_path / "out")
    fix = r"AdaLoRA adapters at .*lj\.adalora\.to_lora\(lora, opt_state\)"
    with pytest.raises(TypeError, match=fix):
        lj.peft.save(tmp_path / "p", lora, lambda path: path)
    with pytest.raises(TypeError, match=fix):
        lj.sharding.specs(lora, jax.tree.map(lambda _: None, PARAMS))


def test_a_training_checkpoint_resumes_the_allocation(tmp_path):
    base, lora = lj.adalora.split(jax.random.key(0), PARAMS, CONFIG)
    tx = lj.adalora.allocator(optax.adam(1e-2), target_rank=1, total_steps=6, t_init=1, t_final=1, delta_t=1)
    opt = tx.init(lora)
    # every leaf its own buffer, so a step may donate the state
    assert len({id(x) for x in jax.tree.leaves(opt)}) == len(jax.tree.leaves(opt))
    step = jax.jit(lambda l, o, g: (lambda u, o: (optax.apply_updates(l, u), o))(*tx.update(g, o, l)),
                   donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    for _ in range(3):
        lora, opt = step(lora, opt, jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32), lora))
    with lj.checkpoint.Manager(tmp_path / "m") as mgr:
        mgr.save(3, lora, opt)
    with lj.checkpoint.Manager(tmp_path / "m") as mgr:
        at, lora2, opt2 = mgr.restore(opt_state=jax.eval_shape(tx.init, lora))
    assert at == 3 and jax.tree.structure(lora2) == jax.tree.structure(lora)
    assert jax.tree.structure(opt2) == jax.tree.structure(opt)
    for a, b in zip(jax.tree.leaves((lora2, opt2)), jax.tree.leaves((lora, opt)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert lj.adalora.ranks(lora2, opt2) == lj.adalora.ranks(lora, opt)
