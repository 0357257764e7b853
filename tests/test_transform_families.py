"""``lj.wrap(f)`` (the factored interpreter) equals ``lj.wrap(f, strategy="merge")``.

For every model family and axis layout the factored strategy must agree with the reference
that materializes ``W + s·A⊗B`` and calls ``f``: the output, the gradient with respect to the
adapters' ``a`` and ``b``, and the gradient with respect to the float inputs. The wrapped
``g`` runs without any jit ("eager"), and under ``jax.jit``, ``jax.checkpoint`` and
``jax.vmap`` (each inside one outer ``jax.jit``), always inside ``jax.value_and_grad``; every
transform of the factored ``g`` is compared with the same transform of the merge ``g``.

The adapters are given random non-zero factors before comparing: ``lj.split`` starts B (A for
embeddings) at zero, and a zero delta would make both strategies equal to the base model
whatever the factored rules did. Every case also checks that the loss depends on each
adapter (non-zero gradients of its ``a`` and ``b``), so no target can go unchecked.

No case may emit :class:`lj.transform.MaterializeWarning`: pytest's ``filterwarnings=error``
turns one into a failure, and the Hugging Face tests also record warnings explicitly.

bfloat16 weights are checked against a float64 numpy reference with a tolerance derived from
bfloat16's rounding (see :func:`test_bf16_against_float64`).
"""

from __future__ import annotations

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import lora_jax as lj
from lora_jax.usage import trace_usage
from reference import np_delta

KEY = jax.random.key(0)
FP32_RTOL = 1e-5  # factored vs merge, relative to the scale of each compared array


# ---------------------------------------------------------------------------------------
# helpers


def normal(*shape, seed=1, dtype=jnp.float32, std=1.0):
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), dtype)


def nonzero(base, lora, seed=0):
    """Every adapter with gaussian ``a`` and ``b`` (dtypes kept), sized so that the delta
    ``s·A⊗B`` has about the root-mean-square of its base weight (``s·sqrt(r)·std²``)."""
    rng = np.random.default_rng(seed)
    weights = {lj.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}

    def fill(path, w):
        if not lj.is_lora(w):
            return w
        rms = float(np.sqrt(np.mean(np.square(np.asarray(weights[lj.path_str(path)], np.float64)))))
        std = np.sqrt(rms / (w.scale * np.sqrt(w.rank)))
        a = rng.standard_normal(np.shape(w.a)) * std
        b = rng.standard_normal(np.shape(w.b)) * std
        return w.replace(a=jnp.asarray(a, w.a.dtype), b=jnp.asarray(b, w.b.dtype))

    return jax.tree_util.tree_map_with_path(fill, lora, is_leaf=lj.is_lora)


def n_targets(lora) -> int:
    return sum(lj.is_lora(w) for w in jax.tree.leaves(lora, is_leaf=lj.is_lora))


def _is_float(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def _cotangent(y):
    """A fixed, non-constant weighting of the output (so every output element matters)."""
    y = jnp.asarray(y, jnp.float32)
    return jnp.cos(1.7 * jnp.arange(y.size, dtype=jnp.float32) + 0.3).reshape(y.shape)


def _batched(x):
    """Two examples from one: ``x`` and ``x`` reversed along every axis (ints stay valid)."""
    return jnp.stack([x, jnp.flip(x)])


VARIANTS = ("eager", "jit", "checkpoint", "vmap")
JITTED = ("jit", "checkpoint", "vmap")
STRATEGIES = ("factored", "merge")


def derivatives(g, base, lora, args, variant, forward_mode=False):
    """``(y, (d lora, *d float args))`` of ``sum(g(base, lora, *args) * ct)`` with ``g``
    transformed by ``variant``: ``"eager"`` (as is), ``"jit"`` (``jax.jit(g)``),
    ``"checkpoint"`` (``jax.checkpoint(g)``) or ``"vmap"`` (``jax.vmap(g, in_axes=(None,
    None, 0))`` over a batch of two inputs). ``forward_mode`` takes the same derivatives
    with ``jax.jacfwd`` (``lax.while_loop`` has no reverse mode).
    """
    args = list(args)
    if variant == "jit":
        g = jax.jit(g)
    elif variant == "checkpoint":
        g = jax.checkpoint(g)
    elif variant == "vmap":
        g = jax.vmap(g, in_axes=(None, None, *[0] * len(args)))
        args = [_batched(x) for x in args]
    floats = [i for i, x in enumerate(args) if _is_float(x)]

    def loss(lora, *fargs):
        a = list(args)
        for i, x in zip(floats, fargs):
            a[i] = x
        y = g(base, lora, *a)
        total = sum(jnp.sum(jnp.asarray(t, jnp.float32) * _cotangent(t))
                    for t in jax.tree.leaves(y) if _is_float(t))
        return total, y

    argnums = tuple(range(1 + len(floats)))
    xs = (lora, *[args[i] for i in floats])
    if forward_mode:
        grads, y = jax.jacfwd(loss, argnums=argnums, has_aux=True)(*xs)
    else:
        (_, y), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*xs)
    return y, grads


