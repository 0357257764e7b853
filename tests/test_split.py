"""split / merge / unmerge, init schemes, abstract trees, delta math against numpy."""

import re
import time
import types
import zlib

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import lora_jax as lj
from reference import np_delta_of, randomize


def _tree(key, dtype=jnp.float32):
    ks = jax.random.split(key, 4)
    return {
        "params": {
            "blk": {
                "attn": {
                    "q": {"kernel": jax.random.normal(ks[0], (16, 24), dtype), "bias": jnp.zeros(24, dtype)},
                    "v": {"kernel": jax.random.normal(ks[1], (16, 24), dtype)},
                },
                "mlp": {"up": {"kernel": jax.random.normal(ks[2], (16, 40), dtype)}},
            },
            "embed": {"embedding": jax.random.normal(ks[3], (50, 16), dtype)},
        }
    }


CFG = lj.LoraConfig(
    rules=(
        lj.Rule(r".*/attn/(q|v)/kernel", rank=4, alpha=8.0),
        lj.Rule(r".*/mlp/.*/kernel", rank=2, alpha=2.0),
        lj.Rule(r".*/embedding", rank=3, alpha=3.0),
    )
)


_np_delta = np_delta_of


def _randomize(lora, key):
    return randomize(lora, seed=int(jax.random.randint(key, (), 0, 2**30)))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_merge_of_split_is_identity_exactly(init):
    params = _tree(jax.random.key(0))
    cfg = lj.LoraConfig(rules=CFG.rules, init=init)
    base, lora = lj.split(jax.random.key(1), params, cfg)
    chex.assert_trees_all_equal(base, params)
    chex.assert_trees_all_equal(lj.merge(base, lora), params)
    for path, w in lj.targets(lora):
        if w.kind == "embed":  # PEFT's embedding init: A = 0, B gaussian
            assert not np.any(np.asarray(w.a)) and np.std(np.asarray(w.b)) > 0.5
        else:
            assert not np.any(np.asarray(w.b)) and np.any(np.asarray(w.a)), path


def test_default_init_is_kaiming_uniform_and_keys_differ():
    params = {"q": jnp.zeros((400, 64)), "v": jnp.zeros((400, 64))}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q|v", rank=8),)))
    a_q, a_v = np.asarray(lora["q"].a), np.asarray(lora["v"].a)
    bound = 1 / np.sqrt(400)
    assert np.abs(a_q).max() <= bound and np.abs(a_q).max() > 0.95 * bound
    assert abs(a_q.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform(-b, b) std = b/sqrt(3)
    assert not np.allclose(a_q, a_v)  # one key per target
    # adding a rule does not change the other adapters' init (keys folded in from paths)
    params2 = {**params, "o": jnp.zeros((400, 64))}
    _, lora2 = lj.split(jax.random.key(0), params2, lj.LoraConfig(rules=(lj.Rule("q|v|o", rank=8),)))
    np.testing.assert_array_equal(np.asarray(lora2["q"].a), a_q)


def test_gaussian_init_std():
    _, lora = lj.split(
        jax.random.key(0), {"w": jnp.zeros((512, 256))},
        lj.LoraConfig(rules=(lj.Rule("w", rank=8),), init="gaussian"),
    )
    assert abs(float(jnp.std(lora["w"].a)) - 1 / 8) < 0.01


def test_pissa_residual_and_top_singular_directions():
    params = _tree(jax.random.key(0))
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=CFG.rules, init="pissa"))
    chex.assert_trees_all_close(lj.merge(base, lora), params, atol=2e-5, rtol=1e-5)
    w = lora["params"]["blk"]["attn"]["q"]["kernel"]
    W = np.asarray(params["params"]["blk"]["attn"]["q"]["kernel"], np.float64)
    s = np.linalg.svd(W, compute_uv=False)
    # the adapter holds the top-r part: its singular values are W's top r
    np.testing.assert_allclose(np.linalg.svd(_np_delta(w), compute_uv=False)[: w.rank], s[: w.rank], rtol=1e-4)
    # the residual's spectrum is W's tail
    R = np.asarray(base["params"]["blk"]["attn"]["q"]["kernel"], np.float64)
    np.testing.assert_allclose(np.linalg.svd(R, compute_uv=False)[: len(s) - w.rank], s[w.rank :], rtol=1e-4, atol=1e-4)


