"""Flax NNX helpers: give an NNX module the same functional face as a linen model.

``split(model, config, key)`` is ``nnx.split`` followed by :func:`lora_jax.split` on the
module's state; ``call`` runs the module with adapters applied. The state is the full
``nnx.State`` (parameters, batch statistics, RNG state); rules see NNX paths such as
``layers/0/attn/q/kernel`` (the Variable's trailing ``value`` is dropped).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from .config import LoraConfig
from .split import split as _split
from .tree import merge as _merge
from .transform import wrap

__all__ = ["split", "call", "apply_fn", "merge"]


def apply_fn(graphdef: Any) -> Callable:
    """``f(state, *args, **kwargs)`` calling the module rebuilt from ``graphdef`` and ``state``.

    Use it with :func:`lora_jax.wrap` or ``split(..., apply_fn=...)``. Updates the module
    makes to its own state during the call (BatchNorm statistics in training mode, RNG
    counters) are not returned; run such a module with ``nnx.merge`` yourself.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> graphdef, state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> apply_fn(graphdef)(state, jnp.ones((1, 2))).shape
    (1, 3)
    """

    def f(state, *args, **kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)

    return f


def split(
    model: nnx.Module,
    config: LoraConfig,
    key: jax.Array,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
):
    """``(graphdef, base_state, lora)`` for an NNX module.

    With ``args`` (example inputs, concrete or ``jax.ShapeDtypeStruct``), the module's call
    is traced to infer every target's axes, as ``lora_jax.split(..., apply_fn=...)`` does.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("kernel", rank=2),))
    >>> graphdef, base, lora = lj.nnx.split(model, cfg, jax.random.key(1), args=(jnp.ones((1, 8)),))
    >>> lora["kernel"].get_value().a.shape
    (2, 8)
    """
    graphdef, state = nnx.split(model)
    fn = apply_fn(graphdef) if args or kwargs else None
    base, lora = _split(key, state, config, apply_fn=fn, args=args, kwargs=kwargs)
    return graphdef, base, lora


def call(
    graphdef: Any,
    base: Any,
    lora: Any,
    *args,
    lora_rng: jax.Array | None = None,
    strategy: str = "factored",
    **kwargs,
):
    """Run the module with adapters: ``lj.wrap(apply_fn(graphdef), strategy)(base, lora, *args)``.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from flax import nnx
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("kernel", rank=2),))
    >>> graphdef, base, lora = lj.nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), cfg, jax.random.key(1))
    >>> lj.nnx.call(graphdef, base, lora, jnp.ones((3, 8))).shape
    (3, 4)
    """
    return _wrapped(graphdef, strategy)(base, lora, *args, lora_rng=lora_rng, **kwargs)


def _wrapped(graphdef: Any, strategy: str) -> Callable:
    """One wrapped function per module structure, so its traces are reused across calls.

    A graphdef that holds an unhashable static attribute (a plain, non-frozen dataclass
    config, as some model libraries keep) is cached by identity instead: the same graphdef
    object reuses its traces, an equal copy traces again.
    """
    try:
        hash(graphdef)
    except TypeError:
        key = (id(graphdef), strategy)
        hit = _BY_ID.get(key)
        if hit is None or hit[0] is not graphdef:
            if len(_BY_ID) >= _CACHE_SIZE:
                _BY_ID.pop(next(iter(_BY_ID)))  # the oldest
            hit = _BY_ID[key] = (graphdef, wrap(apply_fn(graphdef), strategy))  # kept alive: its id stays its own
        return hit[1]
    return _by_value(graphdef, strategy)


_CACHE_SIZE = 64
_BY_ID: dict[tuple[int, str], tuple[Any, Callable]] = {}


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _by_value(graphdef: Any, strategy: str) -> Callable:
    return wrap(apply_fn(graphdef), strategy)


def merge(graphdef: Any, base: Any, lora: Any) -> nnx.Module:
    """A plain NNX module with the adapters folded into its weights (for serving/export).

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from flax import nnx
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("kernel", rank=2),))
    >>> graphdef, base, lora = lj.nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), cfg, jax.random.key(1))
    >>> type(lj.nnx.merge(graphdef, base, lora)).__name__
    'Linear'
    """
    return nnx.merge(graphdef, _merge(base, lora))
