"""combine and pissa_to_lora against float64 numpy references written from the definitions.

* "cat": the dense weighted sum ``sum_i w_i·s_i·A_i⊗B_i``;
* "svd": the error of numpy's truncated SVD of that dense sum;
* "ties", "dare_linear", "dare_ties": a numpy version of TIES (Yadav et al. 2023) and DARE
  (Yu et al. 2023) as PEFT's ``add_weighted_adapter`` applies them to the factors, with the
  DARE masks drawn as ``combine``'s docstring says;
* pissa_to_lora: ``merge(base, result) == merge(pissa_base, lora)``.

The adapters mix ranks, lora and rsLoRA scaling, a plain (in, out) kernel, a DenseGeneral
kernel (in, heads, head_dim) and a stacked one (layers, in, out), and some adapters lack a
target.
"""

import zlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import lora_jax as lj
from reference import np_delta_of

SHAPES = {"q": (12, 10), "heads": (12, 3, 4), "layers": (3, 8, 6)}
AXES = {"q": ((0,), (1,)), "heads": ((0,), (1, 2)), "layers": ((1,), (2,), (0,))}
MAX_RANK = {"q": 10, "heads": 12, "layers": 6}


def _params(dtype=np.float32):
    rng = np.random.default_rng(42)
    params = {name: {"kernel": jnp.asarray(rng.standard_normal(shape).astype(dtype))} for name, shape in SHAPES.items()}
    params["q"]["bias"] = jnp.zeros(10, dtype)
    return params


def _adapter(params, ranks: dict, scaling="lora", seed=0, init="gaussian"):
    """``(base, lora)``: random factors for the targets named in ``ranks`` (alpha = 2·rank + 1);
    with ``init="pissa"`` the pair that ``lj.split`` returns."""
    if init == "pissa":
        rules = tuple(lj.Rule(f"{n}/kernel", rank=r, alpha=2.0 * r + 1.0, axes=AXES[n]) for n, r in ranks.items())
        return lj.split(jax.random.key(seed), params, lj.LoraConfig(rules=rules, scaling=scaling, init=init))
    rng = np.random.default_rng(seed)
    lora = jax.tree.map(lambda x: None, params)
    for name, r in ranks.items():
        ins, outs, *stack = AXES[name]
        alpha = 2.0 * r + 1.0
        spec = lj.LoraWeight(a=None, b=None, shape=params[name]["kernel"].shape, in_axes=ins, out_axes=outs,
                             stack_axes=tuple(stack[0]) if stack else (), rank=r, alpha=alpha,
                             scale=lj.scale_for(scaling, alpha, r), scaling=scaling, rule=f"{name}/kernel")
        dtype = params[name]["kernel"].dtype
        a, b = (jnp.asarray(rng.standard_normal(s), dtype) for s in (spec.a_shape, spec.b_shape))
        lora[name]["kernel"] = spec.replace(a=a, b=b)
    return params, lora


def _dense_sum(loras, weights, path):
    """float64 ``sum_i w_i·s_i·A_i⊗B_i`` of the adapters that have ``path`` (W's layout)."""
    found = [(v, dict(lj.targets(t)).get(path)) for t, v in zip(loras, weights)]
    return sum(v * np_delta_of(w) for v, w in found if w is not None)


def _paths(loras):
    """The sorted paths that hold an adapter in any of the trees."""
    return sorted({p for t in loras for p, _ in lj.targets(t)})


def _as_matrix(x, w):
    """W-shaped ``x`` as (*stack, in, out) in float64."""
    x = np.transpose(np.asarray(x, np.float64), (*w.stack_axes, *w.in_axes, *w.out_axes))
    return x.reshape(*w.stack_shape, int(np.prod(w.in_shape)), int(np.prod(w.out_shape)))


# A draw: 1-3 adapters, each with its own ranks, scaling rule, weight and targets: the first
# has them all (``targets`` of them, drawn), the others a subset.
@st.composite
def adapters(draw, max_rank=4, same_rank=False, targets=3):
    n = draw(st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(list(SHAPES)), min_size=targets, max_size=targets, unique=True))
    shared = {name: draw(st.integers(1, max_rank)) for name in names}
    specs = []
    for i in range(n):
        mine = names if i == 0 else draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        ranks = {name: shared[name] if same_rank else draw(st.integers(1, max_rank)) for name in mine}
        scaling = draw(st.sampled_from(["lora", "rslora"]))
        weight = draw(st.floats(-2.0, 2.0).filter(lambda v: abs(v) > 0.05))
        specs.append((ranks, scaling, weight))
    return specs


