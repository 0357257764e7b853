"""The embedded default model: a small byte-level causal transformer, pretrained once and cached.

``TinyLM`` is a pre-LayerNorm decoder (learned positions, causal multi-head attention,
a GELU MLP, an output head tied to the byte embedding). :func:`pretrained` trains it on
one corpus the first time it is asked for a configuration and keeps the weights as a
plain orbax checkpoint under the user's cache directory, keyed by the model and
pretraining settings; later runs restore them in a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .files import human_bytes, read_json, uninterrupted, write_json
from .run_config import ModelConfig, PretrainConfig

__all__ = ["TinyLM", "cache_root", "pretrained", "lm_loss", "make_step", "progress_bar", "param_count",
           "warmup_cosine", "memory_estimate", "available_memory", "check_memory"]

VOCAB = 256
_FORMAT = 1  # bump when the model code changes meaning: old cache entries are then ignored


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        heads = lambda t: t.reshape(t.shape[:-1] + (cfg.n_heads, cfg.d_model // cfg.n_heads))
        h = nn.LayerNorm(name="ln1")(x)
        q = heads(nn.Dense(cfg.d_model, name="query")(h))
        k = heads(nn.Dense(cfg.d_model, name="key")(h))
        v = heads(nn.Dense(cfg.d_model, name="value")(h))
        mask = nn.make_causal_mask(jnp.zeros(x.shape[:-1], jnp.int32))
        o = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + nn.Dense(cfg.d_model, name="out")(o.reshape(x.shape))
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(cfg.d_model, name="down")(nn.gelu(nn.Dense(cfg.d_ff, name="up")(h)))


class TinyLM(nn.Module):
    """Byte-level causal LM: ``(batch, time) int32 -> (batch, time, 256)`` logits.

    >>> cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context=16)
    >>> ids = jnp.zeros((2, 16), jnp.int32)
    >>> variables = TinyLM(cfg).init(jax.random.key(0), ids)
    >>> TinyLM(cfg).apply(variables, ids).shape
    (2, 16, 256)
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.cfg
        embed = nn.Embed(VOCAB, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (cfg.context, cfg.d_model))
        x = embed(ids) + pos[None, : ids.shape[-1]]
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"block_{i}")(x)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


def memory_estimate(model: ModelConfig, batch_size: int) -> dict[str, int]:
    """Bytes that training a ``TinyLM`` of ``model`` on ``batch_size`` windows needs, by part.

    ``params`` (float32), ``optimizer`` (the gradients and Adam's two moments of a full
    training, as pretraining and ``--compare-full`` do) and ``activations`` (what the
    backward pass keeps per layer: the block's inputs and outputs, q/k/v, the attention
    weights, the MLP's hidden units; and the logits). An estimate, computed from the
    settings alone (nothing is allocated).

    >>> est = memory_estimate(ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, context=128), 16)
    >>> est["params"] == 4 * param_count(jax.eval_shape(TinyLM(ModelConfig()).init, jax.random.key(0),
    ...                                                   jnp.zeros((1, 128), jnp.int32)))
    True
    >>> sorted(est)
    ['activations', 'optimizer', 'params', 'total']
    """
    d, f, t, h, n = model.d_model, model.d_ff, model.context, model.n_heads, model.n_layers
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # q, k, v, out; up; down; two LayerNorms
    params = VOCAB * d + t * d + n * per_layer + 2 * d
    tokens = batch_size * t
    activations = tokens * (n * (12 * d + 2 * f + 2 * h * t) + 3 * VOCAB)
    est = {"params": 4 * params, "optimizer": 3 * 4 * params, "activations": 4 * activations}
    return {**est, "total": sum(est.values())}


def available_memory() -> tuple[int, str] | None:
    """``(bytes, where it comes from)``: the memory a run here may use (None when unknown).

    On an accelerator, its memory limit as JAX reports it; on CPU, ``MemAvailable`` of
    ``/proc/meminfo``, else the physical memory (``os.sysconf``).

    >>> n, source = available_memory()
    >>> n > 0, isinstance(source, str)
    (True, True)
    """
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"the memory of {device.device_kind}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the physical memory"
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model: ModelConfig, batch_size: int) -> None:
    """A ``ValueError`` naming the model settings, the estimate and the limit when
    :func:`memory_estimate` exceeds :func:`available_memory`.

    >>> check_memory(ModelConfig(), 16)
    >>> check_memory(ModelConfig(d_model=100_000, n_heads=4), 16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: model.d_model=100000, model.n_layers=4, model.d_ff=512, model.context=128 with batches of 16 need about ... TiB (parameters ...); make the model or the batch smaller
    """
    limit = available_memory()
    est = memory_estimate(model, batch_size)
    if limit is None or est["total"] <= limit[0]:
        return
    settings = ", ".join(f"model.{k}={getattr(model, k)}" for k in ("d_model", "n_layers", "d_ff", "context"))
    raise ValueError(
        f"{settings} with batches of {batch_size} need about {human_bytes(est['total'])} (parameters "
        f"{human_bytes(est['params'])}, gradients and optimizer state {human_bytes(est['optimizer'])}, "
        f"activations {human_bytes(est['activations'])}) but {human_bytes(limit[0])} is available "
        f"({limit[1]}); make the model or the batch smaller"
    )


