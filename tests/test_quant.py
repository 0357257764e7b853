"""Quantized frozen bases (QLoRA): the codecs against numpy and bitsandbytes, and
``wrap(f)(qbase, lora, x)`` against ``f(merge(qbase, lora), x)``.

The NF4 fixtures in ``fixtures/nf4/`` were made once by real bitsandbytes
(``fixtures/make_nf4_fixtures.py``); torch and bitsandbytes are not test dependencies.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import quant, transform
from reference import randomize

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "nf4"
NF4 = quant.NF4_VALUES.astype(np.float64)


# ---------------------------------------------------------------------------------------
# numpy references: blocks of `block` consecutive inputs of one output


def np_blocks(w, in_axes, block):
    """w as (*rows, n_blocks, block) float64, inputs flattened in W's order, zero-padded."""
    rows = [d for d in range(w.ndim) if d not in in_axes]
    x = np.transpose(np.asarray(w, np.float64), rows + list(in_axes))
    x = x.reshape(*[w.shape[d] for d in rows], -1)
    n = x.shape[-1]
    pad = -n % block
    x = np.concatenate([x, np.zeros((*x.shape[:-1], pad))], axis=-1)
    return x.reshape(*x.shape[:-1], -1, block), rows, n


def np_unblocks(v, w, in_axes, rows, n):
    v = v.reshape(*v.shape[:-2], -1)[..., :n]
    v = v.reshape(*[w.shape[d] for d in rows], *[w.shape[d] for d in in_axes])
    return np.transpose(v, np.argsort(rows + list(in_axes)))


def np_dequantized(w, qtype, in_axes, block):
    """The paper's definitions in float64 (fp8 rounding by ml_dtypes)."""
    x, rows, n = np_blocks(w, in_axes, block)
    absmax = np.abs(x).max(-1, keepdims=True)
    safe = np.where(absmax > 0, absmax, 1.0)
    if qtype == "nf4":
        idx = np.abs((x / safe)[..., None] - NF4).argmin(-1)
        v = NF4[idx] * absmax
    elif qtype == "int8":
        v = np.clip(np.round(x / safe * 127), -127, 127) * (absmax / 127)
    else:
        # the scale is float32 by definition, so is the division that rounds to e4m3
        s32 = (absmax.astype(np.float32) / np.float32(448.0))
        q = x.astype(np.float32) / np.where(s32 > 0, s32, np.float32(1))
        v = q.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s32
        # an exact tie between two e4m3 values may round either way once the compiler turns
        # the division into a multiplication by the reciprocal: both neighbours are right
        step = np.exp2(np.floor(np.log2(np.maximum(np.abs(q), 2.0**-6))) - 3)
        tie = np.abs(np.abs(q / step) % 1 - 0.5) < 1e-4
        return np_unblocks(v, w, in_axes, rows, n), np_unblocks(np.where(tie, step * s32, 0), w, in_axes, rows, n)
    return np_unblocks(v, w, in_axes, rows, n), np.zeros(w.shape)


# ---------------------------------------------------------------------------------------
# codecs


