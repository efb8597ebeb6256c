r"""DoRA: weight-decomposed low-rank adaptation (QDoRA when the base is NF4).

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv 2402.09353, eq. 5,
with one magnitude per output row (W_0 \in R^{out \times in}, norms over each row):

.. math::  W' = \frac{m}{c}\,V', \qquad V' = W_0 + s B A, \qquad c_i = \lVert V'_{i,:} \rVert_2

m [out] is trained and starts at c (so W' = W_0 at init); the bias is never scaled. Sec. 4.3:
treat c as a constant in backward (``detach_norm=True``, the default, as in every result of the
paper); ``detach_norm=False`` gives the exact gradient. A zero row (c_i = 0, real in large
models) would divide by zero: c is clamped at ``eps`` = 1e-12 as ``F.normalize`` does (c^2 at
eps^2 before the square root, so the backward stays finite too). Such a row starts with
m_i = 0 and gets zero gradients: it stays zero, as W_0's row was.

**Without building W'.** With k = m / c, y = x W'^T + b equals

.. math::  y = x W_0^\top + b + (k - 1)\odot(\tilde x W_0^\top) + k \odot s\,\tilde x A^\top B^\top,
           \qquad \tilde x = \text{dropout}(x)

(one base product when dropout is off; k s B is an [out, r] product folded into the adapter's
second matmul, so the scaling costs no extra pass). No [out, in] temporary is ever formed:

.. math::  c_i^2 = \lVert W_{0,i}\rVert^2 + 2s\,[(W_0 A^\top)\odot B]_{i,\cdot}\mathbf 1
           + s^2\,[(B A A^\top)\odot B]_{i,\cdot}\mathbf 1

W_0 A^T is one base product with A as the input ([out, r]), in the same precision as the
forward's base product (a bf16 base: bf16 inputs, float32 accumulation; its rounding is then
below that of the bf16 output); the rest is [out, r] work, summed in float32 or better and
clamped at eps^2 before the square root. :math:`\lVert W_{0,i}\rVert^2` is computed again at
every call, a chunk of rows at a time (one pass over W_0, a few percent of a training step:
docs/bench-dora.md), and never cached: a cache cannot see every way a base changes (writes
through ``.data`` and fused optimizer steps leave no trace; a compiled graph would keep the
value it was traced with). :func:`dora_reference` keeps the plain formula as the
specification; the tests hold the fast path to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import base as frozen
from .lora import LoRALinear

__all__ = ["DoRALinear", "dora_reference"]

EPS = 1e-12  # clamp of the row norm c, as torch.nn.functional.normalize


def dora_reference(x, W0, bias, A, B, m, s, detach_norm=True, eps=EPS):
    """The formula itself: builds V' and W'. x: [..., in], W0: [out, in], m: [out] -> [..., out].
    ``detach_norm`` as in :class:`DoRALinear` (True: c is a constant in backward, sec. 4.3)."""
    V = W0 + s * (B @ A)                                       # [out, in]
    c = torch.linalg.vector_norm(V, dim=1).clamp_min(eps)      # [out]
    if detach_norm:
        c = c.detach()
    return F.linear(x, (m / c)[:, None] * V, bias)


def base_times_At(base: nn.Module, A: torch.Tensor) -> torch.Tensor:
    """W0 A^T: [out, r] in A's dtype, differentiable in A: one base product with A as the input,
    in the dtype of the forward's base product (e.g. bfloat16 with float32 accumulation)."""
    return frozen.product(base, A, bias=False).T.to(A.dtype)                  # [out, r]