def all_derivatives(make_g, base, lora, args, variants, forward_mode=False):
    """``{variant: {strategy: (y, grads)}}``; the eager variant runs without jit, the others
    together in one ``jax.jit`` (one compilation for all of them)."""

    def compute(base, lora, args, variants):
        return {v: {s: derivatives(make_g(s), base, lora, args, v, forward_mode)
                    for s in STRATEGIES} for v in variants}

    out = {}
    if "eager" in variants:
        out.update(compute(base, lora, args, ("eager",)))
    rest = tuple(v for v in variants if v != "eager")
    if rest:
        out.update(jax.jit(compute, static_argnums=3)(base, lora, tuple(args), rest))
    return out


def assert_close(got, want, rtol, what=""):
    """Leaf by leaf: ``|got - want| <= rtol * (|want| + max|want|)``."""
    gl, gd = jax.tree.flatten(got)
    wl, wd = jax.tree.flatten(want)
    assert gd == wd, (what, gd, wd)
    for i, (g, w) in enumerate(zip(gl, wl)):
        w32 = np.asarray(w, np.float32)
        scale = float(np.max(np.abs(w32))) if w32.size else 0.0
        chex.assert_trees_all_close(np.asarray(g, np.float32), w32, rtol=rtol,
                                    atol=rtol * scale + 1e-30, custom_message=f"{what} leaf {i}")


def check_equal(make_g, base, lora, args, variants=VARIANTS, rtol=FP32_RTOL, forward_mode=False):
    """Factored vs merge: values and gradients (adapters and float inputs) per variant.

    ``make_g(strategy)`` gives ``g(base, lora, *args)``. Also checks that the comparison can
    fail: every adapter's delta is non-zero (see :func:`nonzero`) and the loss depends on
    each adapter's ``a`` and ``b`` (non-zero gradients), so a wrong factored rule for any
    target would change the value or the gradients.
    """
    assert n_targets(lora) > 0
    results = all_derivatives(make_g, base, lora, args, variants, forward_mode)
    for variant, res in results.items():
        (y_f, g_f), (y_m, g_m) = res["factored"], res["merge"]
        assert_close(y_f, y_m, rtol, f"{variant}: value")
        assert_close(g_f, g_m, rtol, f"{variant}: gradient")
        for path, w in lj.targets(g_m[0]):
            assert float(jnp.max(jnp.abs(w.a))) > 0 and float(jnp.max(jnp.abs(w.b))) > 0, path


def wrapper(f):
    return lambda strategy: lj.wrap(f, strategy)


def split_nonzero(params, config, f=None, args=(), seed=0):
    """``(base, lora)``: traced split (with ``f``) and adapters with a non-zero delta.

    With ``f``, also checks that every primitive meeting a target in ``f``'s jaxpr is in
    the primitive table both walkers share (see :func:`assert_classified`)."""
    kw = dict(apply_fn=f, args=args) if f is not None else {}
    base, lora = lj.split(KEY, params, config, **kw)
    if f is not None:
        assert_classified(f, params, args, lora)
    return base, nonzero(base, lora, seed)