@settings(max_examples=12, deadline=None)
@given(
    qtype=st.sampled_from(quant.QTYPES),
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    n_in=st.integers(1, 2),
    block=st.sampled_from([2, 4, 8, 64]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_codecs_match_numpy_reference(qtype, shape, n_in, block, dtype, seed):
    """Per-block absmax scaling and the nearest code value (NF4's 16 values, int8's 255,
    e4m3's), for any axes, non-dividing block sizes (zero padding) and dtypes."""
    n_in = min(n_in, len(shape) - 1)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    in_axes = tuple(sorted(rng.choice(len(shape), n_in, replace=False).tolist()))
    w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))  # the values the codec sees
    q = quant.quantize_array(jnp.asarray(w, dtype), qtype, in_axes=in_axes, block_size=block)
    got = np.asarray(q.dequantize().astype(jnp.float32), np.float64)
    want, slack = np_dequantized(w, qtype, in_axes, block)
    assert q.dequantize().dtype == jnp.dtype(dtype) and q.shape == tuple(shape)
    # float32 scaling (and the final cast to dtype) against float64
    tol = 1e-6 if dtype == "float32" else 2**-8
    err = np.abs(got - want.astype(dtype).astype(np.float64))
    assert np.all(err <= tol * (np.abs(want) + np.abs(w).max()) + slack * (1 + tol)), err.max()


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.npz")), ids=lambda p: p.stem)
def test_nf4_matches_bitsandbytes(path):
    """Single-level NF4: bitsandbytes' codes, absmax and dequantized values exactly; double
    quantization: weight error within bitsandbytes' own (its second level is a dynamic 8-bit
    map, ours linear int8 after subtracting the mean, as the paper describes)."""
    ref = np.load(path)
    w = jnp.asarray(ref["weight"])  # (out, in), as torch stores it
    q = quant.quantize_array(w, "nf4", in_axes=(1,), block_size=64)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), ref["single_codes"])
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1), ref["single_absmax"])
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref["single_dequantized"])
    q2 = quant.quantize_array(w, "nf4", in_axes=(1,), block_size=64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q2.codes).reshape(-1), ref["double_codes"])
    ours = np.linalg.norm(np.asarray(q2.dequantize()) - ref["weight"])
    theirs = np.linalg.norm(ref["double_dequantized"] - ref["weight"])
    assert ours <= theirs * 1.01, (ours, theirs)
    scale_err = np.abs(np.asarray(q2.block_scales()).reshape(-1) - ref["single_absmax"]).max()
    assert scale_err <= np.abs(ref["double_absmax"] - ref["single_absmax"]).max()


def test_bytes_per_parameter():
    """NF4 with double quantization stores <= 0.52 bytes per parameter (codes and every
    scale); without it, 0.5 + 4/64."""
    w = jax.random.normal(jax.random.key(0), (512, 1024))
    dq = quant.quantize_array(w, "nf4", in_axes=(0,), double_quant=True)
    assert dq.nbytes / w.size <= 0.52
    assert quant.quantize_array(w, "nf4", in_axes=(0,)).nbytes / w.size == 0.5 + 4 / 64
    assert quant.quantize_array(w, "int8", in_axes=(0,), double_quant=True).nbytes / w.size < 1.02


# ---------------------------------------------------------------------------------------
# the tree API


def filled(lora, seed=3):
    """Random factors small enough that the adapted model stays well conditioned (tanh not
    saturated), so float32 rounding cannot hide a real difference."""
    return jax.tree.map(lambda w: w.replace(a=0.3 * w.a, b=0.3 * w.b) if lj.is_lora(w) else w,
                        randomize(lora, seed), is_leaf=lj.is_lora)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(96)(x))
        h = nn.DenseGeneral((2, 48))(h)  # multi-axis output
        return nn.Dense(5, name="head")(nn.gelu(h.reshape(*h.shape[:-2], 96)))


def mlp():
    x = jax.random.normal(jax.random.key(1), (3, 64))
    model = Mlp()
    return model.apply, model.init(jax.random.key(2), x), x


def test_quantize_picks_all_linear_and_keeps_the_rest():
    f, params, x = mlp()
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    kinds = {lj.path_str(p): lj.is_quantized(v)
             for p, v in jax.tree_util.tree_flatten_with_path(qbase, is_leaf=lj.is_quantized)[0]}
    assert kinds == {"params/Dense_0/kernel": True, "params/Dense_0/bias": False,
                     "params/DenseGeneral_0/kernel": True, "params/DenseGeneral_0/bias": False,
                     "params/head/kernel": False, "params/head/bias": False}
    q = qbase["params"]["DenseGeneral_0"]["kernel"]
    assert q.shape == (96, 2, 48) and q.in_axes == (0,) and q.codes.shape == (2, 48, 64)  # 96 inputs padded to 2 blocks
    # a pattern picks others (the head too); dequantize gives float leaves of the same shapes
    picked = lj.quantize(params, "int8", pattern=r".*head/kernel", double_quant=False)
    assert lj.is_quantized(picked["params"]["head"]["kernel"])
    assert not lj.is_quantized(picked["params"]["Dense_0"]["kernel"])
    back = lj.dequantize(qbase)
    assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, params)
    err = jnp.linalg.norm(back["params"]["Dense_0"]["kernel"] - params["params"]["Dense_0"]["kernel"])
    assert 0 < err / jnp.linalg.norm(params["params"]["Dense_0"]["kernel"]) < 0.12