def _build(specs, params=None):
    params = _params() if params is None else params
    loras = [_adapter(params, ranks, scaling, seed=i)[1] for i, (ranks, scaling, _) in enumerate(specs)]
    return params, loras, [w for *_, w in specs]


@settings(max_examples=6, deadline=None)
@given(specs=adapters(targets=2))
def test_cat_is_the_exact_weighted_sum(specs):
    _, loras, weights = _build(specs)
    out = lj.combine(loras, weights, "cat")
    assert sorted(p for p, _ in lj.targets(out)) == _paths(loras)
    for path, w in lj.targets(out):
        want = _dense_sum(loras, weights, path)
        np.testing.assert_allclose(np_delta_of(w), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        present = [t for t in loras if dict(lj.targets(t)).get(path) is not None]
        assert w.rank == sum(dict(lj.targets(t))[path].rank for t in present)
        assert (w.scale, w.alpha, w.scaling) == (1.0, float(w.rank), "lora")
        assert lj.scale_for(w.scaling, w.alpha, w.rank) == w.scale
    assert out["q"]["bias"] is None


def _check_svd_error(loras, weights, out, k, rtol, atol):
    for path, w in lj.targets(out):
        assert w.rank == k and w.a.shape == w.a_shape and w.b.shape == w.b_shape
        dense = _dense_sum(loras, weights, path)
        m = _as_matrix(dense, w)
        sv = np.linalg.svd(m, compute_uv=False)  # per layer for a stack
        want = np.sqrt(np.sum(sv[..., k:] ** 2))
        got = np.linalg.norm(np_delta_of(w) - dense)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * np.linalg.norm(dense))


@settings(max_examples=6, deadline=None)
@given(specs=adapters(targets=1), k=st.integers(1, 6))
def test_svd_error_is_numpys_truncated_svd_error(specs, k):
    _, loras, weights = _build(specs)
    out = lj.combine(loras, weights, "svd", rank=k)
    _check_svd_error(loras, weights, out, k, rtol=1e-3, atol=1e-5)


def test_svd_in_float64_is_exact_to_float64_rounding():
    with jax.enable_x64(True):
        params = _params(np.float64)
        loras = [_adapter(params, {"q": 4, "heads": 3, "layers": 2}, "rslora", seed=1)[1],
                 _adapter(params, {"q": 2, "layers": 3}, "lora", seed=2)[1]]
        loras = [jax.tree.map(lambda w: w.replace(a=w.a.astype(jnp.float64), b=w.b.astype(jnp.float64)),
                              t, is_leaf=lj.is_lora) for t in loras]
        for k in (2, 6):  # 6 > the total rank of "heads" (3) and "layers" (5): zero-padded, exact
            out = lj.combine(loras, [0.6, -1.3], "svd", rank=k)
            assert all(w.a.dtype == jnp.float64 for _, w in lj.targets(out))
            _check_svd_error(loras, [0.6, -1.3], out, k, rtol=1e-9, atol=1e-12)


def test_svd_never_forms_the_dense_delta():
    n_in, n_out = 3000, 2000
    w = lj.LoraWeight(a=jnp.ones((4, n_in)), b=jnp.ones((4, n_out)), shape=(n_in, n_out),
                      in_axes=(0,), out_axes=(1,), rank=4, alpha=8.0, scale=2.0)
    jaxpr = jax.make_jaxpr(lambda x, y: lj.combine([x, y], [0.5, 0.5], "svd", rank=3))({"w": w}, {"w": w})
    shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert max(np.prod(s) for s in shapes) < n_in * n_out / 100, shapes


# -- ties / dare: a numpy reference from the papers and PEFT's definitions -----------------
def _np_top_magnitude(t, density):
    """Keep the int(density·n) largest |entries| of each layer of t (..., r, x)."""
    flat = t.reshape(*t.shape[:-2], -1)
    keep = int(density * flat.shape[-1])
    idx = np.argsort(-np.abs(flat), axis=-1, kind="stable")[..., :keep]
    out = np.zeros_like(flat)
    np.put_along_axis(out, idx, np.take_along_axis(flat, idx, axis=-1), axis=-1)
    return out.reshape(t.shape)


