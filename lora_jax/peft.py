"""PEFT adapter import/export: ``save`` and ``load`` in Hugging Face PEFT's LoRA format.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``r``, ``lora_alpha``,
``use_rslora``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ...) and
``adapter_model.safetensors`` whose keys name torch modules::

    base_model.model.<torch module path>.lora_A.weight        (r, in)
    base_model.model.<torch module path>.lora_B.weight        (out, r)
    base_model.model.<torch module path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<torch module path>.lora_embedding_B     (embedding_dim, r)
    base_model.model.<torch module path>.lora_magnitude_vector  (out,)   DoRA only

whatever layout the Flax model stores the weight in. With an adapter's ``a`` laid out
(*stack, r, *in) and ``b`` (*stack, r, *out), ``lora_A`` is ``a`` with its input axes
flattened and ``lora_B`` is ``b`` flattened and transposed; the scale is ``lora_alpha / r``
(``use_rslora``: ``lora_alpha / sqrt(r)``), so ``W + s·A⊗B`` means the same on both sides.
Files are read and written with safetensors' numpy API: torch is not needed.

DoRA (``use_dora: true``): every module also has ``lora_magnitude_vector``, the magnitude
``m`` of ``m · V / ||V||`` with ``V = W + s·A⊗B`` and the norm over the input features per
output (embeddings: over ``num_embeddings``, per ``embedding_dim`` entry). It is the
adapter's ``m`` (shape ``w.m_shape``: the stack axes, then the output axes) with its output
axes flattened. PEFT writes the key without a ``.weight`` suffix (older files may carry
one; both are read). ``use_dora`` is one setting for the whole adapter, so a file holds
either DoRA adapters only or plain LoRA adapters only.

A :class:`NameMap` turns Flax parameter paths (``lj.path_str`` form,
``transformer/h/0/attn/c_attn/kernel``) into torch module paths
(``transformer.h.0.attn.c_attn``). :data:`GPT2`, :data:`BERT` (also RoBERTa) and
:data:`LLAMA` (also Mistral) fit Hugging Face's Flax and torch classes of those models,
:data:`HF` any Hugging Face Flax model whose module paths equal the torch ones.

Not covered: LoRA biases, ``modules_to_save``, conv adapters (DoRA ones included), a file
mixing DoRA and plain LoRA modules (PEFT cannot express one), stacking several DoRA files
in one :func:`load`, and tied embeddings' asymmetry (PEFT adapts a tied input embedding for
the lookup only, while ``lj.wrap`` and ``lj.merge`` adapt the weight wherever the Flax
model uses it, output head included).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import string
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from .config import Axes, LoraConfig, Rule, as_axes, path_str, scale_for
from .quant import is_quantized
from .split import split
from .stacked import stack
from .tree import _check_lora_arg, fmt_paths
from .tree import targets as _targets
from .weight import LoraWeight

__all__ = ["NameMap", "save", "load", "HF", "GPT2", "BERT", "LLAMA", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# `base_model.model.<module>.<factor>[.weight]`; PEFT writes no adapter name into saved keys.
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?P<suffix>\.weight)?"
)
# DoRA's magnitude: PEFT >= 0.12 writes it without '.weight' (and appends it on load)
MAGNITUDE = "lora_magnitude_vector"
_FACTORS = {"linear": ("lora_A", "lora_B", ".weight"), "embed": ("lora_embedding_A", "lora_embedding_B", "")}


@dataclasses.dataclass(frozen=True)
class NameMap:
    """How Flax parameter paths map to torch module paths, for PEFT files.

    Args:
      rules: ``(flax_regex, torch_template)`` pairs tried in order: the first regex that
        fully matches a parameter's '/'-joined path (``re.fullmatch``) gives its torch
        module path ``match.expand(torch_template)``, with any '/' turned into '.'.
        Or a callable ``flax_path -> torch_path | None``. A path no rule matches has no
        torch name (it can be neither saved nor loaded).
        For a weight with stack axes (a scanned layer stack), the torch path holds one
        ``{}`` field per stack axis, filled with the index:
        ``(r"layers/attn/q/kernel", "model.layers.{}.self_attn.q_proj")``.
      axes: ``(flax_regex, axes)`` pairs (first full match wins) giving how the Flax model
        uses a weight, for :func:`load` without ``apply_fn``: an :class:`lj.Axes` or a
        ``(in, out[, stack])`` tuple. Unlisted weights get Flax's convention (last axis
        out, the rest in); ``load(..., apply_fn=)`` traces the model instead.
      config: extra ``adapter_config.json`` fields :func:`save` writes (GPT-2's
        ``fan_in_fan_out``).

    >>> m = NameMap(rules=((r"params/blocks_(\\d+)/(q|v)/kernel", r"layers.\\1.attn.\\2_proj"),))
    >>> m.torch_name("params/blocks_3/q/kernel"), m.torch_name("params/blocks_3/q/bias")
    ('layers.3.attn.q_proj', None)
    """

    rules: Any
    axes: tuple = ()
    config: Any = ()

    def __post_init__(self):
        if not callable(self.rules):
            rules = tuple(_regex_pair(item, str, "NameMap rule", _RULES_ERROR) for item in self.rules)
            object.__setattr__(self, "rules", rules)
        pairs = (_regex_pair(item, object, "NameMap axes", _AXES_ERROR) for item in self.axes)
        object.__setattr__(self, "axes", tuple((pattern, as_axes(axes)) for pattern, axes in pairs))
        config = dict(self.config)
        reserved = set(config) & _WRITTEN
        if reserved:
            raise ValueError(f"NameMap config may not set {sorted(reserved)}: save() derives them from the adapters")
        object.__setattr__(self, "config", tuple(sorted(config.items())))

    def torch_name(self, path: str) -> str | None:
        """The torch module path of a Flax parameter path, or None when it has none.

        >>> from lora_jax import peft
        >>> peft.GPT2.torch_name("transformer/h/0/attn/c_attn/kernel")
        'transformer.h.0.attn.c_attn'
        """
        if callable(self.rules):
            name = self.rules(path)
            if name is not None and not isinstance(name, str):
                raise TypeError(f"the name map callable returned {name!r} for {path!r}; return a str or None")
        else:
            hit = _first_match(self.rules, path)
            if hit is None:
                return None
            try:
                name = hit[0].expand(hit[1]).replace("/", ".")
            except (re.error, IndexError) as e:
                raise ValueError(
                    f"the name map's torch template {hit[1]!r} for {path!r} is not valid ({e}); its regex "
                    f"{hit[0].re.pattern!r} has {hit[0].re.groups} group(s) to refer to"
                ) from None
        if name is not None:
            _check_template(name, path)
        return name

    def axes_for(self, path: str) -> Axes | None:
        """The axes a rule gives ``path`` (None: Flax's convention or tracing decides).

        >>> from lora_jax import peft
        >>> peft.GPT2.axes_for("transformer/h/0/mlp/c_fc/kernel")
        Axes(in_axes=(1,), out_axes=(0,), stack_axes=())
        """
        hit = _first_match(self.axes, path)
        return None if hit is None else hit[1]


NameMapLike = Union[NameMap, Sequence, Callable[[str], Union[str, None]]]

# fields save() always derives itself (a NameMap may add others)
_WRITTEN = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora",
     "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias", "use_dora"}
)
_RULES_ERROR = (
    "NameMap rules must be (flax_regex, torch_template) string pairs or a "
    "callable, got {item!r}; e.g. (r'(.*)/kernel', r'\\1')"
)
_AXES_ERROR = (
    "NameMap axes must be (flax_regex, axes) pairs, got {item!r}; e.g. "
    "(r'.*/c_attn/kernel', lj.Axes(in_axes=(1,), out_axes=(0,)))"
)


def _regex_pair(item, value_type: type, what: str, error: str) -> tuple:
    """``item`` as a ``(regex, value)`` tuple: a valid regex string and a ``value_type``."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], value_type)):
        raise TypeError(error.format(item=item))
    try:
        re.compile(item[0])
    except (re.error, TypeError) as e:
        raise ValueError(f"{what} pattern {item[0]!r} is not a valid regex: {e}") from None
    return tuple(item)


def _first_match(pairs, path: str):
    """``(match, value)`` for the first ``(regex, value)`` pair whose regex fully matches ``path``, or None."""
    for pattern, value in pairs:
        m = re.fullmatch(pattern, path)
        if m is not None:
            return m, value
    return None


def _as_name_map(name_map) -> NameMap:
    if isinstance(name_map, NameMap):
        return name_map
    if callable(name_map) or isinstance(name_map, (tuple, list)):
        return NameMap(rules=name_map)
    raise TypeError(
        f"name_map must be an lj.peft.NameMap (e.g. lj.peft.GPT2), a sequence of "
        f"(flax_regex, torch_template) pairs or a callable path -> torch name; got {type(name_map).__name__}"
    )


_OUT_IN = Axes(in_axes=(1,), out_axes=(0,))
_LEAF = r"(?:kernel|embedding)"

#: Any Hugging Face Flax model: the torch module path is the Flax path without its leaf name.
HF = NameMap(rules=((rf"(?:params/)?(.+)/{_LEAF}", r"\1"),))

#: Hugging Face GPT-2 (``FlaxGPT2Model``, ``FlaxGPT2LMHeadModel``): Conv1D kernels stored (out, in).
GPT2 = NameMap(
    rules=(
        (
            rf"(?:params/)?((?:transformer/)?(?:h/\d+/(?:attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)|wte|wpe))/{_LEAF}",
            r"\1",
        ),
    ),
    axes=((r".*/(?:c_attn|c_proj|c_fc)/kernel", _OUT_IN),),
    config={"fan_in_fan_out": True},
)

#: Hugging Face BERT and RoBERTa (base models and their task heads).
BERT = NameMap(
    rules=(
        (
            r"(?:params/)?((?:bert/|roberta/)?(?:embeddings/(?:word|position|token_type)_embeddings"
            r"|encoder/layer/\d+/(?:attention/self/(?:query|key|value)|attention/output/dense"
            r"|intermediate/dense|output/dense)|pooler/dense))/" + _LEAF,
            r"\1",
        ),
        (r"(?:params/)?(classifier(?:/dense|/out_proj)?|qa_outputs|cls/predictions/transform/dense)/kernel", r"\1"),
    ),
)

#: Hugging Face Llama (and Mistral): ``FlaxLlamaModel``, ``FlaxLlamaForCausalLM``.
LLAMA = NameMap(
    rules=(
        (
            r"(?:params/)?((?:model/)?(?:embed_tokens|layers/\d+/(?:self_attn/(?:q|k|v|o)_proj"
            r"|mlp/(?:gate|up|down)_proj))|lm_head)/" + _LEAF,
            r"\1",
        ),
    ),
)


# ---------------------------------------------------------------------------------------
# PEFT's pattern semantics, torch name templates, factor layouts


def _peft_match(key: str, module: str) -> bool:
    """PEFT's ``get_pattern_key`` test: ``re.match(rf"(.*\\.)?({key})$", module)``."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """The value of the first key of ``patterns`` that matches ``module`` (PEFT's order), else ``default``."""
    for key, value in patterns.items():
        if _peft_match(key, module):
            return value
    return default


def _template_parts(template: str) -> list[tuple[str, bool]]:
    """``(literal text, followed by a '{}' field)`` for each piece of a torch name template."""
    return [(literal, field is not None) for literal, field, _, _ in string.Formatter().parse(template)]


def _check_template(template: str, path: str) -> None:
    """A ``ValueError`` naming ``path`` when ``template`` is not a torch name with only
    bare ``{}`` fields (one per stack axis)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"the name map gives {path!r} the torch name template {template!r}, which is not valid ({e}); "
            "'{}' stands for a stack index, and a literal brace is written '{{' or '}}'"
        ) from None
    bad = [f for _, f, spec, conv in parts if f is not None and (f or spec or conv)]
    if bad:
        raise ValueError(
            f"the name map gives {path!r} the torch name template {template!r} with the field(s) "
            f"{['{' + f + '}' for f in bad]}; a stack index is written as a bare '{{}}'"
        )


def _stack_fields(template: str) -> int:
    return sum(field for _, field in _template_parts(template))


def _stack_regex(template: str) -> re.Pattern:
    """A regex matching the torch names a template gives, one ``(\\d+)`` group per field."""
    parts = _template_parts(template)
    return re.compile("".join(re.escape(literal) + (r"(\d+)" if field else "") for literal, field in parts))


def _fill(template: str, index: tuple[int, ...]) -> str:
    return template.format(*index) if index else template


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _to_torch(w: LoraWeight, index: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``lora_A`` (r, in) and ``lora_B`` (out, r) of one stack index, as contiguous numpy arrays."""
    a = np.asarray(jax.device_get(w.a))[index].reshape(w.rank, math.prod(w.in_shape))
    b = np.asarray(jax.device_get(w.b))[index].reshape(w.rank, math.prod(w.out_shape))
    return np.ascontiguousarray(a), np.ascontiguousarray(b.T)


def _from_torch(spec: LoraWeight, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (r, *in) and ``b`` (r, *out) of one stack index from ``lora_A`` (r, in) and ``lora_B`` (out, r)."""
    return lora_a.reshape(spec.rank, *spec.in_shape), lora_b.T.reshape(spec.rank, *spec.out_shape)


def _raise_any(prefix: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(prefix + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# save


def save(
    directory: str | os.PathLike,
    lora: Any,
    name_map: NameMapLike,
    base_model: str | None = None,
    *,
    task_type: str | None = None,
    dropout: float | None = None,
) -> list[str]:
    """Write ``lora`` as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Every adapter becomes ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r)
    (embeddings: ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B``
    (embedding_dim, r)) under ``base_model.model.<torch module path>``, in the adapters'
    own dtype. ``r`` and ``lora_alpha`` are the most common rank and alpha; adapters that
    differ are listed in ``rank_pattern`` / ``alpha_pattern`` by full module path, and
    ``use_rslora`` records the scaling rule. A stacked adapter (scanned layers) writes one
    module per index of its stack axes.

    DoRA adapters (``w.is_dora``) also write ``lora_magnitude_vector`` (out,), their ``m``
    with the output axes flattened, and the config says ``use_dora: true``. PEFT has one
    ``use_dora`` for all modules, so the adapters must be all DoRA or all plain. PEFT
    always treats DoRA's norm as a constant in the gradient; adapters made with
    ``dora_detach=False`` are saved all the same (the setting changes training gradients,
    not outputs), and load back with ``dora_detach=True``.

    Args:
      directory: created if missing; existing adapter files are overwritten.
      lora: a lora tree (from :func:`lj.split`, training, :func:`load`, a checkpoint).
      name_map: a :class:`NameMap` (e.g. :data:`GPT2`), ``(flax_regex, torch_template)``
        pairs, or a callable ``flax_path -> torch module path``.
      base_model: written as ``base_model_name_or_path`` (e.g. ``"gpt2"``).
      task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``); None leaves it unset.
      dropout: ``lora_dropout`` to write; None takes the adapters' common rate.

    Returns:
      The torch module paths written, in tree order.

    Raises:
      ValueError: an adapter with no torch name, a scaling rule PEFT cannot express (a
        custom callable, or "lora" and "rslora" mixed), mixed dropout rates, conv adapters,
        two adapters with one torch name, DoRA and plain adapters in one tree.

    >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax import peft
    >>> params = {"q": {"kernel": jnp.ones((8, 8))}, "v": {"kernel": jnp.ones((8, 8))}}
    >>> cfg = lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=4), lj.Rule("v/kernel", rank=2)))
    >>> _, lora = lj.split(jax.random.key(0), params, cfg)
    >>> d = tempfile.mkdtemp()
    >>> peft.save(d, lora, [(r"(\\w+)/kernel", r"attn.\\1_proj")])
    ['attn.q_proj', 'attn.v_proj']
    >>> import json, pathlib; c = json.loads(pathlib.Path(d, "adapter_config.json").read_text())
    >>> c["r"], c["rank_pattern"], c["use_rslora"], c["use_dora"]
    (4, {'attn.v_proj': 2}, False, False)

    DoRA adapters write their magnitudes too:

    >>> _, dora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=4),), dora=True))
    >>> d = tempfile.mkdtemp(); peft.save(d, dora, [(r"(\\w+)/kernel", r"attn.\\1_proj")])
    ['attn.q_proj']
    >>> from safetensors.numpy import load_file
    >>> sorted(load_file(pathlib.Path(d, "adapter_model.safetensors")))[-1]
    'base_model.model.attn.q_proj.lora_magnitude_vector'
    >>> json.loads(pathlib.Path(d, "adapter_config.json").read_text())["use_dora"]
    True
    """
    name_map = _as_name_map(name_map)
    _check_lora_arg(lora, "peft.save")
    targets = _targets(lora)
    if not targets:
        raise ValueError("save: lora holds no LoraWeight; pass the lora tree from lj.split")
    problems = []
    modules = _torch_modules(targets, name_map, problems)
    scaling = _one_scaling(targets, problems)
    rate = _one_dropout(targets, dropout, problems)
    dora = _one_dora(targets, problems)
    _raise_any("save: ", problems)
    config = _adapter_config(modules, scaling, rate, name_map, base_model, task_type, dora)
    _write(directory, _tensors(modules), config)
    return list(modules)


def _torch_modules(targets, name_map: NameMap, problems: list) -> dict[str, tuple[str, LoraWeight, tuple]]:
    """Torch module path -> ``(flax path, adapter, stack index)`` for every module the file holds."""
    modules = {}
    for path, w in targets:
        template = _template(name_map, path, w, problems) if _exportable(path, w, problems) else None
        if template is None:
            continue
        for index in np.ndindex(*w.stack_shape):
            module = _fill(template, index)
            if module in modules:
                problems.append(
                    f"{path}: torch name {module!r} is already taken by {modules[module][0]}; "
                    "fix the name map"
                )
            modules[module] = (path, w, index)
    return modules


def _exportable(path: str, w: LoraWeight, problems: list) -> bool:
    """Whether PEFT has factors for the adapter's kind; notes a scale its scaling rule does not give."""
    if w.kind not in _FACTORS:
        problems.append(
            f"{path}: a {w.kind!r} adapter (shape {w.shape}) has no PEFT export in this "
            "version; leave it out of the tree you save"
        )
        return False
    if w.scaling in ("lora", "rslora") and not math.isclose(
        w.scale, scale_for(w.scaling, w.alpha, w.rank), rel_tol=1e-6
    ):
        problems.append(
            f"{path}: scale {w.scale} does not follow scaling {w.scaling!r} for alpha="
            f"{w.alpha}, rank={w.rank}; set alpha so that it does, e.g. "
            f"w.replace(alpha={w.scale * w.rank}, scaling='lora')"
        )
    return True


