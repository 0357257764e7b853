"""Run configuration for ``lora-jax finetune`` and ``lora-jax sweep``: YAML into frozen dataclasses.

A config file is YAML with up to seven sections (``model``, ``pretrain``, ``data``, ``lora``,
``train``, ``sweep``, ``output``); every key is optional and defaults to the values below,
which are also ``configs/default.yaml``. ``--set section.key=value`` overrides one key, the
value read as YAML (``--set lora.rank=16``, ``--set lora.targets=[all_linear]``). Unknown
sections or keys, and values of the wrong type or range, raise a ``ValueError`` that names
the key, what it got and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from typing import Any, Mapping, Sequence

__all__ = [
    "ModelConfig",
    "PretrainConfig",
    "DataConfig",
    "AdapterConfig",
    "TrainConfig",
    "SweepConfig",
    "OutputConfig",
    "RunConfig",
    "load",
    "from_dict",
    "to_dict",
    "parse_overrides",
    "CORPORA",
    "METHODS",
]

#: Text corpora built in (``files`` reads ``data.paths``).
CORPORA = ("pydoc", "stdlib", "files")

#: Adapter methods of ``lora.method``: plain LoRA, or AdaLoRA (ranks allocated during training).
METHODS = ("lora", "adalora")


# seeds become int64 PRNG seeds (and seed + 1 for the dropout keys)
_SEED_MAX = 2**63 - 2


def _check(ok: bool, key: str, value: Any, wants: str):
    if not ok:
        raise ValueError(f"config key {key}: got {value!r}; expected {wants}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The embedded default model: a byte-level causal transformer (pre-LN, tied embedding)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    context: int = 128

    def validate(self, prefix: str = "model"):
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "context"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", getattr(self, name), "a positive int")
        _check(
            self.d_model % self.n_heads == 0, f"{prefix}.n_heads", self.n_heads,
            f"a divisor of model.d_model={self.d_model}",
        )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """How the default model is pretrained (once; the result is cached, keyed by these values)."""

    corpus: str = "pydoc"
    steps: int = 800
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def validate(self, prefix: str = "pretrain"):
        _check(self.corpus in CORPORA, f"{prefix}.corpus", self.corpus, f"one of {CORPORA}")
        _check(self.steps > 0, f"{prefix}.steps", self.steps, "a positive int")
        _check(self.batch_size > 0, f"{prefix}.batch_size", self.batch_size, "a positive int")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a positive float")
        _check(self.seed >= 0, f"{prefix}.seed", self.seed, "an int >= 0")
        _check(self.seed <= _SEED_MAX, f"{prefix}.seed", self.seed, f"an int <= {_SEED_MAX} (seeds are int64)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The domain to adapt to (``corpus``) and the pretraining domain measured for forgetting."""

    corpus: str = "stdlib"
    paths: tuple[str, ...] = ()
    max_bytes: int = 2_000_000
    heldout: float = 0.1
    source: str = "pydoc"

    def validate(self, prefix: str = "data"):
        _check(self.corpus in CORPORA, f"{prefix}.corpus", self.corpus, f"one of {CORPORA}")
        _check(self.source in CORPORA, f"{prefix}.source", self.source, f"one of {CORPORA}")
        _check(
            not (self.corpus == "files" and not self.paths), f"{prefix}.paths", self.paths,
            "at least one file or glob pattern when data.corpus is 'files' "
            "(e.g. --set 'data.paths=[\"notes/*.txt\"]')",
        )
        _check(self.max_bytes > 0, f"{prefix}.max_bytes", self.max_bytes, "a positive int")
        _check(0 < self.heldout < 1, f"{prefix}.heldout", self.heldout, "a fraction in (0, 1)")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which weights get adapters and how (see :class:`lora_jax.LoraConfig`).

    ``targets`` are path regexes (``re.fullmatch`` on '/'-joined paths such as
    ``params/block_0/query/kernel``), or the single entry ``all_linear``.

    ``method`` is ``lora`` (plain LoRA) or ``adalora`` (:mod:`lora_jax.adalora`: adapters
    in SVD form whose ranks are allocated during training). With ``adalora``, ``rank`` is
    each target's initial rank and the budget keys apply (they are ignored with ``lora``):

    - ``target_rank``: the average rank kept per target at the end (PEFT's ``target_r``),
      at most ``rank``; the run keeps ``target_rank`` x (number of targets) triplets in all.
    - ``t_init``: warm-up steps before any rank is cut; ``t_final`` (>= 1): steps at the end
      with the final ranks fixed; ``t_init + t_final`` must be below ``train.steps``.
    - ``delta_t``: the ranks are recomputed every ``delta_t`` steps while the budget shrinks.
    - ``beta1``, ``beta2``: the smoothing factors of the importance scores, in [0, 1).
    - ``orth_reg_weight``: the weight of the orthogonality regularizer added to the loss.

    AdaLoRA starts from its own init, so it needs ``init: default``. The written adapter
    is a plain LoRA adapter with each target's kept rank.

    ``dora`` (default false) makes every adapter DoRA (:class:`lora_jax.LoraConfig`'s
    ``dora``, Liu et al. 2024): each target also trains a magnitude ``m`` over W's output
    axes, and the adapted weight is ``m · (W + s·A⊗B) / ||W + s·A⊗B||``. It works with
    every ``init`` and ``quantize`` but not with ``method: adalora``.

    >>> AdapterConfig(dora=True).lora_config().dora
    True
    >>> AdapterConfig(method="adalora", dora=True).validate()
    Traceback (most recent call last):
    ...
    ValueError: config key lora.dora: got True; expected false with lora.method=adalora (AdaLoRA's adapters are SVD triplets without a DoRA magnitude); set lora.dora=false or lora.method=lora

    >>> a = AdapterConfig(method="adalora", rank=8, target_rank=2)
    >>> a.validate()
    >>> AdapterConfig(method="adalora", init="pissa").validate()
    Traceback (most recent call last):
    ...
    ValueError: config key lora.init: got 'pissa'; expected 'default' with lora.method=adalora (AdaLoRA starts from its own init: lambda = 0, P and Q gaussian); set lora.init=default or lora.method=lora
    """

    targets: tuple[str, ...] = ("all_linear",)
    rank: int = 8
    alpha: float = 16.0
    scaling: str = "lora"
    init: str = "default"
    dropout: float = 0.0
    quantize: str = "none"
    method: str = "lora"
    target_rank: int = 4
    t_init: int = 30
    t_final: int = 60
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    dora: bool = False

    def validate(self, prefix: str = "lora"):
        from ..config import INITS, SCALINGS
        from ..quant import QTYPES

        _check(len(self.targets) > 0, f"{prefix}.targets", self.targets, "at least one regex or 'all_linear'")
        _check(
            "all_linear" not in self.targets or len(self.targets) == 1, f"{prefix}.targets",
            self.targets, "either [all_linear] alone or a list of path regexes",
        )
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"config key {prefix}.targets: {t!r} is not a valid regex ({e})") from None
        _check(self.rank > 0, f"{prefix}.rank", self.rank, "a positive int")
        _check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "a positive float")
        _check(self.scaling in SCALINGS, f"{prefix}.scaling", self.scaling, f"one of {tuple(SCALINGS)}")
        _check(self.init in INITS, f"{prefix}.init", self.init, f"one of {INITS}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "a rate in [0, 1)")
        _check(self.quantize in ("none", *QTYPES), f"{prefix}.quantize", self.quantize, f"one of {('none', *QTYPES)}")
        _check(self.quantize == "none" or self.init != "pissa", f"{prefix}.init", self.init,
               "'default' or 'gaussian' with a quantized base (pissa needs the float weights)")
        _check(self.method in METHODS, f"{prefix}.method", self.method, f"one of {METHODS}")
        for name in ("target_rank", "delta_t"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", getattr(self, name), "a positive int")
        for name in ("t_init", "t_final"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "an int >= 0")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"{prefix}.{name}", getattr(self, name),
                   "a smoothing factor in [0, 1) (e.g. 0.85)")
        _check(self.orth_reg_weight >= 0, f"{prefix}.orth_reg_weight", self.orth_reg_weight,
               "a float >= 0 (0 turns the orthogonality regularizer off; PEFT uses 0.5)")
        _check(isinstance(self.dora, bool), f"{prefix}.dora", self.dora, "true or false")
        if self.method == "adalora":
            _check(not self.dora, f"{prefix}.dora", self.dora,
                   f"false with {prefix}.method=adalora (AdaLoRA's adapters are SVD triplets without a DoRA "
                   f"magnitude); set {prefix}.dora=false or {prefix}.method=lora")
            _check(self.init == "default", f"{prefix}.init", self.init,
                   f"'default' with {prefix}.method=adalora (AdaLoRA starts from its own init: lambda = 0, "
                   f"P and Q gaussian); set {prefix}.init=default or {prefix}.method=lora")
            _check(self.t_final >= 1, f"{prefix}.t_final", self.t_final,
                   f"an int >= 1 with {prefix}.method=adalora (the final ranks are fixed at step "
                   "train.steps - t_final; with 0 they never are)")
            _check(self.target_rank <= self.rank, f"{prefix}.target_rank", self.target_rank,
                   f"at most {prefix}.rank={self.rank} (the initial rank, which AdaLoRA cuts down to "
                   f"target_rank on average); lower {prefix}.target_rank or raise {prefix}.rank")

    def lora_config(self, *, rank: int | None = None, alpha: float | None = None, scaling: str | None = None,
                    dora: bool | None = None):
        """The :class:`lora_jax.LoraConfig` these settings describe (optionally with another
        rank, alpha, scaling or DoRA setting).

        >>> c = AdapterConfig(rank=4, alpha=8.0).lora_config(rank=2, dora=True)
        >>> c.rules[0].rank, c.rules[0].alpha, c.dora
        (2, 8.0, True)
        """
        from ..config import LoraConfig, Rule

        rank = self.rank if rank is None else rank
        alpha = self.alpha if alpha is None else alpha
        kw = dict(scaling=self.scaling if scaling is None else scaling, init=self.init, dropout=self.dropout,
                  dora=self.dora if dora is None else dora)
        if self.targets == ("all_linear",):
            return LoraConfig.all_linear(rank=rank, alpha=alpha, **kw)
        return LoraConfig(rules=tuple(Rule(t, rank=rank, alpha=alpha) for t in self.targets), **kw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The adaptation run (LoRA, and the full fine-tune baseline with ``--compare-full``).

    The learning rate warms up linearly over ``warmup`` steps (at most half of the run),
    then decays to a tenth along a cosine.
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    full_lr: float = 3e-4
    warmup: int = 20
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2
    seed: int = 0
    progress: bool = True

    def validate(self, prefix: str = "train"):
        for name in ("steps", "batch_size", "eval_batches", "save_every", "keep"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", getattr(self, name), "a positive int")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a positive float")
        _check(self.seed >= 0, f"{prefix}.seed", self.seed, "an int >= 0")
        _check(self.seed <= _SEED_MAX, f"{prefix}.seed", self.seed, f"an int <= {_SEED_MAX} (seeds are int64)")
        _check(self.full_lr > 0, f"{prefix}.full_lr", self.full_lr, "a positive float")
        _check(self.warmup >= 0, f"{prefix}.warmup", self.warmup, "an int >= 0 (at most half of the steps are used)")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """``lora-jax sweep``: ranks at alpha = r (and rsLoRA at fixed alpha, and DoRA), then alpha/r at the best rank.

    ``dora`` (default true) adds the DoRA series: at each of ``ranks`` the alpha = r run
    is trained again with DoRA adapters (``stage: dora`` in the results); set it to false
    for a quicker sweep of plain LoRA and rsLoRA alone.

    >>> SweepConfig().dora, SweepConfig(dora=False).dora
    (True, False)
    """

    ranks: tuple[int, ...] = (4, 8, 16, 32)
    alpha_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    rslora_alpha: float = 8.0
    steps: int = 150
    norm_every: int = 10
    runaway: float = 1.0
    dora: bool = True

    def validate(self, prefix: str = "sweep"):
        _check(len(self.ranks) > 0 and all(r > 0 for r in self.ranks), f"{prefix}.ranks", self.ranks, "a list of positive ints")
        _check(
            len(self.alpha_ratios) > 0 and all(a > 0 for a in self.alpha_ratios), f"{prefix}.alpha_ratios",
            self.alpha_ratios, "a list of positive floats",
        )
        _check(self.rslora_alpha > 0, f"{prefix}.rslora_alpha", self.rslora_alpha, "a positive float")
        _check(self.steps > 0, f"{prefix}.steps", self.steps, "a positive int")
        _check(self.norm_every > 0, f"{prefix}.norm_every", self.norm_every, "a positive int")
        _check(self.runaway > 0, f"{prefix}.runaway", self.runaway, "a positive float")
        _check(isinstance(self.dora, bool), f"{prefix}.dora", self.dora, "true or false")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where results go; ``cache_dir`` (default: the user cache) holds the pretrained model."""

    dir: str = "runs/default"
    cache_dir: str | None = None

    def validate(self, prefix: str = "output"):
        _check(bool(self.dir), f"{prefix}.dir", self.dir, "a directory path")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: every section of the YAML file.

    >>> cfg = from_dict({"lora": {"rank": 4}}, overrides=["train.steps=10"])
    >>> cfg.lora.rank, cfg.train.steps, cfg.model.d_model
    (4, 10, 128)
    >>> from_dict({"lora": {"rnak": 4}})
    Traceback (most recent call last):
    ...
    ValueError: config key lora.rnak is unknown (did you mean lora.rank?); lora accepts: targets, rank, alpha, scaling, init, dropout, quantize, method, target_rank, t_init, t_final, delta_t, beta1, beta2, orth_reg_weight, dora
    """

    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    data: DataConfig = DataConfig()
    lora: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    output: OutputConfig = OutputConfig()

    def validate(self):
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.paths and "files" not in (self.data.corpus, self.data.source, self.pretrain.corpus):
            raise ValueError(
                f"config key data.paths: got {list(self.data.paths)!r}, but no corpus reads them; set "
                "data.corpus (or data.source and pretrain.corpus) to files, or drop data.paths"
            )
        a, steps = self.lora, self.train.steps
        if a.method == "adalora" and a.t_init + a.t_final >= steps:
            raise ValueError(
                f"config key lora.t_final: got lora.t_init={a.t_init} + lora.t_final={a.t_final} = "
                f"{a.t_init + a.t_final} with train.steps={steps}; AdaLoRA cuts the ranks between step t_init "
                f"and step train.steps - t_final, so it needs t_init + t_final < train.steps: lower them "
                f"(e.g. --set lora.t_init={steps // 10} --set lora.t_final={steps // 5}) or raise train.steps"
            )


def _unknown(key: str, choices: Sequence[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?)" if close else ""
    return ValueError(f"config key {key} is unknown{hint}; {where} accepts: {', '.join(choices)}")


def _coerce(value: Any, hint: Any, key: str):
    """``value`` as the type ``hint`` (int, float, bool, str, str | None, tuple[T, ...])."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key}: got {value!r}; expected a list")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key}: got {value!r}; expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key {key}: got {value!r}; expected an int")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ValueError(f"config key {key}: got {value!r}; expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key}: got {value!r}; expected a string")
    raise TypeError(f"config key {key}: unsupported field type {hint!r}")  # pragma: no cover