def _eager_init(key, path, w, W, init):
    """The adapter's factors as the per-target eager init makes them: ``jax.random`` calls on
    a key folded in from the path, one array operation at a time."""
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    ka, kb = jax.random.split(k)
    dtype = w.a.dtype
    if init == "pissa":  # W stored (in, out)
        u, s, vh = jnp.linalg.svd(jnp.asarray(W, jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[: w.rank] / w.scale)[:, None]
        return (root * u[:, : w.rank].T).astype(dtype), (root * vh[: w.rank]).astype(dtype)
    if w.kind == "embed":
        return jnp.zeros(w.a.shape, dtype), jax.random.normal(kb, w.b.shape, dtype)
    if init == "gaussian":
        return jax.random.normal(ka, w.a.shape, dtype) / w.rank, jnp.zeros(w.b.shape, dtype)
    bound = 1.0 / np.sqrt(np.prod(w.in_shape))
    return jax.random.uniform(ka, w.a.shape, dtype, -bound, bound), jnp.zeros(w.b.shape, dtype)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_init_values_equal_the_eager_per_target_init_bit_for_bit(init, dtype):
    # ranks 3 and 5: their reciprocals are inexact, so a division folded differently shows
    ks = jax.random.split(jax.random.key(7), 4)
    params = {"q": {"kernel": jax.random.normal(ks[0], (24, 20))}, "up": {"kernel": jax.random.normal(ks[1], (20, 36))},
              "conv": {"kernel": jax.random.normal(ks[2], (3, 3, 4, 6))}}
    rules = [lj.Rule(r"(q|up)/kernel", rank=3, alpha=5.0)]
    if init != "pissa":
        params["embed"] = {"embedding": jax.random.normal(ks[3], (50, 12))}
        rules += [lj.Rule(r"conv/kernel", rank=5, alpha=7.0), lj.Rule(r"embed/embedding", rank=5, alpha=7.0)]
    key = jax.random.key(11)
    base, lora = lj.split(key, params, lj.LoraConfig(rules=tuple(rules), init=init, dtype=dtype))
    assert len(lj.targets(lora)) == len(rules) + 1
    for path, w in lj.targets(lora):
        name = path.split("/")[0]
        W = params[name]["kernel" if name != "embed" else "embedding"]
        a, b = _eager_init(key, path, w, W, init)
        assert w.a.dtype == (dtype or jnp.float32)
        np.testing.assert_array_equal(np.asarray(w.a, np.float32), np.asarray(a, np.float32), err_msg=path)
        np.testing.assert_array_equal(np.asarray(w.b, np.float32), np.asarray(b, np.float32), err_msg=path)
        if init == "pissa":
            # the residual W - s·A⊗B: eagerly, XLA rounds s·A⊗B before subtracting; compiled
            # in one program the product and the subtraction fuse into one multiply-add, so
            # the two agree to a rounding of W's magnitude (not bit for bit)
            d = w.scale * jnp.einsum("ri,ro->io", w.a.astype(jnp.float32), w.b.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST)
            ulp = np.finfo(np.float32).eps * float(jnp.abs(W).max())
            np.testing.assert_allclose(np.asarray(base[name]["kernel"]), np.asarray(W - d), rtol=0, atol=ulp)
        else:
            assert base[name] is params[name] or base[name]["kernel" if name != "embed" else "embedding"] is W


@jax.jit
def _reference_row_keys(key, folds, sides):
    return jax.vmap(lambda f, s: jax.random.key_data(jax.random.split(jax.random.fold_in(key, f))[s]))(folds, sides)


@settings(deadline=None, max_examples=25)
@given(words=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
       folds=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6), data=st.data())