def _template(name_map: NameMap, path: str, w: LoraWeight, problems: list) -> str | None:
    """The adapter's torch name template, with one '{}' field per stack axis (None: a problem)."""
    template = name_map.torch_name(path)
    if template is None:
        problems.append(f"{path}: the name map gives it no torch module path; add a rule for it")
        return None
    fields = _stack_fields(template)
    if fields != len(w.stack_axes):
        problems.append(
            f"{path}: shape {w.shape} with stack axes {w.stack_axes} maps to torch name "
            f"{template!r} with {fields} '{{}}' fields; a stacked weight needs one field per "
            "stack axis, e.g. 'model.layers.{}.self_attn.q_proj'"
        )
        return None
    return template


def _one_scaling(targets, problems: list) -> str | None:
    """The scaling rule all exportable adapters share (PEFT's ``use_rslora`` holds one)."""
    scalings = collections.defaultdict(list)
    for path, w in targets:
        if w.kind in _FACTORS:
            scalings[w.scaling].append(path)
    if len(scalings) > 1 or any(s not in ("lora", "rslora") for s in scalings):
        custom = {s: p[:3] for s, p in scalings.items()}
        problems.append(
            f"PEFT writes one scaling rule for all adapters, alpha/r or alpha/sqrt(r) "
            f"(use_rslora); these adapters use {custom}. Re-express each scale s as alpha "
            "under 'lora': w.replace(alpha=w.scale * w.rank, scaling='lora')"
        )
    return next(iter(scalings), None)


