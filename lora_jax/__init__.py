"""lora_jax: functional low-rank adaptation (LoRA) for JAX and Flax."""

from . import adalora, checkpoint, nnx, peft, sharding
from .combine import combine, pissa_to_lora
from .config import Axes, LoraConfig, Rule, path_str, scale_for
from .optim import apply_updates, labels, optimizer
from .quant import QuantizedWeight, dequantize, is_quantized
from .report import delta_norms, summary
from .split import quantize, split
from . import stacked
from .stacked import StackedLoraWeight, batch_slots, put_adapters, stack, swap, take_adapters, unstack
from .transform import wrap
from .tree import merge, targets, unmerge
from .version import __version__
from .weight import LoraWeight, is_lora

__all__ = [
    "__version__",
    "Axes",
    "LoraConfig",
    "LoraWeight",
    "QuantizedWeight",
    "Rule",
    "StackedLoraWeight",
    "adalora",
    "apply_updates",
    "batch_slots",
    "checkpoint",
    "combine",
    "delta_norms",
    "dequantize",
    "is_lora",
    "is_quantized",
    "labels",
    "merge",
    "nnx",
    "optimizer",
    "peft",
    "quantize",
    "path_str",
    "pissa_to_lora",
    "put_adapters",
    "scale_for",
    "sharding",
    "split",
    "stack",
    "stacked",
    "swap",
    "take_adapters",
    "summary",
    "targets",
    "unmerge",
    "unstack",
    "wrap",
]
