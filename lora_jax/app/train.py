"""Training on the embedded model, shared by ``lora-jax finetune`` and ``lora-jax sweep``.

:class:`Setup` loads a run's corpora and pretrained model and evaluates it;
:func:`train_lora` trains adapters (checkpointed, resumable) and :func:`train_full` the
full fine-tune baseline, both on the same batches and through the same loop.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import adalora
from ..split import quantize as lj_quantize
from ..split import split
from ..transform import wrap
from .data import load_corpus
from .files import uninterrupted, write_json
from .model import TinyLM, check_memory, lm_loss, make_step, pretrained, progress_bar
from .model import warmup_cosine as _schedule
from .run_config import RunConfig

__all__ = ["Setup", "lora_optimizer", "train_lora", "train_full"]


class Setup:
    """Everything a run shares: config, corpora, the pretrained model and its evaluation.

    Attributes: ``cfg``, ``model`` (a ``TinyLM``), ``variables`` (pretrained),
    ``base_dir`` (its orbax checkpoint), ``target``/``source`` corpora, ``pretrain_info``,
    ``evaluate(apply, params) -> {"target": loss, "source": loss}``.

    >>> import tempfile
    >>> from lora_jax.app.run_config import from_dict
    >>> from lora_jax.tree import targets
    >>> cfg = from_dict({}, [f"output.cache_dir={tempfile.mkdtemp()}", "model.d_model=16", "model.n_layers=1",
    ...     "model.n_heads=2", "model.d_ff=32", "model.context=16", "pretrain.steps=2", "train.batch_size=2",
    ...     "train.eval_batches=1", "train.progress=false", "data.max_bytes=30000"])
    >>> s = Setup(cfg, log=None)
    >>> base, lora = s.split()
    >>> sorted(s.evaluate(s.model.apply, s.variables)), len(targets(lora))
    (['source', 'target'], 6)
    """

    def __init__(self, cfg: RunConfig, log: Callable | None = print):
        self.cfg = cfg
        m, d = cfg.model, cfg.data
        check_memory(m, max(cfg.pretrain.batch_size, cfg.train.batch_size))  # before anything is allocated
        load = lambda name: load_corpus(name, paths=d.paths, max_bytes=d.max_bytes, heldout=d.heldout, context=m.context)
        self.target = load(d.corpus)
        self.source = self.target if d.source == d.corpus else load(d.source)
        pre = self.source if cfg.pretrain.corpus == d.source else load(cfg.pretrain.corpus)
        self.model = TinyLM(m)
        self.check(self.lora_config())  # before pretraining: targets that match nothing, bad ranks
        self.variables, self.base_dir, self.pretrain_info = pretrained(
            m, cfg.pretrain, pre, cache_dir=cfg.output.cache_dir, progress=cfg.train.progress, log=log
        )
        n = cfg.train.eval_batches * cfg.train.batch_size
        self.windows = {"target": self.target.eval_windows(n, m.context), "source": self.source.eval_windows(n, m.context)}
        self._eval = {}

    def evaluate(self, apply, params) -> dict[str, float]:
        """Held-out loss (nats per byte) on the target and source domains, batch by batch."""
        fn = self._eval.get(apply)
        if fn is None:
            fn = self._eval[apply] = jax.jit(lambda p, w: lm_loss(apply, p, w))
        bs = self.cfg.train.batch_size
        out = {}
        for name, windows in self.windows.items():
            losses = [float(fn(params, windows[i : i + bs])) for i in range(0, len(windows), bs)]
            out[name] = float(np.mean(losses))
        return out

    def lora_config(self, **kw):
        """The run's :class:`lora_jax.LoraConfig`; ``rank``, ``alpha`` or ``scaling`` replace the config's."""
        return self.cfg.lora.lora_config(**kw)

    def _split(self, variables, lora_config, seed: int):
        ids = jax.ShapeDtypeStruct((1, self.cfg.model.context), jnp.int32)
        fn = adalora.split if self.cfg.lora.method == "adalora" else split
        return fn(jax.random.key(seed), variables, lora_config, apply_fn=self.model.apply, args=(ids,))

    def check(self, lora_config) -> None:
        """Split the model's abstract parameters (no arrays): a ``ValueError`` naming the
        ``lora`` settings when a target regex matches nothing or a rank does not fit."""
        ids = jax.ShapeDtypeStruct((1, self.cfg.model.context), jnp.int32)
        abstract = jax.eval_shape(self.model.init, jax.random.key(0), ids)
        try:
            self._split(abstract, lora_config, 0)
        except (ValueError, TypeError) as e:
            a = self.cfg.lora
            raise type(e)(f"lora settings (targets {list(a.targets)}, rank {lora_config.rules[0].rank}): {e}") from None

    def split(self, lora_config=None, seed: int | None = None, quantize: str | None = None):
        """``(base, lora)`` of the pretrained variables, axes inferred by tracing the model;
        the base's matmul weights quantized as ``lora.quantize`` (or ``quantize``) says. With
        ``lora.method: adalora`` the adapters are AdaLoRA's (:func:`lora_jax.adalora.split`)."""
        seed = self.cfg.train.seed if seed is None else seed
        qtype = self.cfg.lora.quantize if quantize is None else quantize
        variables = self.variables
        if qtype != "none":
            ids = jax.ShapeDtypeStruct((1, self.cfg.model.context), jnp.int32)
            variables = lj_quantize(variables, qtype, apply_fn=self.model.apply, args=(ids,))
        return self._split(variables, lora_config or self.lora_config(), seed)


