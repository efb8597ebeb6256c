r"""NF4 4-bit quantization with double quantization: the storage format of QLoRA.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, arXiv 2305.14314, sec. 3.
This is a plain PyTorch reference that reproduces bitsandbytes bit for bit.

**NormalFloat4.** The 16 code values are quantiles of N(0, 1), rescaled to [-1, 1], with an exact
zero and 8 positive / 7 negative values ("two ranges"):

.. math::  q_i = Q(p_i) / Q(\delta), \quad
           \delta = \tfrac12\big((1 - \tfrac1{30}) + (1 - \tfrac1{32})\big)

**Blockwise absmax.** Flatten W row-major, cut it into blocks of ``blocksize`` elements, store
per block :math:`a_b = \max |x|` and per element the index of the code value nearest to
:math:`x \cdot (1 / a_b)`. Dequantize: :math:`\hat x = c[q] \cdot a_b`.

**Double quantization (DQ).** The float32 scales cost 32/64 = 0.5 bit per parameter. DQ
subtracts their mean and stores them with an 8-bit dynamic code in blocks of 256 scales, plus
one float32 per 256 scales: 8/64 + 32/(64*256) = 0.127 bit (eq. 6 of the paper).

Public entry points: :func:`quantize`, :func:`dequantize`, and the :class:`NF4Weight` they pass
around. :func:`quantize` is a chain of small steps, each a function of its own so that a variant
can change exactly one (:mod:`minidora.testing.nf4_mistakes` does): :func:`to_float32`,
:func:`blockwise_absmax`, :func:`normalize`, :func:`nearest_code`, :func:`pack`, and with DQ
:func:`double_quantize` (:func:`mean_scale`, :func:`quantize_scales`, :func:`dynamic_code`).

**Edges.** A float64 weight beyond float32's range is refused (the scales are float32). A
subnormal nested absmax is not clamped in DQ, as in bitsandbytes: its float32 reciprocal is inf,
so the scales of that block get the extreme codes 0 and 255, and a scale equal to the offset
(0 * inf = NaN) gets code 0, the code bitsandbytes' NaN-to-integer conversion yields on x86
(AVX2 and AVX-512 alike) and on ARM (:func:`dynamic_code`).

bitsandbytes' checkpoint keys are written and read by :mod:`minidora.bnb_checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._tables import DYNAMIC_MAP

__all__ = [
    "NF4Weight", "quantize", "dequantize", "nf4_codebook", "NF4_CODEBOOK", "DYNAMIC_CODE",
    "storage_bits_per_param", "FLOAT_DTYPES", "check_float_dtype",
]

NESTED_BLOCKSIZE = 256  # scales per double-quantization block (fixed by bitsandbytes)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # weights, inputs
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


def nf4_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the 16 NF4 values from normal quantiles, in float32, as bitsandbytes does.

    Returns:
        [16] float32, sorted, from -1.0 to 1.0 with an exact 0.0 at index 7.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 positive
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 negative
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()


NF4_CODEBOOK = nf4_codebook()                                          # [16] float32
DYNAMIC_CODE = torch.tensor(DYNAMIC_MAP, dtype=torch.float32)          # [256] float32


@dataclass
class NF4Weight:
    """A weight stored in NF4, laid out exactly as bitsandbytes stores it.

    Attributes:
        packed: [ceil(n / 2)] uint8, two 4-bit codes per byte, first element in the high nibble.
        absmax: [n_blocks] float32 scales, or uint8 codes into DYNAMIC_CODE with double quant.
        shape: the original weight shape, e.g. (out_features, in_features).
        dtype: the original weight dtype (what :func:`dequantize` returns by default).
        blocksize: elements per block (power of two, 32..4096).
        nested_absmax: [ceil(n_blocks / 256)] float32, double quant only.
        offset: 0-dim float32, the mean subtracted from the scales, double quant only.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes, scales, and the double-quant statistics."""
        n = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4  # nested scales + offset
        return n

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def scales(self) -> torch.Tensor:
        """The float32 per-block scales, decoding the double quantization if present."""
        return decode_scales(self.absmax, self.nested_absmax, self.offset)

    def plain_scales(self) -> NF4Weight:
        """The same weight with its double-quantized scales decoded to float32 (same values)."""
        return NF4Weight(self.packed, self.scales(), self.shape, self.dtype, self.blocksize)

    def rows(self, r0: int, r1: int) -> NF4Weight:
        """Rows r0:r1 of a 2-D weight with float32 scales, sharing storage. The rows must start
        a block and a byte (r0 * in_features a multiple of blocksize); the last block may be
        partial, as at the end of any weight."""
        n_out, n_in = self.shape
        e0, e1 = r0 * n_in, r1 * n_in
        if self.double_quant or e0 % self.blocksize or not 0 <= r0 < r1 <= n_out:
            raise ValueError(f"rows({r0}, {r1}) needs float32 scales (plain_scales()), rows within "
                             f"{n_out}, and r0 * {n_in} a multiple of blocksize {self.blocksize}")
        bs = self.blocksize
        return NF4Weight(self.packed[e0 // 2:(e1 + 1) // 2], self.absmax[e0 // bs:-(-e1 // bs)],
                         (r1 - r0, n_in), self.dtype, bs)


def storage_bits_per_param(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per parameter of an NF4 tensor with ``numel`` elements (codes + scales)."""
    n_blocks = -(-numel // blocksize)
    nbytes = -(-numel // 2) + (n_blocks if double_quant else 4 * n_blocks)
    if double_quant:
        nbytes += 4 * -(-n_blocks // NESTED_BLOCKSIZE) + 4
    return 8 * nbytes / numel


def _check_blocksize(blocksize) -> None:
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 32
            or blocksize > 4096 or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")


def check_float_dtype(dtype, name: str) -> None:
    """Raise TypeError naming ``name`` unless ``dtype`` is one of :data:`FLOAT_DTYPES`."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {dtype}")


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    check_float_dtype(weight.dtype, "weight")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if weight.is_meta:   # no values to check (a model built on the meta device)
        return
    bad = ~torch.isfinite(weight)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight has {int(bad.sum())} NaN/Inf value(s), first at index {first}: "
                         "quantizing them would poison their whole block")


# --- the steps of quantize, in order (public so that a variant can change exactly one) ------

def to_float32(weight: torch.Tensor) -> torch.Tensor:
    """Flatten ``weight`` row-major and upcast (or, from float64, round) it to float32.

    Returns:
        [n] float32.

    Raises:
        ValueError: a float64 value beyond float32's range: the scales are float32, as in
            bitsandbytes' format, so such a weight has no NF4 form.
    """
    x = weight.detach().reshape(-1).to(torch.float32)                      # [n]
    if weight.dtype == torch.float64 and not x.is_meta:
        big = torch.isinf(x)
        if big.any():
            first = tuple(int(i) for i in big.view(weight.shape).nonzero()[0])
            raise ValueError(
                f"weight has {int(big.sum())} value(s) beyond float32's range, first at index "
                f"{first}: {weight[first].item():g} (max |w| {weight.abs().max().item():g}); NF4 "
                "scales are float32 (bitsandbytes' format), so |w| must be at most float32's max, "
                f"{torch.finfo(torch.float32).max:.8g}")
    return x


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad x [n] with zeros to whole blocks.

    Returns:
        (blocks [n_blocks, blocksize], absmax [n_blocks]): the blocks and their max |x|.
    """
    pad = -x.numel() % blocksize
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)                  # [n_blocks, bs], [n_blocks]


def normalize(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """blocks [n_blocks, bs] * (1 / absmax) [n_blocks]: multiply by the float32 reciprocal, as
    bitsandbytes does (``x / absmax`` rounds differently next to a midpoint). The divisor is
    clamped at 1e-38, so that an all-zero block gives zeros, not NaN."""
    return blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def nearest_code(scaled: torch.Tensor, code: torch.Tensor = NF4_CODEBOOK) -> torch.Tensor:
    """Index (int64, shape of ``scaled``) of the nearest value of the sorted ``code``; an exact
    tie goes to the lower index."""
    return torch.bucketize(scaled, _midpoints(code.to(scaled.device)), right=False)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[n] codes 0..15 -> [ceil(n / 2)] uint8, the first of each pair in the high nibble; an odd
    count is padded with code 7 (the value 0.0)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)             # [ceil(n/2)]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """[ceil(numel / 2)] uint8 -> [numel] int64 codes (the inverse of :func:`pack`)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel].long()


# bitsandbytes finds the 8-bit code of a scale through a 65536-entry table rather than an exact
# search: the normalised value v in [-1, 1] picks grid point
# i = trunc(((v + 1) * 0.5) * 65535 + 0.5),
# and the table holds the nearest dynamic-map entry to that grid point, -1 + 2i / 65535. A value
# within about 1.5e-5 of a midpoint can so land one code away from its exact nearest one (a few
# codes per thousand). Reproducing the grid keeps the scale codes bit-exact.
_GRID = 65535


def _dynamic_grid_table() -> torch.Tensor:
    grid = -1.0 + (2.0 * torch.arange(_GRID + 1, dtype=torch.float32)) / _GRID   # [65536]
    return nearest_code(grid, DYNAMIC_CODE)                                        # [65536] codes


_DYNAMIC_TABLE = _dynamic_grid_table()


def mean_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The offset of double quantization: the float32 mean of the scales [n_blocks], 0-dim."""
    offset = absmax.mean()
    if not absmax.is_meta and not torch.isfinite(offset):
        # a float32 sum of huge scales overflows where the mean itself does not: sum in float64
        offset = absmax.double().mean().float()
    return offset


def dynamic_code(v: torch.Tensor) -> torch.Tensor:
    """8-bit codes (int64, shape of ``v``) of normalized scales v, through bitsandbytes' grid.

    v is clamped to [-1, 1]. A NaN v (0 * inf: a scale equal to the offset in a block whose
    nested absmax is 0 or subnormal, so that its float32 reciprocal is inf) takes grid point 0,
    hence code 0: bitsandbytes converts NaN to an integer whose low 16 bits are 0 (x86's
    "integer indefinite" 0x80000000 in both its AVX2 and AVX-512 builds, and 0 on ARM).
    """
    v = v.clamp(-1.0, 1.0)                                      # NaN stays NaN
    grid_index = (((v + 1.0) * 0.5) * _GRID + 0.5).nan_to_num(0.0).to(torch.int64)  # truncation
    return _DYNAMIC_TABLE.to(v.device)[grid_index]


def quantize_scales(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales minus their offset, v [n_blocks] float32 -> (uint8 codes [n_blocks], nested_absmax
    [ceil(n_blocks / 256)] float32), in blocks of 256.

    Unlike the 4-bit step, bitsandbytes does not clamp the nested absmax here: where it is
    subnormal its reciprocal is inf, and the scales of that block get code 255 (above the
    offset), 0 (below it) or 0 (equal to it, NaN; see :func:`dynamic_code`).
    """
    blocks, nested = blockwise_absmax(v, NESTED_BLOCKSIZE)                    # [nb2, 256], [nb2]
    codes = dynamic_code(blocks * (1.0 / nested)[:, None])                    # [nb2, 256]
    return codes.view(-1)[: v.numel()].to(torch.uint8), nested


def double_quantize(absmax: torch.Tensor):
    """Scales [n_blocks] float32 -> (uint8 codes [n_blocks], nested_absmax [ceil(n_blocks / 256)]
    float32, offset 0-dim float32): the offset is their mean, and ``absmax - offset`` is coded
    by :func:`quantize_scales`."""
    offset = mean_scale(absmax)
    codes, nested = quantize_scales(absmax - offset)
    return codes, nested, offset


def decode_scales(absmax, nested_absmax, offset) -> torch.Tensor:
    """The float32 scales [n_blocks]: ``absmax`` itself, or with double quantization
    float32(dynamic_map[code] * nested) + offset (two roundings, in that order)."""
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    nested = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]       # [n_blocks]
    return DYNAMIC_CODE.to(absmax.device)[absmax.long()] * nested + offset


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a floating-point tensor to NF4, bit-exact with bitsandbytes.

    Args:
        weight: any shape, float32 / bfloat16 / float16 / float64, finite, non-empty (float64:
            within float32's range, as the scales are float32).
        blocksize: elements per absmax block, a power of two in 32..4096.
        double_quant: also quantize the scales (QLoRA's DQ).

    Returns:
        An :class:`NF4Weight`.
    """
    _check_weight(weight)
    _check_blocksize(blocksize)
    x = to_float32(weight)                                               # [n]
    blocks, absmax = blockwise_absmax(x, blocksize)                      # [nb, bs], [nb]
    codes = nearest_code(normalize(blocks, absmax)).view(-1)[: x.numel()]   # [n]
    q = NF4Weight(pack(codes), absmax, tuple(weight.shape), weight.dtype, blocksize)
    if double_quant:
        q.absmax, q.nested_absmax, q.offset = double_quantize(absmax)
    return q


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode an :class:`NF4Weight` to a dense tensor of its shape (default: its dtype).

    out = float32(codebook[code]) * float32(scale), cast once to ``dtype``.
    """
    dtype = q.dtype if dtype is None else dtype
    check_float_dtype(dtype, "dtype")
    if q.double_quant and not isinstance(q.offset, torch.Tensor):
        raise TypeError("q.offset must be a float32 tensor (the mean scale) when q.nested_absmax "
                        f"is set (double quantization), got {type(q.offset).__name__}")
    codes = unpack(q.packed, q.numel)                                                # [n]
    scales = q.scales().repeat_interleave(q.blocksize)[: q.numel]                     # [n]
    values = NF4_CODEBOOK.to(q.packed.device)[codes] * scales
    return values.to(dtype).view(q.shape)