def assert_classified(f, params, args, lora):
    """No primitive outside ``lora_jax._jaxpr.PRIMITIVES`` consumes a targeted weight of
    ``f(params, *args)``: a JAX upgrade that renames or adds one fails here by name."""
    paths = [lj.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    targets = dict(lj.targets(lora))
    index = [i for i, p in enumerate(paths) if p in targets]
    assert len(index) == len(targets), (sorted(targets), paths)
    usages = trace_usage(f, params, args, targets=index)
    unknown = {paths[i]: usages[i].unknown() for i in index if usages[i].unknown()}
    assert not unknown, f"primitives outside the shared table meet targets: {unknown}"


def linen_check(model, args, config, variants=("jit",), rtol=FP32_RTOL, expect=None):
    params = model.init(KEY, *args)
    base, lora = split_nonzero(params, config, model.apply, args)
    if expect is not None:
        assert n_targets(lora) == expect, lj.summary(lora)
    check_equal(wrapper(model.apply), base, lora, args, variants, rtol)
    return lora


ALL_KERNELS = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2, alpha=4.0),))


# ---------------------------------------------------------------------------------------
# 1. Flax linen


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.tanh(nn.Dense(12)(x))
        return nn.Dense(5)(x)


def test_linen_dense_mlp():
    linen_check(MLP(), (normal(3, 8),), ALL_KERNELS, variants=VARIANTS, expect=3)


class MultiAxis(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(3, 4), name="split_heads")(x)  # (d, h, dh)
        h = jnp.tanh(h)
        return nn.DenseGeneral(features=6, axis=(-2, -1), name="merge_heads")(h)  # (h, dh, o)


def test_linen_dense_general_multi_axis():
    lora = linen_check(MultiAxis(), (normal(2, 5, 8),), ALL_KERNELS, variants=JITTED, expect=2)
    w = lora["params"]["merge_heads"]["kernel"]
    assert (w.in_axes, w.out_axes) == ((0, 1), (2,))


@pytest.mark.parametrize(
    "spec,kshape,xshape",
    [("bd,hde->bhe", (3, 8, 4), (2, 8)),
     ("bhd,ehd->bhe", (5, 3, 4), (2, 3, 4)),  # h is a batch dim of the product: a stack axis
     ("bd,hed->bhe", (3, 4, 8), (2, 8))],
    ids=["bd,hde", "bhd,ehd", "bd,hed"],
)
def test_linen_einsum(spec, kshape, xshape):
    if not hasattr(nn, "Einsum"):
        pytest.skip("flax.linen has no Einsum")
    linen_check(nn.Einsum(kshape, spec), (normal(*xshape),), ALL_KERNELS, expect=1)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 6, name="embed")
        h = jnp.tanh(nn.Dense(6, name="mix")(emb(ids)))
        return emb.attend(h)


def test_linen_embed_lookup_and_tied_attend():
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/embedding", rank=3, alpha=3.0),
                               lj.Rule(r".*/kernel", rank=2, alpha=4.0)))
    lora = linen_check(TiedLM(), (jnp.array([[1, 4, 10], [0, 2, 4]], jnp.int32),), cfg,
                       variants=JITTED, expect=2)
    assert lora["params"]["embed"]["embedding"].kind == "embed"


@pytest.mark.parametrize(
    "kw,xshape",
    [
        (dict(features=5, kernel_size=(3, 3), padding="SAME"), (2, 6, 6, 4)),
        (dict(features=5, kernel_size=(3, 3), strides=2, padding="VALID"), (2, 7, 7, 4)),
        (dict(features=5, kernel_size=(3,), kernel_dilation=2, padding="SAME"), (2, 9, 4)),
        (dict(features=6, kernel_size=(2, 3), feature_group_count=2, padding="VALID"),
         (2, 5, 6, 4)),
        (dict(features=4, kernel_size=(3,), strides=2, input_dilation=2, padding=((1, 2),)),
         (2, 6, 4)),
    ],
    ids=["same", "strided-valid", "dilated-1d", "groups2", "input-dilation"],
)
def test_linen_conv(kw, xshape):
    linen_check(nn.Conv(**kw), (normal(*xshape),), ALL_KERNELS, expect=1)