def lm_loss(apply, params, windows):
    """Mean next-byte cross-entropy (nats) of ``apply(params, ids)`` on ``(n, T + 1)`` windows.

    >>> uniform = lambda params, ids: jnp.zeros(ids.shape + (VOCAB,))
    >>> round(float(lm_loss(uniform, None, jnp.zeros((2, 9), jnp.int32))), 4)  # log(256)
    5.5452
    """
    logits = apply(params, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), windows[:, 1:]).mean()


def warmup_cosine(lr: float, steps: int, warmup: int):
    """Linear warmup over ``warmup`` steps (at most half of ``steps``), then a cosine from
    ``lr`` down to ``lr / 10`` at ``steps``; no warmup at all when that leaves none (one step).

    >>> [round(float(warmup_cosine(0.01, 10, 4)(i)), 4) for i in (0, 4, 10)]
    [0.0, 0.01, 0.001]
    >>> round(float(warmup_cosine(0.01, 1, 1)(0)), 6)  # one step: no warmup, the full rate
    0.01
    """
    warmup = min(warmup, steps // 2)
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, steps, alpha=0.1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.1)


def make_step(loss_fn, tx, has_aux: bool = False):
    """A jitted Adam-style step ``(params, opt, batch, key) -> (params, opt, loss)``.

    ``loss_fn(params, batch, key)`` is differentiated w.r.t. ``params`` only; params and
    optimizer state are donated. With ``has_aux``, ``loss_fn`` returns ``(objective,
    loss)``: the objective is differentiated and ``loss`` returned (a loss without its
    regularizers, say).

    >>> tx = optax.sgd(0.1)
    >>> step = make_step(lambda p, b, k: jnp.sum((p - b) ** 2), tx)
    >>> p, opt, loss = step(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.ones(2), None)
    >>> p, float(loss)
    (Array([0.2, 0.2], dtype=float32), 2.0)
    >>> step = make_step(lambda p, b, k: (jnp.sum((p - b) ** 2) + jnp.sum(p ** 2), jnp.sum((p - b) ** 2)), tx,
    ...                  has_aux=True)
    >>> p, opt, loss = step(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.ones(2), None)
    >>> float(loss)
    2.0
    """

    def step(params, opt, batch, key):
        if has_aux:
            (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return jax.jit(step, donate_argnums=(0, 1))


def cache_root(cache_dir: str | None = None) -> str:
    """Where pretrained weights are cached: ``cache_dir``, else ``$LORA_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/lora_jax`` (``~/.cache/lora_jax``).

    >>> cache_root("/tmp/x")
    '/tmp/x'
    """
    if cache_dir:
        return os.path.expanduser(cache_dir)
    if os.environ.get("LORA_JAX_CACHE"):
        return os.path.expanduser(os.environ["LORA_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora_jax")


def _cache_key(model: ModelConfig, pretrain: PretrainConfig, train_text: np.ndarray) -> str:
    """A hash of everything the pretrained weights depend on, the exact training text included."""
    spec = {"format": _FORMAT, "model": dataclasses.asdict(model), "pretrain": dataclasses.asdict(pretrain),
            "text": hashlib.sha256(np.ascontiguousarray(train_text).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrained(model: ModelConfig, pretrain: PretrainConfig, corpus, *, cache_dir=None, progress=True, log=print):
    """The pretrained ``TinyLM`` variables for these settings, trained and cached on first use.

    Returns ``(variables, checkpoint_dir, info)``: ``checkpoint_dir`` is a plain orbax
    checkpoint of ``variables`` (what :func:`lora_jax.checkpoint.merge` takes as the base),
    ``info`` the pretraining record (losses, time, settings). ``corpus`` is the
    :class:`~lora_jax.app.data.Corpus` of ``pretrain.corpus``.

    >>> import tempfile
    >>> from lora_jax.app.data import load_corpus
    >>> m = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=16)
    >>> p = PretrainConfig(steps=2)
    >>> corpus = load_corpus("pydoc", max_bytes=30_000, context=16)
    >>> cache = tempfile.mkdtemp()
    >>> v1, where, info = pretrained(m, p, corpus, cache_dir=cache, progress=False, log=None)
    >>> v2, _, info2 = pretrained(m, p, corpus, cache_dir=cache, progress=False, log=None)
    >>> info["cached"], info2["cached"], jax.tree.all(jax.tree.map(jnp.array_equal, v1, v2))
    (False, True, True)
    """
    from .. import checkpoint

    key = _cache_key(model, pretrain, corpus.train)
    root = os.path.join(cache_root(cache_dir), "pretrained", f"tinylm-{key}")
    ckpt, info_path = os.path.join(root, "params"), os.path.join(root, "info.json")
    lm = TinyLM(model)
    if os.path.exists(info_path) and os.path.isdir(ckpt):
        info = read_json(info_path, "the pretrained model's cache entry")
        abstract = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, model.context), jnp.int32))
        variables = checkpoint.restore_params(ckpt, like=abstract)
        return variables, ckpt, {**info, "cached": True}

    if log:
        log(f"pretraining the default model on {corpus.name} ({pretrain.steps} steps, once; cached in {root})")
    variables, info = _pretrain(lm, pretrain, corpus, progress)
    with uninterrupted():
        _store(root, variables, info)
    variables = checkpoint.restore_params(ckpt, like=jax.eval_shape(lambda: variables))
    return variables, ckpt, {**info, "cached": False}


def _pretrain(lm: TinyLM, pretrain: PretrainConfig, corpus, progress: bool):
    """Train ``lm`` from scratch on ``corpus``; returns the variables and the pretraining record."""
    model = lm.cfg
    variables = jax.jit(lm.init)(jax.random.key(pretrain.seed), jnp.zeros((1, model.context), jnp.int32))
    # warmup over a tenth of the steps (at most 100), then a cosine down to a tenth
    schedule = warmup_cosine(pretrain.lr, pretrain.steps, min(100, pretrain.steps // 10 + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    step = make_step(lambda p, b, k: lm_loss(lm.apply, p, b), tx)
    opt = tx.init(variables)
    losses, start = [], time.perf_counter()
    bar = progress_bar(pretrain.steps, "pretrain", progress)
    key0 = jax.random.key(0)
    for i in range(pretrain.steps):
        batch = corpus.batch(i, pretrain.batch_size, model.context, seed=pretrain.seed)
        variables, opt, loss = step(variables, opt, batch, key0)
        losses.append(float(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    held = corpus.eval_windows(8 * pretrain.batch_size, model.context)
    info = {
        "model": dataclasses.asdict(model),
        "pretrain": dataclasses.asdict(pretrain),
        "corpus": corpus.name,
        "losses": losses,
        "heldout_loss": float(jax.jit(lambda p, w: lm_loss(lm.apply, p, w))(variables, held)),
        "seconds": time.perf_counter() - start,
    }
    return variables, info


def _store(root: str, variables, info: dict) -> None:
    """Write the cache entry ``root``: ``params/`` (plain orbax), then ``info.json``."""
    from .. import checkpoint

    ckpt = os.path.join(root, "params")
    os.makedirs(root, exist_ok=True)
    # written under a name of its own, then renamed: when several processes pretrain the same
    # entry at once, the first rename wins and the others (same settings, same weights) use it
    tmp_ckpt = f"{ckpt}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    checkpoint.save_params(tmp_ckpt, variables)
    try:
        os.rename(tmp_ckpt, ckpt)
    except OSError:
        if not os.path.isdir(ckpt):
            raise
        shutil.rmtree(tmp_ckpt, ignore_errors=True)
    write_json(os.path.join(root, "info.json"), info)  # written last: its presence marks a complete cache entry


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm progress bar over ``total`` steps, starting at ``initial``; silent unless ``enabled``.

    >>> bar = progress_bar(3, "train", enabled=False)
    >>> bar.total, bar.disable
    (3, True)
    >>> bar.close()
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def param_count(tree) -> int:
    """Number of array elements in ``tree``.

    >>> param_count({"a": jnp.ones((2, 3)), "b": None, "c": [jnp.ones(4)]})
    10
    """
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
