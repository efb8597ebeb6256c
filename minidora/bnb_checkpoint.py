"""bitsandbytes' NF4 checkpoint layout: the keys a ``Linear4bit`` saves, written and read exactly.

For a weight W [256, 512], NF4 with double quantization, bitsandbytes stores ``weight``
(65536, 1) uint8 packed codes, ``weight.absmax`` (2048,) uint8 scale codes (float32 without
double quantization), ``weight.quant_map`` (16,) float32, ``weight.nested_absmax`` (8,) and
``weight.nested_quant_map`` (256,) float32, and ``weight.quant_state.bitsandbytes__nf4``: UTF-8
JSON bytes with quant_type, blocksize, dtype, shape and (double quantization) nested_blocksize,
nested_dtype, nested_offset. Every key, shape, dtype and JSON field is checked on reading, and
the scales must be finite.

This module reads and writes one weight (an :class:`~minidora.nf4.NF4Weight`);
``NF4Linear.to_bnb_state_dict`` / ``from_bnb_state_dict`` add the bias, and
:func:`minidora.checkpoint.load_bnb_nf4_linears` swaps a model's layers for the ones a
checkpoint holds.
"""

from __future__ import annotations

import json
import math

import torch

from .nf4 import (
    _DTYPE_NAMES,
    DYNAMIC_CODE,
    NESTED_BLOCKSIZE,
    NF4_CODEBOOK,
    NF4Weight,
    _check_blocksize,
)

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict"]


def to_bnb_state_dict(q: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """Export to the keys a bitsandbytes ``Linear4bit`` writes (``weight``, ``weight.absmax``...).

    The non-tensor state goes into ``<prefix>.quant_state.bitsandbytes__nf4``: UTF-8 JSON bytes.
    """
    meta = {"quant_type": "nf4", "blocksize": q.blocksize,
            "dtype": str(q.dtype).removeprefix("torch."), "shape": list(q.shape)}
    sd = {prefix: q.packed.reshape(-1, 1), f"{prefix}.absmax": q.absmax,
          f"{prefix}.quant_map": NF4_CODEBOOK.clone()}
    if q.double_quant:
        sd[f"{prefix}.nested_absmax"] = q.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = DYNAMIC_CODE.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=q.offset.item())
    blob = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def _expect(sd, key, dtype, shape=None) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"state dict is missing {key!r} (have: {sorted(sd)})")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{key!r} must be a {dtype} tensor, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key!r} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def _expect_finite(t: torch.Tensor, key: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"{key!r} holds {int(bad.sum())} NaN/Inf scale(s), first at index "
                         f"{int(bad.nonzero()[0, 0])}: the checkpoint is corrupt")


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
    """Import an NF4 weight from bitsandbytes' checkpoint layout (see :func:`to_bnb_state_dict`).

    Every key, shape, dtype and the JSON blob are checked; anything unexpected raises.
    """
    blob_key = f"{prefix}.quant_state.bitsandbytes__nf4"
    other = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if blob_key not in sd and other:
        raise ValueError(f"unknown quant_type in {other[0]!r}: only 'nf4' is supported")
    blob = _expect(sd, blob_key, torch.uint8)
    try:
        meta = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{blob_key!r} does not hold valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{blob_key!r} does not hold the JSON object bitsandbytes writes: it "
                         "is nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{blob_key!r} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"unknown quant_type {meta.get('quant_type')!r} in {blob_key!r}: "
                         "expected 'nf4'")
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{blob_key!r} is missing the field {field!r}")
    blocksize, shape = meta["blocksize"], meta["shape"]
    _check_blocksize(blocksize)
    if meta["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {meta['dtype']!r} in {blob_key!r}")
    if (not isinstance(shape, list) or not shape
            or not all(type(s) is int and s > 0 for s in shape)):
        raise ValueError(f"shape in {blob_key!r} must be a list of positive ints, got {shape!r}")
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = _expect(sd, prefix, torch.uint8, ((n + 1) // 2, 1)).reshape(-1)
    quant_map = _expect(sd, f"{prefix}.quant_map", torch.float32, (16,))
    if not torch.equal(quant_map, NF4_CODEBOOK):
        raise ValueError(f"{prefix}.quant_map is not the NF4 codebook")
    nested = "nested_offset" in meta
    absmax = _expect(sd, f"{prefix}.absmax", torch.uint8 if nested else torch.float32, (n_blocks,))
    if not nested:
        _expect_finite(absmax, f"{prefix}.absmax")
    q = NF4Weight(packed, absmax, tuple(shape), _DTYPE_NAMES[meta["dtype"]], blocksize)
    if nested:
        if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, "
                             f"got {meta['nested_blocksize']!r}")
        offset = meta["nested_offset"]
        if type(offset) not in (int, float) or not math.isfinite(offset):
            raise ValueError(f"nested_offset must be a finite number, got {offset!r}")
        q.nested_absmax = _expect(sd, f"{prefix}.nested_absmax", torch.float32,
                                  (-(-n_blocks // NESTED_BLOCKSIZE),))
        _expect_finite(q.nested_absmax, f"{prefix}.nested_absmax")
        nested_map = _expect(sd, f"{prefix}.nested_quant_map", torch.float32, (256,))
        if not torch.equal(nested_map, DYNAMIC_CODE):
            raise ValueError(f"{prefix}.nested_quant_map is not the 8-bit dynamic map")
        q.offset = torch.tensor(meta["nested_offset"], dtype=torch.float32)
    return q