def _adam(lr: float, steps: int, warmup: int):
    """Global-norm clipping at 1, then Adam on :func:`_schedule`: the optimizer of every run here."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_schedule(lr, steps, warmup)))


def lora_optimizer(cfg: RunConfig, steps: int | None = None):
    """The adapters' optimizer: global-norm clipping at 1, Adam at ``train.lr`` with warmup and cosine decay.

    With ``lora.method: adalora`` that optimizer is wrapped in
    :func:`lora_jax.adalora.allocator`, which cuts the ranks to ``lora.target_rank`` over
    ``steps`` (default ``train.steps``) as the ``lora`` budget keys say.

    >>> from lora_jax.app.run_config import from_dict
    >>> tx = lora_optimizer(from_dict({}, ["train.steps=10"]))
    >>> type(tx.init({"a": jnp.ones(3)})).__name__
    'tuple'
    >>> cfg = from_dict({}, ["train.steps=10", "lora.method=adalora", "lora.t_init=2", "lora.t_final=3"])
    >>> import lora_jax as lj
    >>> _, ada = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((8, 8))}, lj.LoraConfig(rules=(lj.Rule("w", rank=8),)))
    >>> type(lora_optimizer(cfg).init(ada)).__name__
    'AllocatorState'
    """
    steps = cfg.train.steps if steps is None else steps
    tx = _adam(cfg.train.lr, steps, cfg.train.warmup)
    a = cfg.lora
    if a.method != "adalora":
        return tx
    return adalora.allocator(tx, target_rank=a.target_rank, total_steps=steps, t_init=a.t_init, t_final=a.t_final,
                             delta_t=a.delta_t, beta1=a.beta1, beta2=a.beta2)


def train_lora(
    s: Setup,
    base,
    lora,
    *,
    steps: int,
    tx=None,
    manager=None,
    start: int = 0,
    opt=None,
    history: list | None = None,
    on_step: Callable | None = None,
    desc: str = "LoRA",
):
    """Train ``lora`` (base frozen) from step ``start`` to ``steps`` on the target corpus.

    Batch ``i`` and its dropout key depend only on ``(train.seed, i)``, so a run resumed
    from a checkpoint continues exactly as an uninterrupted one. ``manager`` (a
    :class:`lora_jax.checkpoint.Manager`) saves every ``train.save_every`` steps and at the
    end; ``on_step(step, lora, loss)`` is called after each step. With ``lora.method:
    adalora`` the loss trained on adds ``lora.orth_reg_weight`` times
    :func:`lora_jax.adalora.orth_reg`; ``history`` holds the language-model loss alone.

    Returns ``(lora, opt, history, step_seconds)``: ``history`` the per-step losses,
    ``step_seconds`` the median step time (None when no step ran).

    :func:`lora_jax.app.run.finetune` runs it once, :mod:`lora_jax.app.sweep` once per trial.

    >>> import tempfile
    >>> from lora_jax.app.run_config import from_dict
    >>> s = Setup(from_dict({}, [f"output.cache_dir={tempfile.mkdtemp()}", "model.d_model=16", "model.n_layers=1",
    ...     "model.n_heads=2", "model.d_ff=32", "model.context=16", "pretrain.steps=2", "train.batch_size=2",
    ...     "train.eval_batches=1", "train.progress=false", "data.max_bytes=30000"]), log=None)
    >>> base, lora = s.split()
    >>> lora, opt, history, step_seconds = train_lora(s, base, lora, steps=3)
    >>> len(history), step_seconds > 0
    (3, True)
    """
    cfg = s.cfg
    tx = lora_optimizer(cfg, steps) if tx is None else tx
    if opt is None:
        # one buffer per leaf: the step donates the state, and an optimizer's init may hand
        # out one array in two places
        opt = jax.tree.map(jnp.copy, tx.init(lora))
    forward = wrap(s.model.apply)
    seed_key = jax.random.key(cfg.train.seed + 1)

    orth = cfg.lora.orth_reg_weight if cfg.lora.method == "adalora" else 0.0

    def loss_fn(lora, batch, key):
        apply = lambda base, ids: forward(base, lora, ids, lora_rng=key if cfg.lora.dropout > 0 else None)
        loss = lm_loss(apply, base, batch)
        return (loss + orth * adalora.orth_reg(lora) if orth else loss), loss

    step_fn = make_step(loss_fn, tx, has_aux=True)
    return _loop(s, step_fn, lora, opt, start=start, steps=steps, key=seed_key, manager=manager,
                 history=history, on_step=on_step, desc=desc)


def train_full(s: Setup, *, steps: int, desc: str = "full FT"):
    """Full fine-tuning baseline: every weight trains (Adam at ``train.full_lr``), on the same batches.

    Returns ``(params, opt, history, step_seconds)`` like :func:`train_lora`.

    >>> import tempfile
    >>> from lora_jax.app.run_config import from_dict
    >>> cfg = from_dict({}, [f"output.cache_dir={tempfile.mkdtemp()}", "model.d_model=16", "model.n_layers=1",
    ...     "model.n_heads=2", "model.d_ff=32", "model.context=16", "pretrain.steps=2", "train.batch_size=2",
    ...     "train.eval_batches=1", "train.progress=false", "data.max_bytes=30000"])
    >>> s = Setup(cfg, log=None)
    >>> params, _, losses, _ = train_full(s, steps=2)
    >>> len(losses), jax.tree.structure(params) == jax.tree.structure(s.variables)
    (2, True)
    """
    cfg = s.cfg
    tx = _adam(cfg.train.full_lr, steps, cfg.train.warmup)
    params = jax.tree.map(jnp.copy, s.variables)
    step_fn = make_step(lambda p, b, k: lm_loss(s.model.apply, p, b), tx)
    return _loop(s, step_fn, params, tx.init(params), start=0, steps=steps, key=jax.random.key(0), desc=desc)


def _loop(s, step_fn, params, opt, *, start, steps, key, manager=None, history=None, on_step=None, desc=""):
    cfg = s.cfg
    # committed inputs from the first step on: a step's outputs are committed, so inputs that
    # are not (fresh optimizer state) would compile the step a second time
    params, opt = jax.device_put((params, opt), jax.local_devices()[0])
    history = list(history or [])
    times = []
    tokens = cfg.train.batch_size * cfg.model.context
    bar = progress_bar(steps, desc, cfg.train.progress, initial=start)
    for i in range(start, steps):
        batch = s.target.batch(i, cfg.train.batch_size, cfg.model.context, seed=cfg.train.seed)
        t0 = time.perf_counter()
        params, opt, loss = step_fn(params, opt, batch, jax.random.fold_in(key, i))
        loss = float(loss)  # waits for the step
        times.append(time.perf_counter() - t0)
        history.append(loss)
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f}, {tokens / times[-1]:,.0f} tok/s")
        if on_step is not None:
            on_step(i + 1, params, loss)
        if manager is not None and ((i + 1) % cfg.train.save_every == 0 or i + 1 == steps):
            with uninterrupted():
                # the losses first: a checkpoint on disk always has its whole loss history beside it
                write_json(os.path.join(manager.directory, "history.json"), {"step": i + 1, "losses": history})
                manager.save(i + 1, params, opt, config=s.lora_config())
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
    # the median step after the first (which compiles); None when no step ran (a finished run resumed)
    step_seconds = float(np.median(times[1:])) if len(times) > 1 else (times[0] if times else None)
    return params, opt, history, step_seconds