def _section(cls, data: Any, name: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {name}: got {data!r}; expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(f"{name}.{key}", names, name)
        values[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**values)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", ...]`` -> ``{"a": {"b": 1}}``, each value read as YAML.

    >>> parse_overrides(["lora.rank=16", "lora.targets=[.*/query/kernel]", "output.dir=runs/x"])
    {'lora': {'rank': 16, 'targets': ['.*/query/kernel']}, 'output': {'dir': 'runs/x'}}
    """
    import yaml

    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(
                f"--set {item!r}: expected section.key=value, e.g. --set lora.rank=16 or --set train.steps=50"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def from_dict(data: Mapping | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a mapping (a parsed YAML file) plus ``--set`` overrides.

    >>> from_dict({}, overrides=["lora.scaling=rslora"]).lora.scaling
    'rslora'
    >>> from_dict({"train": {"steps": 0}})
    Traceback (most recent call last):
    ...
    ValueError: config key train.steps: got 0; expected a positive int
    """
    data = dict(data or {})
    for section, values in parse_overrides(overrides).items():
        current = data.get(section) or {}
        if not isinstance(current, Mapping):
            raise ValueError(f"config section {section}: got {current!r}; expected a mapping")
        data[section] = {**current, **values}
    hints = typing.get_type_hints(RunConfig)
    names = [f.name for f in dataclasses.fields(RunConfig)]
    sections = {}
    for name, values in data.items():
        if name not in names:
            raise _unknown(str(name), names, "a config file")
        sections[name] = _section(hints[name], values, name)
    cfg = RunConfig(**sections)
    cfg.validate()
    return cfg


def load(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file (None: all defaults) and apply ``--set`` overrides.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.yaml")
    >>> with open(path, "w") as f:
    ...     _ = f.write("lora:\\n  rank: 4\\ntrain:\\n  steps: 20\\n")
    >>> cfg = load(path, ["train.lr=1e-3"])
    >>> cfg.lora.rank, cfg.train.steps, cfg.train.lr
    (4, 20, 0.001)
    """
    import yaml

    if path is None:
        return from_dict({}, overrides)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return from_dict(data, overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain YAML-ready data (tuples become lists).

    >>> to_dict(from_dict({}))["lora"]["targets"]
    ['all_linear']
    """

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
        for f in dataclasses.fields(cfg)
    }
