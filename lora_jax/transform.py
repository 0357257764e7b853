"""``wrap``: run any ``f(params, *args)`` with LoRA adapters applied."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from .split import merge
from .weight import is_lora

__all__ = ["wrap", "STRATEGIES"]

STRATEGIES = ("factored", "merge")


def wrap(f: Callable, strategy: str = "factored") -> Callable:
    """Turn ``f(params, *args, **kwargs)`` into ``g(base, lora, *args, lora_rng=None, **kwargs)``.

    ``g`` computes what ``f`` computes with every targeted weight W replaced by
    ``W + s·A⊗B``. ``f`` is any function whose first argument is the parameter tree:
    ``model.apply`` (linen), ``lambda state, x: nnx.merge(graphdef, state)(x)`` (NNX), a
    Hugging Face Flax model's ``__call__`` with ``params=``, or hand-written JAX.

    Strategies:
      ``"merge"``: materialize ``W + s·A⊗B`` (float32 accumulation, base dtype) for every
        target, then call ``f``. Simple and obviously correct: the reference the factored
        path is tested against.
      ``"factored"`` (default): the adapter applied as ``x·W + s·((x·A)·B)`` without forming
        A⊗B. In this release it is computed through the merge reference, with identical
        results; only its speed and memory will change.

    ``lora_rng``: a PRNG key enabling adapter-input dropout for adapters whose dropout
    rate is > 0. Dropout acts on the adapter's input only, which no merged weight can
    express, so it needs the factored transform; until that lands, passing a key while an
    adapter has dropout > 0 raises instead of silently skipping the dropout.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.eye(4)}
    >>> base, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("w", rank=2),)))
    >>> lora = {"w": lora["w"].replace(b=jnp.ones((2, 4)))}
    >>> y = lj.wrap(f)(base, lora, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(y, jnp.ones((1, 4)) @ lj.merge(base, lora)["w"]))
    True
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {STRATEGIES}")
    if not callable(f):
        raise TypeError(f"wrap expects a callable f(params, *args), got {type(f).__name__}")

    @functools.wraps(f)
    def wrapped(base: Any, lora: Any, *args, lora_rng: jax.Array | None = None, **kwargs):
        if lora_rng is not None:
            with_dropout = [
                w.rule for w in jax.tree.leaves(lora, is_leaf=is_lora) if is_lora(w) and w.dropout > 0
            ]
            if with_dropout:
                raise NotImplementedError(
                    f"adapter-input dropout (rules {sorted(set(with_dropout))}) needs the "
                    "factored transform, which this release does not have yet; set dropout=0.0 "
                    "or pass lora_rng=None"
                )
        return f(merge(base, lora), *args, **kwargs)

    return wrapped
