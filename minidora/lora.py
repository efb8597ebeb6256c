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
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import base as frozen
from ._state import AdapterModule

__all__ = ["LoRALinear", "lora_reference"]

INITS = ("kaiming", "gaussian")
MERGE_WARN = 0.1   # merge() warns when the stored weight lost more than this share of the update


def lora_reference(x, W0, bias, A, B, s):
    """The formula itself: y = x (W0 + s B A)^T + b. x: [..., in], W0: [out, in] -> [..., out]."""
    return F.linear(x, W0 + s * (B @ A), bias)


def _check_args(base, r, alpha, dropout, init) -> None:
    frozen.check(base)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:   # np.int64 too
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class LoRALinear(AdapterModule):
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

    _unmerge_extra_needed = False    # DoRA: a dense unmerge needs what merge() kept (its k)

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming",
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_args(base, r, alpha, dropout, init)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora, self.init = int(r), alpha, bool(rslora), init
        self.scaling = alpha / (math.sqrt(self.r) if rslora else self.r)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base.parameters()).device
        kw = dict(dtype=adapter_dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kw))    # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **kw))   # [out, r]
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
        """x: [..., in_features] -> [..., out_features] in x's dtype (a real floating type)."""
        frozen.check_input(x)
        y = frozen.product(self.base, x)                                    # [..., out]
        if self.merged:
            return y.to(x.dtype)
        return self.add_lora(y.to(self.acc_dtype), self.dropout(x)).to(x.dtype)

    # --- merging ---------------------------------------------------------------------------------

    def merged_weight(self) -> torch.Tensor:
        """The exact merged weight W0 + s B A, [out, in] in acc_dtype (nothing is changed)."""
        w0 = frozen.weight(self.base, self.acc_dtype)
        return w0 + self.delta_weight().to(w0.dtype)

    def _unmerge_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight().to(w.dtype)

    @torch.no_grad()
    def merge(self, warn: bool = True) -> float:
        """Fold the adapter into the base weight; forward then runs the base alone.

        Returns:
            The share of the adapter's update the stored weight lost: ||stored - exact|| /
            ||exact - W0||. A dense float32/float64 base keeps it exactly (0.0); an NF4 base is
            re-quantized (dequantize, merge, quantize again), which can lose most of a small
            update: then (``warn``) a warning says so, and :func:`minidora.merge_and_unload`
            keeps the update in a dense layer instead. An update within rounding of zero
            (||exact - W0|| <= eps ||W0||, eps of exact's dtype: an untrained adapter) has no
            share to lose: the figure is then ||stored - exact|| / ||W0||, how far storing moved
            the weight (:func:`minidora.base.share_lost`).

        Raises:
            RuntimeError: the layer is already merged.
            ValueError: the weights are on the meta device, or the base would store the merged
                weight as inf or NaN (it overflows the base's dtype); nothing is changed.
        """
        if self.merged:
            raise RuntimeError("this layer is already merged; call unmerge() first")
        if any(t.is_meta for t in (*self.parameters(), *self.buffers())):
            raise ValueError("the layer's weights are on the meta device (built under "
                             "torch.device('meta')) and hold no values to merge; materialize "
                             "them first (model.to_empty(device=...), then load_state_dict)")
        w0 = frozen.weight(self.base, self.acc_dtype)                        # [out, in]
        exact = self.merged_weight()                                         # [out, in]
        extra = self._unmerge_extra(w0)
        self._unmerge_state = {"base": frozen.store(self.base, exact), **extra}
        self.merged = True
        err = frozen.share_lost(self.base, w0, exact)
        if warn and err > MERGE_WARN:
            warnings.warn(f"merging lost {err:.0%} of the adapter's update (the base stores the "
                          f"merged weight as {frozen.storage(self.base)}); "
                          "minidora.merge_and_unload keeps it in a dense layer", stacklevel=3)
        return err

    def _unmerge_extra(self, w0: torch.Tensor) -> dict:
        """What unmerging a dense base needs besides the merged weight (DoRA: its k = m / c)."""
        return {}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: exact bytes for an NF4 base, exact up to rounding for a dense one."""
        if not self.merged:
            raise RuntimeError("this layer is not merged")
        state = self._unmerge_state
        if state is None and (not isinstance(self.base, nn.Linear) or self._unmerge_extra_needed):
            raise RuntimeError("this layer's merged weight came from a loaded state dict: its "
                               "unmerged weight cannot be recovered from it; load an unmerged "
                               "state instead")
        if state is not None and state["base"] is not None:      # the exact old bytes
            frozen.restore(self.base, state["base"])
        else:                                                    # a dense base: W0 = W - s B A
            frozen.store(self.base, self._unmerge_weight(frozen.weight(self.base, self.acc_dtype)))
        self._unmerge_state = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, "
                f"dropout={self.dropout_p}, merged={self.merged}")
