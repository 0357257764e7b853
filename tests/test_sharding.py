"""Sharding: adapter layouts derived from the base's, sharded training equal to one device."""

import dataclasses
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharded_train as ex
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import sharding
from reference import np_delta_of, randomize

SIZES = ex.Sizes(vocab=64, d_model=32, heads=8, head_dim=4, mlp=64, layers=1, seq=6, batch=16)
STEPS = 10
# Weight sizes are powers of two; every activation holds batch*seq = 96 = 3*32 per token
# grid, so an all-gather whose size equals a weight's is a weight (never an activation).


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _step_fn(model, tx):
    forward = lj.wrap(model.apply)

    def step(base, lora, opt, tokens, targets):
        def loss(l):
            return ex.loss_fn(lambda p, t: forward(p, l, t), base, tokens, targets)

        value, g = jax.value_and_grad(loss)(lora)
        updates, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, updates), opt, value

    return step


def _frozen_step_fn(model):
    """The base model's step with every target frozen: only the layer norms train."""

    def is_norm(path):
        return "/ln" in "/" + lj.path_str(path)

    def step(base, tokens, targets):
        norms = jax.tree_util.tree_map_with_path(lambda p, x: x if is_norm(p) else None, base)

        def loss(norms):
            params = jax.tree.map(lambda b, n: b if n is None else n, base, norms, is_leaf=lambda x: x is None)
            return ex.loss_fn(model.apply, params, tokens, targets)

        return jax.value_and_grad(loss)(norms)

    return step


def _gathered_sizes(hlo: str) -> list[int]:
    """Element counts of the results of every all-gather in compiled HLO text."""
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            shapes = re.findall(r"\[([\d,]*)\]", m.group(1))
            sizes.append(math.prod(int(d) for d in shapes[-1].split(",") if d))
    return sizes