def test_host_derived_row_keys_equal_jax_fold_in_then_split(words, folds, data):
    # lj.split derives each target's key pair on the host for a concrete threefry key; the
    # hashes must be jax.random's, bit for bit, in either threefry mode
    from lora_jax.split import _row_keys

    folds = np.asarray(folds, np.uint32)
    sides = np.asarray(data.draw(st.lists(st.sampled_from([0, 1]), min_size=len(folds), max_size=len(folds))), np.uint32)
    got = {}
    for partitionable in (True, False):
        with jax.threefry_partitionable(partitionable):
            key = jax.random.wrap_key_data(np.asarray(words, np.uint32))  # both key words over all 32 bits
            got[partitionable] = np.asarray(jax.random.key_data(_row_keys(key, folds, sides)))
            np.testing.assert_array_equal(got[partitionable], np.asarray(_reference_row_keys(key, folds, sides)))
    assert (got[True] != got[False]).any()  # the two modes are different hashes: both were checked


@pytest.mark.parametrize("kind", ["raw PRNGKey", "rbg", "threefry, not partitionable"])
def test_init_values_equal_the_eager_init_for_every_key_kind(kind):
    # the host path (threefry keys, raw or typed, in either mode) and the in-program one
    # (other implementations) draw what the eager per-target init draws
    params = {"q": {"kernel": jnp.linspace(-1, 1, 24 * 20).reshape(24, 20)},
              "conv": {"kernel": jnp.ones((3, 3, 4, 6))}, "embed": {"embedding": jnp.ones((50, 12))}}
    cfg = lj.LoraConfig(rules=(lj.Rule(r"(q|conv)/kernel", rank=3), lj.Rule(r"embed/embedding", rank=5)))
    key = {"raw PRNGKey": jax.random.PRNGKey(5), "rbg": jax.random.key(5, impl="rbg")}.get(kind, jax.random.key(5))
    with jax.threefry_partitionable(kind != "threefry, not partitionable"):
        _, lora = lj.split(key, params, cfg)
        for path, w in lj.targets(lora):
            a, b = _eager_init(key, path, w, None, "default")
            np.testing.assert_array_equal(np.asarray(w.a), np.asarray(a), err_msg=path)
            np.testing.assert_array_equal(np.asarray(w.b), np.asarray(b), err_msg=path)


def test_split_compiles_one_program_whatever_the_number_of_shapes(caplog):
    # the one program that draws for every target; the factors are cut apart and the zeros
    # made on the host, so no eager operation compiles a program per shape
    compiled = re.compile(r"Compiling (?:jit\()?(\w+)")

    def programs(n, init="default", impl="threefry2x32"):
        params = {f"l{i}": {"kernel": jnp.zeros((8 + i, 16 + 2 * i))} for i in range(n)}
        cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2),), init=init)
        key = jax.random.key(n, impl=impl)
        jax.block_until_ready(key)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("DEBUG"):
            jax.block_until_ready(lj.split(key, params, cfg))
        return [m.group(1) for r in caplog.records if (m := compiled.search(r.getMessage()))]

    assert programs(3) == programs(9) == ["_draw"]  # new shapes in each call
    assert programs(4, "gaussian") == ["_draw", "_divide"]  # (the division apart, see split._divide)
    assert programs(5, impl="rbg") == ["_derive", "_draw"]  # keys other than threefry derive in a program
    # a threefry key's targets are derived on the host: the program holds the sampler's hash only
    from lora_jax.split import _draw, _draw_groups, _row_keys

    (_, spec), = lj.targets(lj.split(jax.random.key(0), {"w": jnp.zeros((8, 16))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))[1])
    groups = _draw_groups([spec], [types.SimpleNamespace(dtype="float32")], "default", True)
    keys = _row_keys(jax.random.key(0), np.uint32([3]), np.uint32([0]))
    jaxpr = str(jax.make_jaxpr(_draw, static_argnums=1)(keys, groups))
    assert jaxpr.count("random_bits") == 1 and "random_fold_in" not in jaxpr and "random_split" not in jaxpr