class DoRALinear(LoRALinear):
    """DoRA (or QDoRA) around a frozen base layer; m (``magnitude``) is [out_features].

    Args:
        base: ``nn.Linear`` or ``NF4Linear`` with weight [out_features, in_features]; frozen here.
        r: rank (>= 1).
        alpha: scale numerator (> 0); s = alpha / r, or alpha / sqrt(r) with ``rslora``.
        dropout: dropout probability on the adapter's input, in [0, 1).
        rslora: use s = alpha / sqrt(r).
        init: ``"kaiming"`` or ``"gaussian"`` for A; B = 0.
        detach_norm: treat c as a constant in backward (paper sec. 4.3); False: exact gradient.
        adapter_dtype: dtype of A, B and m (float32; float64 for gradient checks).
        eps: lower clamp of c.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", detach_norm: bool = True,
                 adapter_dtype: torch.dtype = torch.float32, eps: float = EPS):
        super().__init__(base, r, alpha, dropout, rslora, init, adapter_dtype)
        self.detach_norm, self.eps = bool(detach_norm), eps
        self.magnitude = nn.Parameter(torch.empty(self.out_features, dtype=adapter_dtype,
                                                  device=self.lora_A.device))   # [out]
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A random, B = 0 and m = ||W0|| per row: the layer equals its base."""
        super().reset_adapter()
        if hasattr(self, "magnitude"):      # c at B = 0, as forward computes it: k = m / c = 1
            self.magnitude.copy_(self.weight_norm_sq().clamp_min(0).sqrt())

    def w0_norm_sq(self) -> torch.Tensor:
        """||W0[i, :]||^2 per row of the weight the forward applies, [out] in acc_dtype: from the
        base as it is now, at every call (never cached, so never stale)."""
        return frozen.row_norms_sq(self.base, dtype=self.acc_dtype)

    def weight_norm_sq(self) -> torch.Tensor:
        """c^2 = ||W0 + s B A||^2 per row, by the identity above: [out] in acc_dtype."""
        acc, s = self.acc_dtype, self.scaling
        A, B = self.lora_A.to(acc), self.lora_B.to(acc)                # [r, in], [out, r]
        cross = (base_times_At(self.base, A) * B).sum(1)               # [out]
        quad = ((B @ (A @ A.T)) * B).sum(1)                            # [out]
        return self.w0_norm_sq() + 2 * s * cross + s * s * quad

    def weight_norm(self) -> torch.Tensor:
        """c = ||W0 + s B A|| per row, clamped at eps (finite value and gradient): [out]."""
        c = self.weight_norm_sq().clamp_min(self.eps ** 2).sqrt()
        return c.detach() if self.detach_norm else c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype (a real floating type)."""
        frozen.check_input(x)
        if self.merged:
            return frozen.product(self.base, x).to(x.dtype)
        acc, b = self.acc_dtype, self.base.bias
        k = self.magnitude.to(acc) / self.weight_norm()                # [out]
        if self.training and self.dropout_p > 0:                       # x~ != x: two base products
            xd = self.dropout(x)                                       # [..., in]
            y = torch.addcmul(frozen.product(self.base, x).to(acc),       # x W0^T + b
                              frozen.product(self.base, xd, bias=False).to(acc), k - 1)
        else:                                                          # x~ = x: one base product
            xd = x
            y = frozen.product(self.base, x, bias=False).to(acc)          # [..., out]
            y = y * k if b is None else torch.addcmul(b.to(acc), y, k)
        return self.add_lora(y, xd, k).to(x.dtype)                     # + k s x~ A^T B^T

    # --- merging: W = k V' with the k = m / c of forward; unmerge divides by the k merge kept ---

    def merge_scale(self) -> torch.Tensor:
        """k = m / c per row, with the c forward uses: [out] in acc_dtype (k = 1 exactly at
        init, so an untrained adapter merges to W0 itself)."""
        return self.magnitude.to(self.acc_dtype) / self.weight_norm()

    def merged_weight(self) -> torch.Tensor:
        """The exact merged weight k V', [out, in] in acc_dtype (nothing is changed)."""
        return self.merge_scale()[:, None] * super().merged_weight()    # V' = W0 + s B A

    _unmerge_extra_needed = True

    def _unmerge_extra(self, w0: torch.Tensor) -> dict:
        k = self.merge_scale()
        zero = (k == 0).nonzero().view(-1)          # rows a division cannot bring back
        return {"k": k, "zero_rows": zero, "w0_rows": w0[zero].clone()}

    def _unmerge_weight(self, w: torch.Tensor) -> torch.Tensor:
        st = self._unmerge_state
        k = st["k"].to(w.dtype)
        safe_k = torch.where(k == 0, torch.ones_like(k), k)
        w0 = w / safe_k[:, None] - self.delta_weight().to(w.dtype)
        w0[st["zero_rows"]] = st["w0_rows"].to(w.dtype)
        return w0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"