def test_quantize_abstract():
    f, params, x = mlp()
    abstract = jax.eval_shape(lambda: params)
    q = lj.quantize(abstract, "nf4", apply_fn=f, args=(x,))["params"]["Dense_0"]["kernel"]
    assert q.codes.shape == (96, 32) and q.codes.dtype == jnp.uint8


def check_factored_equals_merge(f, qbase, lora, args, rtol=2e-5, residuals=True):
    """Values and grads w.r.t. lora of wrap(f) vs f(merge(qbase, lora)), under jit; and no
    dequantized weight kept between the forward and the backward pass."""
    lora = filled(lora)

    def loss(strategy):
        def run(l):  # a fixed random cotangent: well conditioned however large y is
            y = lj.wrap(f, strategy)(qbase, l, *args)
            return sum(jnp.sum(t * jax.random.normal(jax.random.key(k), t.shape))
                       for k, t in enumerate(jax.tree.leaves(y))), y
        return run

    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss("factored"), has_aux=True))(lora)
    (l2, y2), g2 = jax.jit(jax.value_and_grad(loss("merge"), has_aux=True))(lora)
    for a, b in zip(jax.tree.leaves((y1, g1)), jax.tree.leaves((y2, g2))):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))
    if residuals:
        saved = residuals_of(loss("factored"), lora)
        assert not dequantized_among(saved, qbase)
        return saved


def residuals_of(loss, lora) -> list:
    """The arrays the backward pass of ``loss`` keeps from its forward pass."""
    _, vjp = jax.vjp(jax.jit(lambda l: loss(l)[0]), lora)
    return jax.tree.leaves(vjp)


def dequantized_among(saved, qbase) -> list:
    """Float arrays of a quantized weight's shape among ``saved``."""
    shapes = {q.shape for q in jax.tree.leaves(qbase, is_leaf=lj.is_quantized) if lj.is_quantized(q)}
    return [r.shape for r in saved if jnp.issubdtype(r.dtype, jnp.floating) and r.shape in shapes]


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_linen_factored_equals_merge(qtype):
    f, params, x = mlp()
    qbase = lj.quantize(params, qtype, apply_fn=f, args=(x,))
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=4), apply_fn=f, args=(x,))
    assert lj.is_quantized(base["params"]["Dense_0"]["kernel"])
    assert {p for p, _ in lj.targets(lora)} == {"params/Dense_0/kernel", "params/DenseGeneral_0/kernel"}
    check_factored_equals_merge(f, base, lora, (x,))


def test_the_residual_check_can_fail(monkeypatch):
    """With each use a plain product of the dequantized weight, the check above finds the
    float weight among the residuals."""
    f, params, x = mlp()
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=4), apply_fn=f, args=(x,))
    monkeypatch.setattr(transform, "_use", lambda eqn, vals: transform.bind(eqn, [transform._value(v) for v in vals]))
    loss = lambda l: (jnp.sum(lj.wrap(f)(base, l, x)), None)  # noqa: E731
    assert dequantized_among(residuals_of(loss, lora), base)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(32)(jnp.tanh(nn.Dense(48)(x))), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return nn.Dense(4)(scan()(x, None)[0])


