"""minidora.nf4 against bitsandbytes' own numbers, and its properties on fresh random data."""

import math

import numpy as np
import pytest
import torch

from helpers import FLOAT_DTYPES
from minidora import nf4
from minidora.testing import golden as shipped

CASES = shipped.nf4_cases()


def golden(case, key):
    return torch.from_numpy(np.asarray(shipped.nf4_bitsandbytes()[f"{case}.{key}"]))


def golden_weight(case):
    g = shipped.nf4_bitsandbytes()
    dtype = getattr(torch, str(g[f"{case}.dtype"]))
    return golden(case, "input").to(dtype), int(g[f"{case}.blocksize"])


def unpack(packed, n):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n].long()


# --- the two tables -----------------------------------------------------------------------------

def test_codebook_derived_from_normal_quantiles_equals_bitsandbytes_table():
    derived = nf4.nf4_codebook()
    assert derived.dtype == torch.float32
    assert torch.equal(derived, torch.from_numpy(shipped.nf4_bitsandbytes()["nf4_codebook"]))
    assert derived[7] == 0.0 and derived[0] == -1.0 and derived[15] == 1.0
    assert int((derived > 0).sum()) == 8 and int((derived < 0).sum()) == 7


def test_dynamic_map_table_equals_bitsandbytes():
    want = torch.from_numpy(shipped.nf4_bitsandbytes()["dynamic_map"])
    assert torch.equal(nf4.DYNAMIC_CODE, want)


# --- bit-exactness with bitsandbytes ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_golden_without_double_quant(case):
    w, bs = golden_weight(case)
    q = nf4.quantize(w, blocksize=bs, double_quant=False)
    assert torch.equal(q.packed, golden(case, "packed"))
    assert torch.equal(q.absmax, golden(case, "absmax"))
    out = nf4.dequantize(q)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out.float(), golden(case, "dequantized"))


@pytest.mark.parametrize("case", CASES)
def test_golden_with_double_quant(case):
    w, bs = golden_weight(case)
    q = nf4.quantize(w, blocksize=bs, double_quant=True)
    assert torch.equal(q.packed, golden(case, "packed"))
    assert torch.equal(q.absmax, golden(case, "dq.absmax_codes"))
    assert torch.equal(q.nested_absmax, golden(case, "dq.nested_absmax"))
    assert torch.equal(q.offset, golden(case, "dq.offset"))
    assert torch.equal(nf4.dequantize(q).float(), golden(case, "dq.dequantized"))


def test_all_zero_block_gives_code_7_and_zero_scale():
    w = torch.randn(4, 64)
    w[1] = 0.0
    q = nf4.quantize(w, 64, double_quant=False)
    assert q.absmax[1] == 0.0
    assert torch.all(q.packed[32:64] == 0x77)
    assert torch.equal(nf4.dequantize(q)[1], torch.zeros(64))
    out = nf4.dequantize(nf4.quantize(w, 64, double_quant=True))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(64))


def test_odd_count_pads_last_byte_with_code_7():
    w = torch.randn(3, 5) + 0.1
    q = nf4.quantize(w, 32, double_quant=False)
    assert q.packed.numel() == 8 and (q.packed[-1] & 0xF) == 7


# --- properties on fresh random data ------------------------------------------------------------

SHAPES = [(1, 1), (7, 13), (33, 77), (64, 96), (5, 4099), (129, 65), (3,), (2, 3, 50)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_error_bound_without_double_quant(shape, blocksize):
    gen = torch.Generator().manual_seed(hash((shape, blocksize)) % 2**31)
    w = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 3
    q = nf4.quantize(w, blocksize, double_quant=False)
    err = (w - nf4.dequantize(q)).abs().reshape(-1)
    half_gap = (nf4.NF4_CODEBOOK[1:] - nf4.NF4_CODEBOOK[:-1]).max() / 2
    scale = q.absmax.repeat_interleave(blocksize)[: w.numel()]
    # the bound is exact up to the float32 roundings of x * (1 / absmax) and c[q] * absmax
    assert torch.all(err <= half_gap * scale * (1 + 1e-6) + 1e-30)
    assert q.packed.numel() == math.ceil(w.numel() / 2)
    assert q.absmax.numel() == math.ceil(w.numel() / blocksize)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_every_dtype(dtype, double_quant):
    w = (torch.randn(37, 91) * 0.02).to(dtype)
    q = nf4.quantize(w, 64, double_quant=double_quant)
    assert q.dtype == dtype and q.shape == (37, 91)
    out32 = nf4.dequantize(q, torch.float32)
    for out_dtype in FLOAT_DTYPES:
        out = nf4.dequantize(q, out_dtype)
        assert out.dtype == out_dtype
        assert torch.equal(out, out32.to(out_dtype))  # one float32 product, cast once
    assert nf4.dequantize(q).dtype == dtype
    rel = (out32 - w.float()).norm() / w.float().norm()
    assert 0.03 < rel < 0.15  # 4-bit: about 10 % relative error on Gaussian weights


def test_double_quant_scales_close_to_float32_scales():
    w = torch.randn(300, 257)
    plain = nf4.quantize(w, 64, double_quant=False)
    dq = nf4.quantize(w, 64, double_quant=True)
    assert torch.equal(plain.packed, dq.packed)
    step = dq.nested_absmax.repeat_interleave(256)[: plain.absmax.numel()] * 0.02
    assert torch.all((dq.scales() - plain.absmax).abs() <= step)


def test_bits_per_parameter():
    numel = 4096 * 4096
    assert nf4.storage_bits_per_param(numel, 64, double_quant=False) == 4.5
    dq_bits = nf4.storage_bits_per_param(numel, 64, double_quant=True)
    assert abs(dq_bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-5
    assert round(dq_bits, 3) == 4.127
    w = torch.randn(1024, 1024)
    for double_quant in (False, True):
        q = nf4.quantize(w, 64, double_quant=double_quant)
        assert q.bits_per_param == nf4.storage_bits_per_param(w.numel(), 64, double_quant)
        assert q.nbytes == w.numel() // 2 + (16384 if double_quant else 65536) + (
            4 * 64 + 4 if double_quant else 0)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [torch.ones(4, 4, dtype=torch.int32),
                                    torch.ones(4, dtype=torch.complex64),
                                    torch.ones(4, dtype=torch.bool)])