def _one_dropout(targets, dropout: float | None, problems: list):
    """``dropout`` when given, else the rate all adapters share (PEFT has one ``lora_dropout``)."""
    rates = sorted({w.dropout for _, w in targets})
    if dropout is None and len(rates) > 1:
        problems.append(f"PEFT has one lora_dropout, but the adapters use {rates}; pass dropout=")
    return rates[0] if dropout is None else dropout


def _one_dora(targets, problems: list) -> bool:
    """Whether the exportable adapters are DoRA ones (PEFT's ``use_dora`` is one setting for
    all modules); notes a mix, and magnitudes of the wrong shape."""
    dora, plain = [], []
    for path, w in targets:
        if w.kind not in _FACTORS:
            continue
        (dora if w.is_dora else plain).append(path)
        if w.is_dora and tuple(np.shape(w.m)) != tuple(w.m_shape):
            problems.append(
                f"{path}: DoRA magnitude m has shape {tuple(np.shape(w.m))}, but the weight {w.shape} "
                f"(stack axes {w.stack_axes}, out axes {w.out_axes}) needs {w.m_shape}"
            )
    if dora and plain:
        problems.append(
            f"PEFT's use_dora is one setting for all modules, but the tree mixes DoRA adapters "
            f"({fmt_paths(dora, 4)}) and plain ones ({fmt_paths(plain, 4)}). Save them as two "
            "adapters (a tree each, None at the other's targets), or make the plain ones DoRA "
            "without changing them: w.replace(m=jnp.sqrt(w.dora_norm_sq(W))) with W the base weight"
        )
    return bool(dora) and not plain


