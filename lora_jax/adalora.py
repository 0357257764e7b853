"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): adapters in SVD form whose ranks an optax
transformation allocates during training.

Each target's update is ``s·(P·diag(λ) ⊗ Q)`` with P in the layout of a LoRA ``a``
(*stack, r, *in), λ of shape (*stack, r) and Q in the layout of ``b`` (*stack, r, *out): an
:class:`~lora_jax.weight.AdaLoraWeight`. ``lj.wrap``, ``lj.merge``, ``lj.unmerge`` and
``lj.summary`` take such trees like any lora tree. :func:`allocator` wraps an optax
optimizer: from the gradients it sees it keeps the smoothed sensitivity and uncertainty of
every entry of P, λ and Q, scores each triplet ``(P_i, λ_i, Q_i)``, and masks λ to a budget
of triplets that shrinks from the initial ranks to ``target_rank`` per target along the
paper's cubic schedule. :func:`orth_reg` is the paper's orthogonality regularizer,
:func:`ranks` reads the kept ranks from the optimizer state and :func:`to_lora` turns the
result into a plain lora tree of mixed ranks (merge it, save it, export it to PEFT).

Importance (paper, eqs. 8-11), for every entry w of P, λ and Q at update t::

    I = |w · ∂L/∂w|
    Ī ← β1·Ī + (1-β1)·I               (sensitivity, smoothed)
    Ū ← β2·Ū + (1-β2)·|I - Ī|         (uncertainty)
    s(w) = Ī · Ū
    S_i = s(λ_i) + mean_j s(P_ij) + mean_j s(Q_ij)     (triplet i of a target)

Budget (triplets in all targets; ``b0`` the sum of the initial ranks, ``bT`` =
``target_rank`` × targets, layers of a stacked target counting one each)::

    b(t) = b0                                              t <= t_init
    b(t) = floor((b0 - bT)·(1 - (t - t_init)/(T - t_final - t_init))³ + bT)   after
    b(t) = bT                                              t >= T - t_final

At every update t with ``t_init < t < T - t_final`` and ``t % delta_t == 0`` the ``b0 - b(t)``
triplets of lowest score (one threshold over all targets; ties at it go too) get λ = 0;
between these steps masked λ may grow again, as in PEFT. At ``t = T - t_final`` the final
mask (budget bT) is fixed, the scores stop changing, and every later update keeps it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import LoraConfig, path_str
from .split import split as lora_split
from .split import target_key
from .tree import fmt_paths, is_node
from .weight import AdaLoraWeight, is_adalora

__all__ = ["AdaLoraWeight", "AllocatorState", "split", "allocator", "orth_reg", "ranks", "to_lora"]

# PEFT's AdaLoraLayer.reset_lora_parameters: λ = 0, P and Q normal with this std
INIT_STD = 0.02


def _is_node(x) -> bool:
    return is_node(x) or is_adalora(x)


