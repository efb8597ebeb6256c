"""NF4 with one classic mistake at a time: what a wrong quantizer or dequantizer produces.

:func:`~minidora.testing.check_nf4` uses these to say *why* an implementation differs: when
your bytes equal, say, :func:`quantize` with ``mistake="ties_up"``, your quantizer rounds exact
ties the wrong way. With ``mistake=None`` both functions are the format itself (the tests hold
them to :mod:`minidora.nf4`); each mistake changes exactly one step of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import nf4

__all__ = ["MISTAKES", "QUANTIZE_MISTAKES", "DEQUANTIZE_MISTAKES", "quantize", "dequantize",
           "unpack"]

# key: (short name, what the format wants instead)
MISTAKES = {
    "nibbles": ("nibble order swapped",
                "the first element of each pair goes in the HIGH nibble: "
                "byte = (q[2i] << 4) | q[2i+1]"),
    "ties_up": ("ties rounded to the upper code",
                "a value exactly on a midpoint takes the LOWER code "
                "(torch.bucketize(scaled, midpoints, right=False))"),
    "divide": ("division instead of the reciprocal",
               "bitsandbytes multiplies by the float32 reciprocal, scaled = x * (1 / absmax); "
               "x / absmax rounds differently next to a midpoint"),
    "input_dtype": ("scaled in the input dtype",
                    "upcast bfloat16/float16 weights to float32 before scaling"),
    "codebook4": ("codebook rounded to 4 decimals",
                  "use the float32 values derived from normal quantiles "
                  "(minidora.nf4.NF4_CODEBOOK); torchao's rounded table is not bit-compatible"),
    "offset_codebook": ("codebook from the unrounded offset",
                        "bitsandbytes derives the 16 values with offset = 0.9677083; the exact "
                        "((1 - 1/30) + (1 - 1/32)) / 2 = 0.96770833... changes 12 of them in the "
                        "last bits (minidora.nf4.NF4_CODEBOOK is the table)"),
    "pad0": ("odd element count padded with code 0",
             "pad the last byte with code 7 (the value 0.0)"),
    "per_row": ("blocks restart at every row",
                "flatten the weight row-major first: blocks of blocksize elements span rows"),
    "signed_max": ("max x instead of max |x|", "absmax is the largest |x| of the block"),
    "no_offset": ("offset (mean of the scales) not subtracted",
                  "double quantization codes absmax - mean(absmax), in blocks of 256 scales"),
    "exact_dynamic": ("exact nearest 8-bit code instead of bitsandbytes' lookup grid",
                      "bitsandbytes maps v = (absmax - offset) / nested_absmax to grid point "
                      "i = trunc(((v + 1) / 2) * 65535 + 0.5) and takes the dynamic-map entry "
                      "nearest to -1 + 2i / 65535; a few codes per thousand differ from the exact "
                      "nearest entry"),
    "offset_f64": ("offset averaged in float64", "offset = absmax.mean() in float32"),
    "row_scales": ("scales indexed per row",
                   "element (i, j) uses absmax[(i * in_features + j) // blocksize]; "
                   "i * (in_features // blocksize) + j // blocksize (bitsandbytes' AVX-512 CPU "
                   "kernel) is wrong when in_features is not a multiple of blocksize"),
    "no_offset_back": ("offset not added back",
                       "scale = float32(dynamic_map[code] * nested_absmax) + offset"),
    "low_precision": ("product in the output dtype",
                      "multiply the float32 code value by the float32 scale, then cast once"),
}
QUANTIZE_MISTAKES = ("nibbles", "ties_up", "divide", "input_dtype", "codebook4", "offset_codebook",
                     "pad0", "per_row", "signed_max", "no_offset", "exact_dynamic", "offset_f64")
DEQUANTIZE_MISTAKES = ("nibbles", "row_scales", "no_offset_back", "low_precision", "codebook4",
                       "offset_codebook")
NESTED = nf4.NESTED_BLOCKSIZE   # scales per double-quantization block (fixed by bitsandbytes)


def _swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return (packed << 4) | (packed >> 4)                                 # uint8: wraps


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[m] uint8 -> [2m] int64 codes, high nibble first (the padding nibble included)."""
    return nf4.unpack(packed, 2 * packed.numel())


def _codebook(mistake: str | None) -> torch.Tensor:
    if mistake == "codebook4":
        return torch.round(nf4.NF4_CODEBOOK.double() * 1e4).div(1e4).float()
    if mistake == "offset_codebook":
        return nf4.nf4_codebook(((1 - 1 / 30) + (1 - 1 / 32)) / 2)
    return nf4.NF4_CODEBOOK


