"""minidora: minimal, gradient-checked LoRA, DoRA, QLoRA and QDoRA, with a compiled NF4 fast
path.

The public names below are imported on first use (PEP 562): ``import minidora`` alone does not
import torch, so ``python -m minidora`` can answer Ctrl-C during its start-up with one line.
``from minidora import wrap`` and ``minidora.wrap`` work as with any package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The submodules that are public names of the package, and where each other public name lives.
_SUBMODULES = ("analysis", "backends", "base", "bnb_checkpoint", "checkpoint", "fp4", "nf4",
               "ops")
_HOME = {
    "DoRALinear": "dora", "dora_reference": "dora",
    "LoRALinear": "lora", "lora_reference": "lora",
    "NF4Weight": "nf4", "NF4Linear": "nf4_linear",
    **{name: "model" for name in (
        "METHODS", "Report", "adapter_layers", "cast_adapters", "merge", "merge_and_unload",
        "report", "unmerge", "wrap")},
    **{name: "checkpoint" for name in (
        "load_adapters", "load_bnb_nf4_linears", "load_peft_adapter", "save_adapters",
        "save_peft_adapter")},
}

__all__ = [
    "LoRALinear", "DoRALinear", "NF4Linear", "NF4Weight", "lora_reference", "dora_reference",
    "wrap", "report", "Report", "merge", "unmerge", "merge_and_unload", "cast_adapters",
    "adapter_layers", "save_adapters", "load_adapters", "save_peft_adapter", "load_peft_adapter",
    "load_bnb_nf4_linears", "METHODS", "analysis", "backends", "base", "bnb_checkpoint",
    "checkpoint", "fp4", "nf4", "ops",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value          # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:   # the same names, for type checkers and documentation tools
    from . import (  # noqa: F401
        analysis,
        backends,
        base,
        bnb_checkpoint,
        checkpoint,
        fp4,
        nf4,
        ops,
    )
    from .checkpoint import (  # noqa: F401
        load_adapters,
        load_bnb_nf4_linears,
        load_peft_adapter,
        save_adapters,
        save_peft_adapter,
    )
    from .dora import DoRALinear, dora_reference  # noqa: F401
    from .lora import LoRALinear, lora_reference  # noqa: F401
    from .model import (  # noqa: F401
        METHODS,
        Report,
        adapter_layers,
        cast_adapters,
        merge,
        merge_and_unload,
        report,
        unmerge,
        wrap,
    )
    from .nf4 import NF4Weight  # noqa: F401
    from .nf4_linear import NF4Linear  # noqa: F401
