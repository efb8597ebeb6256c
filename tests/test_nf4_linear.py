"""minidora.nf4_linear: state layout, forward vs the dequantized reference, state_dict and
bitsandbytes checkpoint round trips, dtype safety, bad input."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import dense
from minidora import NF4Linear, nf4
from minidora.testing import golden


def linear(out_f, in_f, bias=True, seed=0, dtype=torch.float32):
    return dense(out_f, in_f, dtype=dtype, bias=bias, seed=seed, std=0.2)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_layout(double_quant):
    layer = NF4Linear.from_linear(linear(33, 77), double_quant=double_quant)
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    assert params["packed"].dtype == torch.uint8 and params["packed"].numel() == (33 * 77 + 1) // 2
    assert not any(p.requires_grad for p in params.values())
    if double_quant:
        assert params["absmax"].dtype == torch.uint8
        assert set(buffers) == {"nested_absmax", "offset"}
        assert buffers["nested_absmax"].dtype == buffers["offset"].dtype == torch.float32
    else:
        assert buffers["absmax"].dtype == torch.float32 and set(buffers) == {"absmax"}
    assert set(layer.state_dict()) == set(params) | set(buffers)
    assert (layer.out_features, layer.in_features, layer.blocksize) == (33, 77, 64)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bytes_equal_bitsandbytes_golden(double_quant):
    case = "w33x77_f32_odd"
    w = torch.from_numpy(golden.nf4_bitsandbytes()[f"{case}.input"])
    lin = nn.Linear(77, 33, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    g = golden.nf4_bitsandbytes()
    layer = NF4Linear.from_linear(lin, blocksize=int(g[f"{case}.blocksize"]),
                                  double_quant=double_quant)
    assert torch.equal(layer.packed, torch.from_numpy(golden.nf4_bitsandbytes()[f"{case}.packed"]))
    key = f"{case}.dq.dequantized" if double_quant else f"{case}.dequantized"
    assert torch.equal(layer.dequantize_weight(torch.float32), torch.from_numpy(g[key]))


@pytest.mark.parametrize("compute_dtype,rtol", [
    (torch.float64, 1e-13),       # float64 matmul: only summation order
    (torch.float32, 1e-5),        # 77-term float32 sums in another order
    (torch.bfloat16, 2e-2),       # bf16 inputs, weights and output (2^-8 each)
])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_equals_dense_reference(compute_dtype, rtol, double_quant):
    lin = linear(33, 77, seed=1)
    layer = NF4Linear.from_linear(lin, double_quant=double_quant, compute_dtype=compute_dtype)
    w = nf4.dequantize(nf4.quantize(lin.weight, 64, double_quant), torch.float64)
    x_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    x = torch.randn(2, 5, 77, dtype=x_dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == x_dtype and y.shape == (2, 5, 33)            # back in x's dtype
    ref = F.linear(x.double(), w, lin.bias.double())
    scale = ref.abs().max()
    assert ((y.double() - ref).abs() <= rtol * (ref.abs() + scale)).all()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.packed.grad is None


def test_dequantize_weight_bit_exact_with_reference():
    lin = linear(40, 50, seed=2)
    layer = NF4Linear.from_linear(lin)
    q = nf4.quantize(lin.weight, 64, True)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(layer.dequantize_weight(dtype), nf4.dequantize(q, dtype))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    src = NF4Linear.from_linear(linear(21, 64, seed=3), double_quant=double_quant,
                                compute_dtype=torch.float32)
    dst = NF4Linear.from_linear(linear(21, 64, seed=4), double_quant=double_quant,
                                compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    assert not torch.equal(src(x), dst(x))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src(x), dst(x))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_layout_round_trip(double_quant):
    src = NF4Linear.from_linear(linear(24, 80, seed=5), double_quant=double_quant)
    sd = src.to_bnb_state_dict("layer.")
    assert sd["layer.weight"].shape == ((24 * 80) // 2, 1) and "layer.bias" in sd
    assert ("layer.weight.nested_absmax" in sd) == double_quant
    dst = NF4Linear.from_bnb_state_dict(sd, "layer.", compute_dtype=torch.float32)
    assert torch.equal(dst.packed, src.packed) and torch.equal(dst.absmax, src.absmax)
    assert torch.equal(dst.bias, src.bias) and dst.double_quant == double_quant
    assert torch.equal(dst.dequantize_weight(torch.float32), src.dequantize_weight(torch.float32))


def test_bitsandbytes_checkpoint_from_golden_llama():
    from safetensors.torch import load_file
    sd = load_file(str(golden.path("peft", "llama_base_nf4", "model.safetensors")))
    layer = NF4Linear.from_bnb_state_dict(sd, "model.layers.0.self_attn.k_proj.",
                                          compute_dtype=torch.float32)
    assert (layer.out_features, layer.in_features, layer.double_quant) == (32, 64, False)
    # The fp32 llama the NF4 file was made from: its weight, quantized here, gives the same bytes.
    base = load_file(str(golden.path("peft", "llama_base", "model.safetensors")))
    w = base["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(nf4.quantize(w, 64, False).packed, layer.packed)


def test_module_casts_keep_float32_statistics():
    layer = NF4Linear.from_linear(linear(16, 64, seed=6), compute_dtype=torch.float32)
    nested, offset = layer.nested_absmax.clone(), layer.offset.clone()
    x = torch.randn(2, 64)
    y = layer(x)
    layer.double()
    assert layer.nested_absmax.dtype == layer.offset.dtype == torch.float32
    assert torch.equal(layer.nested_absmax, nested) and torch.equal(layer.offset, offset)
    assert layer.bias.dtype == torch.float64
    assert torch.equal(layer(x), y)   # bias float64 -> float32 compute: the same values
    plain = NF4Linear.from_linear(linear(16, 64, seed=6), double_quant=False).to(torch.bfloat16)
    assert plain.absmax.dtype == torch.float32


def test_bad_input():
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="compute_dtype must be one of"):
        NF4Linear.from_linear(linear(4, 64), compute_dtype=torch.int8)
    q = nf4.quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(5,\)"):
        NF4Linear(q, torch.zeros(5))
    with pytest.raises(TypeError, match="q must be a 2-D NF4Weight"):
        NF4Linear(nf4.quantize(torch.randn(64)))
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        NF4Linear.from_linear(linear(4, 64), blocksize=48)


@pytest.mark.parametrize("x", [torch.arange(128).view(2, 64), torch.zeros(2, 64, dtype=torch.bool),
                               torch.randn(2, 64, dtype=torch.complex64)])
def test_input_that_is_not_real_floating_point_is_refused(x):
    layer = NF4Linear.from_linear(linear(4, 64), compute_dtype=torch.float32)
    with pytest.raises(TypeError, match=rf"x must be a real floating-point tensor .*got {x.dtype}"):
        layer(x)


def test_state_dict_with_other_double_quant_setting_is_refused():
    dq = NF4Linear.from_linear(linear(8, 64, seed=7), double_quant=True)
    plain = NF4Linear.from_linear(linear(8, 64, seed=7), double_quant=False)
    with pytest.raises(RuntimeError, match=r"absmax: the checkpoint holds torch.float32, this "
                                           r"layer torch.uint8"):
        dq.load_state_dict(plain.state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="absmax: the checkpoint holds torch.uint8"):
        plain.load_state_dict(dq.state_dict(), strict=False)
