"""Optimizer over the combined ``{"base": ..., "lora": ...}`` tree with the base frozen."""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["optimizer", "labels"]


def labels(tree: Any) -> dict:
    """The label tree for ``optax.multi_transform``: ``"base"``/``"lora"`` per leaf.

    >>> import jax.numpy as jnp
    >>> labels({"base": {"w": jnp.ones(2)}, "lora": {"w": None}})
    {'base': {'w': 'base'}, 'lora': {'w': None}}
    """
    if not isinstance(tree, dict) or set(tree) != {"base", "lora"}:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"lj.optimizer expects the tree {{'base': base, 'lora': lora}}, got {keys}; "
            "build it as {'base': base, 'lora': lora} from lj.split's result"
        )
    return {
        "base": jax.tree.map(lambda _: "base", tree["base"]),
        "lora": jax.tree.map(lambda _: "lora", tree["lora"]),
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
    """
    return optax.multi_transform({"lora": tx, "base": optax.set_to_zero()}, labels)
