"""Sharded LoRA training of a small transformer: FSDP, tensor-parallel and 2-D meshes.

Run on 8 simulated CPU devices (the script sets that up when run directly):

    python examples/sharded_train.py                  # all three meshes, 20 steps each
    python examples/sharded_train.py --mesh 2d --steps 50

Run unchanged on a TPU pod slice: start the same command on every host with
``--distributed`` (``jax.distributed.initialize()`` finds the other hosts by itself):

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
        --command="cd lora_jax && python examples/sharded_train.py --distributed --mesh 2d"

What happens, for each mesh:

1. The base model is initialized under ``jit`` directly on its shardings, which come from
   the model's own logical annotations (``nn.with_logical_partitioning``) and a set of
   logical axis rules per mesh (FSDP shards ``embed`` over ``data``; tensor-parallel shards
   ``heads``, ``mlp`` and ``vocab`` over ``model``; 2-D does both).
2. ``lj.sharding.split`` creates every A and B on the sharding derived from its base
   weight (no PartitionSpec for an adapter is written here).
3. A jitted, donated train step updates the adapters (Adam) with the base frozen.
4. ``lj.sharding.merge`` folds the adapters into the base, laid out like the base.

Weights, heads, MLP width and vocabulary must be divisible by the mesh axes that shard
them: adjust ``--d-model``, ``--heads``, ``--mlp``, ``--vocab`` and ``--batch`` for large
slices.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __name__ == "__main__" and "--distributed" not in sys.argv:
    # Eight simulated devices when this runs on CPU; no effect on TPU/GPU backends.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import sharding as lj_sharding  # noqa: E402

MESHES = ("fsdp", "tp", "2d")

# Logical axis rules per mesh: which mesh axis shards which named weight axis.
RULES = {
    "fsdp": (("embed", "data"),),
    "tp": (("heads", "model"), ("mlp", "model"), ("vocab", "model")),
    "2d": (("embed", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model")),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    vocab: int = 256
    d_model: int = 64
    heads: int = 8
    head_dim: int = 8
    mlp: int = 256
    layers: int = 2
    seq: int = 32
    batch: int = 32


def _init(names, init=nn.initializers.lecun_normal()):
    return nn.with_logical_partitioning(init, names)


class Block(nn.Module):
    sizes: Sizes

    @nn.compact
    def __call__(self, x):
        s = self.sizes
        ln = lambda name: nn.LayerNorm(use_bias=False, name=name,  # noqa: E731
                                       scale_init=_init(("embed",), nn.initializers.ones))
        h = ln("ln1")(x)
        qkv = {
            n: nn.DenseGeneral((s.heads, s.head_dim), use_bias=False, name=n,
                               kernel_init=_init(("embed", "heads", "kv")))(h)
            for n in ("q", "k", "v")
        }
        t = x.shape[1]
        logits = jnp.einsum("bqhd,bkhd->bhqk", qkv["q"], qkv["k"]) / np.sqrt(s.head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        att = nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, qkv["v"])
        x = x + nn.DenseGeneral(s.d_model, axis=(-2, -1), use_bias=False, name="o",
                                kernel_init=_init(("heads", "kv", "embed")))(o)
        h = ln("ln2")(x)
        h = nn.gelu(nn.Dense(s.mlp, use_bias=False, name="up", kernel_init=_init(("embed", "mlp")))(h))
        return x + nn.Dense(s.d_model, use_bias=False, name="down", kernel_init=_init(("mlp", "embed")))(h)


class Transformer(nn.Module):
    sizes: Sizes

    @nn.compact
    def __call__(self, tokens):
        s = self.sizes
        x = nn.Embed(s.vocab, s.d_model, name="embed",
                     embedding_init=_init(("vocab", "embed"), nn.initializers.normal(1.0)))(tokens)
        for i in range(s.layers):
            x = Block(s, name=f"block{i}")(x)
        x = nn.LayerNorm(use_bias=False, name="ln_f", scale_init=_init(("embed",), nn.initializers.ones))(x)
        return nn.Dense(s.vocab, use_bias=False, name="head", kernel_init=_init(("embed", "vocab")))(x)


# Every attention and MLP projection and the embedding get adapters; the head does not.
LORA_CONFIG = lj.LoraConfig(
    rules=(
        lj.Rule(r"params/block\d+/(q|k|v|o)/kernel", rank=4, alpha=8.0),
        lj.Rule(r"params/block\d+/(up|down)/kernel", rank=4, alpha=8.0),
        lj.Rule(r"params/embed/embedding", rank=4, alpha=4.0),
    )
)


def make_mesh(kind: str, model_parallel: int | None = None, devices=None):
    """``(mesh, rules)`` for ``kind`` in ``MESHES`` over ``devices`` (default: all).

    ``fsdp``: one ``data`` axis over every device. ``tp`` and ``2d``: ``(data, model)`` with
    ``model_parallel`` devices on ``model`` (default: all of them for ``tp``, half for ``2d``).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if kind not in MESHES:
        raise ValueError(f"mesh kind {kind!r}; use one of {MESHES}")
    if kind == "fsdp":
        shape, names = (n,), ("data",)
    else:
        m = model_parallel or (n if kind == "tp" else max(1, n // 2))
        if n % m:
            raise ValueError(f"model_parallel={m} does not divide the {n} devices")
        shape, names = (n // m, m), ("data", "model")
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    return mesh, RULES[kind]


def make_data(sizes: Sizes, seed: int = 0):
    """A next-token task: sequences that count up modulo ``vocab`` from a random start."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, sizes.vocab, (sizes.batch, 1))
    step = rng.integers(1, 4, (sizes.batch, 1))
    seq = (start + step * np.arange(sizes.seq + 1)) % sizes.vocab
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def loss_fn(apply, params, tokens, targets):
    logits = apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def global_array(x: np.ndarray, sharding):
    """A global array from a host array every process holds in full (multi-host safe)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def train(mesh, rules, sizes: Sizes = Sizes(), steps: int = 20, lr: float = 1e-2, seed: int = 0, log=print):
    """Initialize the sharded base, split, train the adapters ``steps`` steps, merge.

    Returns a dict: ``losses`` (per step), ``merged_loss`` (the merged model on the same
    batch, which equals the adapted model's), ``lora`` (the trained adapter as host numpy
    arrays, the same on every process) and the shardings used.
    """
    model = Transformer(sizes)
    tokens_np, targets_np = make_data(sizes, seed)
    data_sh = NamedSharding(mesh, P("data") if "data" in mesh.axis_names else P())
    tokens, targets = global_array(tokens_np, data_sh), global_array(targets_np, data_sh)

    # 1. the base, created on its shardings (from the model's logical annotations)
    boxed = jax.eval_shape(model.init, jax.random.key(seed), tokens)
    base_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.jit(lambda k, t: nn.unbox(model.init(k, t)), out_shardings=base_sh)(jax.random.key(seed), tokens)

    # 2. adapters created on the shardings derived from the base's
    base, lora = lj_sharding.split(jax.random.key(seed + 1), params, LORA_CONFIG, mesh, boxed,
                                   apply_fn=model.apply, args=(tokens,), rules=rules)
    lora_sh = lj_sharding.shardings(lora, mesh, boxed, rules=rules)

    # 3. train: gradients and Adam state for the adapters only, donated between steps
    tx = optax.adam(lr)
    opt_sh = lj_sharding.state_shardings(jax.eval_shape(tx.init, lora), lora_sh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    forward = lj.wrap(model.apply)
    replicated = NamedSharding(mesh, P())

    def step(base, lora, opt, tokens, targets):
        loss, g = jax.value_and_grad(lambda l: loss_fn(lambda p, t: forward(p, l, t), base, tokens, targets))(lora)
        updates, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    step = jax.jit(step, in_shardings=(base_sh, lora_sh, opt_sh, data_sh, data_sh),
                   out_shardings=(lora_sh, opt_sh, replicated), donate_argnums=(1, 2))
    losses = []
    for i in range(steps):
        lora, opt, loss = step(base, lora, opt, tokens, targets)
        losses.append(float(loss))
        if i == 0 or (i + 1) % 10 == 0 or i + 1 == steps:
            log(f"  step {i + 1:4d}  loss {losses[-1]:.4f}")
    # (arrays spanning several processes are passed to jit, never closed over)
    adapted = jax.jit(lambda b, l, x, y: loss_fn(lambda p, t: forward(p, l, t), b, x, y))
    adapted_loss = float(adapted(base, lora, tokens, targets))
    host_lora = multihost_utils.process_allgather(lora, tiled=True)

    # 4. merge on the base's shardings (the base's buffers are donated to the result)
    merged = lj_sharding.merge(base, lora)
    merged_loss = float(jax.jit(lambda p, x, y: loss_fn(model.apply, p, x, y))(merged, tokens, targets))
    return dict(losses=losses, adapted_loss=adapted_loss, merged_loss=merged_loss, lora=host_lora,
                lora_shardings=lora_sh, base_shardings=base_sh, merged=merged)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", choices=(*MESHES, "all"), default="all")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--model-parallel", type=int, default=None,
                        help="devices on the 'model' axis (tp: all, 2d: half by default)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host: TPU pod slices)")
    for field in dataclasses.fields(Sizes):
        parser.add_argument("--" + field.name.replace("_", "-"), type=int, default=field.default)
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    log(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices")
    results = {}
    for kind in MESHES if args.mesh == "all" else (args.mesh,):
        mesh, rules = make_mesh(kind, args.model_parallel)
        log(f"{kind}: mesh {dict(mesh.shape)}, rules {rules}")
        out = train(mesh, rules, sizes, steps=args.steps, lr=args.lr, log=log)
        w = out["lora_shardings"]["params"]["block0"]["q"]["kernel"]
        log(f"  block0/q/kernel: base {out['base_shardings']['params']['block0']['q']['kernel'].spec}"
            f" -> A {w.a.spec}, B {w.b.spec}")
        log(f"  adapted loss {out['adapted_loss']:.4f}, merged loss {out['merged_loss']:.4f}")
        results[kind] = out
    return results


if __name__ == "__main__":
    main()