def _np_dare_masks(key, path, i, a_shape, b_shape, density):
    """The masks combine's docstring promises: one draw over a then b."""
    k = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF), i)
    n_a = int(np.prod(a_shape))
    keep = np.asarray(jax.random.bernoulli(k, density, (n_a + int(np.prod(b_shape)),)), np.float64)
    return keep[:n_a].reshape(a_shape), keep[n_a:].reshape(b_shape)


def _np_merge_factor(tensors, vs, method, density, sign_method, masks):
    if method == "ties":
        trimmed = [_np_top_magnitude(t, density) for t in tensors]
    else:
        trimmed = [t * m / density for t, m in zip(tensors, masks)]
    weighted = [v * t for v, t in zip(vs, trimmed)]
    if method == "dare_linear":
        return sum(weighted)
    signs = np.sign(np.stack(trimmed))
    total = np.sum(np.stack(trimmed), 0) if sign_method == "total" else np.sum(signs, 0)
    agree = signs == np.where(total >= 0, 1.0, -1.0)
    return np.sum(np.stack(weighted) * agree, 0) / np.maximum(np.sum(agree, 0), 1)


def _np_elementwise(loras, weights, method, density, sign_method, key):
    """{path: (A, B)} merged factors (W's factor shapes), float64."""
    out = {}
    for path in _paths(loras):
        found = [(i, weights[i], dict(lj.targets(t)).get(path)) for i, t in enumerate(loras)]
        found = [(i, v * w.scale, w) for i, v, w in found if w is not None]
        v_a = [np.sign(c) * np.sqrt(abs(c)) for _, c, _ in found]
        v_b = [np.sqrt(abs(c)) for _, c, _ in found]
        factors = []
        for f, vs in ((0, v_a), (1, v_b)):
            tensors = [np.asarray((w.a, w.b)[f], np.float64) for _, _, w in found]
            flat = [t.reshape(*w.stack_shape, w.rank, -1) for t, (_, _, w) in zip(tensors, found)]
            masks = None
            if method != "ties":
                masks = [_np_dare_masks(key, path, i, w.a.shape, w.b.shape, density)[f].reshape(ft.shape)
                         for (i, _, w), ft in zip(found, flat)]
            merged = _np_merge_factor(flat, vs, method, density, sign_method, masks)
            factors.append(merged.reshape(tensors[0].shape))
        out[path] = tuple(factors)
    return out


def _check_elementwise(loras, weights, method, density, sign_method, key):
    kw = dict(density=density, key=key)
    if method != "dare_linear":
        kw["majority_sign_method"] = sign_method
    out = lj.combine(loras, weights, method, **kw)
    ref = _np_elementwise(loras, weights, method, density, sign_method, key)
    assert sorted(ref) == sorted(p for p, _ in lj.targets(out))
    for path, w in lj.targets(out):
        a, b = ref[path]
        np.testing.assert_allclose(np.asarray(w.a, np.float64), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(w.b, np.float64), b, rtol=1e-5, atol=1e-6)
        assert (w.scale, w.alpha, w.rank) == (1.0, float(w.rank), dict(lj.targets(loras[0]))[path].rank)


@settings(max_examples=6, deadline=None)
@given(specs=adapters(same_rank=True, targets=1), density=st.sampled_from([0.2, 0.5, 0.9, 1.0]),
       sign_method=st.sampled_from(["total", "frequency"]))
def test_ties_follows_the_numpy_reference(specs, density, sign_method):
    _, loras, weights = _build(specs)
    _check_elementwise(loras, weights, "ties", density, sign_method, None)


def test_dare_follows_the_numpy_reference_with_the_documented_masks():
    params = _params()
    loras = [_adapter(params, {"heads": 2, "layers": 2}, "rslora", seed=0)[1],
             _adapter(params, {"layers": 2}, "lora", seed=1)[1],
             _adapter(params, {"heads": 2, "layers": 2}, "lora", seed=2)[1]]
    for method in ("dare_linear", "dare_ties"):
        _check_elementwise(loras, [0.8, -0.5, 1.2], method, 0.4, "total", jax.random.key(3))


@pytest.mark.parametrize("scaling", ["lora", "rslora"])
def test_one_adapter_at_full_density_is_its_own_weighted_delta(scaling):
    # trimming nothing and electing every sign, ties gives back w·s·A⊗B with the adapter's
    # own scale (alpha/sqrt(r) under rsLoRA), not a scale its rule does not apply
    params = _params()
    _, lora = _adapter(params, {"layers": 4}, scaling, seed=3)
    for method, key in (("ties", None), ("dare_linear", jax.random.key(0)), ("dare_ties", jax.random.key(0))):
        out = lj.combine([lora], [0.75], method, density=1.0, key=key)
        for path, w in lj.targets(out):
            want = 0.75 * np_delta_of(dict(lj.targets(lora))[path])
            np.testing.assert_allclose(np_delta_of(w), want, rtol=1e-5, atol=1e-5)