def _adapters(tree: Any, fn: str) -> list[tuple[str, AdaLoraWeight]]:
    """``(path, AdaLoraWeight)`` for every AdaLoRA adapter in ``tree``; a tree without any is a TypeError."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]
    found = [(path_str(p), x) for p, x in leaves if is_adalora(x)]
    if not found:
        plain = [path_str(p) for p, x in leaves if x is not None and not is_adalora(x)]
        what = f"LoRA adapters or arrays at {fmt_paths(plain, 4)}" if plain else "no adapters"
        raise TypeError(f"lj.adalora.{fn}: expected a tree with AdaLoRA adapters (lj.adalora.AdaLoraWeight, "
                        f"from lj.adalora.split), got {what}; split the parameters with "
                        "lj.adalora.split instead of lj.split")
    return found


def split(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Split ``params`` into ``(base, lora)`` with AdaLoRA adapters in SVD form.

    Targets, axes and scales are those of :func:`lora_jax.split` with the same arguments;
    each rule's rank is the initial rank. Every target gets an
    :class:`~lora_jax.weight.AdaLoraWeight` with PEFT's init: λ = 0 (so the adapted model
    starts as the base), P and Q normal with std 0.02, from the target's own key.

    Raises:
      ValueError: ``config.init`` other than ``"default"`` (AdaLoRA has its own init), and
        everything :func:`lora_jax.split` raises.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=4),))
    >>> base, lora = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((16, 8))}, cfg)
    >>> w = lora["w"]
    >>> w.p.shape, w.lam.shape, w.q.shape, float(abs(lj.merge(base, lora)["w"] - 1).max())
    ((4, 16), (4,), (4, 8), 0.0)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an lj.LoraConfig, got {type(config).__name__}")
    if config.init != "default":
        raise ValueError(f"lj.adalora.split: config.init={config.init!r}, but AdaLoRA starts from its own "
                         "init (λ = 0, P and Q gaussian); use init='default'")
    dora = [r.pattern for r in config.rules if config.dora_for(r)]
    if dora:
        raise ValueError(f"lj.adalora.split: rules {dora} ask for DoRA, which AdaLoRA's SVD-form adapters do not "
                         "have; use dora=False (LoraConfig and Rule) for AdaLoRA, or lj.split for DoRA")
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        return jax.eval_shape(lambda k, p: split(k, p, config, apply_fn, args), key, params)
    base, lora = lora_split(key, params, config, apply_fn=apply_fn, args=args)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_node)
    out = []
    for p, w in leaves:
        if w is not None:
            kp, kq = jax.random.split(target_key(key, path_str(p)))
            dtype = jnp.result_type(w.a)
            w = AdaLoraWeight.of(w, p=INIT_STD * jax.random.normal(kp, w.a_shape, dtype),
                                 lam=jnp.zeros((*w.stack_shape, w.rank), dtype),
                                 q=INIT_STD * jax.random.normal(kq, w.b_shape, dtype))
        out.append(w)
    return base, jax.tree.unflatten(treedef, out)


class AllocatorState(NamedTuple):
    """The state of :func:`allocator`: the update count, per target (in tree order) the
    smoothed sensitivity and uncertainty of (P, λ, Q) and the kept-triplet mask
    (*stack, r) (True = kept), and the inner optimizer's state."""

    count: jax.Array
    sensitivity: tuple
    uncertainty: tuple
    mask: tuple
    inner: Any


def _budgets(b0: int, bT: int, total_steps: int, t_init: int, t_final: int) -> np.ndarray:
    """The budget b(t) for t = t_init .. total_steps - t_final (float64, then truncated)."""
    span = total_steps - t_final - t_init
    mul = 1.0 - np.arange(span + 1, dtype=np.float64) / span
    return np.floor((b0 - bT) * mul ** 3 + bT).astype(np.int32)


def _triplet_scores(w: AdaLoraWeight, sens, unc) -> jax.Array:
    """S_i = s(λ_i) + mean of s over P's row i + mean over Q's row i, shape (*stack, r)."""
    s_p, s_lam, s_q = (a * b for a, b in zip(sens, unc))
    lead = s_lam.ndim
    return (s_lam + jnp.mean(s_p, axis=tuple(range(lead, s_p.ndim)))
            + jnp.mean(s_q, axis=tuple(range(lead, s_q.ndim))))


