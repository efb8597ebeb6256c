"""minidora: minimal, gradient-checked LoRA, DoRA, QLoRA and QDoRA, with a compiled NF4 fast path."""

from . import nf4, ops
from .nf4 import NF4Weight

__version__ = "0.1.0"

from . import analysis
from .dora import DoRALinear, dora_reference
from .lora import LoRALinear, lora_reference
from .model import (METHODS, Report, adapter_layers, cast_adapters, load_adapters,
                    load_bnb_nf4_linears, load_peft_adapter, merge, merge_and_unload, report,
                    save_adapters, save_peft_adapter, unmerge, wrap)
from .nf4_linear import NF4Linear
