"""The frozen base of an adapter: what LoRA and DoRA ask of it, whether it is dense or 4-bit.

QLoRA is LoRA over a 4-bit base and QDoRA is DoRA over it: the adapter code is the same, and
only these five questions reach the base layer (``nn.Linear`` or
:class:`~minidora.nf4_linear.NF4Linear`, which answers them with its own methods):

- :func:`product`: x W0^T (+ b), in the base's dtype;
- :func:`weight`: W0 as a dense tensor of a chosen dtype (for merging and inspection);
- :func:`row_norms_sq`: ||W0[i, :]||^2 per row, for DoRA's norm;
- :func:`store` and :func:`restore`: put a merged weight in place of W0 and take it back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4_linear import NF4Linear

__all__ = ["check", "product", "weight", "row_norms_sq", "store", "restore", "storage"]


def check(base: nn.Module) -> None:
    """Raise unless ``base`` is a usable frozen base: a non-empty ``nn.Linear`` with a real
    floating-point weight, or an ``NF4Linear``."""
    if not isinstance(base, (nn.Linear, NF4Linear)):
        raise TypeError("base must be an nn.Linear or minidora.NF4Linear, "
                        f"got {type(base).__name__}")
    if base.in_features < 1 or base.out_features < 1:
        raise ValueError("base must have in_features >= 1 and out_features >= 1, got "
                         f"{base.in_features} and {base.out_features}")
    if isinstance(base, nn.Linear) and not base.weight.dtype.is_floating_point:
        raise TypeError("base.weight must be a real floating-point tensor, "
                        f"got {base.weight.dtype}")


def product(base: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """x [..., in] -> x W0^T (+ b) [..., out], computed in the base's dtype (not cast back)."""
    if isinstance(base, NF4Linear):
        return base.linear(x, bias)
    w = base.weight
    return F.linear(x.to(w.dtype), w, base.bias if bias else None)


def weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W0 as a dense [out, in] tensor of ``dtype`` (dequantized for an NF4 base)."""
    if isinstance(base, NF4Linear):
        return base.dequantize_weight(dtype)
    return base.weight.to(dtype)


def row_norms_sq(base: nn.Module, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """||W0[i, :]||^2 for every row of the weight the forward applies, summed in float64, a
    chunk of rows at a time (no [out, in] temporary): [out] float64."""
    if isinstance(base, NF4Linear):
        return base.row_norms_sq(chunk_elems)
    step = max(1, chunk_elems // base.in_features)
    return torch.cat([base.weight[r0:r0 + step].detach().double().pow(2).sum(1)
                      for r0 in range(0, base.out_features, step)])


def store(base: nn.Module, w: torch.Tensor):
    """Put the dense weight ``w`` [out, in] in place of W0 (an NF4 base quantizes it again).

    Returns:
        What :func:`restore` needs to put the old weight back exactly (the old NF4 bytes), or
        None for a dense base, whose old weight is recomputed from the merged one instead.
    """
    if isinstance(base, NF4Linear):
        return base.replace_weight(w)
    with torch.no_grad():
        base.weight.copy_(w)
    return None


def restore(base: nn.Module, saved) -> None:
    """Undo :func:`store` exactly with what it returned (an NF4 base's old bytes)."""
    base.restore_weight(saved)


def storage(base: nn.Module) -> str:
    """How the base stores its weight, for messages: ``"NF4"`` or a dtype."""
    return "NF4" if isinstance(base, NF4Linear) else str(base.weight.dtype)