class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        h = jnp.tanh(nn.Dense(8)(c))
        return c + nn.Dense(6)(h), None


class ScannedStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                         prevent_cse=False)
        y, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)()(x, None)
        return y


def test_linen_scan_remat_stack():
    lora = linen_check(ScannedStack(), (normal(2, 6),), ALL_KERNELS, variants=JITTED, expect=2)
    for _, w in lj.targets(lora):
        assert w.stack_axes == (0,)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x, mask=mask)
        return nn.Dense(4, name="out")(nn.LayerNorm()(x + y))


def test_linen_attention_block():
    x = normal(2, 5, 8)
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/attn/.*/kernel", rank=2, alpha=4.0),))
    linen_check(Attention(), (x, mask), cfg, expect=4)


# ---------------------------------------------------------------------------------------
# 2. Flax NNX


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(9, 6, rngs=rngs)
        self.lin = nnx.Linear(6, 8, rngs=rngs)
        self.lg = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.conv = nnx.Conv(8, 5, kernel_size=(3,), rngs=rngs)

    def __call__(self, ids, x):
        h = jnp.tanh(self.lin(self.emb(ids) + x))  # (b, t, 8)
        h = self.lg(h)  # (b, t, 2, 4)
        return self.conv(jnp.reshape(h, (*h.shape[:2], 8)))  # (b, t, 5)


def test_nnx_modules():
    model = NnxNet(nnx.Rngs(0))
    ids, x = jnp.array([[1, 8, 3, 0], [2, 2, 7, 5]], jnp.int32), normal(2, 4, 6)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/(kernel|embedding)", rank=2, alpha=4.0),))
    graphdef, base, lora = lj.nnx.split(model, cfg, KEY, args=(ids, x))
    lora = nonzero(base, lora)
    assert n_targets(lora) == 4

    def make_g(strategy):
        return functools.partial(lj.nnx.call, graphdef, strategy=strategy)

    check_equal(make_g, base, lora, (ids, x), JITTED)


# ---------------------------------------------------------------------------------------
# 3. Hugging Face Flax models (tiny random configs)


def _allow():
    # Hugging Face's Flax models rely on numpy rank promotion, which the test suite raises on
    return jax.numpy_rank_promotion("allow")


def hf_model(name):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, **common)
        cls, field = transformers.FlaxGPT2LMHeadModel, "logits"
    elif name == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=16, **common)
        cls, field = transformers.FlaxBertModel, ("last_hidden_state", "pooler_output")
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48,
                                       max_position_embeddings=16, **common)
        cls, field = transformers.FlaxLlamaForCausalLM, "logits"
    with _allow():
        model = cls(cfg, _do_init=False)
        params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))

    def f(p, ids):
        with _allow():
            out = model(ids, params=p)
            return tuple(out[k] for k in field) if isinstance(field, tuple) else out[field]

    return f, params


# the word embedding of each model (GPT-2's wte is also its tied output head: lookup + attend)
HF_EMBED = {"gpt2": r"transformer/wte/embedding", "bert": None,
            "llama": r"model/embed_tokens/embedding"}