def _adapter_config(modules, scaling: str, rate, name_map: NameMap, base_model, task_type,
                    dora: bool = False) -> dict[str, Any]:
    """``adapter_config.json``: the common rank and alpha, patterns for the modules that differ."""
    r, rank_pattern = _common({m: w.rank for m, (_, w, _) in modules.items()})
    alpha, alpha_pattern = _common({m: _number(w.alpha) for m, (_, w, _) in modules.items()})
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": scaling == "rslora",
        "target_modules": sorted(modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": float(rate),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": dora,
        "lora_bias": False,
        "inference_mode": True,
        **dict(name_map.config),
    }


def _tensors(modules) -> dict[str, np.ndarray]:
    """The safetensors entries: each module's two factors (and DoRA magnitude) under its PEFT keys."""
    tensors = {}
    for module, (_, w, index) in modules.items():
        fa, fb, suffix = _FACTORS[w.kind]
        tensors[f"{PREFIX}{module}.{fa}{suffix}"], tensors[f"{PREFIX}{module}.{fb}{suffix}"] = _to_torch(w, index)
        if w.is_dora:  # (out,): the output axes flattened in C order, as lora_B's rows
            m = np.asarray(jax.device_get(w.m))[index]
            tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.ascontiguousarray(m.reshape(-1))
    return tensors