def test_scanned_remat_stack_dequantizes_one_layer_per_step():
    model, x = Stack(), jax.random.normal(jax.random.key(1), (2, 5, 32))
    params = model.init(jax.random.key(2), x)
    qbase = lj.quantize(params, "nf4", block_size=16, apply_fn=model.apply, args=(x,))
    q = qbase["params"]["ScanCheckpointLayer_0"]["Dense_0"]["kernel"]
    assert q.shape == (3, 48, 32) and q.in_axes == (1,) and q.codes.shape == (3, 32, 24)
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=2), apply_fn=model.apply, args=(x,))
    saved = check_factored_equals_merge(model.apply, base, lora, (x,), rtol=1e-4)  # 3 float32 layers deep
    # the codes are not copied per step either: the residuals hold the stored codes themselves
    stored = {q.codes.unsafe_buffer_pointer() for q in jax.tree.leaves(base, is_leaf=lj.is_quantized)
              if lj.is_quantized(q)}
    codes = [r for r in saved if r.dtype == jnp.uint8]
    assert codes and all(r.unsafe_buffer_pointer() in stored for r in codes)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 80, rngs=rngs)
        self.down = nnx.Linear(80, 64, rngs=rngs)
        self.out = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(x + self.down(nnx.relu(self.up(x))))


def test_nnx_factored_equals_merge():
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    f, x = lj.nnx.apply_fn(graphdef), jax.random.normal(jax.random.key(1), (4, 64))
    qstate = lj.quantize(state, "int8", apply_fn=f, args=(x,))
    base, lora = lj.split(jax.random.key(0), qstate, lj.LoraConfig.all_linear(rank=3), apply_fn=f, args=(x,))
    assert len(lj.targets(lora)) == 2
    check_factored_equals_merge(f, base, lora, (x,), residuals=False)


@pytest.mark.slow
def test_hugging_face_gpt2_factored_equals_merge():
    """GPT-2 stores its Conv1D kernels (out, in)-style: inference gives in_axes (1,) for
    c_attn, and the blocks run along it."""
    from test_transform_families import hf_model

    f, params = hf_model("gpt2")
    ids = jnp.array([[3, 17, 42, 5, 63, 0]], jnp.int32)
    qbase = lj.quantize(params, "nf4", block_size=32, apply_fn=f, args=(ids,))
    q = qbase["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert q.shape == (96, 32) and q.in_axes == (1,)
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=2), apply_fn=f, args=(ids,))
    check_factored_equals_merge(f, base, lora, (ids,), rtol=1e-4, residuals=False)


def test_vmap_and_quantized_non_targets():
    """A quantized weight that is not a target is dequantized at its use too; vmap over
    inputs works."""
    f, params, x = mlp()
    qbase = lj.quantize(params, "fp8", apply_fn=f, args=(x,))
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/Dense_0/kernel", rank=2),))
    base, lora = lj.split(jax.random.key(0), qbase, cfg, apply_fn=f, args=(x,))
    lora = randomize(lora)
    xs = jnp.stack([x, 2 * x])
    got = jax.vmap(lambda x: lj.wrap(f)(base, lora, x))(xs)
    want = jax.vmap(lambda x: f(lj.merge(base, lora), x))(xs)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_merge_requantize_and_unmerge():
    f, params, x = mlp()
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=4), apply_fn=f, args=(x,))
    lora = randomize(lora)
    merged = lj.merge(base, lora)
    assert not any(lj.is_quantized(v) for v in jax.tree.leaves(merged, is_leaf=lj.is_quantized))
    w = merged["params"]["Dense_0"]["kernel"]
    deq = lj.dequantize(base)["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(w, deq + lora["params"]["Dense_0"]["kernel"].delta(), rtol=1e-6, atol=1e-6)
    again = lj.merge(base, lora, requantize=True)
    q = again["params"]["Dense_0"]["kernel"]
    assert lj.is_quantized(q) and (q.qtype, q.block_size, q.double_quant) == ("nf4", 64, True)
    ref = quant.quantize_array(w, "nf4", in_axes=(0,), double_quant=True).dequantize()
    np.testing.assert_array_equal(q.dequantize(), ref)
    np.testing.assert_allclose(lj.unmerge(merged, lora)["params"]["Dense_0"]["kernel"], deq, atol=1e-5)


# ---------------------------------------------------------------------------------------
# bad input


def test_errors_name_the_path():
    f, params, x = mlp()
    with pytest.raises(ValueError, match=r"qtype='nf5' is not a known quantization"):
        lj.quantize(params, "nf5")
    with pytest.raises(ValueError, match=r"block_size=3"):
        lj.quantize(params, "nf4", block_size=3)
    with pytest.raises(ValueError, match=r"params/Dense_0/bias: shape \(96,\) has no input and output axes"):
        lj.quantize(params, "nf4", pattern=r".*Dense_0/bias")
    with pytest.raises(TypeError, match=r"ids: dtype int32 cannot be quantized"):
        lj.quantize({"ids": jnp.ones((4, 4), jnp.int32)}, "int8", pattern="ids")
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    with pytest.raises(ValueError, match=r"already quantized: .*params/Dense_0/kernel \(nf4\)"):
        lj.quantize(qbase, "nf4", apply_fn=f, args=(x,))
    with pytest.raises(ValueError, match=r"init='pissa'.*quantized"):
        lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=2, init="pissa"), apply_fn=f, args=(x,))