# adapted weights: per layer GPT-2 c_attn, c_proj, c_fc, mlp c_proj; BERT q, k, v and three
# dense, plus the pooler's dense (an output layer that keeps the width, so not a head);
# Llama q, k, v, o, gate, up, down; plus the embeddings above
HF_TARGETS = {"gpt2": 2 * 4 + 1, "bert": 2 * 6 + 1, "llama": 2 * 7 + 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face(name):
    f, params = hf_model(name)
    ids = jnp.array([[3, 17, 42, 5, 63, 0], [8, 8, 1, 60, 2, 33]], jnp.int32)
    rules = lj.LoraConfig.all_linear(rank=4, alpha=8.0).rules
    if HF_EMBED[name]:
        rules = (lj.Rule(HF_EMBED[name], rank=4, alpha=8.0), *rules)
    base, lora = split_nonzero(params, lj.LoraConfig(rules=rules), f, (ids,), seed=1)
    targets = dict(lj.targets(lora))
    assert len(targets) == HF_TARGETS[name], sorted(targets)
    if name == "gpt2":
        w = targets["transformer/h/0/attn/c_attn/kernel"]
        assert w.shape == (96, 32) and (w.in_axes, w.out_axes) == ((1,), (0,))  # (out, in)
        assert targets["transformer/wte/embedding"].kind == "embed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_equal(wrapper(f), base, lora, (ids,), ("jit",))
    materialized = [w for w in caught if issubclass(w.category, lj.transform.MaterializeWarning)]
    assert not materialized, [str(w.message) for w in materialized]


# ---------------------------------------------------------------------------------------
# 4. plain JAX


def _fused_qkv(p, x):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)  # (d, 3d) -> three (d, d)
    s = jax.nn.softmax((x @ q) @ (x @ k).T / 2.0, axis=-1)
    return s @ (x @ v)


def _heads(p, x):
    d = x.shape[-1]
    w = p["w"].reshape(d, 2, 4)  # (d, h*dh) -> (d, h, dh)
    return jnp.einsum("bd,dhe->bhe", x, w)


def _heads_in(p, x):
    w = p["w"].reshape(2, 3, p["w"].shape[1])  # (h*dh, o) -> (h, dh, o)
    return jnp.einsum("bhe,heo->bo", x.reshape(x.shape[0], 2, 3), w)


def _heads_merged(p, x):
    w = p["w"].reshape(p["w"].shape[0], -1)  # (d, h, dh) -> (d, h*dh)
    return x @ w


def _fori(p, x):
    return lax.fori_loop(0, p["w"].shape[0], lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _scan_xs(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]


def _scan_const(p, x):
    def body(h, xt):
        return jnp.tanh(h @ p["w"] + xt), None

    return lax.scan(body, x, jnp.stack([x, -x, 0.5 * x]))[0]


def _cond(p, x):
    return lax.cond(jnp.sum(x) > 0, lambda x: x @ p["w"], lambda x: jnp.tanh(x @ p["w"]) * 2.0, x)


def _while(p, x):
    def body(c):
        i, h = c
        return i + 1, jnp.tanh(h @ p["w"]) + h

    return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]


@jax.custom_vjp
def _mm(x, w):
    return x @ w


def _mm_fwd(x, w):
    return x @ w, (x, w)


def _mm_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_mm.defvjp(_mm_fwd, _mm_bwd)


def _custom_vjp(p, x):
    return jnp.tanh(_mm(x, p["w"]))


@jax.jit
def _inner_jit(w, x):
    return jnp.sin(x @ w)


def _jit(p, x):
    return _inner_jit(p["w"], x) + x @ p["w"]


def _checkpoint(p, x):
    body = jax.checkpoint(lambda w, x: jnp.tanh(x @ w) @ w.T,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return body(p["w"], x)


def _batched_einsum(p, x):
    return jnp.einsum("bi,lio->blo", x, p["w"])


def _concat_qkv(p, x):
    qkv = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1)  # three adapted pieces, out axis
    q, k, v = jnp.split(x @ qkv, 3, axis=1)
    return jnp.tanh(q) * k + v


def _concat_in_plain(p, x):
    w = jnp.concatenate([p["w"], jnp.full((2, 5), 0.3)], axis=0)  # a plain block on the input axis
    return jnp.concatenate([x, x[:, :2]], axis=1) @ w


def _concat_stack_plain(p, x):
    w = jnp.concatenate([jnp.eye(6)[None] * 0.5, p["w"]], axis=0)  # a plain layer first
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]