def _write(directory, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _common(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value (ties: the first met) and a PEFT pattern dict for the rest.

    Keys are full module paths; one that PEFT's suffix-regex matching would confuse with
    another module (``q`` matches ``a.q``) is written escaped and anchored at the start
    (``^q``), so that it matches that module alone.
    """
    default = collections.Counter(values.values()).most_common(1)[0][0]
    pattern = {}
    for module, value in values.items():
        if value != default:
            pattern[module] = value
    for module in list(pattern):
        clash = [m for m in values if m != module and _peft_match(module, m)]
        if clash:
            value = pattern.pop(module)
            pattern["^" + re.escape(module)] = value
    # PEFT takes the first key that matches; check every module resolves to its own value
    for module, value in values.items():
        got = _pattern_value(pattern, module, default)
        if got != value:  # pragma: no cover - anchored escaped full names cannot collide
            raise AssertionError(f"pattern for {module} resolves to {got}, not {value}")
    return default, pattern


# ---------------------------------------------------------------------------------------
# load


def load(
    directory: str | os.PathLike | Sequence[str | os.PathLike],
    params: Any,
    name_map: NameMapLike,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
) -> Any:
    """Read a PEFT LoRA adapter into a lora tree for ``params``.

    Returns only ``lora`` (the structure of ``params``, an :class:`LoraWeight` at each
    adapted weight, ``None`` elsewhere): the base is ``params`` itself, so
    ``lj.wrap(f)(params, lora, x)`` runs the adapted model. Ranks come from the tensors,
    alphas from ``lora_alpha`` / ``alpha_pattern`` (PEFT's matching: the first key ``k``
    with ``re.match(rf"(.*\\.)?({k})$", module)``), the scaling rule from ``use_rslora``,
    the dropout rate from ``lora_dropout``.

    A DoRA file (``use_dora: true``) gives DoRA adapters: each module's
    ``lora_magnitude_vector`` (out,) becomes the adapter's ``m`` (shape ``w.m_shape``; a
    stacked weight takes the stack index from the module path, as for the factors), in the
    factors' dtype, with ``dora_detach=True`` as PEFT computes it. Stack indices the file
    has no module for get ``m = ||W||``, which leaves them unchanged (this needs concrete
    ``params``).

    How each weight is laid out (which axes ``lora_A`` and ``lora_B`` span) comes from
    tracing ``apply_fn(params, *args, **kwargs)`` when given (as :func:`lj.split`), else
    from the name map's ``axes``, else Flax's convention (last axis out, the rest in).
    Embedding adapters need an ``embedding`` leaf (or tracing that finds a lookup).

    Several directories (a list or tuple) load one adapter each and return them stacked
    (:func:`lora_jax.stack`) in that order, for ``lj.wrap(f)(params, stacked, x,
    adapter_ids=ids)``: the adapters may differ in rank, alpha, scaling rule and targets.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``; or a
        list of such directories.
      params: the Flax parameters the adapter was trained for (arrays or
        ``jax.ShapeDtypeStruct``; only shapes and dtypes are read, except to check an
        embedding copy the file may carry).
      name_map: a :class:`NameMap` (e.g. :data:`LLAMA`), ``(flax_regex, torch_template)``
        pairs, or a callable ``flax_path -> torch module path``.
      apply_fn, args, kwargs: optional model function and example inputs for axis
        inference.

    Raises:
      ValueError: a file key whose module maps to no Flax parameter, factor shapes that do
        not fit the Flax weight, a rank_pattern that disagrees with the tensors, a PEFT
        feature without a LoRA-tree equivalent (LoRA bias, modules_to_save, non-LORA
        peft_type), a DoRA magnitude missing or of the wrong shape (or present while
        ``use_dora`` is false), stored embedding weights that differ from ``params``.

    >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax import peft
    >>> params = {"q": {"kernel": jnp.ones((8, 6))}}
    >>> _, lora = lj.split(jax.random.key(0), params, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=2),)))
    >>> d = tempfile.mkdtemp(); _ = peft.save(d, lora, [(r"(\\w+)/kernel", r"\\1_proj")])
    >>> back = peft.load(d, params, [(r"(\\w+)/kernel", r"\\1_proj")])
    >>> back["q"]["kernel"].a.shape, bool((back["q"]["kernel"].a == lora["q"]["kernel"].a).all())
    ((2, 8), True)
    >>> _, big = lj.split(jax.random.key(1), params, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=4),)))
    >>> d2 = tempfile.mkdtemp(); _ = peft.save(d2, big, [(r"(\\w+)/kernel", r"\\1_proj")])
    >>> peft.load([d, d2], params, [(r"(\\w+)/kernel", r"\\1_proj")])["q"]["kernel"].ranks
    (2, 4)

    A DoRA adapter loads with its magnitude:

    >>> _, dora = lj.split(jax.random.key(2), params, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=2),), dora=True))
    >>> d3 = tempfile.mkdtemp(); _ = peft.save(d3, dora, [(r"(\\w+)/kernel", r"\\1_proj")])
    >>> w = peft.load(d3, params, [(r"(\\w+)/kernel", r"\\1_proj")])["q"]["kernel"]
    >>> w.is_dora, w.m.shape, bool((w.m == dora["q"]["kernel"].m).all())
    (True, (6,), True)
    """
    if isinstance(directory, (list, tuple)):
        if not directory:
            raise ValueError("load: the list of adapter directories is empty; give one or more directories")
        loaded = [load(d, params, name_map, apply_fn, args, kwargs) for d in directory]
        dora = [str(d) for d, lora in zip(directory, loaded) if any(w.is_dora for _, w in _targets(lora))]
        if dora:
            raise ValueError(
                f"load: {dora} hold DoRA adapters, which lj.stack cannot stack (it keeps a and b "
                "only); load each directory on its own, or merge them one at a time"
            )
        return stack(loaded)
    quantized = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
                 if is_quantized(x)]
    if quantized:
        raise TypeError(
            f"load: params holds quantized weights ({fmt_paths(quantized, 4)}); give the float "
            "parameter tree (or lj.dequantize(params)): the loaded adapter then fits the "
            "quantized base too"
        )
    name_map = _as_name_map(name_map)
    config, tensors = _read(directory)
    settings = _settings(config)
    found, base_copies, keys = _sort_keys(directory, tensors)
    found = _targeted(os.path.join(directory, CONFIG_NAME), config, found)
    _check_magnitudes(directory, config, found, keys)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths, arrays = [path_str(p) for p, _ in leaves], [x for _, x in leaves]
    exact, stacked = _torch_index(name_map, paths)
    hits = _locate(directory, found, exact, stacked, paths)
    problems = []
    rules, kinds = _rules(directory, config, name_map, paths, hits, found, problems, traced=apply_fn is not None)
    _raise_any(f"load: {directory}: ", problems)
    specs = _specs(params, treedef, rules, settings, apply_fn, args, kwargs)
    out = [None] * len(paths)
    for i, kind in kinds.items():
        out[i] = _fill_weight(paths[i], specs[i], kind, hits[i], found, problems)
        if out[i] is not None and config.get("use_dora", False):
            out[i] = _fill_magnitude(directory, paths[i], out[i], arrays[i], hits[i], found, keys, problems)
    for module, copy in base_copies.items():
        _check_copy(module, copy, exact, paths, arrays, problems)
    _raise_any(f"load: {directory}: ", problems)
    return jax.tree.unflatten(treedef, out)


def _read(directory):
    """The adapter's config (checked for features a lora tree cannot hold) and its tensors."""
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise ValueError(
                f"load: {p} does not exist; a PEFT adapter directory holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (older adapter_model.bin files need torch: convert them with "
                "safetensors.torch first)"
            )
    config = _check_config(cpath, _read_json(cpath))
    unsupported = _unsupported(config)
    if unsupported:
        raise ValueError(
            f"load: {cpath}: {'; '.join(unsupported)}; a lora tree holds low-rank factors only. "
            "Merge those parts into the base weights with PEFT first"
        )
    try:
        tensors = load_file(wpath)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type (SafetensorError) is not importable everywhere
        raise ValueError(
            f"load: {wpath} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); it is "
            "truncated or damaged: download or export the adapter again"
        ) from None
    bad = [f"{k} ({v.dtype})" for k, v in tensors.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise ValueError(f"load: {wpath}: LoRA factors must be floating point; found {fmt_paths(bad, limit=8)}")
    return config, tensors


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"load: {path} is not valid JSON ({type(e).__name__}: {e}); it is damaged: "
                         "export the adapter again") from None