def test_merge_matches_numpy_and_unmerge_inverts():
    params = _tree(jax.random.key(0))
    base, lora = lj.split(jax.random.key(1), params, CFG)
    lora = _randomize(lora, jax.random.key(2))
    merged = lj.merge(base, lora)
    for path, w in lj.targets(lora):
        got = np.asarray(merged["params"]["blk"]["attn"]["q"]["kernel"]) if path.endswith("q/kernel") else None
        if got is not None:
            ref = np.asarray(base["params"]["blk"]["attn"]["q"]["kernel"], np.float64) + _np_delta(w)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for (path, w), (_, m), (_, b) in zip(
        lj.targets(lora),
        [(p, x) for p, x in _flat(merged) if p in dict(lj.targets(lora))],
        [(p, x) for p, x in _flat(base) if p in dict(lj.targets(lora))],
    ):
        np.testing.assert_allclose(np.asarray(m), np.asarray(b, np.float64) + _np_delta(w), rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(lj.unmerge(merged, lora), base, atol=1e-4)


def _flat(tree):
    return [(lj.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_half_precision_base():
    params = _tree(jax.random.key(0), jnp.bfloat16)
    base, lora = lj.split(jax.random.key(1), params, CFG)
    assert lora["params"]["blk"]["attn"]["q"]["kernel"].a.dtype == jnp.float32  # adapters fp32
    assert lora["params"]["blk"]["attn"]["q"]["kernel"].dtype == "bfloat16"
    lora = _randomize(lora, jax.random.key(2))
    merged = lj.merge(base, lora)
    chex.assert_trees_all_equal_dtypes(merged, params)
    # fp32 accumulation, one rounding to bf16 at the end: within half a bf16 ulp of the exact
    # sum (plus float32 noise), where bf16 accumulation would be off by several ulps
    w = lora["params"]["blk"]["attn"]["q"]["kernel"]
    exact = np.asarray(base["params"]["blk"]["attn"]["q"]["kernel"], np.float64) + _np_delta(w)
    got = np.asarray(merged["params"]["blk"]["attn"]["q"]["kernel"], np.float64)
    np.testing.assert_array_less(np.abs(got - exact), np.abs(exact) * 2.0**-8 * 1.01 + 1e-6)
    cfg16 = lj.LoraConfig(rules=CFG.rules, dtype=jnp.bfloat16)
    _, lora16 = lj.split(jax.random.key(1), params, cfg16)
    assert lora16["params"]["blk"]["attn"]["q"]["kernel"].a.dtype == jnp.bfloat16


@settings(max_examples=8, deadline=None)
@given(
    data=st.data(),
    ndim=st.integers(2, 4),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_delta_and_norm_property(data, ndim, dtype):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    perm = data.draw(st.permutations(range(ndim)))
    n_stack = data.draw(st.integers(0, ndim - 2))
    n_in = data.draw(st.integers(1, ndim - n_stack - 1))
    stack, ins, outs = tuple(perm[:n_stack]), tuple(perm[n_stack : n_stack + n_in]), tuple(perm[n_stack + n_in :])
    in_size = int(np.prod([shape[i] for i in ins]))
    out_size = int(np.prod([shape[i] for i in outs]))
    rank = data.draw(st.integers(1, min(in_size, out_size)))
    spec = lj.LoraWeight(a=None, b=None, shape=shape, in_axes=ins, out_axes=outs, stack_axes=stack,
                         rank=rank, scale=data.draw(st.floats(0.1, 4.0)))
    rng = np.random.default_rng(0)
    w = spec.replace(a=jnp.asarray(rng.normal(size=spec.a_shape).astype(np.float32)),
                     b=jnp.asarray(rng.normal(size=spec.b_shape).astype(np.float32)))
    ref = _np_delta(w)
    assert w.delta().shape == shape
    np.testing.assert_allclose(np.asarray(w.delta()), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(w.delta_norm()), np.linalg.norm(ref), rtol=1e-4, atol=1e-5)
    # round trip through split with explicit axes
    W = rng.normal(size=shape).astype(dtype)
    with jax.enable_x64(dtype == np.float64) if hasattr(jax, "enable_x64") else _nullctx():
        base, lora = lj.split(jax.random.key(0), {"w": jnp.asarray(W)},
                              lj.LoraConfig(rules=(lj.Rule("w", rank=rank, axes=(ins, outs, stack)),)))
        assert lora["w"].a.shape == spec.a_shape and lora["w"].b.shape == spec.b_shape
        np.testing.assert_array_equal(np.asarray(lj.merge(base, lora)["w"]), np.asarray(base["w"]))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_delta_norms_never_form_the_product():
    w = lj.LoraWeight(a=jnp.ones((4, 3000)), b=jnp.ones((4, 2000)), shape=(3000, 2000),
                      in_axes=(0,), out_axes=(1,), rank=4, scale=0.5)
    jaxpr = jax.make_jaxpr(lambda l: lj.delta_norms(l))({"w": w})
    shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert all(np.prod(s) < 3000 * 2000 for s in shapes), shapes
    # ||0.5 * ones(3000,4) @ ones(4,2000)||_F = 0.5 * 4 * sqrt(3000*2000)
    np.testing.assert_allclose(float(lj.delta_norms({"w": w})["w"]), 2 * np.sqrt(3000 * 2000), rtol=1e-5)


def _gpt3_175b():
    d, layers = 12288, 96
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    layer = {
        "attn": {n: {"kernel": sds(d, d), "bias": sds(d)} for n in ("q", "k", "v", "o")},
        "mlp": {"up": {"kernel": sds(d, 4 * d)}, "down": {"kernel": sds(4 * d, d)}},
        "ln": {"scale": sds(d)},
    }
    return {"embed": {"embedding": sds(50257, d)}, **{f"layer_{i}": layer for i in range(layers)}}


@pytest.mark.parametrize("rank, expected", [(1, 4_718_592), (8, 37_748_736)])
def test_gpt3_175b_splits_abstractly(rank, expected):
    params = _gpt3_175b()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n_params > 174e9
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/attn/(q|v)/kernel", rank=rank, alpha=float(rank)),))
    t0 = time.perf_counter()
    base, lora = lj.split(jax.random.key(0), params, cfg)
    elapsed = time.perf_counter() - t0
    assert elapsed < 60  # a sanity bound, far above the ~1 s it takes
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((base, lora)))
    trainable = sum(w.num_params for _, w in lj.targets(lora))
    assert trainable == expected  # LoRA paper, Table 4
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora)) == expected


def test_roberta_base_count():
    d = 768
    params = {
        f"layer_{i}": {n: {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)} for n in ("query", "key", "value")}
        for i in range(12)
    }
    _, lora = lj.split(jax.random.key(0), params,
                       lj.LoraConfig(rules=(lj.Rule(r".*/(query|value)/kernel", rank=8, alpha=16.0),)))
    assert sum(w.num_params for _, w in lj.targets(lora)) == 294_912