def test_no_materialize_warning_and_one_trace():
    f, params, x = mlp()
    traces = []

    def counted(p, x):
        traces.append(1)
        return f(p, x)

    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=4), apply_fn=f, args=(x,))
    g = lj.wrap(counted)
    g(base, lora, x)
    g(base, randomize(lora), x + 1)
    assert len(traces) == 1
    assert transform.MaterializeWarning  # (warnings are errors in this suite)


# ---------------------------------------------------------------------------------------
# sharding, checkpoints, summary


def test_sharded_quantized_step_equals_one_device():
    """Codes and scales placed by quantized_specs on a 2x4 mesh (model-parallel output axis,
    data-parallel first input axis): the factored loss and grads equal one device's, and the
    specs of a placed tree map back to the weight's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    f, params, x = mlp()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"params": {"Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
                        "DenseGeneral_0": {"kernel": P("model", None, None), "bias": P()},
                        "head": {"kernel": P(), "bias": P()}}}
    qbase = lj.quantize(params, "nf4", block_size=8, apply_fn=f, args=(x,))  # 96 inputs: 12 blocks
    qspecs = lj.sharding.quantized_specs(qbase, specs)
    k = qspecs["params"]["DenseGeneral_0"]["kernel"]
    assert (k.codes, k.scale, k.scale2) == (P(None, None, "model"), P(None, None, "model"), P())
    placed = jax.device_put(qbase, jax.tree.map(lambda s: NamedSharding(mesh, s), qspecs))
    assert placed["params"]["Dense_0"]["kernel"].codes.sharding.spec == P("model", None)
    back = lj.sharding.specs(lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=2),
                                      apply_fn=f, args=(x,))[1], placed)
    assert back["params"]["DenseGeneral_0"]["kernel"].a == P(None, "model")  # (r, in)
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=2), apply_fn=f, args=(x,))
    lora = filled(lora)
    loss = jax.jit(jax.value_and_grad(lambda l, b: jnp.sum(lj.wrap(f)(b, l, x) ** 2)))
    (l1, g1), (l8, g8) = loss(lora, base), loss(lora, placed)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    two_in = {"k": quant.quantize_array(jnp.ones((4, 8, 16)), "int8", in_axes=(0, 1), block_size=8)}
    with pytest.raises(ValueError, match=r"k: spec .* splits input axis 1 of the quantized weight \(4, 8, 16\)"):
        lj.sharding.quantized_specs(two_in, {"k": P(None, "model")})
    assert lj.sharding.quantized_specs(two_in, {"k": P("data", None, "model")})["k"].codes == P("model", "data")


def test_checkpoint_round_trip_and_summary(tmp_path):
    f, params, x = mlp()
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    lj.checkpoint.save_params(tmp_path / "q", qbase)
    for got in (lj.checkpoint.restore_params(tmp_path / "q"), lj.checkpoint.restore_params(tmp_path / "q", like=qbase)):
        assert jax.tree.structure(got, is_leaf=lj.is_quantized) == jax.tree.structure(qbase, is_leaf=lj.is_quantized)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(qbase)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        q, want = got["params"]["Dense_0"]["kernel"], qbase["params"]["Dense_0"]["kernel"]
        assert (q.qtype, q.shape, q.dtype, q.block_size, q.in_axes) == (
            want.qtype, want.shape, want.dtype, want.block_size, want.in_axes)
    base, lora = lj.split(jax.random.key(0), qbase, lj.LoraConfig.all_linear(rank=4), apply_fn=f, args=(x,))
    text = lj.summary(lora, base)
    n_q = 64 * 96 + 96 * 96
    stored = sum(q.nbytes for q in jax.tree.leaves(qbase, is_leaf=lj.is_quantized) if lj.is_quantized(q))
    assert f"nf4: 2 quantized weights, {8 * stored / n_q:.3f} bits/param" in text
    params_n = sum(v.size for v in jax.tree.leaves(params))
    assert f"all params: {params_n + sum(w.num_params for _, w in lj.targets(lora)):,}" in text


@pytest.mark.slow
def test_finetune_with_a_quantized_base(tmp_path):
    """``lora.quantize=nf4``: the run trains on the quantized base, merges into its
    dequantized weights, and reports the float-base run and the base bytes beside it."""
    from lora_jax.app.run import finetune, format_table
    from lora_jax.app.run_config import from_dict

    cfg = from_dict({}, [f"output.dir={tmp_path}/run", f"output.cache_dir={tmp_path}/cache",
                         "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
                         "model.context=16", "pretrain.steps=2", "train.steps=3", "train.warmup=1",
                         "train.batch_size=2", "train.eval_batches=1", "train.progress=false",
                         "data.max_bytes=30000", "lora.rank=2", "lora.quantize=nf4"])
    m = finetune(cfg, log=None)
    assert m["base"]["quantize"] == "nf4" and m["base"]["stored_bytes"] < 0.5 * m["base"]["bytes"]
    assert {"lora", "float_base"} <= set(m) and m["float_base"]["steps"] == 3
    assert m["lora"]["target_before"] != m["float_base"]["target_before"]  # deq(W) is not W
    assert "base bytes (nf4 vs float)" in format_table(m) and "LoRA, nf4 base" in format_table(m)
    qbase = lj.checkpoint.restore_params(tmp_path / "run" / "base")
    adapter = lj.checkpoint.restore(tmp_path / "run" / "adapter")
    merged = lj.checkpoint.restore_params(tmp_path / "run" / "merged")
    want = lj.merge(qbase, adapter)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"lora.quantize"):
        from_dict({}, ["lora.quantize=nf3"])


def test_peft_load_onto_a_quantized_tree_is_refused(tmp_path):
    f, params, x = mlp()
    qbase = lj.quantize(params, "nf4", apply_fn=f, args=(x,))
    with pytest.raises(TypeError, match=r"params holds quantized weights \(.*params/Dense_0/kernel.*\); give the float"):
        lj.peft.load(tmp_path, qbase, [(r"params/(\w+)/kernel", r"\1")])


def test_compiled_step_keeps_at_most_two_dequantized_weights(monkeypatch):
    """The compiled training step's temporaries on an nf4 base exceed the float base's by at
    most two dequantized weights (8 layers: every weight at once would be 8); with each use
    a plain product of the dequantized weight they do not."""
    n, d = 8, 256
    params = {f"l{i}": {"kernel": 0.05 * jax.random.normal(jax.random.key(i), (d, d))} for i in range(n)}

    def f(p, x):
        for i in range(n):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return x

    x = jnp.ones((16, d))
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=4),))

    def temps(tree):
        base, lora = lj.split(jax.random.key(0), tree, cfg)
        step = jax.jit(jax.grad(lambda l, b: jnp.sum(lj.wrap(f)(b, l, x))))
        return step.lower(lora, base).compile().memory_analysis().temp_size_in_bytes

    weight = d * d * 4
    float_temps, nf4_temps = temps(params), temps(lj.quantize(params, "nf4"))
    assert nf4_temps <= float_temps + 2 * weight, (nf4_temps - float_temps) / weight
    monkeypatch.setattr(transform, "_use", lambda eqn, vals: transform.bind(eqn, [transform._value(v) for v in vals]))
    assert temps(lj.quantize(params, "nf4")) > float_temps + 4 * weight