def allocator(
    inner_tx: optax.GradientTransformation,
    *,
    target_rank: int,
    total_steps: int,
    t_init: int,
    t_final: int,
    delta_t: int,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> optax.GradientTransformation:
    """``inner_tx`` plus AdaLoRA's rank allocation, as one optax transformation.

    Each update applies ``inner_tx``, updates the importance of every entry of P, λ and Q
    from the gradients and the params, and on the schedule of the module docstring masks λ:
    the returned update of a masked λ is ``-λ`` (so ``optax.apply_updates`` leaves it
    exactly 0). Nothing else needs calling during training. Use it as the outermost
    transformation on the adapters (inside :func:`lora_jax.optimizer` is fine:
    ``lj.optimizer(lj.adalora.allocator(optax.adamw(1e-3), ...))``); a transformation
    chained after it would change the masking updates. ``update`` needs ``params``.

    Args:
      inner_tx: the optimizer of P, λ and Q.
      target_rank: the average rank to keep per target (PEFT's ``target_r``).
      total_steps: T, the number of training steps (updates).
      t_init: warm-up updates before any masking.
      t_final: updates at the end with the final mask fixed.
      delta_t: masks are recomputed every ``delta_t`` updates while the budget shrinks.
      beta1, beta2: EMA factors of the sensitivity and the uncertainty.

    Raises:
      ValueError: ``t_init + t_final >= total_steps``, ``delta_t < 1``, betas outside
        [0, 1), ``target_rank < 1``; at ``init``, a target whose initial rank is below
        ``target_rank``; ``update`` without params.
      TypeError: a tree without AdaLoRA adapters.

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("w.", rank=4),))
    >>> base, lora = lj.adalora.split(jax.random.key(0), {"w1": jnp.ones((8, 8)), "w2": jnp.ones((8, 8))}, cfg)
    >>> tx = lj.adalora.allocator(optax.sgd(0.1), target_rank=2, total_steps=4, t_init=0, t_final=1, delta_t=1)
    >>> state = tx.init(lora)
    >>> grads = jax.tree.map(jnp.ones_like, lora)
    >>> for _ in range(4):
    ...     updates, state = tx.update(grads, state, lora)
    ...     lora = optax.apply_updates(lora, updates)
    >>> kept = lj.adalora.ranks(lora, state)
    >>> sorted(kept), kept["w1"] + kept["w2"]   # 2 per target on average: 4 of the 8 triplets
    (['w1', 'w2'], 4)
    """
    for name, v in (("target_rank", target_rank), ("total_steps", total_steps), ("t_init", t_init),
                    ("t_final", t_final), ("delta_t", delta_t)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"lj.adalora.allocator: {name} must be an int, got {v!r}")
    if target_rank < 1:
        raise ValueError(f"lj.adalora.allocator: target_rank={target_rank}; keep at least rank 1 per target")
    if t_init < 0 or t_final < 0 or t_init + t_final >= total_steps:
        raise ValueError(
            f"lj.adalora.allocator: the budget cannot shrink with total_steps={total_steps}, t_init={t_init}, "
            f"t_final={t_final}: it shrinks between t_init and total_steps - t_final, so it needs "
            f"0 <= t_init, 0 <= t_final and t_init + t_final < total_steps (e.g. t_init={total_steps // 10}, "
            f"t_final={total_steps // 5})")
    if delta_t < 1:
        raise ValueError(f"lj.adalora.allocator: delta_t={delta_t}; masks are recomputed every delta_t "
                         "updates, so use delta_t >= 1 (PEFT's deltaT, e.g. 10)")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"lj.adalora.allocator: {name}={b}; an EMA factor must be in [0, 1) (e.g. 0.85)")
    stop = total_steps - t_final

    def init(params):
        found = _adapters(params, "allocator")
        small = [f"{p} (rank {w.spec.rank})" for p, w in found if w.spec.rank < target_rank]
        if small:
            raise ValueError(f"lj.adalora.allocator: target_rank={target_rank} exceeds the initial rank of "
                             f"{fmt_paths(small)}; give those rules rank >= {target_rank}, or lower target_rank")
        def zeros():  # (a new buffer each: a training step may donate the state)
            return tuple(tuple(jnp.zeros(jnp.shape(x), jnp.float32) for x in (w.p, w.lam, w.q)) for _, w in found)

        mask = tuple(jnp.ones(jnp.shape(w.lam), bool) for _, w in found)
        return AllocatorState(jnp.zeros((), jnp.int32), zeros(), zeros(), mask, inner_tx.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("lj.adalora.allocator: update(grads, state, params) needs params, to score "
                             "|θ·∇θ| and to zero the masked λ; pass the current params (optax: tx.update(grads, "
                             "state, params))")
        ws = [w for _, w in _adapters(params, "allocator")]
        gs = [g for _, g in _adapters(grads, "allocator")]
        if len(gs) != len(ws) or len(ws) != len(state.mask):
            raise ValueError(f"lj.adalora.allocator: grads hold {len(gs)} AdaLoRA adapters, params {len(ws)} and "
                             f"the state {len(state.mask)}; pass the gradients of the tree the state was made for")
        updates, inner = inner_tx.update(grads, state.inner, params)
        t = state.count
        learn = t < stop
        sens, unc, scores = [], [], []
        for w, g, s0, u0 in zip(ws, gs, state.sensitivity, state.uncertainty):
            s1, u1 = [], []
            for x, dx, s, u in zip((w.p, w.lam, w.q), (g.p, g.lam, g.q), s0, u0):
                imp = jnp.abs(jnp.asarray(x, jnp.float32) * jnp.asarray(dx, jnp.float32))
                s_new = beta1 * s + (1 - beta1) * imp
                u_new = beta2 * u + (1 - beta2) * jnp.abs(imp - s_new)
                s1.append(jnp.where(learn, s_new, s))
                u1.append(jnp.where(learn, u_new, u))
            sens.append(tuple(s1))
            unc.append(tuple(u1))
            scores.append(_triplet_scores(w, s1, u1))
        b0 = sum(math.prod(jnp.shape(w.lam)) for w in ws)
        bT = target_rank * sum(math.prod(jnp.shape(w.lam)[:-1]) for w in ws)
        budgets = jnp.asarray(_budgets(b0, bT, total_steps, t_init, t_final))
        budget = budgets[jnp.clip(t - t_init, 0, stop - t_init)]
        flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores]))
        drop = b0 - budget
        threshold = jnp.where(drop > 0, flat[jnp.clip(drop - 1, 0, b0 - 1)], -jnp.inf)
        recompute = ((t > t_init) & (t < stop) & (t % delta_t == 0)) | (t == stop)
        apply = recompute | (t > stop)
        masks = tuple(jnp.where(recompute, s > threshold, m) for s, m in zip(scores, state.mask))
        new = iter([jnp.where(apply & ~m, -w.lam, u.lam).astype(jnp.result_type(u.lam))
                    for w, u, m in zip(ws, (u for _, u in _adapters(updates, "allocator")), masks)])
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_node)
        updates = jax.tree.unflatten(treedef, [u.replace(lam=next(new)) if is_adalora(u) else u for u in leaves])
        return updates, AllocatorState(t + 1, tuple(sens), tuple(unc), masks, inner)

    return optax.GradientTransformation(init, update)


