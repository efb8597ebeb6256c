r"""LoRA: a trainable low-rank update next to a frozen linear layer (QLoRA when the base is NF4).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv 2106.09685, eq. 3
(written for PyTorch's row convention, W_0 \in R^{out \times in}):

.. math::  y = x W_0^\top + b + s\,\text{dropout}(x) A^\top B^\top, \qquad
           A \in \mathbb{R}^{r \times in},\; B \in \mathbb{R}^{out \times r}

with :math:`s = \alpha / r`, or :math:`s = \alpha / \sqrt r` with rsLoRA (Kalajdzievski, 2023,
arXiv 2312.03732). A starts Kaiming-uniform (a = sqrt(5), i.e. U(+-1/sqrt(in))) or, with
``init="gaussian"``, normal with std 1/r (as PEFT); B starts at zero, so at init the layer
equals its base exactly. Merged, the layer is the plain linear map :math:`W = W_0 + s B A`.

The base is an ``nn.Linear`` or a :class:`~minidora.nf4_linear.NF4Linear`: QLoRA (Dettmers et
al., 2023, arXiv 2305.14314, eq. 5) is exactly this class over a 4-bit base. The adapter weights
stay in ``adapter_dtype`` (float32) whatever the base dtype; the base product runs in the base's
dtype and the sum is returned in x's dtype.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4
from .nf4_linear import NF4Linear

__all__ = ["LoRALinear", "lora_reference"]

INITS = ("kaiming", "gaussian")
MERGE_WARN = 0.1   # merge() warns when the stored weight lost more than this share of the update


class _NeedsState:
    """Marks a layer whose dense unmerge needs what merge() cached (DoRA's per-row k)."""


def lora_reference(x, W0, bias, A, B, s):
    """The formula itself: y = x (W0 + s B A)^T + b. x: [..., in], W0: [out, in] -> [..., out]."""
    return F.linear(x, W0 + s * (B @ A), bias)


# --- the frozen base, dense or NF4 -------------------------------------------------------------

def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W0 as a dense [out, in] tensor of ``dtype`` (dequantized for an NF4 base)."""
    if isinstance(base, NF4Linear):
        return base.dequantize_weight(dtype)
    return base.weight.to(dtype)


def base_linear(base: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """x [..., in] -> x W0^T (+ b) [..., out], computed in the base's dtype (not cast back)."""
    if isinstance(base, NF4Linear):
        return base.linear(x, bias)
    w = base.weight
    return F.linear(x.to(w.dtype), w, base.bias if bias else None)


def _check_args(base, r, alpha, dropout, init) -> None:
    if not isinstance(base, (nn.Linear, NF4Linear)):
        raise TypeError("base must be an nn.Linear or minidora.NF4Linear, "
                        f"got {type(base).__name__}")
    if base.in_features < 1 or base.out_features < 1:
        raise ValueError("base must have in_features >= 1 and out_features >= 1, got "
                         f"{base.in_features} and {base.out_features}")
    if isinstance(base, nn.Linear) and not base.weight.dtype.is_floating_point:
        raise TypeError(f"base.weight must be a real floating-point tensor, got {base.weight.dtype}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class LoRALinear(nn.Module):
    """LoRA (or QLoRA) around a frozen base layer.

    Args:
        base: ``nn.Linear`` or ``NF4Linear`` with weight [out_features, in_features]; frozen here.
        r: rank (>= 1).
        alpha: scale numerator (> 0); s = alpha / r, or alpha / sqrt(r) with ``rslora``.
        dropout: dropout probability on the adapter's input, in [0, 1).
        rslora: use s = alpha / sqrt(r).
        init: ``"kaiming"`` (A ~ U(+-1/sqrt(in))) or ``"gaussian"`` (A normal, std 1/r); B = 0.
        adapter_dtype: dtype of A and B (float32; float64 for gradient checks).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming",
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_args(base, r, alpha, dropout, init)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora, self.init = r, alpha, bool(rslora), init
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base.parameters()).device
        kw = dict(dtype=adapter_dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))    # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))   # [out, r]
        self.reset_adapter()
        self.merged = False
        self._unmerge_state = None

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A random (``init``), B = 0: the layer equals its base."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1 / self.r)
        nn.init.zeros_(self.lora_B)

    @property
    def acc_dtype(self) -> torch.dtype:
        """float64 when the adapter or a dense base is float64, else float32."""
        w = getattr(self.base, "weight", None)
        wide = self.lora_A.dtype == torch.float64 or (w is not None and w.dtype == torch.float64)
        return torch.float64 if wide else torch.float32

    def delta_weight(self) -> torch.Tensor:
        """s B A: [out, in] (only for merging and inspection; training never builds it)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def add_lora(self, y: torch.Tensor, xd: torch.Tensor, k: torch.Tensor | None = None):
        """y + x~ A^T (s k B)^T: s (and DoRA's per-row k) scale B, an [out, r] product, rather
        than the [..., out] result. (Not ``torch.add(..., alpha=s)``: torch.compile in torch
        2.13 drops that alpha when it fuses the add into the matmul.)

        Args:
            y: [..., out_features] in the accumulation dtype.
            xd: [..., in_features], the adapter's (dropped-out) input x~.
            k: [out_features] or None.
        """
        a = xd.to(self.lora_A.dtype) @ self.lora_A.T                        # [..., r]
        B = self.scaling * (self.lora_B if k is None else k[:, None] * self.lora_B)  # [out, r]
        return y + a.to(y.dtype) @ B.T.to(y.dtype)                          # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        y = base_linear(self.base, x)                                       # [..., out]
        if self.merged:
            return y.to(x.dtype)
        return self.add_lora(y.to(self.acc_dtype), self.dropout(x)).to(x.dtype)

    # --- merging ---------------------------------------------------------------------------------

    def merged_weight(self) -> torch.Tensor:
        """The exact merged weight W0 + s B A, [out, in] in acc_dtype (nothing is changed)."""
        w0 = base_weight(self.base, self.acc_dtype)
        return w0 + self.delta_weight().to(w0.dtype)

    def _unmerge_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight().to(w.dtype)

    @torch.no_grad()
    def merge(self, warn: bool = True) -> float:
        """Fold the adapter into the base weight; forward then runs the base alone.

        Returns:
            How much of the adapter's update the stored weight lost, relative to the update:
            ||stored - exact|| / ||exact - W0|| (0.0 when the base stores it exactly, or when
            the update is zero). A dense float32/float64 base keeps it exactly; an NF4 base is
            re-quantized (dequantize, merge, quantize again), which can lose most of a small
            update: then (``warn``) a warning says so. :func:`minidora.merge_and_unload` keeps
            the update in a dense layer instead.
        """
        if self.merged:
            raise RuntimeError("this layer is already merged; call unmerge() first")
        w0 = base_weight(self.base, self.acc_dtype)                          # [out, in]
        exact = self.merged_weight()                                         # [out, in]
        if isinstance(self.base, NF4Linear):
            self._unmerge_state = {"nf4": self.base.weight_nf4}  # restore these bytes exactly
            q = nf4.quantize(exact.float(), self.base.blocksize, self.base.double_quant)
            q.dtype = self.base.weight_dtype
            self.base._load_weight(q)
        else:
            self._unmerge_state = self._dense_unmerge_state(w0, exact)
            self.base.weight.copy_(exact)
        self.merged = True
        update = (exact - w0).norm()
        err = 0.0 if update == 0 else ((base_weight(self.base, exact.dtype) - exact).norm()
                                       / update).item()
        if warn and err > MERGE_WARN:
            warnings.warn(f"merging lost {err:.0%} of the adapter's update (the base stores the "
                          f"merged weight as {self._storage()}); minidora.merge_and_unload keeps "
                          "it in a dense layer", stacklevel=3)
        return err

    def _storage(self) -> str:
        return "NF4" if isinstance(self.base, NF4Linear) else str(self.base.weight.dtype)

    def _dense_unmerge_state(self, w0: torch.Tensor, exact: torch.Tensor) -> dict:
        return {}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: exact bytes for an NF4 base, exact up to rounding for a dense one."""
        if not self.merged:
            raise RuntimeError("this layer is not merged")
        state = getattr(self, "_unmerge_state", None)
        if state is None and (isinstance(self.base, NF4Linear) or isinstance(self, _NeedsState)):
            raise RuntimeError("this layer's merged weight came from a loaded state dict: its "
                               "unmerged weight cannot be recovered from it; load an unmerged "
                               "state instead")
        if isinstance(self.base, NF4Linear):
            self.base._load_weight(state["nf4"])
        else:
            self.base.weight.copy_(self._unmerge_weight(base_weight(self.base, self.acc_dtype)))
        self._unmerge_state = None
        self.merged = False

    # --- state: ``merged`` travels with state_dict; adapters keep their dtype --------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "merged"] = torch.tensor(self.merged)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        flag = state_dict.pop(prefix + "merged", None)    # absent in older state dicts
        if flag is not None:
            if not isinstance(flag, torch.Tensor) or flag.numel() != 1 or flag.is_floating_point():
                error_msgs.append(f"{prefix}merged must be a one-element bool tensor, got {flag!r}")
            else:
                self.merged, self._unmerge_state = bool(flag.item()), None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not turn trainable adapters into bf16 behind the user's
        # back: they keep their dtype (minidora.cast_adapters changes it on purpose).
        own = {id(t) for p in self._parameters.values() if p is not None
               for t in (p, p.grad) if t is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) not in own or out.dtype == t.dtype:
                return out
            return t.to(device=out.device)          # a cast: follow the device only

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, "
                f"dropout={self.dropout_p}, merged={self.merged}")