def _check_config(path: str, config: Any) -> dict:
    """``config`` when every field a LoRA import reads has PEFT's type and range; a
    ``ValueError`` naming ``path`` and the key otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"load: {path}: the config is a JSON {type(config).__name__}, expected an object "
                         "(PEFT's LoraConfig as adapter_config.json holds it)")

    def check(key, ok, wants, default=None):
        value = config.get(key, default)
        if not ok(value):
            raise ValueError(f"load: {path}: {key} is {value!r}; expected {wants}")
        return value

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    check("r", lambda v: is_int(v) and v >= 1, "an int >= 1", 8)
    check("lora_alpha", lambda v: is_num(v) and v > 0, "a number > 0", 8)
    check("lora_dropout", lambda v: is_num(v) and 0 <= v < 1, "a rate in [0, 1)", 0.0)
    check("use_rslora", lambda v: isinstance(v, bool), "true or false", False)
    check("use_dora", lambda v: isinstance(v, bool), "true or false", False)
    check("peft_type", lambda v: isinstance(v, str), "a string such as 'LORA'", "LORA")
    check("target_modules", lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v)), "null, a regex or a list of module names")
    for key, ok, wants in (("rank_pattern", lambda v: is_int(v) and v >= 1, "ints >= 1"),
                           ("alpha_pattern", lambda v: is_num(v) and v > 0, "numbers > 0")):
        patterns = check(key, lambda v: v is None or isinstance(v, dict), "null or an object of patterns")
        for pattern, value in (patterns or {}).items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as e:
                raise ValueError(f"load: {path}: {key} key {pattern!r} is not a valid regex ({e})") from None
            if not ok(value):
                raise ValueError(f"load: {path}: {key}[{pattern!r}] is {value!r}; expected {wants}")
    if isinstance(config.get("target_modules"), str):
        try:
            re.compile(config["target_modules"])
        except re.error as e:
            raise ValueError(f"load: {path}: target_modules {config['target_modules']!r} is not a valid regex ({e})") from None
    return config


def _unsupported(config: Mapping[str, Any]) -> list[str]:
    """The config's PEFT features that have no LoRA-tree equivalent."""
    unsupported = []
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={config['peft_type']!r} (only 'LORA' is LoRA)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append(f"bias={config.get('bias')!r} / lora_bias={config.get('lora_bias')!r} (trained biases)")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save={config['modules_to_save']!r} (fully trained modules)")
    for field in ("layer_replication", "trainable_token_indices"):
        if config.get(field):
            unsupported.append(f"{field}={config[field]!r}")
    return unsupported


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`LoraConfig` fields one for all adapters: scaling rule and dropout rate."""
    return {
        "scaling": "rslora" if config.get("use_rslora", False) else "lora",
        "dropout": float(config.get("lora_dropout", 0.0)),
    }


def _listed(spec, module: str) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a regex (``re.fullmatch``), a list
    holds module names (equal, or a dotted suffix of the module's path)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


def _targeted(cpath: str, config: Mapping[str, Any], found: dict) -> dict:
    """The file's modules PEFT would load: those ``target_modules`` lists and
    ``exclude_modules`` does not (a ``UserWarning`` for the others, and for each listed
    name no module of the file matches)."""
    spec, exclude = config.get("target_modules"), config.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or (
            isinstance(exclude, list) and all(isinstance(x, str) for x in exclude))):
        raise ValueError(f"load: {cpath}: exclude_modules is {exclude!r}; expected null, a regex or a list of module names")
    keep = {m: f for m, f in found.items()
            if (spec in (None, "all-linear") or _listed(spec, m)) and not (exclude and _listed(exclude, m))}
    dropped = sorted(set(found) - set(keep))
    if dropped:
        warnings.warn(f"load: {cpath}: the file holds factors for {fmt_paths(dropped, limit=8)}, which "
                      "target_modules does not list (or exclude_modules does); PEFT ignores them, and so does "
                      "this load", UserWarning, stacklevel=3)
    if isinstance(spec, list):
        missing = [t for t in spec if not any(_listed([t], m) for m in keep)]
        if missing:
            warnings.warn(f"load: {cpath}: target_modules lists {missing}, but the file holds no factors for "
                          "a module of that name; nothing is loaded for it", UserWarning, stacklevel=3)
    return keep


def _sort_keys(directory, tensors: Mapping[str, np.ndarray]):
    """The file's factors by torch module (``{module: {factor: array}}``), its base-weight
    copies, and each factor's key (``{(module, factor): key}``)."""
    found: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    base_copies, unknown, keys = {}, [], {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        # linear factors end in '.weight' (nn.Linear), embedding factors do not (nn.Parameter);
        # DoRA magnitudes are written without it and were once written with it
        linear = m is not None and m["factor"] in ("lora_A", "lora_B")
        if m is not None and (m["factor"] == MAGNITUDE or (m["suffix"] is not None) == linear):
            if (m["module"], m["factor"]) in keys:
                raise ValueError(
                    f"load: {os.path.join(directory, WEIGHTS_NAME)}: {keys[m['module'], m['factor']]} and {key} "
                    f"are both the {m['factor']} of {m['module']}; keep one"
                )
            found[m["module"]][m["factor"]] = value
            keys[m["module"], m["factor"]] = key
        elif key.startswith(PREFIX) and key.endswith(".base_layer.weight"):
            base_copies[key[len(PREFIX) : -len(".base_layer.weight")]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"load: {directory}: keys that are not LoRA factors: {fmt_paths(unknown, limit=8)}; expected "
            "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' / '.lora_embedding_A' / "
            "'.lora_embedding_B' / '.lora_magnitude_vector' (LoRA biases and modules_to_save weights have "
            "no LoRA-tree equivalent)"
        )
    return found, base_copies, keys


def _check_magnitudes(directory, config, found, keys) -> None:
    """With ``use_dora``, every module has a magnitude; without it, none has."""
    wpath = os.path.join(directory, WEIGHTS_NAME)
    with_m = sorted(m for m, f in found.items() if MAGNITUDE in f)
    if config.get("use_dora", False):
        missing = sorted(set(found) - set(with_m))
        if missing:
            rows = [np.shape(f[fb])[0] for fa, fb, _ in _FACTORS.values() for f in [found[missing[0]]] if fb in f]
            shape = f"({rows[0]},)" if rows else "(out,)"
            raise ValueError(
                f"load: {wpath}: {CONFIG_NAME} says use_dora=true, but the modules {fmt_paths(missing, limit=8)} "
                f"have no DoRA magnitude (key '{PREFIX}{missing[0]}.{MAGNITUDE}', shape {shape}); the file "
                "is incomplete: export the adapter again"
            )
    elif with_m:
        raise ValueError(
            f"load: {wpath}: keys {fmt_paths([keys[m, MAGNITUDE] for m in with_m], limit=4)} are DoRA "
            f"magnitudes, but {CONFIG_NAME} has use_dora={json.dumps(config.get('use_dora', False))}; "
            "PEFT would not read them. Set use_dora to true if the adapter is a DoRA one, or drop the keys"
        )


def _torch_index(name_map: NameMap, paths: list[str]):
    """Flax leaf indices by torch name: ``exact`` names, and ``(regex, leaf)`` for stacked templates."""
    exact, stacked = {}, []
    for i, path in enumerate(paths):
        template = name_map.torch_name(path)
        if template is None:
            continue
        if _stack_fields(template):
            stacked.append((_stack_regex(template), i))
        elif template in exact:
            raise ValueError(
                f"load: the name map gives {paths[exact[template]]} and {path} the same torch name "
                f"{template!r}; fix the name map"
            )
        else:
            exact[template] = i
    return exact, stacked


def _locate(directory, found, exact, stacked, paths) -> dict[int, dict[tuple, str]]:
    """Each file module's Flax leaf and stack index: ``{leaf: {index: module}}``."""
    hits: dict[int, dict[tuple, str]] = collections.defaultdict(dict)
    unmapped = []
    for module in found:
        hit = _leaf_of(module, exact, stacked)
        if hit is None:
            unmapped.append(module)
        else:
            hits[hit[0]][hit[1]] = module
    if unmapped:
        mapped = sorted(exact)[:6]
        raise ValueError(
            f"load: {directory}: torch modules {fmt_paths(unmapped, limit=8)} map to no Flax parameter. The name "
            f"map gives torch names to {len(exact) + len(stacked)} Flax parameters (e.g. {mapped}); "
            f"Flax paths look "
            f"like {fmt_paths(paths, 4)}. Use the name map for this model family (lj.peft.GPT2, BERT, "
            "LLAMA, HF) or add a rule"
        )
    return hits


def _leaf_of(module: str, exact, stacked) -> tuple[int, tuple] | None:
    """``(leaf, stack index)`` of a torch module, or None when no Flax leaf has its name."""
    if module in exact:
        return exact[module], ()
    for regex, i in stacked:
        m = regex.fullmatch(module)
        if m is not None:
            return i, tuple(int(g) for g in m.groups())
    return None


def _rules(directory, config, name_map: NameMap, paths, hits, found, problems: list, traced: bool):
    """One :class:`Rule` per adapted leaf, and ``{leaf: factor kind}``."""
    rules, kinds = [], {}
    for i, by_index in hits.items():
        path = paths[i]
        specs = {_module_spec(directory, config, module, found[module], problems) for module in by_index.values()}
        if len(specs) > 1:
            problems.append(
                f"{path}: one stacked Flax weight, but its torch modules differ in (kind, rank, "
                f"alpha): {sorted(specs)}; unstack the weight to load them"
            )
            continue
        kind, rank, alpha = specs.pop()
        axes = None if traced else name_map.axes_for(path)
        rules.append(Rule(re.escape(path), rank=rank, alpha=alpha, axes=axes))
        kinds[i] = kind
    return rules, kinds


def _module_spec(directory, config, module: str, factors, problems: list) -> tuple[str, int, float]:
    """``(kind, rank, alpha)`` of one torch module: rank from its tensors, alpha from the config."""
    kind, rank = _factor_kind_rank(directory, module, factors)
    want = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if want != rank:
        problems.append(f"{module}: the tensors have rank {rank} but r / rank_pattern give {want}")
    return kind, rank, float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))