def _numpy_params(abstract, seed):
    """Host values for an abstract parameter tree: layer-norm scales 1, weights N(0, 0.15²)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if lj.path_str(path).split("/")[-1] == "scale":
            return np.ones(x.shape, x.dtype)
        return (0.15 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _numpy_lora(abstract_lora, seed):
    """Every adapter with nonzero N(0, 0.1²) host factors (B too, so every factor trains)."""
    rng = np.random.default_rng(seed)

    def fill(w):
        if not lj.is_lora(w):
            return w
        return w.replace(a=(0.1 * rng.standard_normal(w.a.shape)).astype(np.float32),
                         b=(0.1 * rng.standard_normal(w.b.shape)).astype(np.float32))

    return jax.tree.map(fill, abstract_lora, is_leaf=lj.is_lora)


@pytest.fixture(scope="module")
def reference():
    """Training on one device, no sharding anywhere."""
    model = ex.Transformer(SIZES)
    tokens, targets = ex.make_data(SIZES)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)  # nn.LogicallyPartitioned boxes
    params = _numpy_params(nn.unbox(boxed), 0)
    _, abstract_lora = lj.split(jax.random.key(1), nn.unbox(boxed), ex.LORA_CONFIG, apply_fn=model.apply,
                                args=(tokens,))
    lora0 = _numpy_lora(abstract_lora, 1)
    tx = optax.adam(1e-2)
    step = jax.jit(_step_fn(model, tx))
    lora, opt, losses = lora0, tx.init(lora0), []
    for _ in range(STEPS):
        lora, opt, loss = step(params, lora, opt, tokens, targets)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]  # it learns: the comparison below is not vacuous
    return dict(model=model, boxed=boxed, params=params, lora0=lora0, lora=jax.device_get(lora), losses=losses)


# Hand-derived layouts (independent of lj.sharding): (A spec, B spec) for some targets.
# q: (embed, heads, kv); o: (heads, kv, embed); up: (embed, mlp); down: (mlp, embed);
# embedding: (vocab, embed). A is (r, *in), B is (r, *out).
EXPECTED = {
    "fsdp": {
        "params/block0/q/kernel": (P(None, "data"), P()),
        "params/block0/o/kernel": (P(), P(None, "data")),
        "params/block0/up/kernel": (P(None, "data"), P()),
        "params/block0/down/kernel": (P(), P(None, "data")),
        "params/embed/embedding": (P(), P(None, "data")),
    },
    "tp": {
        "params/block0/q/kernel": (P(), P(None, "model", None)),
        "params/block0/o/kernel": (P(None, "model", None), P()),
        "params/block0/up/kernel": (P(), P(None, "model")),
        "params/block0/down/kernel": (P(None, "model"), P()),
        "params/embed/embedding": (P(None, "model"), P()),
    },
    "2d": {
        "params/block0/q/kernel": (P(None, "data"), P(None, "model", None)),
        "params/block0/o/kernel": (P(None, "model", None), P(None, "data")),
        "params/block0/up/kernel": (P(None, "data"), P(None, "model")),
        "params/block0/down/kernel": (P(None, "model"), P(None, "data")),
        "params/embed/embedding": (P(None, "model"), P(None, "data")),
    },
}


def _targets(lora):
    return {lj.path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(lora, is_leaf=lj.is_lora)[0]
            if lj.is_lora(w)}


def _np_merge(params, lora):
    """W + s·A⊗B with the independent numpy reference, in float64."""
    targets = _targets(lora)

    def one(path, x):
        w = targets.get(lj.path_str(path))
        return np.asarray(x, np.float64) + (np_delta_of(w) if w is not None else 0.0)

    return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ex.MESHES)
def test_sharded_training_equals_single_device(kind, reference):
    mesh, rules = ex.make_mesh(kind)
    assert mesh.devices.size == 8
    model, boxed = reference["model"], reference["boxed"]
    tokens_np, targets_np = ex.make_data(SIZES)
    data_sh = NamedSharding(mesh, P("data"))
    tokens, targets = jax.device_put(tokens_np, data_sh), jax.device_put(targets_np, data_sh)
    base_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    base = jax.device_put(reference["params"], base_sh)
    lora = sharding.shard(reference["lora0"], mesh, boxed, rules=rules)
    lora_sh = sharding.shardings(lora, mesh, boxed, rules=rules)

    def wrong_layouts(tree):
        bad = []
        for path, w in _targets(tree).items():
            want = _targets(lora_sh)[path]
            for name in ("a", "b"):
                x, s = getattr(w, name), getattr(want, name)
                if not x.sharding.is_equivalent_to(s, x.ndim):
                    bad.append(f"{path}/{name}: {x.sharding.spec} != {s.spec}")
        return bad

    assert not wrong_layouts(lora)
    for path, (a, b) in EXPECTED[kind].items():
        got = _targets(lora)[path]
        assert got.a.sharding.is_equivalent_to(NamedSharding(mesh, a), got.a.ndim), (path, got.a.sharding.spec, a)
        assert got.b.sharding.is_equivalent_to(NamedSharding(mesh, b), got.b.ndim), (path, got.b.sharding.spec, b)

    # train: the step has no out_shardings, so the layouts after each step are the
    # partitioner's choice; they must stay the derived ones
    tx = optax.adam(1e-2)
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, lora), lora_sh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    step = jax.jit(_step_fn(model, tx), donate_argnums=(1, 2)).lower(base, lora, opt, tokens, targets).compile()
    losses = []
    for i in range(STEPS):
        lora, opt, loss = step(base, lora, opt, tokens, targets)
        losses.append(float(loss))
        assert not wrong_layouts(lora), (i, wrong_layouts(lora))
    np.testing.assert_allclose(losses, reference["losses"], rtol=2e-5)
    chex.assert_trees_all_close(jax.device_get(lora), reference["lora"], rtol=2e-4, atol=2e-5)

    # no all-gather of a full targeted weight beyond those the frozen model's step does
    weight_sizes = {math.prod(w.shape) for w in _targets(lora).values()}
    lora_gathers = [n for n in _gathered_sizes(step.as_text()) if n in weight_sizes]
    if kind == "tp":  # tensor parallelism gathers no weight at all, and neither may LoRA
        assert not lora_gathers and "all-reduce" in step.as_text()
    else:
        frozen = jax.jit(_frozen_step_fn(model)).lower(base, tokens, targets).compile()
        frozen_gathers = [n for n in _gathered_sizes(frozen.as_text()) if n in weight_sizes]
        for size in weight_sizes:
            assert lora_gathers.count(size) <= frozen_gathers.count(size), (
                f"{lora_gathers.count(size)} all-gathers of {size} elements (a full targeted weight) "
                f"in the LoRA step, {frozen_gathers.count(size)} in the frozen model's step"
            )

    # merge under jit: the base's layout, the base's buffers donated, the right values
    want = _np_merge(reference["params"], jax.device_get(lora))
    with jax.transfer_guard("disallow"):  # nothing goes through the host
        merged = sharding.merge(base, lora)
    chex.assert_trees_all_close(jax.device_get(merged), want, rtol=1e-5, atol=1e-6)
    for (path, x), want_sh in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(base_sh)):
        assert x.sharding.is_equivalent_to(want_sh, x.ndim), (lj.path_str(path), x.sharding, want_sh)
    assert all(base["params"]["block0"][n]["kernel"].is_deleted() for n in ("q", "k", "v", "o", "up", "down"))


def test_sharded_split_equals_split_without_host_transfers():
    """A and B are created on their shardings inside jit, equal to the unsharded split."""
    mesh = _mesh((2, 4), ("data", "model"))
    params = {
        "dense": {"kernel": np.ones((16, 32), np.float32), "bias": np.zeros(32, np.float32)},
        "attn_out": {"kernel": np.ones((4, 8, 16), np.float32)},  # (heads, head_dim, d)
        "embed": {"embedding": np.ones((32, 16), np.float32)},
    }
    specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")},
             "attn_out": {"kernel": P("model", None, "data")}, "embed": {"embedding": P("model", "data")}}
    cfg = lj.LoraConfig(rules=(lj.Rule(r"dense/kernel", rank=4), lj.Rule(r"embed/embedding", rank=2),
                               lj.Rule(r"attn_out/kernel", rank=2, axes=((0, 1), (2,)))))
    on_mesh = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    key = jax.device_put(jax.random.key(3), NamedSharding(mesh, P()))
    with jax.transfer_guard("disallow"):
        base, lora = sharding.split(key, on_mesh, cfg)  # mesh and layout read from the arrays
    assert base is on_mesh
    want = lj.split(jax.random.key(3), params, cfg)[1]
    chex.assert_trees_all_equal(jax.device_get(lora), jax.device_get(want))
    got = {k: (w.a.sharding.spec, w.b.sharding.spec) for k, w in _targets(lora).items()}
    assert got == {"dense/kernel": (P(None, "data"), P(None, "model")),
                   "attn_out/kernel": (P(None, "model", None), P(None, "data")),
                   "embed/embedding": (P(None, "model"), P(None, "data"))}
    # the gaussian init: equal up to the last bit of its division by the rank (documented)
    gauss = dataclasses.replace(cfg, init="gaussian")
    got = jax.device_get(sharding.split(key, on_mesh, gauss)[1])
    want = lj.split(jax.random.key(3), params, gauss)[1]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=np.finfo(np.float32).eps, atol=0)


def test_gather_parser_reads_hlo():
    mesh = _mesh((8,), ("data",))
    x = jax.device_put(jnp.ones((16, 24)), NamedSharding(mesh, P("data")))
    hlo = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
    assert _gathered_sizes(hlo) == [16 * 24]


# ---------------------------------------------------------------------------------------
# derivation: semantics over random weights, axes and base specs


def _lora_weight(shape, ins, outs, stack, rank=2):
    w = lj.LoraWeight(a=None, b=None, shape=tuple(shape), in_axes=tuple(ins), out_axes=tuple(outs),
                      stack_axes=tuple(stack), rank=rank)
    return w.replace(a=jax.ShapeDtypeStruct(w.a_shape, jnp.float32), b=jax.ShapeDtypeStruct(w.b_shape, jnp.float32))


@st.composite
def _weights_and_specs(draw):
    ndim = draw(st.integers(2, 4))
    shape = draw(st.lists(st.sampled_from([8, 16]), min_size=ndim, max_size=ndim))
    perm = draw(st.permutations(range(ndim)))
    n_in = draw(st.integers(1, ndim - 1))
    n_out = draw(st.integers(1, ndim - n_in))
    ins, outs, stack = perm[:n_in], perm[n_in:n_in + n_out], perm[n_in + n_out:]
    # a base spec: each mesh axis used at most once, entries None / name / tuple
    free = ["x", "y"]
    entries = []
    for _ in range(ndim):
        choice = draw(st.sampled_from(["none", "one", "both"]))
        if choice == "one" and free:
            entries.append(free.pop(draw(st.integers(0, len(free) - 1))))
        elif choice == "both" and len(free) == 2:
            entries.append(tuple(free))
            free = []
        else:
            entries.append(None)
    cut = draw(st.integers(0, ndim))  # trailing entries may be left out
    while cut < ndim and entries[cut:] != [None] * (ndim - cut):
        cut += 1
    return _lora_weight(shape, ins, outs, stack), P(*entries[:cut])


def _norm(idx, shape):
    return tuple(s.indices(n) for s, n in zip(idx, shape))


@settings(max_examples=60, deadline=None)
@given(_weights_and_specs())
def test_each_device_holds_the_factor_slices_matching_its_weight_slice(case):
    """Semantic check: on every device, A's shard covers the same input (and stack) indices
    as the weight's shard, B's the same output indices, and both hold every rank row."""
    w, spec = case
    mesh = _mesh((2, 4), ("x", "y"))
    s = sharding.shardings({"w": w}, mesh, {"w": spec})["w"]
    w_idx = NamedSharding(mesh, spec).devices_indices_map(w.shape)
    a_idx, b_idx = s.a.devices_indices_map(w.a_shape), s.b.devices_indices_map(w.b_shape)
    for dev in mesh.devices.flat:
        wi = _norm(w_idx[dev], w.shape)
        for fac_idx, fac_shape, axes in ((a_idx, w.a_shape, w.in_axes), (b_idx, w.b_shape, w.out_axes)):
            fi = _norm(fac_idx[dev], fac_shape)
            ns = len(w.stack_axes)
            assert fi[ns] == (0, w.rank, 1)  # the rank axis is whole on every device
            assert fi[:ns] == tuple(wi[i] for i in w.stack_axes)
            assert fi[ns + 1:] == tuple(wi[i] for i in axes)


def test_multi_axis_and_transposed_kernels():
    mesh = _mesh((2, 4), ("data", "model"))
    lora = {
        # (heads, head_dim, d_model) contracted over heads and head_dim: the attention output
        "o": _lora_weight((8, 4, 16), (0, 1), (2,), ()),
        # Hugging Face GPT-2 style (out, in)
        "proj": _lora_weight((16, 8), (1,), (0,), ()),
        # a stacked (scan) layer weight (layers, in, out)
        "stack": _lora_weight((2, 8, 16), (1,), (2,), (0,)),
    }
    base = {"o": P("model", None, "data"), "proj": P("model", "data"), "stack": P("data", None, "model")}
    s = sharding.specs(lora, base)
    assert (s["o"].a, s["o"].b) == (P(None, "model", None), P(None, "data"))
    assert (s["proj"].a, s["proj"].b) == (P(None, "data"), P(None, "model"))
    assert (s["stack"].a, s["stack"].b) == (P("data", None, None), P("data", None, "model"))
    sh = sharding.shardings(lora, mesh, base)
    assert sh["stack"].b.shard_shape(lora["stack"].b.shape) == (1, 2, 4)


class _ScanMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                init = nn.initializers.lecun_normal()
                h = nn.Dense(32, use_bias=False, name="up",
                             kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
                down = nn.Dense(16, use_bias=False, name="down",
                                kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))
                return x + down(nn.relu(h)), None

        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(name="layers")(x, None)[0]


def test_scanned_stack_follows_the_layer_axis():
    mesh = _mesh((2, 4), ("data", "model"))
    rules = (("layers", "data"), ("mlp", "model"))
    model = _ScanMLP()
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(1), x)
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2),))
    _, lora = lj.split(jax.random.key(2), nn.unbox(boxed), cfg, apply_fn=model.apply, args=(x,))
    up = lora["params"]["layers"]["up"]["kernel"]
    assert up.stack_axes == (0,) and up.a.shape == (2, 2, 16)  # (layers, r, in)
    s = sharding.specs(lora, boxed, rules=rules)["params"]["layers"]
    assert (s["up"]["kernel"].a, s["up"]["kernel"].b) == (P("data", None, None), P("data", None, "model"))
    assert (s["down"]["kernel"].a, s["down"]["kernel"].b) == (P("data", None, "model"), P("data", None, None))

    # the sharded adapter computes what the unsharded one does
    base, lora = _numpy_params(nn.unbox(boxed), 0), _numpy_lora(lora, 1)
    base_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    fwd = jax.jit(lj.wrap(model.apply))
    want = fwd(base, lora, x)
    got = fwd(jax.device_put(base, base_sh), sharding.shard(lora, mesh, boxed, rules=rules), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_embedding_factors():
    mesh = _mesh((2, 4), ("data", "model"))
    params = {"embed": {"embedding": jnp.ones((32, 8))}}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule(r"embed/embedding", rank=2),)))
    w = lora["embed"]["embedding"]
    assert w.kind == "embed"
    s = sharding.shardings(lora, mesh, {"embed": {"embedding": P("model", "data")}})["embed"]["embedding"]
    assert (s.a.spec, s.b.spec) == (P(None, "model"), P(None, "data"))  # A over vocab, B over features


# ---------------------------------------------------------------------------------------
# every form of base layout gives the same specs


def test_all_forms_of_base_layout_agree():
    mesh, rules = ex.make_mesh("2d")
    model = ex.Transformer(SIZES)
    tokens = jnp.zeros((SIZES.batch, SIZES.seq), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    abstract = nn.unbox(boxed)
    _, lora = lj.split(jax.random.key(1), abstract, ex.LORA_CONFIG, apply_fn=model.apply, args=(tokens,))
    logical = nn.get_partition_spec(boxed)
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, rules), logical,
                              is_leaf=lambda x: isinstance(x, P))
    named = nn.logical_to_mesh_sharding(logical, mesh, rules)
    with_sharding = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, named)
    want = sharding.specs(lora, mesh_specs)
    assert _targets(want)["params/block0/q/kernel"].a == P(None, "data")  # not all replicated
    forms = {
        "boxes + rules": sharding.specs(lora, boxed, rules=rules),
        "logical specs + rules": sharding.specs(lora, logical, rules=list(rules)),
        "NamedSharding": sharding.specs(lora, named),
        "ShapeDtypeStruct": sharding.specs(lora, with_sharding),
    }
    with nn.logical_axis_rules(rules):
        forms["boxes + context rules"] = sharding.specs(lora, boxed)
    boxed_with_rules = jax.tree.map(lambda b: b.replace(rules=rules), boxed,
                                    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    forms["boxes carrying rules"] = sharding.specs(lora, boxed_with_rules)
    for name, got in forms.items():
        assert jax.tree.leaves(got) == jax.tree.leaves(want), name
        assert jax.tree.structure(got) == jax.tree.structure(want), name


def test_sharded_arrays_and_mesh_partitioned_boxes():
    mesh = _mesh((2, 4), ("data", "model"))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
            return nn.Dense(16, kernel_init=init, name="fc")(x)

    x = jnp.ones((2, 8))
    boxed = Net().init(jax.random.key(0), x)  # nn.Partitioned: mesh axis names
    params = nn.unbox(boxed)
    _, lora = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2),)))
    from_boxes = sharding.specs(lora, boxed)["params"]["fc"]["kernel"]
    assert (from_boxes.a, from_boxes.b) == (P(None, "data"), P(None, "model"))
    sharded = jax.device_put(params, nn.get_sharding(boxed, mesh))
    from_arrays = sharding.specs(lora, sharded)["params"]["fc"]["kernel"]
    assert (from_arrays.a, from_arrays.b) == (P(None, "data"), P(None, "model"))


class _NNXNet(nnx.Module):
    def __init__(self, names, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, names[0]), rngs=rngs)
        self.down = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, names[1]), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_nnx_sharding_metadata():
    mesh = _mesh((2, 4), ("data", "model"))
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=2),))
    x = jnp.ones((4, 16))
    want_up, want_down = (P(None, "data"), P(None, "model")), (P(None, "model"), P(None, "data"))

    def pair(lora, tree, rules=None):
        s = sharding.specs(lora, tree, rules=rules)
        return [(v.get_value().a, v.get_value().b) for v in (s["up"]["kernel"], s["down"]["kernel"])]

    with nnx.use_eager_sharding(False):
        logical = _NNXNet((("embed", "mlp"), ("mlp", "embed")), nnx.Rngs(0))
        meshed = _NNXNet((("data", "model"), ("model", "data")), nnx.Rngs(0))
    rules = (("embed", "data"), ("mlp", "model"))
    _, base, lora = lj.nnx.split(logical, cfg, jax.random.key(1), args=(x,))
    assert pair(lora, base, rules) == [want_up, want_down]  # the Variables' own metadata
    assert pair(lora, nnx.get_partition_spec(base), rules) == [want_up, want_down]  # a State of specs
    with nn.logical_axis_rules(rules):
        assert pair(lora, base) == [want_up, want_down]
    _, base, lora = lj.nnx.split(meshed, cfg, jax.random.key(1), args=(x,))
    assert pair(lora, base) == [want_up, want_down]  # mesh axis names, no rules needed
    sh = sharding.shardings(lora, mesh, base)
    lora = sharding.shard(lora, mesh, base)
    assert lora["up"]["kernel"].get_value().a.sharding.is_equivalent_to(sh["up"]["kernel"].get_value().a, 2)


def test_nnx_variable_without_metadata_follows_its_arrays_sharding():
    mesh = _mesh((2, 4), ("data", "model"))
    _, state = nnx.split(nnx.Linear(8, 16, use_bias=False, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, NamedSharding(mesh, P("data", "model")))
    assert not state["kernel"].get_metadata().get("out_sharding")  # no sharding metadata
    cfg = lj.LoraConfig(rules=(lj.Rule("kernel", rank=2),))
    _, lora = sharding.split(jax.random.key(0), state, cfg)
    w = lora["kernel"].get_value()
    assert (w.a.sharding.spec, w.b.sharding.spec) == (P(None, "data"), P(None, "model"))
    s = sharding.specs(lora, state)["kernel"].get_value()
    assert (s.a, s.b) == (P(None, "data"), P(None, "model"))


class _NNXLogical(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "model"))
        self.lin = nnx.Linear(8, 16, use_bias=False, kernel_init=init, rngs=rngs)


def test_nnx_logical_name_without_a_rule_names_a_mesh_axis_as_in_nnx():
    # NNX passes a logical name with no rule through as a mesh axis name ('model' here)
    mesh = _mesh((2, 4), ("data", "model"))
    rules = [("embed", "data")]
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*kernel", rank=2),))
    want = (P(None, "data"), P(None, "model"))

    def pair(lora, tree, rules=None):
        s = sharding.specs(lora, tree, rules=rules)["lin"]["kernel"].get_value()
        return s.a, s.b

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # eager sharding: W laid out by NNX
        _, base, lora = lj.nnx.split(_NNXLogical(nnx.Rngs(0)), cfg, jax.random.key(1))
        assert base["lin"]["kernel"].get_value().sharding.spec == P("data", "model")
        assert pair(lora, base) == want
        assert pair(lora, nnx.get_partition_spec(base)) == want
        _, sharded = sharding.split(jax.random.key(1), base, cfg)
        w = sharded["lin"]["kernel"].get_value()
        assert (w.a.sharding.spec, w.b.sharding.spec) == want
    with nnx.use_eager_sharding(False):  # metadata only: the names are resolved as NNX would
        _, base, lora = lj.nnx.split(_NNXLogical(nnx.Rngs(0)), cfg, jax.random.key(1))
    assert pair(lora, base, rules) == want
    assert pair(lora, nnx.get_partition_spec(base), rules) == want
    with nn.logical_axis_rules(rules):
        assert pair(lora, base) == want
        assert nnx.get_partition_spec(base)["lin"]["kernel"].get_value() == P("data", "model")
    # linen maps a name without a rule to None (replicated), and so does the derivation there
    assert nn.logical_to_mesh_axes(("embed", "model"), rules) == P("data", None)
    _, linen_lora = lj.split(jax.random.key(1), {"w": jnp.ones((8, 16))}, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    boxed = {"w": nn.LogicallyPartitioned(jnp.ones((8, 16)), ("embed", "model"))}
    got = sharding.specs(linen_lora, boxed, rules=rules)["w"]
    assert (got.a, got.b) == (P(None, "data"), P(None, None))


# ---------------------------------------------------------------------------------------
# sharded split, shard, state shardings


def test_pissa_split_keeps_the_base_layout():
    mesh = _mesh((2, 4), ("data", "model"))
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=4),), init="pissa")
    w = jax.random.normal(jax.random.key(0), (16, 32))
    w_sh = NamedSharding(mesh, P("data", "model"))
    base, lora = sharding.split(jax.random.key(1), {"w": jax.device_put(w, w_sh)}, cfg, donate=True)
    ref_base, ref_lora = lj.split(jax.random.key(1), {"w": w}, cfg)
    assert base["w"].sharding.is_equivalent_to(w_sh, 2)
    assert lora["w"].a.sharding.spec == P(None, "data") and lora["w"].b.sharding.spec == P(None, "model")
    merged = lj.merge(jax.device_get(base), jax.device_get(lora))
    np.testing.assert_allclose(merged["w"], w, atol=1e-5)  # residual + delta == W
    delta = lambda b, l: lj.merge(b, l)["w"] - b["w"]  # noqa: E731  (SVD sign choices may differ)
    np.testing.assert_allclose(delta(jax.device_get(base), jax.device_get(lora)), delta(ref_base, ref_lora), atol=1e-5)


def test_shard_moves_an_existing_adapter():
    mesh = _mesh((8,), ("data",))
    _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((16, 8)), "b": jnp.ones(8)},
                       lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    lora = randomize(lora)
    moved = sharding.shard(lora, mesh, {"w": P("data"), "b": None})
    assert moved["b"] is None
    assert moved["w"].a.sharding.shard_shape((2, 16)) == (2, 2)
    assert moved["w"].b.sharding.is_fully_replicated
    chex.assert_trees_all_equal(jax.device_get(moved), jax.device_get(lora))


def test_state_shardings_cover_optimizer_states():
    mesh = _mesh((8,), ("data",))
    _, lora = lj.split(jax.random.key(0), {"w": jnp.ones((16, 8)), "v": jnp.ones((8, 16))},
                       lj.LoraConfig(rules=(lj.Rule("w|v", rank=2),)))
    lora_sh = sharding.shardings(lora, mesh, {"w": P("data"), "v": P(None, "data")})
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = jax.eval_shape(tx.init, lora)
    st_sh = sharding.state_shardings(state, lora_sh)
    adam = st_sh[1][0]
    assert adam.mu["w"].a.spec == P(None, "data") and adam.nu["v"].b.spec == P(None, "data")
    assert adam.count.spec == P() and adam.count.mesh == mesh
    opt = jax.jit(tx.init, out_shardings=st_sh)(lora)
    assert opt[1][0].mu["w"].a.sharding.spec == P(None, "data")


# ---------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def small():
    params = {"layer": {"w": jnp.ones((16, 8)), "bias": jnp.ones(8)}}
    _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule(r"layer/w", rank=2),)))
    return lora


def test_specs_tree_that_does_not_match(small):
    with pytest.raises(ValueError, match=r"in lora but not in base_specs: layer/bias") as e:
        sharding.specs(small, {"layer": {"w": P("data")}})
    assert "nn.get_partition_spec" in str(e.value)
    with pytest.raises(ValueError, match=r"in base_specs but not in lora: layer/extra"):
        sharding.specs(small, {"layer": {"w": P("data"), "bias": P(), "extra": P()}})
    with pytest.raises(ValueError, match=r"in lora but not in base_specs: layer/bias, layer/w.*"
                                          r"in base_specs but not in lora: params/layer/bias"):
        sharding.specs(small, {"params": {"layer": {"w": P(), "bias": P()}}})


def test_spec_with_wrong_rank(small):
    with pytest.raises(ValueError, match=r"layer/w: the base spec .* has 4 entries but the weight has "
                                          r"shape \(16, 8\) \(2 axes\)"):
        sharding.specs(small, {"layer": {"w": P("data", None, None, "model"), "bias": P()}})


def test_mesh_axis_that_does_not_exist(small):
    mesh = _mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"layer/w: factor a .* names mesh axis 'embed', but the mesh has "
                                          r"axes \('data', 'model'\)\. If these are logical axis names, pass rules="):
        sharding.shardings(small, mesh, {"layer": {"w": P("embed"), "bias": P()}})
    _, odd = lj.split(jax.random.key(0), {"layer": {"w": jnp.ones((12, 8)), "bias": jnp.ones(8)}},
                      lj.LoraConfig(rules=(lj.Rule(r"layer/w", rank=2),)))
    with pytest.raises(ValueError, match=r"layer/w: factor a of shape \(2, 12\) cannot be split 8 ways "
                                          r"along axis 1 \(size 12\)"):
        sharding.shardings(odd, _mesh((8,), ("data",)), {"layer": {"w": P("data"), "bias": P()}})


def test_other_bad_inputs(small):
    with pytest.raises(TypeError, match=r"base_specs: layer/w is a str"):
        sharding.specs(small, {"layer": {"w": "data", "bias": P()}})
    with pytest.raises(TypeError, match=r"base_specs: layer/w holds an lj.LoraWeight"):
        sharding.specs(small, small | {"layer": {"w": small["layer"]["w"], "bias": P()}})
    boxed = {"layer": {"w": nn.LogicallyPartitioned(jnp.ones((16, 8)), ("embed", "mlp")), "bias": None}}
    with pytest.raises(ValueError, match=r"layer/w: .*logical axis names \('embed', 'mlp'\).*pass rules="):
        sharding.specs(small, boxed)
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
        sharding.shardings(small, ("data",), {"layer": {"w": P(), "bias": P()}})
    with pytest.raises(ValueError, match=r"needs a mesh"):
        sharding.split(jax.random.key(0), {"w": jnp.ones((4, 4))}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),)))
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    w = jax.device_put(jnp.ones((16, 8)), NamedSharding(explicit, P("data")))
    with pytest.raises(ValueError, match=r"init='pissa' .* Explicit axes \['data'\]"):
        sharding.split(jax.random.key(0), {"w": w}, lj.LoraConfig(rules=(lj.Rule("w", rank=1),), init="pissa"))
    with pytest.raises(TypeError, match=r"rules must be a sequence"):
        sharding.specs(small, {"layer": {"w": P(), "bias": P()}}, rules={"embed": "data"})
