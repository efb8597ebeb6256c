"""minidora: minimal, gradient-checked LoRA, DoRA, QLoRA and QDoRA, with a compiled NF4 fast path."""

from . import nf4, ops
from .nf4 import NF4Weight

__version__ = "0.1.0"