def test_split_under_eval_shape_and_jit():
    params = _tree(jax.random.key(0))
    abstract = jax.eval_shape(lambda p: lj.split(jax.random.key(1), p, CFG), params)
    concrete = lj.split(jax.random.key(1), params, CFG)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)
    jitted = jax.jit(lambda k, p: lj.split(k, p, CFG))(jax.random.key(1), params)
    chex.assert_trees_all_close(jitted, concrete)
    assert jax.tree.structure(jitted) == jax.tree.structure(concrete)


def test_merge_under_jit_with_donation():
    params = _tree(jax.random.key(0))
    base, lora = lj.split(jax.random.key(1), params, CFG)
    lora = _randomize(lora, jax.random.key(2))
    ref = lj.merge(base, lora)
    base_copy = jax.tree.map(jnp.copy, base)
    out = jax.jit(lj.merge, donate_argnums=0)(base_copy, lora)
    chex.assert_trees_all_close(out, ref)


def test_merged_forward_equals_wrap_merge():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(24), nn.tanh, nn.Dense(8)])
    x = jax.random.normal(jax.random.key(0), (5, 12))
    variables = model.init(jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r"params/layers_\d/kernel", rank=3, alpha=6.0),))
    base, lora = lj.split(jax.random.key(2), variables, cfg, apply_fn=model.apply, args=(x,))
    lora = _randomize(lora, jax.random.key(3))
    y_wrap = lj.wrap(model.apply, strategy="merge")(base, lora, x)
    y_merged = model.apply(lj.merge(base, lora), x)
    chex.assert_trees_all_close(y_wrap, y_merged)
    # and the numpy reference of the merged network
    p = variables["params"]
    k0 = np.asarray(p["layers_0"]["kernel"], np.float64) + _np_delta(lora["params"]["layers_0"]["kernel"])
    k2 = np.asarray(p["layers_2"]["kernel"], np.float64) + _np_delta(lora["params"]["layers_2"]["kernel"])
    h = np.tanh(np.asarray(x, np.float64) @ k0 + np.asarray(p["layers_0"]["bias"]))
    ref = h @ k2 + np.asarray(p["layers_2"]["bias"])
    np.testing.assert_allclose(np.asarray(y_wrap), ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(y_wrap), np.asarray(model.apply(variables, x)))


