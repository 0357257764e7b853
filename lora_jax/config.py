"""Configuration: which weights get an adapter, of what rank, scaled how.

This module holds the single path matcher of the library: a parameter's path is
``jax.tree_util.keystr(path, simple=True, separator="/")`` and a rule matches it with
``re.fullmatch``. The first matching rule wins.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

__all__ = [
    "Axes",
    "Rule",
    "LoraConfig",
    "path_str",
    "scale_for",
    "SCALINGS",
    "INITS",
    "HEAD_NAMES",
]

ScalingRule = Union[str, Callable[[float, int], float]]

INITS = ("default", "gaussian", "pissa")

# Parameter names that conventionally hold a model's output head; `LoraConfig.all_linear`
# leaves weights under these names alone, as PEFT's "all-linear" leaves the output layer.
HEAD_NAMES = ("lm_head", "head", "classifier", "score", "logits", "output_head")


def _lora_scale(alpha: float, rank: int) -> float:
    return alpha / rank


def _rslora_scale(alpha: float, rank: int) -> float:
    return alpha / math.sqrt(rank)


SCALINGS: dict[str, Callable[[float, int], float]] = {
    "lora": _lora_scale,
    "rslora": _rslora_scale,
}


def path_str(path: Sequence[Any]) -> str:
    """The '/'-joined string of a pytree key path: the one form rules match against.

    >>> import jax
    >>> paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
    ...     {"params": {"layers": [{"kernel": 0}]}})[0]]
    >>> paths
    ['params/layers/0/kernel']

    NNX ``Variable`` leaves (``lin/kernel/value``) read as ``lin/kernel``.
    """
    path = tuple(path)
    # An NNX Variable's array sits under its ``.value`` attribute; dropping that last key
    # lets the same rules read ``lin/kernel`` for linen and NNX alike.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/")


def scale_for(scaling: ScalingRule, alpha: float, rank: int) -> float:
    """The adapter scale ``s`` for a scaling rule, alpha and rank.

    ``"lora"`` gives alpha/r (Hu et al. 2021), ``"rslora"`` gives alpha/sqrt(r)
    (Kalajdzievski 2023); a callable ``(alpha, rank) -> float`` gives what it returns.

    >>> scale_for("lora", 16.0, 8), scale_for("rslora", 16.0, 64)
    (2.0, 2.0)
    >>> scale_for(lambda alpha, r: alpha / r**0.25, 16.0, 16)
    8.0
    """
    if isinstance(scaling, str):
        try:
            fn = SCALINGS[scaling]
        except KeyError:
            raise ValueError(
                f"scaling={scaling!r} is not a known rule; use one of {sorted(SCALINGS)} "
                "or a callable (alpha, rank) -> float"
            ) from None
    elif callable(scaling):
        fn = scaling
    else:
        raise TypeError(
            f"scaling must be 'lora', 'rslora' or a callable (alpha, rank) -> float, "
            f"got {type(scaling).__name__}"
        )
    value = fn(alpha, rank)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"the scaling callable returned {value!r} for alpha={alpha}, rank={rank}; "
            "it must return a Python number"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"scaling gave the scale {value} for alpha={alpha}, rank={rank}; "
            "a scale must be finite and > 0"
        )
    return value


def scaling_name(scaling: ScalingRule) -> str:
    """A printable, hashable name of a scaling rule (stored in adapter metadata)."""
    if isinstance(scaling, str):
        return scaling
    return "custom:" + getattr(scaling, "__qualname__", type(scaling).__name__)


class Axes(NamedTuple):
    """Which axes of a weight the adapter reads from and writes to.

    ``in_axes`` are contracted with the layer's input (A spans them), ``out_axes`` are
    produced (B spans them), and ``stack_axes`` index independent copies of the weight
    (a scanned layer stack, per-head weights): each slice gets its own A and B. Negative
    numbers count from the end. Every axis of the weight must appear exactly once.

    >>> Axes(in_axes=(1,), out_axes=(0,))   # a kernel stored (out, in)
    Axes(in_axes=(1,), out_axes=(0,), stack_axes=())
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    def normalized(self, ndim: int, where: str = "") -> "Axes":
        """Non-negative, validated axes for a weight of ``ndim`` dimensions.

        >>> Axes(in_axes=(-2,), out_axes=(-1,), stack_axes=(0,)).normalized(3)
        Axes(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
        """

        def norm(group):
            if isinstance(group, int):
                group = (group,)
            out = []
            for ax in group:
                if not isinstance(ax, int) or isinstance(ax, bool):
                    raise TypeError(f"{where}axes entries must be ints, got {ax!r}")
                if not -ndim <= ax < ndim:
                    raise ValueError(
                        f"{where}axis {ax} is out of range for a weight with {ndim} dimensions"
                    )
                out.append(ax % ndim)
            return tuple(out)

        ins, outs, stack = norm(self.in_axes), norm(self.out_axes), norm(self.stack_axes)
        allx = ins + outs + stack
        if sorted(allx) != list(range(ndim)) or not ins or not outs:
            raise ValueError(
                f"{where}axes {self} must name every one of the weight's {ndim} axes exactly "
                "once, with at least one input and one output axis; e.g. "
                "Axes(in_axes=(0,), out_axes=(1,)) for a (in, out) kernel"
            )
        return Axes(ins, outs, stack)

    @classmethod
    def default(cls, ndim: int) -> "Axes":
        """Flax's convention: last axis out, the rest in (conv kernels: window and in).

        >>> Axes.default(4)   # a 2-D conv kernel (kh, kw, in, out)
        Axes(in_axes=(0, 1, 2), out_axes=(3,), stack_axes=())
        """
        return cls(tuple(range(ndim - 1)), (ndim - 1,), ())