def _barrier(p, x):
    w, x = jax.lax.optimization_barrier((p["w"], x))
    return x @ w


def _named(p, x):
    from jax.ad_checkpoint import checkpoint_name

    return jax.checkpoint(lambda w: jnp.tanh(x @ checkpoint_name(w, "w")),
                          policy=jax.checkpoint_policies.save_only_these_names("w"))(p["w"])


_SQ = dict(w=(6, 6))  # square weights for the loops that feed h back into h @ W
PLAIN = {
    # name: (fn, {param: shape}, x shape, rule axes or None = traced)
    "x@W": (lambda p, x: x @ p["w"], dict(w=(6, 5)), (3, 6), None),
    "x@W.T": (lambda p, x: x @ p["w"].T, dict(w=(5, 6)), (3, 6), None),
    "fused-qkv-split": (_fused_qkv, dict(qkv=(6, 12)), (3, 6), None),
    "heads-reshape": (_heads, dict(w=(6, 8)), (3, 6), None),
    "heads-reshape-in": (_heads_in, dict(w=(6, 5)), (3, 6), None),
    "heads-merge-reshape": (_heads_merged, dict(w=(6, 2, 4)), (3, 6), None),
    "fori-W[i]": (_fori, dict(w=(3, 6, 6)), (2, 6), None),
    "scan-xs": (_scan_xs, dict(w=(3, 6, 6)), (2, 6), None),
    "scan-const": (_scan_const, _SQ, (2, 6), None),
    "cond": (_cond, dict(w=(6, 5)), (3, 6), None),
    "cond-other-branch": (lambda p, x: _cond(p, -x), dict(w=(6, 5)), (3, 6), None),
    "while": (_while, _SQ, (2, 6), None),
    "custom-vjp": (_custom_vjp, dict(w=(6, 5)), (3, 6), None),
    "inner-jit": (_jit, dict(w=(6, 5)), (3, 6), None),
    "checkpoint-policy": (_checkpoint, dict(w=(6, 5)), (3, 6), None),
    "batched-einsum": (_batched_einsum, dict(w=(3, 6, 5)), (2, 6),
                       lj.Axes(in_axes=(1,), out_axes=(2,), stack_axes=(0,))),
    "concat-qkv": (_concat_qkv, dict(q=(6, 4), k=(6, 4), v=(6, 4)), (3, 6), None),
    "concat-in-plain": (_concat_in_plain, dict(w=(6, 5)), (3, 6), None),
    "concat-stack-plain": (_concat_stack_plain, dict(w=(2, 6, 6)), (2, 6), None),
    "optimization-barrier": (_barrier, dict(w=(6, 5)), (3, 6), None),
    "checkpoint-name": (_named, dict(w=(6, 5)), (3, 6), None),
}


# the cases also run without any jit (the others run jitted only, to keep the file fast)
EAGER = {"x@W.T", "scan-xs", "cond", "custom-vjp", "while"}

@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_jax(name):
    fn, shapes, xshape, axes = PLAIN[name]
    params = {k: normal(*s, seed=i + 2, std=0.5) for i, (k, s) in enumerate(shapes.items())}
    x = jnp.abs(normal(*xshape, seed=9))  # sum(x) > 0: lax.cond's first branch
    rule = lj.Rule(r"w|qkv|q|k|v", rank=2, alpha=4.0, axes=axes)
    base, lora = split_nonzero(params, lj.LoraConfig(rules=(rule,)), fn, (x,))
    variants = VARIANTS if name in EAGER else JITTED
    check_equal(wrapper(fn), base, lora, (x,), variants, forward_mode=name == "while")