def _flatten(weight: torch.Tensor, bs: int, per_row: bool):
    """-> (x [n'] float32, mask of its real elements [n'] or None). per_row: every row padded
    with zeros to whole blocks, so that blocks restart at every row."""
    x = nf4.to_float32(weight)                                           # [n]
    if not per_row or weight.dim() < 2:
        return x, None
    rows = x.view(weight.shape[0], -1)                                   # [rows, len]
    pad = -rows.shape[1] % bs
    keep = F.pad(torch.ones_like(rows, dtype=torch.bool), (0, pad))
    return F.pad(rows, (0, pad)).view(-1), keep.view(-1)


def quantize(weight: torch.Tensor, blocksize: int, double_quant: bool,
             mistake: str | None = None) -> dict[str, torch.Tensor]:
    """NF4-quantize ``weight`` (any shape) with one mistake (a key of MISTAKES) or none: the
    steps of :func:`minidora.nf4.quantize`, one of them changed.

    Returns:
        dict: packed [ceil(n/2)] uint8, absmax [n_blocks] (float32, or uint8 codes with double
        quantization), and with double quantization nested_absmax [ceil(n_blocks/256)] and
        offset (0-dim float32).
    """
    x, keep = _flatten(weight, blocksize, mistake == "per_row")          # [n']
    blocks, absmax = nf4.blockwise_absmax(x, blocksize)                  # [nb, bs], [nb]
    if mistake == "signed_max":
        absmax = blocks.amax(1)
    if mistake == "divide":
        scaled = blocks / absmax.clamp_min(1e-38)[:, None]
    elif mistake == "input_dtype" and weight.dtype in (torch.bfloat16, torch.float16):
        inv = (1.0 / absmax.clamp_min(1e-38)).to(weight.dtype)
        scaled = (blocks.to(weight.dtype) * inv[:, None]).float()
    else:
        scaled = nf4.normalize(blocks, absmax)
    code = _codebook(mistake)
    if mistake == "ties_up":
        codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, right=True)
    else:
        codes = nf4.nearest_code(scaled, code)
    codes = codes.view(-1)[keep] if keep is not None else codes.view(-1)[: weight.numel()]
    if mistake == "pad0" and codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = nf4.pack(codes)
    out = {"packed": _swap_nibbles(packed) if mistake == "nibbles" else packed, "absmax": absmax}
    if double_quant:
        out.update(_double_quantize(absmax, mistake))
    return out


def _double_quantize(absmax: torch.Tensor, mistake: str | None) -> dict[str, torch.Tensor]:
    if mistake == "no_offset":
        offset = torch.zeros((), dtype=torch.float32)
    elif mistake == "offset_f64":
        offset = absmax.double().mean().float()
    else:
        offset = nf4.mean_scale(absmax)
    if mistake == "exact_dynamic":
        blocks, nested = nf4.blockwise_absmax(absmax - offset, NESTED)   # [nb2, 256], [nb2]
        v = (blocks * (1.0 / nested)[:, None]).clamp(-1, 1).nan_to_num(-1.0)
        codes = nf4.nearest_code(v, nf4.DYNAMIC_CODE).view(-1)[: absmax.numel()].to(torch.uint8)
    else:
        codes, nested = nf4.quantize_scales(absmax - offset)
    return {"absmax": codes, "nested_absmax": nested, "offset": offset}


def dequantize(fields: dict[str, torch.Tensor], shape: tuple, blocksize: int, dtype: torch.dtype,
               mistake: str | None = None) -> torch.Tensor:
    """Decode ``fields`` (as :func:`quantize` returns them) to ``shape`` in ``dtype``: the steps
    of :func:`minidora.nf4.dequantize`, one of them changed."""
    n = math.prod(shape)
    packed = fields["packed"]
    codes = nf4.unpack(_swap_nibbles(packed) if mistake == "nibbles" else packed, n)   # [n]
    offset = fields.get("offset")
    if mistake == "no_offset_back" and offset is not None:
        offset = torch.zeros((), dtype=torch.float32)
    scales = nf4.decode_scales(fields["absmax"], fields.get("nested_absmax"), offset)
    index = torch.arange(n) // blocksize                                  # [n]
    if mistake == "row_scales" and len(shape) == 2:
        rows, cols = shape
        col = torch.arange(cols)
        index = (torch.arange(rows)[:, None] * (cols // blocksize) + col // blocksize).view(-1)
        index = index.clamp_max(scales.numel() - 1)
    code = _codebook(mistake)
    if mistake == "low_precision":
        return (code.to(dtype)[codes] * scales.to(dtype)[index]).view(shape)
    return (code[codes] * scales[index]).to(dtype).view(shape)