def _group(g) -> tuple:
    return tuple(g) if isinstance(g, (tuple, list)) else (g,)


def as_axes(value) -> Axes | None:
    """An :class:`Axes` from any form a rule accepts: ``Axes``, a dict, an ``(in, out[, stack])`` tuple.

    A bare axis stands for a one-axis group; None stays None.

    >>> as_axes({"in": 1, "out": 0})
    Axes(in_axes=(1,), out_axes=(0,), stack_axes=())
    >>> as_axes((0, (1, 2)))
    Axes(in_axes=(0,), out_axes=(1, 2), stack_axes=())
    """
    if value is None:
        return None
    if isinstance(value, Axes):
        return Axes(*(_group(g) for g in value))
    if isinstance(value, dict):
        names = {"in": "in_axes", "out": "out_axes", "stack": "stack_axes"}
        unknown = set(value) - set(names) - set(names.values())
        if unknown:
            raise ValueError(f"axes dict has unknown keys {sorted(unknown)}; use 'in', 'out', 'stack'")
        return Axes(*(_group(value.get(k, value.get(v, ()))) for k, v in names.items()))
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return Axes(*(_group(g) for g in value))
    raise TypeError(
        f"axes must be lj.Axes(in_axes=..., out_axes=..., stack_axes=...), a dict with "
        f"'in'/'out'/'stack', or a tuple (in, out[, stack]); got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which weights to adapt and how: a regex over parameter paths plus hyperparameters.

    Args:
      pattern: regular expression matched with ``re.fullmatch`` against the '/'-joined
        key path of each parameter (for a linen variables dict, e.g.
        ``"params/Block_0/attn/q/kernel"``).
      rank: the adapter rank r (> 0, at most min(in, out) of every matched weight).
      alpha: the scale numerator (> 0); the scale is ``scaling(alpha, rank)``.
      axes: optional :class:`Axes` (or ``(in, out[, stack])`` tuple / dict) overriding
        both tracing and Flax's default convention.
      dropout: adapter-input dropout rate for this rule; ``None`` uses the config's.
      linear_only: match only weights used as matrix multiplications (see
        :meth:`LoraConfig.all_linear`).
      dora: DoRA for this rule's targets (True/False); ``None`` uses the config's.

    >>> Rule(r".*/(q|v)/kernel", rank=8, alpha=16.0)
    Rule(pattern='.*/(q|v)/kernel', rank=8, alpha=16.0, axes=None, dropout=None, linear_only=False, dora=None)
    """

    pattern: str
    rank: int = 8
    alpha: float = 16.0
    axes: Any = None
    dropout: float | None = None
    linear_only: bool = False
    dora: bool | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule pattern must be a str regex, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise TypeError(f"Rule {self.pattern!r}: rank must be an int, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if self.rank <= 0:
            raise ValueError(f"Rule {self.pattern!r}: rank must be > 0, got {self.rank}; try rank=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise TypeError(f"Rule {self.pattern!r}: alpha must be a number, got {self.alpha!r}")
        if not self.alpha > 0 or not math.isfinite(self.alpha):
            raise ValueError(
                f"Rule {self.pattern!r}: alpha must be a finite number > 0, got {self.alpha}; "
                "alpha = 2 * rank is a common choice"
            )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "axes", as_axes(self.axes))
        if self.dropout is not None:
            _check_dropout(self.dropout, f"Rule {self.pattern!r}: ")
        if self.dora is not None and not isinstance(self.dora, bool):
            raise TypeError(f"Rule {self.pattern!r}: dora must be True, False or None (the config's), "
                            f"got {self.dora!r}")

    def matches(self, path: str) -> bool:
        """Whether this rule's pattern fully matches a '/'-joined path.

        >>> Rule(r".*/q/kernel").matches("params/attn/q/kernel")
        True
        >>> Rule(r"q/kernel").matches("params/attn/q/kernel")   # fullmatch, not search
        False
        """
        return re.fullmatch(self.pattern, path) is not None


def _check_float_dtype(dtype) -> None:
    """A ``ValueError`` unless ``dtype`` names a floating-point dtype (the factors are trained)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"LoraConfig dtype={dtype!r}: A and B are trained, so they need a floating-point dtype; use "
            "dtype=None (the base's, at least float32), 'float32' or 'bfloat16'"
        )


