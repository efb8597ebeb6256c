"""minidora.nf4 against bitsandbytes' own numbers, and its properties on fresh random data."""

import json
import math

import numpy as np
import pytest
import torch

from minidora import bnb_checkpoint, nf4
from minidora.testing import golden as shipped

CASES = shipped.nf4_cases()
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


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


# --- bitsandbytes checkpoint layout -------------------------------------------------------------

def test_state_dict_layout_matches_spec_table():
    w = torch.randn(256, 512).to(torch.bfloat16)
    sd = bnb_checkpoint.to_bnb_state_dict(nf4.quantize(w, 64, double_quant=True))
    table = {
        "weight": ((65536, 1), torch.uint8), "weight.absmax": ((2048,), torch.uint8),
        "weight.quant_map": ((16,), torch.float32), "weight.nested_absmax": ((8,), torch.float32),
        "weight.nested_quant_map": ((256,), torch.float32),
    }
    blob_key = "weight.quant_state.bitsandbytes__nf4"
    assert set(sd) == set(table) | {blob_key}
    for key, (shape, dtype) in table.items():
        assert tuple(sd[key].shape) == shape and sd[key].dtype == dtype, key
    meta = json.loads(bytes(sd[blob_key].tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [256, 512] and meta["nested_blocksize"] == 256
    assert meta["nested_dtype"] == "float32" and isinstance(meta["nested_offset"], float)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_round_trip_is_bit_exact(double_quant, dtype):
    w = torch.randn(19, 131).to(dtype)
    q = nf4.quantize(w, 128, double_quant=double_quant)
    sd = bnb_checkpoint.to_bnb_state_dict(q, prefix="layer.weight")
    back = bnb_checkpoint.from_bnb_state_dict(sd, prefix="layer.weight")
    assert back.shape == q.shape and back.dtype == q.dtype and back.blocksize == q.blocksize
    assert torch.equal(back.packed, q.packed) and torch.equal(back.absmax, q.absmax)
    if double_quant:
        assert torch.equal(back.nested_absmax, q.nested_absmax)
        assert torch.equal(back.offset, q.offset)
    else:
        assert back.nested_absmax is None and back.offset is None
    assert torch.equal(nf4.dequantize(back), nf4.dequantize(q))


def test_loads_a_checkpoint_written_by_bitsandbytes():
    from safetensors.torch import load_file

    nf4_sd = load_file(str(shipped.path("peft", "llama_base_nf4", "model.safetensors")))
    dense_sd = load_file(str(shipped.path("peft", "llama_base", "model.safetensors")))
    suffix = ".quant_state.bitsandbytes__nf4"
    names = [k[: -len(suffix)] for k in nf4_sd if k.endswith(suffix)]
    assert len(names) == 14  # 7 linears x 2 layers
    for name in names:
        q = bnb_checkpoint.from_bnb_state_dict(nf4_sd, prefix=name)
        mine = nf4.quantize(dense_sd[name], q.blocksize, double_quant=False)
        assert torch.equal(q.packed, mine.packed) and torch.equal(q.absmax, mine.absmax), name
        assert torch.equal(nf4.dequantize(q), nf4.dequantize(mine))


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


@pytest.fixture
def good_sd():
    return bnb_checkpoint.to_bnb_state_dict(nf4.quantize(torch.randn(16, 64), 64, True))


def _with_meta(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()).decode())
    meta.update(changes)
    sd = dict(sd)
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map",
                                 "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
def test_state_dict_missing_key(good_sd, key):
    del good_sd[key]
    with pytest.raises(KeyError, match=f"missing '{key}'"):
        bnb_checkpoint.from_bnb_state_dict(good_sd)


@pytest.mark.parametrize("key,value,match", [
    ("weight", torch.zeros(511, 1, dtype=torch.uint8), r"must have shape \(512, 1\)"),
    ("weight.absmax", torch.zeros(17, dtype=torch.uint8), r"must have shape \(16,\)"),
    ("weight.absmax", torch.zeros(16, dtype=torch.float32), "must be a torch.uint8 tensor"),
    ("weight", torch.zeros(512, 1, dtype=torch.int8), "must be a torch.uint8 tensor"),
    ("weight.nested_absmax", torch.zeros(2), r"must have shape \(1,\)"),
    ("weight.quant_map", torch.linspace(-1, 1, 16), "not the NF4 codebook"),
])
def test_state_dict_wrong_shape_or_dtype(good_sd, key, value, match):
    good_sd[key] = value
    with pytest.raises(ValueError, match=match):
        bnb_checkpoint.from_bnb_state_dict(good_sd)


def test_state_dict_unknown_quant_type(good_sd):
    with pytest.raises(ValueError, match="unknown quant_type 'fp4'"):
        bnb_checkpoint.from_bnb_state_dict(_with_meta(good_sd, quant_type="fp4"))
    renamed = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in good_sd.items()}
    with pytest.raises(ValueError, match="unknown quant_type"):
        bnb_checkpoint.from_bnb_state_dict(renamed)


@pytest.mark.parametrize("blob,match", [
    (b"{not json", "valid UTF-8 JSON"), (b"\xff\xfe", "valid UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_state_dict_corrupt_json(good_sd, blob, match):
    good_sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        bnb_checkpoint.from_bnb_state_dict(good_sd)


@pytest.mark.parametrize("changes,match", [
    ({"shape": [16, -64]}, "list of positive ints"), ({"blocksize": 100}, "blocksize must be"),
    ({"dtype": "int8"}, "unsupported dtype"),
    ({"nested_offset": "x"}, "nested_offset must be a finite number"),
    ({"nested_offset": float("nan")}, "nested_offset must be a finite number, got nan"),
    ({"nested_offset": True}, "nested_offset must be a finite number, got True"),
    ({"nested_blocksize": 128}, "nested_blocksize must be 256"),
    ({"shape": [32, 64]}, "must have shape"),
    ({"shape": [True, 1024]}, "list of positive ints"), ({"blocksize": True}, "blocksize must be"),
])
def test_state_dict_bad_metadata(good_sd, changes, match):
    with pytest.raises(ValueError, match=match):
        bnb_checkpoint.from_bnb_state_dict(_with_meta(good_sd, **changes))


def test_state_dict_nan_scales_are_refused(good_sd):
    good_sd["weight.nested_absmax"] = torch.tensor([float("inf")])
    with pytest.raises(ValueError, match=r"'weight.nested_absmax' holds 1 NaN/Inf scale"):
        bnb_checkpoint.from_bnb_state_dict(good_sd)
    sd = bnb_checkpoint.to_bnb_state_dict(nf4.quantize(torch.randn(16, 64), 64, False))
    sd["weight.absmax"] = sd["weight.absmax"].clone()
    sd["weight.absmax"][5] = float("nan")
    with pytest.raises(ValueError, match=r"'weight.absmax' holds 1 NaN/Inf scale\(s\), first at "
                                         r"index 5"):
        bnb_checkpoint.from_bnb_state_dict(sd)


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


def test_old_names_of_the_checkpoint_functions_still_work():
    q = nf4.quantize(torch.randn(8, 64), 64, True)
    with pytest.warns(DeprecationWarning, match="moved to minidora.bnb_checkpoint.to_bnb_state"):
        sd = nf4.to_bnb_state_dict(q)
    with pytest.warns(DeprecationWarning, match="from_bnb_state_dict"):
        assert torch.equal(nf4.from_bnb_state_dict(sd).packed, q.packed)


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