def test_rejects_non_floating_weight(weight):
    with pytest.raises(TypeError, match="weight must be float32, bfloat16, float16 or float64"):
        nf4.quantize(weight)


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        nf4.quantize([[1.0, 2.0]])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two in 32..4096"):
        nf4.quantize(torch.randn(8, 8), blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_nan_and_inf_and_says_where(bad):
    w = torch.randn(5, 7)
    w[3, 2] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf value\(s\), first at index \(3, 2\)"):
        nf4.quantize(w)


def test_rejects_empty_weight():
    with pytest.raises(ValueError, match="weight must not be empty"):
        nf4.quantize(torch.empty(0, 4))


def test_dequantize_rejects_non_float_dtype():
    with pytest.raises(TypeError, match="dtype must be"):
        nf4.dequantize(nf4.quantize(torch.randn(4, 8)), torch.int8)


def test_double_quant_of_huge_weights():
    # the float32 sum of the scales overflows long before the weights do
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7)).double() * 1e33
    q = nf4.quantize(w.float(), 64, double_quant=True)
    got = nf4.dequantize(q, torch.float64)
    assert torch.isfinite(q.offset) and torch.isfinite(got).all()
    assert (got - w).norm() / w.norm() < 0.12        # the usual NF4 error (about 0.09 on N(0, 1))
    # scales at both ends of the float32 range: |scale - mean| and the decoded scales stay finite
    w = torch.tensor([3.4028e38] * 32 + [1.0] * 32).repeat(64)
    got = nf4.dequantize(nf4.quantize(w, 32, double_quant=True))
    assert torch.isfinite(got).all() and got.max() == w.max()


def test_dequantize_without_offset_says_so():
    q = nf4.quantize(torch.randn(8, 64), 64, double_quant=True)
    q.offset = None
    with pytest.raises(TypeError, match="q.offset must be a float32 tensor"):
        nf4.dequantize(q)


def test_quantize_on_the_meta_device():
    q = nf4.quantize(torch.empty(40, 96, device="meta"), 64, double_quant=True)
    assert q.packed.is_meta and q.packed.shape == (1920,) and q.absmax.dtype == torch.uint8
    assert nf4.dequantize(q, torch.float32).shape == (40, 96)


def test_row_range_view():
    q = nf4.quantize(torch.randn(40, 96, generator=torch.Generator().manual_seed(3)), 64, True)
    plain = q.plain_scales()
    assert torch.equal(nf4.dequantize(plain), nf4.dequantize(q))
    part = plain.rows(2, 7)                      # rows 2..6 start at element 192: block 3
    assert part.packed.data_ptr() == plain.packed.data_ptr() + 96
    assert torch.equal(nf4.dequantize(part), nf4.dequantize(q)[2:7])
    assert torch.equal(nf4.dequantize(plain.rows(38, 40)), nf4.dequantize(q)[38:])  # partial end
    for bad in [(1, 3), (0, 41), (5, 5)]:
        with pytest.raises(ValueError, match=r"rows\(.*multiple of blocksize 64"):
            plain.rows(*bad)
    with pytest.raises(ValueError, match="needs float32 scales"):
        q.rows(0, 2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_float64_beyond_float32_range_is_refused_and_says_where(double_quant):
    w = torch.randn(5, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    w[3, 41] = -2e39
    w[4, 2] = 1e300
    with pytest.raises(ValueError, match=r"2 value\(s\) beyond float32's range, first at "
                                         r"index \(3, 41\): -2e\+39 \(max \|w\| 1e\+300\); NF4 "
                                         r"scales are float32 \(bitsandbytes' format\), so \|w\| "
                                         r"must be at most float32's max, 3.4028235e\+38"):
        nf4.quantize(w, 64, double_quant)
    # float32's max itself is a float64 weight like any other
    w[3, 41], w[4, 2] = torch.finfo(torch.float32).max, 1.0
    q = nf4.quantize(w, 64, double_quant)
    assert torch.equal(nf4.dequantize(q), nf4.dequantize(nf4.quantize(w.float(), 64, double_quant))
                       .double())