def test_dare_keeps_a_density_fraction_rescaled_by_one_over_density():
    n, density = 4000, 0.3
    w = lj.LoraWeight(a=jnp.ones((2, n)), b=jnp.full((2, n), 2.0), shape=(n, n), in_axes=(0,), out_axes=(1,),
                      rank=2, alpha=2.0, scale=1.0)
    out = lj.combine([{"w": w}], [1.0], "dare_linear", density=density, key=jax.random.key(7))["w"]
    for got, value in ((np.asarray(out.a), 1.0), (np.asarray(out.b), 2.0)):
        kept = got != 0
        frac = kept.mean()
        assert abs(frac - density) < 4 * np.sqrt(density * (1 - density) / kept.size), frac
        np.testing.assert_allclose(got[kept], value / density, rtol=1e-6)  # expectation kept
    again = lj.combine([{"w": w}], [1.0], "dare_linear", density=density, key=jax.random.key(7))["w"]
    other = lj.combine([{"w": w}], [1.0], "dare_linear", density=density, key=jax.random.key(8))["w"]
    assert np.array_equal(np.asarray(again.a), np.asarray(out.a))
    assert not np.array_equal(np.asarray(other.a), np.asarray(out.a))


def test_combine_runs_under_jit_with_a_traced_key():
    params = _params()
    loras = [_adapter(params, {"layers": 2}, seed=s)[1] for s in (0, 1)]
    run = lambda l, k: lj.combine(l, [0.5, 0.5], "dare_linear", density=0.5, key=k)  # noqa: E731
    got, want = jax.jit(run)(loras, jax.random.key(1)), run(loras, jax.random.key(1))
    for f in ("a", "b"):
        np.testing.assert_allclose(getattr(got["layers"]["kernel"], f), getattr(want["layers"]["kernel"], f),
                                   rtol=1e-6, atol=1e-7)


