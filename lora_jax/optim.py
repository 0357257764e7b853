"""Optimizer over the combined ``{"base": ..., "lora": ...}`` tree with the base frozen."""

from __future__ import annotations

from typing import Any

import jax
import optax

from .weight import PER_ADAPTER, is_stacked

__all__ = ["optimizer", "labels", "apply_updates"]


def labels(tree: Any) -> dict:
    """The label tree for ``optax.multi_transform``: ``"base"``/``"lora"`` per leaf.

    >>> import jax.numpy as jnp
    >>> labels({"base": {"w": jnp.ones(2)}, "lora": {"w": None}})
    {'base': {'w': 'base'}, 'lora': {'w': None}}

    In a stacked tree (:func:`lora_jax.stack`) the factors are ``"lora"`` and each
    adapter's scale, alpha, rank and dropout rate ``"base"`` (frozen: a weight decay would
    otherwise shrink them).
    """
    if not isinstance(tree, dict) or set(tree) != {"base", "lora"}:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"lj.optimizer expects the tree {{'base': base, 'lora': lora}}, got {keys}; "
            "build it as {'base': base, 'lora': lora} from lj.split's result"
        )
    def lora_label(x):  # a stacked adapter's per-adapter numbers are frozen, like the base
        if is_stacked(x):
            return x.replace(a="lora", b="lora", **dict.fromkeys(PER_ADAPTER, "base"))
        return jax.tree.map(lambda _: "lora", x)

    return {
        "base": jax.tree.map(lambda _: "base", tree["base"]),
        "lora": jax.tree.map(lora_label, tree["lora"], is_leaf=is_stacked),
    }


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Train ``lora`` with ``tx`` and freeze ``base``: an ``optax.multi_transform``.

    The base gets ``optax.set_to_zero()``: its updates are zeros and no optimizer state is
    allocated for it (Adam's moments exist for the adapters only). Use it on the tree
    ``{"base": base, "lora": lora}``; gradients for the base can be anything of the right
    structure (zeros, or real gradients: they are discarded).

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> base, lora = lj.split(jax.random.key(0), {"w": jnp.ones((8, 8))},
    ...                       lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> tx = lj.optimizer(optax.adam(1e-3))
    >>> state = tx.init({"base": base, "lora": lora})
    >>> sum(x.size for x in jax.tree.leaves(state))   # step count + Adam moments of A and B
    65

    Put gradient clipping, accumulation (``optax.MultiSteps``) and the like *inside*
    (``lj.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4)))``):
    wrapped around it they would see, and keep state for, the base. Apply the updates
    with :func:`apply_updates` (``optax.apply_updates`` also works when every base leaf is
    a float array; NNX states hold RNG keys, which cannot take an update).
    """
    return optax.multi_transform({"lora": tx, "base": optax.set_to_zero()}, labels)


def apply_updates(state: dict, updates: dict) -> dict:
    """``optax.apply_updates`` for ``{"base": ..., "lora": ...}``: the base comes back as is.

    The base's updates are zeros under :func:`optimizer`; skipping them keeps the base
    bit-identical, costs no base-sized addition, and works for bases holding non-float
    leaves (NNX RNG keys, integer counters).

    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> base, lora = lj.split(jax.random.key(0), {"w": jnp.ones((4, 4))},
    ...                       lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> state = {"base": base, "lora": lora}
    >>> tx = lj.optimizer(optax.sgd(0.1))
    >>> grads = jax.tree.map(jnp.ones_like, state)
    >>> updates, _ = tx.update(grads, tx.init(state), state)
    >>> new = lj.apply_updates(state, updates)
    >>> new["base"] is base, round(float(new["lora"]["w"].b[0, 0]), 6)
    (True, -0.1)
    """
    labels(state)
    return {"base": state["base"], "lora": optax.apply_updates(state["lora"], updates["lora"])}