def test_size_one_axis_dropped_by_the_model_joins_out_axes():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 1, 5))}
    f = lambda p, x: x @ p["w"].reshape(3, 5)
    x = jnp.ones((2, 3))
    base, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)), apply_fn=f, args=(x,))
    w = lora["w"]
    assert (w.in_axes, w.out_axes, w.a.shape, w.b.shape) == ((0,), (1, 2), (2, 3), (2, 1, 5))
    lora = _randomize(lora, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(lj.merge(base, lora)["w"]),
                               np.asarray(params["w"], np.float64) + _np_delta(lora["w"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", ["python", "fori_loop"])
def test_layer_stack_indexed_per_layer_gets_stack_axis(loop):
    # W[i] of an (L, in, out) stack, then a fused-kernel slice W[i][:, :4]
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4, 6))}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def f(p, x):
        if loop == "python":
            for i in range(3):
                x = jnp.tanh(x @ p["w"][i][:, :4])
            return x
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i][:, :4]), x)

    base, lora = lj.split(jax.random.key(2), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)), apply_fn=f, args=(x,))
    w = lora["w"]
    assert (w.stack_axes, w.in_axes, w.out_axes, w.a.shape, w.b.shape) == ((0,), (1,), (2,), (3, 2, 4), (3, 2, 6))
    lora = _randomize(lora, jax.random.key(3))
    merged = {"w": params["w"] + _np_delta(lora["w"])}
    chex.assert_trees_all_close(lj.wrap(f, strategy="merge")(base, lora, x), f(merged, x), rtol=1e-5, atol=1e-5)


def test_none_leaves_and_empty_containers_survive():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": None}, "extra": [], "t": (jnp.ones(2),)}
    base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("dense/kernel", rank=2),)))
    assert base["dense"]["bias"] is None and lora["dense"]["bias"] is None and lora["extra"] == []
    lora = _randomize(lora, jax.random.key(1))
    merged = lj.merge(base, lora)
    assert merged["dense"]["bias"] is None and merged["extra"] == [] and merged["t"][0].shape == (2,)
    chex.assert_trees_all_close(lj.unmerge(merged, lora), base, atol=1e-6)