def _factor_kind_rank(directory, module, factors):
    names = set(factors) - {MAGNITUDE}
    for kind, (fa, fb, _) in _FACTORS.items():
        if names == {fa, fb}:
            a, b = factors[fa], factors[fb]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"load: {directory}: {module}: {fa} {a.shape} and {fb} {b.shape} are not "
                    "(r, in) and (out, r) with one r (conv adapters have no import in this version)"
                )
            return kind, int(a.shape[0])
    raise ValueError(
        f"load: {directory}: {module} has factors {sorted(names)}; a module needs lora_A and "
        "lora_B (or lora_embedding_A and lora_embedding_B)"
    )


def _specs(params, treedef, rules, settings, apply_fn, args, kwargs) -> list:
    """The empty :class:`LoraWeight` of each leaf of ``params`` (None: not adapted), as ``lj.split`` lays it out."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
    cfg = LoraConfig(rules=tuple(rules), **settings)
    _, spec_tree = split(jax.random.key(0), abstract, cfg, apply_fn, args, kwargs)
    return treedef.flatten_up_to(spec_tree)  # aligned with params' leaves (no None)


def _fill_weight(path, spec: LoraWeight, kind, by_index, found, problems):
    """``spec`` with the factors of its torch modules (zeros for stack indices the file skips)."""
    if not _fits(path, spec, kind, by_index, problems):
        return None
    fa, fb, _ = _FACTORS[kind]
    a = np.zeros(spec.a_shape, spec.a.dtype)
    b = np.zeros(spec.b_shape, spec.b.dtype)
    for index in np.ndindex(*spec.stack_shape):
        module = by_index.get(index)
        if module is None:  # a layer PEFT left alone: a zero adapter changes nothing
            continue
        if not _shapes_fit(path, spec, fa, fb, module, found[module], problems):
            return None
        a[index], b[index] = _from_torch(spec, found[module][fa], found[module][fb])
    return spec.replace(a=jnp.asarray(a), b=jnp.asarray(b))


def _fill_magnitude(directory, path, w: LoraWeight, base, by_index, found, keys, problems):
    """``w`` with DoRA's ``m`` from its modules' magnitudes (out,), in the factors' dtype;
    ``||W||`` (no change) for stack indices the file has no module for."""
    wpath = os.path.join(directory, WEIGHTS_NAME)
    n_out = math.prod(w.out_shape)
    m = np.zeros(w.m_shape, np.dtype(w.a.dtype))
    for index in np.ndindex(*w.stack_shape):
        module = by_index.get(index)
        if module is None:
            continue
        mag = found[module][MAGNITUDE]
        if mag.shape != (n_out,):
            problems.append(
                f"{path}: {wpath}: {keys[module, MAGNITUDE]} has shape {mag.shape}, but the Flax weight "
                f"{w.shape} with out axes {w.out_axes} (size {n_out}) needs ({n_out},), one magnitude per "
                f"output (as lora_B has {n_out} rows); the file was made for another model, or is damaged"
            )
            return None
        m[index] = mag.reshape(w.out_shape)
    skipped = [i for i in np.ndindex(*w.stack_shape) if i not in by_index]
    if skipped:
        if isinstance(base, jax.ShapeDtypeStruct) or base is None:
            problems.append(
                f"{path}: the DoRA file has no module for stack indices {skipped[:8]}; they need the "
                "magnitude ||W|| (an unchanged layer), which takes the weight's values: pass concrete params"
            )
            return None
        norms = np.sqrt(np.asarray(jax.device_get(
            w.replace(a=jnp.zeros_like(w.a), b=jnp.zeros_like(w.b)).dora_norm_sq(jnp.asarray(base)))))
        for index in skipped:
            m[index] = norms[index]
    return w.replace(m=jnp.asarray(m))


def _fits(path, spec: LoraWeight, kind, by_index, problems) -> bool:
    """Whether the file's factor kind and stack indices fit the Flax weight."""
    fa, fb, _ = _FACTORS[kind]
    if (kind == "embed") != (spec.kind == "embed"):
        problems.append(
            f"{path}: the file holds {fa}/{fb} for it, but the Flax weight {spec.shape} is used "
            f"as {spec.kind!r}; embedding adapters belong to 'embedding' leaves (or pass apply_fn "
            "to trace the model)"
        )
        return False
    outside = [m for i, m in by_index.items() if len(i) != len(spec.stack_shape)
               or any(not 0 <= k < n for k, n in zip(i, spec.stack_shape))]
    if outside:
        problems.append(
            f"{path}: torch modules {fmt_paths(outside, limit=8)} index past the Flax weight's stack "
            f"{spec.stack_shape} (shape {spec.shape}, stack axes {spec.stack_axes}); check the "
            "name map's '{}' fields and the model's layer count"
        )
        return False
    return True