def orth_reg(lora: Any) -> jax.Array:
    """The orthogonality regularizer ``Σ ||P·Pᵀ - I||²_F + ||Q·Qᵀ - I||²_F`` over targets.

    P and Q are rank-major ((*stack, r, in) and (*stack, r, out), the in/out axes
    flattened), so ``P·Pᵀ`` is r×r; stacked targets sum over their layers. Add it to the
    loss with a small weight (PEFT's ``orth_reg_weight`` defaults to 0.5; PEFT sums the
    unsquared norms and divides by the number of matrices, this is the paper's eq. 4).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> _, lora = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                            lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lora = {"w": lora["w"].replace(p=jnp.eye(2, 4), q=2 * jnp.eye(2, 4))}
    >>> float(lj.adalora.orth_reg(lora))   # P orthonormal; Q·Qᵀ - I = 3·I
    18.0
    """
    total = jnp.zeros((), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    for _, w in _adapters(lora, "orth_reg"):
        for m in w.spec.replace(a=w.p, b=w.q).matrices(jnp.promote_types(jnp.result_type(w.p, w.q), jnp.float32)):
            gram = jnp.einsum("...ri,...si->...rs", m, m, precision=hi)
            eye = jnp.eye(gram.shape[-1], dtype=gram.dtype).reshape((1,) * (gram.ndim - 2) + gram.shape[-2:])
            total = total + jnp.sum((gram - eye) ** 2)
    return total


def _state(opt_state: Any, fn: str) -> AllocatorState:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState))
             if isinstance(x, AllocatorState)]
    if len(found) != 1:
        raise ValueError(f"lj.adalora.{fn}: opt_state holds {len(found)} lj.adalora.allocator states, expected "
                         "exactly one; pass the state of the optimizer built with lj.adalora.allocator "
                         "(inside lj.optimizer or any optax combinator)")
    return found[0]


