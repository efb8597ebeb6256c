r"""FP4 (bitsandbytes' E2M1) and a symmetric absmax Int4: the other 4-bit formats of QLoRA.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, arXiv 2305.14314, Table 2
compares NF4 (:mod:`minidora.nf4`) with these two on the same blockwise absmax scheme: flatten W
row-major, cut it into blocks of ``blocksize`` elements, store per block :math:`a_b = \max|x|`
and per element a 4-bit code of :math:`x \cdot (1 / a_b)`; dequantize as
:math:`\hat x = v[q] \cdot a_b`. Only the 16 values :math:`v` differ.

**FP4 as bitsandbytes defines it.** One sign bit, two exponent bits, one mantissa bit, but not
IEEE's E2M1 (whose largest value is 6 and smallest step 0.5, i.e. 1/12 of it). For the three
bits :math:`e_1 e_0 m` below the sign bit:

.. math::  |v| = \tfrac{1}{12}\begin{cases} m / 16 & e = 0 \\
                                              2^{4 - e}\,(1 + m / 2) & e = 1, 2, 3 \end{cases}

so the magnitudes of codes 0..7 are 0, 1/192, 8/12, 1, 4/12, 6/12, 2/12, 3/12 (the largest
exponent field is the *smallest* normal value), and codes 8..15 are their negatives. The code of
a value is the nearest one, the lower in sorted order at an exact midpoint, as bitsandbytes'
CPU quantize finds it. The two zeros split the values around zero: bitsandbytes gives code 0
(+0) to ``x`` in (-1/384, 0] and code 8 (-0) to ``x`` in (0, 1/384]; code 8 decodes to
-0.0, as in bitsandbytes' CPU kernels (its Python fallback, taken for an odd last dimension,
decodes it to +0.0).
Packing and padding as NF4's, except that an odd count is padded with code 0 (the value 0.0).
A partial last block is normalized as the whole ones, by the reciprocal of its absmax, as
:mod:`minidora.nf4` does (bitsandbytes' CPU quantize divides there instead: a value whose
quotient lands on a midpoint can then take the neighbouring code; docs/format.md).

**Int4, symmetric absmax.** The 15 values :math:`k / 7`, k = -7..7, stored as code k + 7 (code
15 is unused); the nearest value, the lower at a midpoint. Padded with code 7 (the value 0.0).

Public entry points: :func:`quantize`, :func:`dequantize`, the :class:`Quantized4bit` they pass
around, :func:`fp4_code` and the tables :data:`FP4_CODE`, :data:`INT4_CODE`. The steps are
:mod:`minidora.nf4`'s (:func:`~minidora.nf4.to_float32`, :func:`~minidora.nf4.blockwise_absmax`,
:func:`~minidora.nf4.normalize`, :func:`~minidora.nf4.nearest_code`, :func:`~minidora.nf4.pack`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import nf4

__all__ = ["Quantized4bit", "quantize", "dequantize", "codes_of", "fp4_code", "FP4_CODE",
           "INT4_CODE", "FORMATS"]

FORMATS = ("fp4", "int4")


def fp4_code() -> torch.Tensor:
    """The 16 values of bitsandbytes' FP4, in code (bit-pattern) order, from the formula above.

    Returns:
        [16] float32: codes 0..7 are >= 0, code 8 + i is the negative of code i.
    """
    mags = []
    for bits in range(8):
        e, m = bits >> 1, bits & 1
        mags.append(m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2))   # 0, 1/16, 8, 12, ...
    values = torch.tensor(mags + [-v for v in mags], dtype=torch.float32)   # code 8: -0.0
    return values / values.max()                                          # / 12, in float32


FP4_CODE = fp4_code()                                                      # [16] float32
INT4_CODE = torch.cat([torch.arange(-7, 8, dtype=torch.float32) / 7,
                       torch.zeros(1)])                                    # [16]; code 15 unused
# The values in increasing order and the code each sorted position stands for. A stable sort
# puts code 0 (+0) before code 8 (-0): the order bitsandbytes' midpoints are taken in.
_FP4_ORDER = torch.sort(FP4_CODE, stable=True).indices                     # [16]
_PAD = {"fp4": 0, "int4": 7}                                               # the code of 0.0


@dataclass
class Quantized4bit:
    """A weight in FP4 or Int4, laid out as bitsandbytes lays out its 4-bit weights.

    Attributes:
        packed: [ceil(n / 2)] uint8, two 4-bit codes per byte, first element in the high nibble.
        absmax: [n_blocks] float32 scales.
        shape: the original weight shape, e.g. (out_features, in_features).
        dtype: the original weight dtype (what :func:`dequantize` returns by default).
        fmt: ``"fp4"`` or ``"int4"``.
        blocksize: elements per block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    fmt: str
    blocksize: int = 64

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def code(self) -> torch.Tensor:
        """The format's 16 values, [16] float32."""
        return FP4_CODE if self.fmt == "fp4" else INT4_CODE


def _check(weight, fmt, blocksize) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 32
            or blocksize > 4096 or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    nf4.check_float_dtype(weight.dtype, "weight")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    bad = ~torch.isfinite(weight)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight has {int(bad.sum())} NaN/Inf value(s), first at index {first}: "
                         "quantizing them would poison their whole block")


def codes_of(scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    """The code (int64, shape of ``scaled``) of each normalized value in [-1, 1]: the nearest
    value of the format, the lower in sorted order at a midpoint."""
    if fmt == "int4":
        return nf4.nearest_code(scaled, INT4_CODE[:15])                   # k + 7
    order = _FP4_ORDER.to(scaled.device)
    return order[nf4.nearest_code(scaled, FP4_CODE[order])]               # sorted -> code


def quantize(weight: torch.Tensor, fmt: str = "fp4", blocksize: int = 64) -> Quantized4bit:
    """Quantize a floating-point tensor to FP4 (bit-exact with bitsandbytes) or Int4.

    Args:
        weight: any shape, float32 / bfloat16 / float16 / float64, finite, non-empty.
        fmt: ``"fp4"`` (bitsandbytes' FP4) or ``"int4"`` (symmetric absmax, 15 levels).
        blocksize: elements per absmax block, a power of two in 32..4096.

    Returns:
        A :class:`Quantized4bit`.
    """
    _check(weight, fmt, blocksize)
    x = nf4.to_float32(weight)                                             # [n]
    blocks, absmax = nf4.blockwise_absmax(x, blocksize)                    # [nb, bs], [nb]
    codes = codes_of(nf4.normalize(blocks, absmax), fmt).view(-1)[: x.numel()]   # [n]
    if codes.numel() % 2:                                                  # pad with 0.0's code
        codes = torch.cat([codes, codes.new_full((1,), _PAD[fmt])])
    return Quantized4bit(nf4.pack(codes), absmax, tuple(weight.shape), weight.dtype, fmt,
                         blocksize)


def dequantize(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a :class:`Quantized4bit` to a dense tensor of its shape (default: its dtype).

    out = float32(value[code]) * float32(scale), cast once to ``dtype``.
    """
    dtype = q.dtype if dtype is None else dtype
    nf4.check_float_dtype(dtype, "dtype")
    if q.fmt not in FORMATS:
        raise ValueError(f"q.fmt must be one of {', '.join(FORMATS)}, got {q.fmt!r}")
    codes = nf4.unpack(q.packed, q.numel)                                  # [n]
    scales = q.absmax.repeat_interleave(q.blocksize)[: q.numel]            # [n]
    values = q.code.to(q.packed.device)[codes] * scales
    return values.to(dtype).view(q.shape)
