"""The frozen base of an adapter: what LoRA and DoRA ask of it, whether it is dense or 4-bit.

QLoRA is LoRA over a 4-bit base and QDoRA is DoRA over it: the adapter code is the same, and
only these five questions reach the base layer (``nn.Linear`` or
:class:`~minidora.nf4_linear.NF4Linear`, which answers them with its own methods):

- :func:`product`: x W0^T (+ b), in the base's dtype;
- :func:`weight`: W0 as a dense tensor of a chosen dtype (for merging and inspection);
- :func:`row_norms_sq`: ||W0[i, :]||^2 per row, for DoRA's norm;
- :func:`store` and :func:`restore`: put a merged weight in place of W0 and take it back.

:func:`check` and :func:`check_input` refuse what the adapters cannot use (a bad base, an input
that is not a real floating-point tensor).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4_linear import NF4Linear

__all__ = ["check", "check_input", "product", "weight", "row_norms_sq", "store", "restore",
           "storage", "share_lost"]


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


def check_input(x) -> None:
    """Raise unless x is a real floating-point tensor: nn.Linear refuses the others, and the
    casts of the adapter layers would truncate integers or drop imaginary parts instead."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a real floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {got}")


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


def row_norms_sq(base: nn.Module, chunk_elems: int = 1 << 20,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """||W0[i, :]||^2 for every row of the weight the forward applies, summed in ``dtype``, a
    chunk of rows at a time: a chunk holds at most ``chunk_elems`` elements and an eighth of the
    weight, so no [out, in] temporary is formed (a float32 weight summed in float32 needs none):
    [out] of ``dtype``."""
    if isinstance(base, NF4Linear):
        return base.row_norms_sq(chunk_elems, dtype)
    w = base.weight.detach()                                                  # [out, in]
    step = max(1, min(chunk_elems, w.numel() // 8) // base.in_features)
    return torch.cat([torch.linalg.vector_norm(w[r0:r0 + step].to(dtype), dim=1).square()
                      for r0 in range(0, base.out_features, step)])           # [out]


def store(base: nn.Module, w: torch.Tensor):
    """Put the dense weight ``w`` [out, in] in place of W0 (an NF4 base quantizes it again).

    Returns:
        What :func:`restore` needs to put the old weight back exactly (the old NF4 bytes), or
        None for a dense base, whose old weight is recomputed from the merged one instead.

    Raises:
        ValueError: ``w`` holds a value the base would store as inf or NaN (it overflows the
            base's dtype, or is not finite); the base is left as it was.
    """
    if isinstance(base, NF4Linear):
        return base.replace_weight(w)        # refuses NaN/Inf, and float32 overflow, itself
    cast = w.to(base.weight.dtype)
    bad = int((~torch.isfinite(cast)).sum())
    if bad:
        raise ValueError(f"the merged weight has {bad} value(s) that a {base.weight.dtype} weight "
                         f"stores as inf or NaN (largest |value| {w.abs().max().item():.4g}, "
                         f"largest finite {base.weight.dtype}: "
                         f"{torch.finfo(base.weight.dtype).max:.4g}); nothing was changed")
    with torch.no_grad():
        base.weight.copy_(cast)
    return None


def restore(base: nn.Module, saved) -> None:
    """Undo :func:`store` exactly with what it returned (an NF4 base's old bytes)."""
    base.restore_weight(saved)


def share_lost(base: nn.Module, w0: torch.Tensor, exact: torch.Tensor) -> float:
    """After :func:`store` of ``exact``: the share of the update exact - W0 that the stored weight
    lost, ||stored - exact|| / ||exact - W0|| (norms in float64, so no overflow).

    An update no larger than eps ||W0|| (eps of exact's dtype) is zero up to the rounding of
    W0 + update itself (an untrained adapter: B = 0, DoRA's k = 1): it has no share to lose, and
    the figure is then ||stored - exact|| / ||W0||, how far storing moved the weight. That is 0.0
    for a base that stores exactly, and small but not 0.0 where re-quantizing moves the weight
    (new double-quantization codes for the scales); never a division by a rounding error.

    Args:
        w0, exact: [out, in], the weight before merging and the exact merged weight.
    """
    norm = lambda t: torch.linalg.vector_norm(t, dtype=torch.float64)          # noqa: E731
    update, w0_norm = norm(exact - w0), norm(w0)
    scale = update if update > torch.finfo(exact.dtype).eps * w0_norm else w0_norm
    lost = norm(weight(base, exact.dtype) - exact)
    return (lost / scale).item() if scale > 0 else 0.0


def storage(base: nn.Module) -> str:
    """How the base stores its weight, for messages: ``"NF4"`` or a dtype."""
    return "NF4" if isinstance(base, NF4Linear) else str(base.weight.dtype)