def _masks(lora: Any, opt_state: Any, fn: str) -> list[tuple[str, AdaLoraWeight, np.ndarray]]:
    """``(path, adapter, kept mask)`` per AdaLoRA target, the masks from the allocator's state."""
    found = _adapters(lora, fn)
    masks = _state(opt_state, fn).mask
    if len(masks) != len(found) or any(np.shape(m) != np.shape(w.lam) for (_, w), m in zip(found, masks)):
        raise ValueError(
            f"lj.adalora.{fn}: the allocator's state holds masks of shapes {[tuple(np.shape(m)) for m in masks]} "
            f"but lora has λ of shapes {[tuple(np.shape(w.lam)) for _, w in found]} at "
            f"{fmt_paths([p for p, _ in found])}; pass the lora tree this optimizer state was trained with")
    return [(p, w, np.asarray(jax.device_get(m))) for (p, w), m in zip(found, masks)]


def ranks(lora: Any, opt_state: Any) -> Any:
    """A tree like ``lora`` with each target's kept rank (an int) in place of its adapter.

    A stacked target (scanned layers) gives the largest kept rank among its layers.
    ``opt_state`` is the state of an optimizer holding one :func:`allocator` (at any depth).

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> _, lora = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)},
    ...                            lj.LoraConfig(rules=(lj.Rule("w", rank=3),)))
    >>> tx = lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=2, t_final=2, delta_t=2)
    >>> lj.adalora.ranks(lora, tx.init(lora))   # nothing masked yet
    {'b': None, 'w': 3}
    """
    kept = iter([int(m.sum(axis=-1).max()) for _, _, m in _masks(lora, opt_state, "ranks")])
    leaves, treedef = jax.tree.flatten(lora, is_leaf=_is_node)
    return jax.tree.unflatten(treedef, [next(kept) if is_adalora(x) else None for x in leaves])


def to_lora(lora: Any, opt_state: Any) -> Any:
    """The plain lora tree (:class:`~lora_jax.LoraWeight` nodes, mixed ranks) of the kept triplets.

    Each target gets rank k = its kept rank (:func:`ranks`), ``a`` = the kept rows of P,
    each scaled by its λ, and ``b`` = the kept rows of Q, with the same scale s as the SVD
    form, so ``lj.merge`` gives the same weights as the AdaLoRA tree with its masked λ at
    zero. The result follows the ``"lora"`` scaling rule with ``alpha = s·k`` (so
    :mod:`lora_jax.checkpoint` and :func:`lora_jax.peft.save` take it like any other). A
    target with nothing kept becomes a rank-1 adapter of zeros. A stacked target takes the
    largest kept rank of its layers, the other layers padded with zero rows.

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> base, lora = lj.adalora.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                               lj.LoraConfig(rules=(lj.Rule("w", rank=3),)))
    >>> tx = lj.adalora.allocator(optax.sgd(0.1), target_rank=1, total_steps=10, t_init=2, t_final=2, delta_t=2)
    >>> plain = lj.adalora.to_lora(lora, tx.init(lora))
    >>> plain["w"].rank, plain["w"].a.shape, bool(jnp.allclose(lj.merge(base, plain)["w"], lj.merge(base, lora)["w"]))
    (3, (3, 4), True)
    """
    out = []
    for _, w, m in _masks(lora, opt_state, "to_lora"):
        spec, lead = w.spec, m.ndim - 1
        k = max(int(m.sum(axis=-1).max()), 1)
        order = np.argsort(~m, axis=-1, kind="stable")[..., :k]  # kept rows first, in their order
        keep = np.take_along_axis(m, order, axis=-1)
        lw = w.lora()
        rows = lambda x, n: jnp.take_along_axis(x, jnp.asarray(order.reshape(*order.shape, *(1,) * n)), axis=lead)
        a = rows(lw.a, len(spec.in_axes)) * jnp.asarray(keep.reshape(*keep.shape, *(1,) * len(spec.in_axes)),
                                                        jnp.result_type(lw.a))
        out.append(spec.replace(a=a, b=rows(lw.b, len(spec.out_axes)), rank=k, alpha=spec.scale * k,
                                scaling="lora"))
    it = iter(out)
    leaves, treedef = jax.tree.flatten(lora, is_leaf=_is_node)
    return jax.tree.unflatten(treedef, [next(it) if is_adalora(x) else x for x in leaves])
