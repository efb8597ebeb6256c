"""minidora/bnb_checkpoint.py: bitsandbytes' NF4 checkpoint keys, written and read exactly."""

import json

import pytest
import torch

from minidora import bnb_checkpoint, nf4
from minidora.testing import golden as shipped


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
