r"""A frozen linear layer whose weight is stored in NF4: the base of QLoRA and QDoRA.

QLoRA (Dettmers et al., 2023, arXiv 2305.14314), eq. 5, without the adapter term:

.. math::  Y^{\text{BF16}} = X^{\text{BF16}}\,
           \text{doubleDequant}(c_1, c_2, W^{\text{NF4}})^\top + b

The weight never trains; only an adapter on top of it does. Every matmul goes through the single
dispatch point :func:`minidora.ops.nf4_linear` (compiled kernel when built, plain PyTorch
reference otherwise).

**Compute dtype.** The input is cast to ``compute_dtype`` (bfloat16 by default, as in QLoRA; also
float32, float16, or float64 for gradient checks), the product and the bias run in that dtype,
and the result is cast back to the input's dtype, as bitsandbytes' ``Linear4bit`` does, so the
layer drops into a float32 model unchanged.

**State.** As docs/format.md describes, so that DDP/FSDP2 and ``state_dict`` handle it without help:
packed codes (and double-quant scale codes) are frozen uint8 ``nn.Parameter``; float32 scales,
nested scales and the offset are buffers (kept float32 even under ``module.double()`` or
``module.to(torch.bfloat16)``, which would otherwise corrupt them); shape, blocksize and dtypes
are plain attributes. The 16 NF4 values are a constant of the ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import bnb_checkpoint, nf4, ops

__all__ = ["NF4Linear"]

class NF4Linear(nn.Module):
    """Frozen ``y = x W^T + b`` with W in NF4 (optionally double-quantized).

    Args:
        q: the quantized weight, shape (out_features, in_features).
        bias: [out_features] or None; stored frozen in its own dtype.
        compute_dtype: dtype of the matmul (bfloat16, float16, float32 or float64).
    """

    def __init__(self, q: nf4.NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(q, nf4.NF4Weight) or len(q.shape) != 2:
            raise TypeError(f"q must be a 2-D NF4Weight (out_features, in_features), got {q!r:.80}")
        if compute_dtype not in nf4.FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be one of {nf4.FLOAT_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self._load_weight(q)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), "
                                 f"got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    def _load_weight(self, q: nf4.NF4Weight) -> None:
        """(Re)place the stored weight; used at construction and by merging."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"q must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(q.shape)}")
        self.blocksize, self.weight_dtype = q.blocksize, q.dtype
        self.packed = nn.Parameter(q.packed.detach().clone(), requires_grad=False)  # [ceil(n/2)]
        if q.double_quant:   # uint8 scale codes are a frozen parameter, float stats are buffers
            self.absmax = nn.Parameter(q.absmax.detach().clone(), requires_grad=False)
            self.register_buffer("nested_absmax", q.nested_absmax.detach().clone())
            self.register_buffer("offset", q.offset.detach().clone().float())
        else:
            if "absmax" in self._parameters:
                del self._parameters["absmax"]
            self.register_buffer("absmax", q.absmax.detach().clone())
            self.register_buffer("nested_absmax", None)
            self.register_buffer("offset", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight to NF4 (bit-exact with bitsandbytes)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = nf4.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype=compute_dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def weight_nf4(self) -> nf4.NF4Weight:
        """The stored weight as an :class:`~minidora.nf4.NF4Weight` (shares storage)."""
        return nf4.NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features),
                             self.weight_dtype, self.blocksize, self.nested_absmax, self.offset)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, [out_features, in_features], in ``dtype`` (default compute_dtype)."""
        return ops.nf4_dequantize(self.weight_nf4, dtype or self.compute_dtype)

    def row_norms_sq(self, chunk_elems: int = 1 << 20,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """||W[i, :]||^2 of the weight the forward applies (dequantized to compute_dtype), summed
        in ``dtype``, a chunk of whole blocks at a time (at most ``chunk_elems`` elements and an
        eighth of the weight, or one run of whole blocks): [out_features] of ``dtype``."""
        q = self.weight_nf4.plain_scales()
        unit = q.blocksize // math.gcd(self.in_features, q.blocksize)  # rows per whole blocks
        rows = min(chunk_elems, self.out_features * self.in_features // 8) // self.in_features
        step = max(unit, rows // unit * unit)
        out = []
        for r0 in range(0, self.out_features, step):
            w = ops.nf4_dequantize(q.rows(r0, min(self.out_features, r0 + step)),
                                   self.compute_dtype)                       # [rows, in]
            out.append(torch.linalg.vector_norm(w.to(dtype), dim=1).square())
        return torch.cat(out)                                                # [out]

    @torch.no_grad()
    def replace_weight(self, w: torch.Tensor) -> nf4.NF4Weight:
        """Quantize the dense ``w`` [out, in] in place of the stored weight (same blocksize and
        double quantization); returns the old weight for :meth:`restore_weight`."""
        old = self.weight_nf4
        q = nf4.quantize(w.float(), self.blocksize, self.double_quant)
        q.dtype = self.weight_dtype
        self._load_weight(q)
        return old

    def restore_weight(self, q: nf4.NF4Weight) -> None:
        """Put back the exact bytes :meth:`replace_weight` returned."""
        self._load_weight(q)

    def linear(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """x [..., in] -> x W^T (+ b) [..., out], in compute_dtype (no cast back)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():   # a cast would truncate
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a real floating-point tensor (float16, bfloat16, float32 "
                            f"or float64), got {got}")
        x = x.to(self.compute_dtype)
        b = self.bias.to(self.compute_dtype) if (bias and self.bias is not None) else None
        return ops.nf4_linear(x, self.weight_nf4, b)                    # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        return self.linear(x).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Move the float32 statistics with the module but never change their dtype.
        keep = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # load_state_dict would silently cast float32 scales into uint8 codes (or back): refuse.
        for name in ("packed", "absmax", "nested_absmax", "offset"):
            own, new = getattr(self, name), state_dict.get(prefix + name)
            if own is not None and new is not None and new.dtype != own.dtype:
                error_msgs.append(f"{prefix}{name}: the checkpoint holds {new.dtype}, this layer "
                                  f"{own.dtype} (double quantization on in one, off in the other?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # --- bitsandbytes checkpoint layout ---------------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The keys a bitsandbytes ``Linear4bit`` writes (``weight``, ``weight.absmax``, ...)."""
        sd = bnb_checkpoint.to_bnb_state_dict(self.weight_nf4, prefix + "weight")
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        return {k: v.detach() for k, v in sd.items()}

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "",
                            compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Build the layer from bitsandbytes' checkpoint keys (``weight.*`` and optional bias)."""
        q = bnb_checkpoint.from_bnb_state_dict(sd, prefix + "weight")
        if len(q.shape) != 2:
            raise ValueError(f"{prefix}weight must be 2-D for a linear layer, got shape {q.shape}")
        return cls(q, sd.get(prefix + "bias"), compute_dtype=compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
