"""minidora: minimal, gradient-checked LoRA, DoRA, QLoRA and QDoRA, with a compiled NF4 fast
path."""

__version__ = "0.1.0"

from . import analysis, base, bnb_checkpoint, checkpoint, nf4, ops
from .dora import DoRALinear, dora_reference
from .lora import LoRALinear, lora_reference
from .model import (
                    METHODS,
                    Report,
                    adapter_layers,
                    cast_adapters,
                    load_adapters,
                    load_bnb_nf4_linears,
                    load_peft_adapter,
                    merge,
                    merge_and_unload,
                    report,
                    save_adapters,
                    save_peft_adapter,
                    unmerge,
                    wrap,
)
from .nf4 import NF4Weight
from .nf4_linear import NF4Linear

__all__ = [
    "LoRALinear", "DoRALinear", "NF4Linear", "NF4Weight", "lora_reference", "dora_reference",
    "wrap", "report", "Report", "merge", "unmerge", "merge_and_unload", "cast_adapters",
    "adapter_layers", "save_adapters", "load_adapters", "save_peft_adapter", "load_peft_adapter",
    "load_bnb_nf4_linears", "METHODS", "analysis", "base", "bnb_checkpoint", "checkpoint", "nf4",
    "ops",
]