def _shapes_fit(path, spec: LoraWeight, fa, fb, module, factors, problems) -> bool:
    """Whether one module's factors are ``(r, in)`` and ``(out, r)`` for the Flax weight."""
    n_in, n_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
    fa_arr, fb_arr = factors[fa], factors[fb]
    if fa_arr.shape == (spec.rank, n_in) and fb_arr.shape == (n_out, spec.rank):
        return True
    hint = ""
    if fa_arr.shape[1] == n_out and fb_arr.shape[0] == n_in:
        hint = (
            " The sizes fit with in and out swapped: the Flax weight is stored (out, in); "
            "give its axes in the name map (axes=) or pass apply_fn= to trace them"
        )
    problems.append(
        f"{path}: Flax weight {spec.shape} with in axes {spec.in_axes} (size {n_in}) and "
        f"out axes {spec.out_axes} (size {n_out}) needs {fa} ({spec.rank}, {n_in}) and "
        f"{fb} ({n_out}, {spec.rank}), but {module} has {fa_arr.shape} and "
        f"{fb_arr.shape}.{hint}"
    )
    return False


def _check_copy(module, copy, exact, paths, arrays, problems):
    """PEFT may store embedding weights next to their adapter; they must equal ``params``."""
    i = exact.get(module)
    if i is None:
        problems.append(f"{module}.base_layer.weight: module maps to no Flax parameter")
        return
    w = arrays[i]
    if isinstance(w, jax.ShapeDtypeStruct):
        return
    w = np.asarray(w, np.float32)
    copy = np.asarray(copy, np.float32)
    if w.shape != copy.shape or not np.allclose(w, copy, rtol=1e-3, atol=1e-5):
        diff = "" if w.shape != copy.shape else f", max |diff| {np.abs(w - copy).max():.3g}"
        problems.append(
            f"{paths[i]}: the adapter stores its own base weight for {module} ({copy.shape}) that "
            f"differs from params ({w.shape}{diff}) (a resized vocabulary?); put it into params "
            "first"
        )