def _check_dropout(rate, where=""):
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}dropout must be a number in [0, 1), got {rate!r}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get adapters, how they are scaled and initialized.

    Args:
      rules: :class:`Rule` objects, tried in order; the first whose pattern fully matches a
        parameter's path decides its rank, alpha and axes. Every rule must match at least
        one parameter.
      scaling: ``"lora"`` (alpha/r), ``"rslora"`` (alpha/sqrt(r)) or a callable
        ``(alpha, rank) -> float``.
      init: ``"default"`` (A kaiming-uniform, B zero; embeddings: A zero, B gaussian),
        ``"gaussian"`` (A ~ N(0, 1/r), B zero) or ``"pissa"`` (A, B from the top-r SVD of
        the weight; the base becomes the residual).
      dropout: adapter-input dropout rate for rules that do not set their own.
      exclude: regexes (fullmatch) of paths never adapted, even when a rule matches.
      dtype: dtype of A and B; ``None`` keeps the base's dtype but at least float32
        (PEFT keeps adapters in float32 for half-precision bases too).
      dora: DoRA (Liu et al. 2024) for rules that do not set their own: each target's
        adapter gains a trainable magnitude ``m`` over W's output axes, initialized to
        ``||W + s·A⊗B||`` over its input axes, and the adapted weight becomes
        ``m · (W + s·A⊗B) / ||W + s·A⊗B||`` (see :class:`LoraWeight`).
      dora_detach: treat DoRA's norm as a constant in the gradient (the paper's §4.3, and
        PEFT); False differentiates through it.

    >>> cfg = LoraConfig(rules=(Rule(r".*/(q|v)/kernel", rank=8, alpha=16.0),))
    >>> cfg.scaling, cfg.init
    ('lora', 'default')
    """

    rules: tuple[Rule, ...]
    scaling: ScalingRule = "lora"
    init: str = "default"
    dropout: float = 0.0
    exclude: tuple[str, ...] = ()
    dtype: Any = None
    dora: bool = False
    dora_detach: bool = True

    def __post_init__(self):
        rules = self.rules
        if isinstance(rules, Rule):
            rules = (rules,)
        rules = tuple(rules)
        if not rules:
            raise ValueError("LoraConfig needs at least one Rule, e.g. rules=(lj.Rule(r'.*/kernel'),)")
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"LoraConfig rules must be lj.Rule objects, got {r!r}")
        object.__setattr__(self, "rules", rules)
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        for pat in exclude:
            try:
                re.compile(pat)
            except (re.error, TypeError) as e:
                raise ValueError(f"exclude pattern {pat!r} is not a valid regex: {e}") from None
        object.__setattr__(self, "exclude", exclude)
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not one of {INITS}")
        _check_dropout(self.dropout, "LoraConfig ")
        if self.dtype is not None:
            _check_float_dtype(self.dtype)
        for name in ("dora", "dora_detach"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoraConfig {name} must be True or False, got {getattr(self, name)!r}")
        for r in rules:  # validates the scaling rule early, with every rule's alpha and rank
            scale_for(self.scaling, r.alpha, r.rank)

    @classmethod
    def all_linear(
        cls,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        exclude: Sequence[str] = (),
        **kwargs,
    ) -> "LoraConfig":
        """Adapt every matrix-multiplication weight except the output head.

        With ``split(..., apply_fn=...)`` a weight counts as linear when the traced function
        consumes it with a ``dot_general`` (Dense, DenseGeneral, Einsum, hand-written
        ``x @ W``), and the head is found from the trace alone, whatever the weights are
        called. Without tracing, linear weights are the float leaves named ``kernel`` with
        at least two dimensions, and a path with a head name in it (``lm_head``, ``head``,
        ``classifier``, ``score``, ``logits``, ``output_head``) is left out. ``exclude``
        adds path regexes to leave alone.

        The traced head. A weight's product is an output when its result reaches a
        returned value through operations other than products with weights and sums with
        other activations (bias adds, activations, masks, casts, reshapes, normalization,
        softmax and a loss on the logits keep it an output; a later layer or a residual sum
        ends it). Among the output products that feed no other weight's product, the head
        is each one whose output size is the vocabulary (the rows of the largest embedding
        table the function looks up with indices from its arguments: an LM's output
        embedding); failing that, the only one, if it
        changes the width (a classifier or logits layer); failing that, none. So hidden
        layers inside a head module (RoBERTa's ``lm_head/dense``, BERT's
        ``cls/predictions/transform/dense``) are adapted, and so are output layers side by
        side (CLIP's ``text_projection`` and ``visual_projection``) and a pooler that keeps
        the width, as PEFT's ``all-linear`` adapts them; a model that ends in a residual
        stream (an encoder without a head) has no head. Tracing only one tower of a
        two-tower model makes its projection the only output layer, hence the head: trace
        the function that uses both, or give explicit rules.

        Routers are left out too: a weight whose product's result reaches ``top_k``
        (or ``approx_max_k``), ``argmax``/``argmin`` or a sort (a mixture-of-experts gate, the ``(d, E)`` weight
        that picks each token's experts) is not adapted; the experts are.

        >>> cfg = LoraConfig.all_linear(rank=4, alpha=8.0, exclude=(r".*/embed/.*",))
        >>> cfg.rules[0].linear_only, cfg.exclude
        (True, ('.*/embed/.*',))
        """
        rule = Rule(r".*", rank=rank, alpha=alpha, linear_only=True)
        return cls(rules=(rule,), exclude=tuple(exclude), **kwargs)

    def scale(self, rule: Rule) -> float:
        """The scale ``s`` of adapters made by ``rule`` under this config's scaling rule.

        >>> LoraConfig(rules=(Rule("w", rank=64, alpha=16.0),), scaling="rslora").scale(Rule("w", rank=64, alpha=16.0))
        2.0
        """
        return scale_for(self.scaling, rule.alpha, rule.rank)

    def dora_for(self, rule: Rule) -> bool:
        """Whether ``rule``'s targets use DoRA: the rule's ``dora``, else the config's.

        >>> cfg = LoraConfig(rules=(Rule("q", dora=False), Rule("v")), dora=True)
        >>> cfg.dora_for(cfg.rules[0]), cfg.dora_for(cfg.rules[1])
        (False, True)
        """
        return self.dora if rule.dora is None else rule.dora

    def excluded(self, path: str) -> bool:
        """Whether an ``exclude`` pattern fully matches ``path``.

        >>> LoraConfig(rules=(Rule(".*"),), exclude=(r".*/head/.*",)).excluded("params/head/kernel")
        True
        """
        return any(re.fullmatch(p, path) for p in self.exclude)

    def rule_for(self, path: str, linear: bool = True) -> Rule | None:
        """The first rule whose pattern fully matches ``path``, or None (or if excluded).

        ``linear`` says whether the weight is a matrix-multiplication weight; rules with
        ``linear_only=True`` pass over weights that are not.

        >>> cfg = LoraConfig(rules=(Rule(".*/q/kernel", rank=4), Rule(".*/kernel", rank=2)))
        >>> cfg.rule_for("params/q/kernel").rank, cfg.rule_for("params/o/kernel").rank
        (4, 2)
        """
        if self.excluded(path):
            return None
        for rule in self.rules:
            if rule.matches(path) and (linear or not rule.linear_only):
                return rule
        return None