def test_the_result_exports_to_peft_and_loads_back(tmp_path):
    # scale 1 as alpha = rank under "lora": PEFT's format holds it, whatever the inputs' rules
    params = _params()
    loras = [_adapter(params, {"q": 2}, "rslora", seed=0)[1], _adapter(params, {"q": 3}, "lora", seed=1)[1]]
    out = lj.combine(loras, [0.5, -1.0], "cat")
    lj.peft.save(str(tmp_path), out, lj.peft.HF)
    back = lj.peft.load(str(tmp_path), {"q": params["q"]}, lj.peft.HF)["q"]["kernel"]
    assert (back.rank, back.alpha, back.scale) == (5, 5.0, 1.0)
    np.testing.assert_allclose(np_delta_of(back), _dense_sum(loras, [0.5, -1.0], "q/kernel"), rtol=1e-5, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------
def _two():
    params = _params()
    return [_adapter(params, {"q": 2, "heads": 2}, seed=s)[1] for s in (0, 1)]


@pytest.mark.parametrize(
    "args, kw, err, match",
    [
        (([], []), {}, ValueError, "loras is empty"),
        (("one tree", [1.0, 1.0]), {}, TypeError, "loras must be a list"),
        ((None, [1.0]), {}, ValueError, "weights has 1 entries but loras has 2"),
        ((None, [1.0, float("nan")]), {}, TypeError, r"weights\[1\] must be a finite"),
        ((None, 1.0), {}, TypeError, "weights must be a list of numbers"),
        ((None, [1.0, 1.0], "mean"), {}, ValueError, "method='mean' is not one of"),
        ((None, [1.0, 1.0], "svd"), {}, ValueError, "needs rank; pass e.g. rank=8"),
        ((None, [1.0, 1.0], "svd"), {"rank": 0}, ValueError, "rank must be > 0"),
        ((None, [1.0, 1.0], "svd"), {"rank": 2.0}, TypeError, "rank must be an int"),
        ((None, [1.0, 1.0], "svd"), {"rank": 11}, ValueError, r"q/kernel: rank=11 exceeds min\(in, out\) = 10"),
        ((None, [1.0, 1.0], "cat"), {"rank": 2}, ValueError, "rank=2 does not apply to method='cat'"),
        ((None, [1.0, 1.0], "ties"), {}, ValueError, "needs density; pass e.g. density=0.5"),
        ((None, [1.0, 1.0], "ties"), {"density": 0.0}, ValueError, r"density must be a number in \(0, 1\]"),
        ((None, [1.0, 1.0], "ties"), {"density": 1.5}, ValueError, r"density must be a number in \(0, 1\]"),
        ((None, [1.0, 1.0], "dare_linear"), {"density": 0.5}, TypeError, "needs key"),
        ((None, [1.0, 1.0], "dare_ties"), {"density": 0.5, "key": 3}, TypeError, "key must be one PRNG key"),
        ((None, [1.0, 1.0], "ties"), {"density": 0.5, "majority_sign_method": "max"}, ValueError,
         "majority_sign_method='max' is not one of"),
    ],
)
def test_bad_arguments_name_the_parameter_and_the_fix(args, kw, err, match):
    loras = _two()
    first = loras if args[0] is None else loras[0] if args[0] == "one tree" else args[0]
    args = (first, *args[1:])
    with pytest.raises(err, match=match):
        lj.combine(*args, **kw)


def test_mismatched_adapters_name_the_path_and_shapes():
    params = _params()
    a = _adapter(params, {"q": 2}, seed=0)[1]
    other = dict(params, q={"kernel": jnp.ones((12, 7)), "bias": params["q"]["bias"]})
    b = _adapter(other, {"q": 2}, seed=1)[1]
    with pytest.raises(ValueError, match=r"q/kernel: the adapters are for different weights: .*\(12, 10\).*\(12, 7\)"):
        lj.combine([a, b], [1.0, 1.0])
    c = _adapter({"q": params["q"]}, {"q": 2}, seed=2)[1]
    with pytest.raises(ValueError, match="in loras\\[0\\] but not in loras\\[1\\]: heads/kernel"):
        lj.combine([a, c], [1.0, 1.0])
    d = _adapter(params, {"q": 3}, seed=3)[1]
    with pytest.raises(ValueError, match=r"q/kernel: method='ties' .* ranks are \{'loras\[0\]': 2, 'loras\[1\]': 3\}"):
        lj.combine([a, d], [1.0, 1.0], "ties", density=0.5)
    empty = jax.tree.map(lambda w: None, a, is_leaf=lj.is_lora)
    with pytest.raises(ValueError, match="hold no adapter"):
        lj.combine([empty], [1.0])


# -- pissa_to_lora ----------------------------------------------------------------------------
def _trained(lora, seed):
    rng = np.random.default_rng(seed)
    bump = lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    return jax.tree.map(lambda w: w.replace(a=bump(w.a), b=bump(w.b)), lora, is_leaf=lj.is_lora)


@pytest.mark.parametrize("dtype, tol, scaling", [(np.float32, 1e-5, "lora"), (np.float64, 1e-12, "rslora")])
def test_pissa_to_lora_merges_into_the_original_base_as_pissa_into_its_residual(dtype, tol, scaling):
    with jax.enable_x64(dtype == np.float64):
        params = _params(dtype)
        residual, lora = _adapter(params, {"heads": 2, "layers": 2}, scaling, seed=4, init="pissa")
        lora = _trained(lora, seed=5)
        plain = lj.pissa_to_lora(lora, residual, params)
        if dtype == np.float32:  # the library's own merge, to float32 rounding
            want, got = lj.merge(residual, lora), lj.merge(params, plain)
            for name in ("heads", "layers"):
                np.testing.assert_allclose(got[name]["kernel"], want[name]["kernel"], rtol=0, atol=4e-6)
        for path, w in lj.targets(plain):  # an independent float64 merge
            name = path.split("/")[0]
            pissa_w = dict(lj.targets(lora))[path]
            assert w.rank == 2 * pissa_w.rank and w.scale == 1.0 and w.a.dtype == dtype
            ref = np.asarray(residual[name]["kernel"], np.float64) + np_delta_of(pissa_w)
            mine = np.asarray(params[name]["kernel"], np.float64) + np_delta_of(w)
            np.testing.assert_allclose(mine, ref, rtol=0, atol=tol * np.abs(ref).max())


def test_pissa_to_lora_checks_the_trees_fit():
    params = _params()
    residual, lora = _adapter(params, {"q": 2}, seed=0, init="pissa")
    with pytest.raises(ValueError, match="q/kernel: the adapter was made for shape"):
        lj.pissa_to_lora(lora, residual, dict(params, q={"kernel": jnp.ones((12, 9)), "bias": params["q"]["bias"]}))