# ---------------------------------------------------------------------------------------
# 5. bfloat16 weights against a float64 reference

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
# Both strategies are compared with the exact float64 value of the adapted product and must
# stay within BF16_C * u * (the same product taken over absolute values), the textbook bound
# for a rounded product chain. Along any chain the merge strategy rounds twice (W' = W +
# s·A⊗B to bfloat16 once, then the product's result); the factored strategy rounds up to
# five times (A and s·B cast to bfloat16, the thin products x·A and (x·A)·(s·B), and the sum
# with x·W; the same count holds for each gradient). One more unit covers the second-order
# terms and the float32 accumulation inside each dot (about 32·2^-24 here, far below u).
BF16_C = 6

BF16_FORMS = {
    # name: (fn, weight stored (out, in))
    "x@W": (lambda p, x: x @ p["w"], False),
    "x@W.T": (lambda p, x: x @ p["w"].T, True),
}


@pytest.mark.parametrize("variant", ["eager", "jit"])
@pytest.mark.parametrize("form", list(BF16_FORMS))
def test_bf16_against_float64(form, variant):
    """bfloat16 base, float32 adapters: both strategies agree with float64 within rounding.

    The two strategies round differently: merge forms W + s·A⊗B in float32 and rounds the
    sum to bfloat16 once, then multiplies; factored multiplies by the bfloat16 W and adds
    ``(x·A)·(s·B)`` computed from bfloat16 casts of the factors, rounding each product. So
    they differ by a few bfloat16 ulps of the output, and each is checked against the exact
    value with the bound derived above instead of against the other.
    """
    fn, transposed = BF16_FORMS[form]
    d_in, d_out, rank = 32, 24, 4
    shape = (d_out, d_in) if transposed else (d_in, d_out)
    params = {"w": normal(*shape, seed=3, std=0.2).astype(jnp.bfloat16)}
    x = normal(4, d_in, seed=4).astype(jnp.bfloat16)
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=rank, alpha=8.0),))
    base, lora = split_nonzero(params, cfg, fn, (x,))
    w = lora["w"]
    assert base["w"].dtype == jnp.bfloat16 and w.a.dtype == w.b.dtype == jnp.float32
    assert (w.in_axes, w.out_axes) == (((1,), (0,)) if transposed else ((0,), (1,)))

    # float64 reference, everything in (in, out) orientation; A is (r, in), B is (r, out)
    f64 = lambda t: np.asarray(t, np.float64)  # noqa: E731
    W, X, A, B, s = f64(base["w"]), f64(x), f64(w.a), f64(w.b), w.scale
    D = np_delta(A, B, w.in_axes, w.out_axes, (), s, 2)
    D_abs = np_delta(np.abs(A), np.abs(B), w.in_axes, w.out_axes, (), abs(s), 2)
    if transposed:
        W, D, D_abs = W.T, D.T, D_abs.T
    W_abs = np.abs(W) + D_abs  # bounds |W + s·A⊗B| elementwise, and each factored term

    results = all_derivatives(wrapper(fn), base, lora, (x,), (variant,))[variant]
    for strategy, (y, (g_lora, g_x)) in results.items():
        assert y.dtype == g_x.dtype == jnp.bfloat16, strategy
        ct = f64(jnp.asarray(_cotangent(y), jnp.bfloat16))  # the cotangent y receives
        G, G_abs = X.T @ ct, np.abs(X).T @ np.abs(ct)  # d loss / d (W + s·A⊗B)
        checks = {
            "y": (X @ (W + D), np.abs(X) @ W_abs, y),
            "dx": (ct @ (W + D).T, np.abs(ct) @ W_abs.T, g_x),
            "da": (s * B @ G.T, abs(s) * np.abs(B) @ G_abs.T, g_lora["w"].a),
            "db": (s * A @ G, abs(s) * np.abs(A) @ G_abs, g_lora["w"].b),
        }
        for name, (ref, mag, got) in checks.items():
            err = np.abs(f64(got) - ref)
            bound = BF16_C * BF16_U * mag
            assert np.all(err <= bound), (strategy, name, float(np.max(err / bound)))
    # the adapter moves the output by more than the tolerance: the check could fail
    assert np.max(np.abs(X @ D)) > np.max(BF16_C * BF16_U * np.abs(X) @ W_abs)
