"""minidora.lora: PEFT's float64 numbers, the plain formula, gradcheck, QLoRA = LoRA over the
dequantized weight, init, dropout, merging, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import F64, check_peft_case, close, dense, gradcheck_layer
from minidora import DoRALinear, LoRALinear, NF4Linear, lora_reference, nf4
from minidora.lora import MERGE_WARN


def randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / 3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / 3)
    return layer


# --- PEFT golden -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["lora", "lora_rslora"])
def test_matches_peft_float64(key):
    # Same formula in float64; only summation order may differ: 1e-10 relative is 1e6 ulp slack.
    check_peft_case(LoRALinear, key)


# --- the formula and the gradients ---------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13)])
def test_forward_backward_equal_plain_formula(shape):
    layer = randomize(LoRALinear(dense(11, 13), r=3, alpha=5, **F64))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(*shape[:-1], 11, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = lora_reference(x2, layer.base.weight, layer.base.bias, A, B, layer.scaling)
    (ref * gy).sum().backward()
    close(layer(x), ref, rtol=1e-12, atol=1e-13)
    for got, want in [(x.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)]:
        close(got, want, rtol=1e-12, atol=1e-13)


def test_gradcheck_lora_dense():
    layer = randomize(LoRALinear(dense(6, 9), r=2, alpha=3, **F64))
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, x, ["lora_A", "lora_B"])


def test_gradcheck_qlora_float64_compute(backend):
    base = NF4Linear.from_linear(dense(6, 9, dtype=torch.float32), compute_dtype=torch.float64)
    layer = randomize(LoRALinear(base, r=2, alpha=3, **F64))
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, x, ["lora_A", "lora_B"])


@pytest.mark.parametrize("compute_dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_equals_lora_over_dequantized_weight(compute_dtype, rtol, double_quant, backend):
    lin = dense(37, 45, dtype=torch.float32, seed=3)              # 1665 elements: partial block
    base = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant,
                                 compute_dtype=compute_dtype)
    q = randomize(LoRALinear(base, r=4, alpha=8, adapter_dtype=compute_dtype))
    w = nf4.dequantize(nf4.quantize(lin.weight, 64, double_quant), compute_dtype)
    x = torch.randn(5, 45, dtype=compute_dtype)
    ref = lora_reference(x, w, lin.bias.to(compute_dtype), q.lora_A, q.lora_B, q.scaling)
    # float32: the two matmuls accumulate 45 products in different orders.
    close(q(x), ref, rtol=rtol, atol=rtol)


# --- init, dropout, dtypes -------------------------------------------------------------------

def test_init_kaiming_and_gaussian():
    torch.manual_seed(0)
    k = LoRALinear(dense(300, 400, dtype=torch.float32), r=16, alpha=16)
    bound = 1 / math.sqrt(400)
    assert k.lora_A.abs().max() <= bound and k.lora_A.abs().max() > 0.99 * bound
    assert abs(k.lora_A.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.equal(k.lora_B, torch.zeros(300, 16))
    g = LoRALinear(dense(30, 4000, dtype=torch.float32), r=16, alpha=16, init="gaussian")
    # 64000 draws: the sample std is within 1.5% (5 sigma) of 1/r, the mean within 5 sigma of 0.
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.015 / 16
    assert abs(g.lora_A.mean().item()) < 5 / 16 / math.sqrt(64000)
    assert torch.equal(g.lora_B, torch.zeros(30, 16))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quantized", [False, True])
def test_init_output_equals_base_exactly_even_with_dropout(dropout, quantized):
    base = dense(21, 35, dtype=torch.float32)
    if quantized:
        base = NF4Linear.from_linear(base, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout).train()
    x = torch.randn(6, 35)
    assert torch.equal(layer(x), base(x))


def test_dropout_acts_only_on_adapter_path():
    layer = randomize(LoRALinear(dense(8, 10), r=2, alpha=2, dropout=0.5, **F64)).train()
    x = torch.randn(40, 10, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    assert not torch.equal(xd, x)
    want = layer.base(x) + layer.scaling * xd @ layer.lora_A.T @ layer.lora_B.T
    close(y, want, rtol=1e-12, atol=1e-14)
    layer.eval()
    close(layer(x), lora_reference(x, layer.base.weight, layer.base.bias, layer.lora_A,
                                   layer.lora_B, layer.scaling), rtol=1e-12, atol=1e-14)


def test_rslora_scaling():
    assert LoRALinear(dense(4, 4), r=16, alpha=8, rslora=True).scaling == 2.0
    assert LoRALinear(dense(4, 4), r=16, alpha=8).scaling == 0.5


def test_bf16_base_keeps_float32_adapters_and_trains():
    base = dense(16, 24, dtype=torch.bfloat16)
    layer = randomize(LoRALinear(base, r=4, alpha=8))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = lora_reference(x.float(), base.weight.float(), base.bias.float(), layer.lora_A,
                         layer.lora_B, layer.scaling)
    close(y, ref, rtol=1e-2, atol=1e-2)      # bf16 output rounding (2^-8) plus bf16 products
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert base.weight.grad is None


# --- merge -----------------------------------------------------------------------------------

def test_merge_unmerge_dense_exact():
    layer = randomize(LoRALinear(dense(9, 14), r=3, alpha=6, **F64))
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, 14, dtype=torch.float64)
    y = layer(x)
    assert layer.merge() == 0.0
    close(layer.base.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A, rtol=0, atol=0)
    close(layer(x), y, rtol=1e-13, atol=1e-14)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    close(layer.base.weight, w0, rtol=1e-14, atol=1e-15)
    close(layer(x), y, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("b_scale", [1.0, 1e-3])
def test_merge_nf4_reports_the_share_of_the_update_lost_and_unmerge_restores_bytes(b_scale):
    lin = dense(33, 77, dtype=torch.float32, seed=5)
    base = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    layer = randomize(LoRALinear(base, r=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.mul_(b_scale)
    packed, absmax = base.packed.clone(), base.absmax.clone()
    delta = layer.scaling * layer.lora_B @ layer.lora_A
    exact = nf4.dequantize(base.weight_nf4, torch.float32) + delta
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = layer.merge()
    stored = nf4.dequantize(nf4.quantize(exact, 64, True), torch.float32)
    assert torch.equal(base.dequantize_weight(torch.float32), stored)
    want = ((stored - exact).norm() / delta.norm()).item()      # relative to the update
    assert abs(err - want) <= 1e-5 * want
    # a 1e-3 update is far below one NF4 step: re-quantization loses nearly all of it, and says so
    assert (want > 0.9) == (b_scale < 1)
    lost = [w for w in caught if "of the adapter's update" in str(w.message)]
    assert len(lost) == (want > 0.1) and (not lost or "merge_and_unload" in str(lost[0].message))
    layer.unmerge()
    assert torch.equal(base.packed, packed) and torch.equal(base.absmax, absmax)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_merge_of_an_untrained_adapter_reports_how_far_storing_moved_the_weight(cls,
                                                                               compute_dtype):
    # B = 0: there is no update to lose. Re-quantizing (double quantization: new scale codes)
    # still moves the weight a little; the figure says how much, relative to W0.
    base = NF4Linear.from_linear(dense(33, 77, dtype=torch.float32, seed=5),
                                 compute_dtype=compute_dtype)
    layer = cls(base, r=4, alpha=8)
    w0 = base.dequantize_weight(torch.float32)
    assert torch.equal(layer.merged_weight(), w0)        # DoRA: k = m / c is exactly 1 at init
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = layer.merge()
    moved = ((base.dequantize_weight(torch.float32) - w0).norm() / w0.norm()).item()
    assert 0 < moved < MERGE_WARN and abs(err - moved) <= 1e-5 * moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_merge_of_an_untrained_adapter_into_a_dense_base_loses_nothing(cls, dtype):
    layer = cls(dense(9, 14, dtype=dtype), r=2, alpha=4)
    w0 = layer.base.weight.detach().clone()
    assert layer.merge() == 0.0 and torch.equal(layer.base.weight, w0)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e20), (torch.float16, 1e3)])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_merge_refuses_a_weight_the_base_would_store_as_inf(cls, dtype, big):
    layer = randomize(cls(dense(6, 10, dtype=dtype), r=2, alpha=4))
    with torch.no_grad():
        layer.lora_B.mul_(big).add_(big)       # float32: s B A overflows; float16: W' > 65504
        layer.lora_A.mul_(big)
        if cls is DoRALinear:                  # DoRA scales each row back to m: make m big too
            layer.magnitude.fill_(min(big ** 2, 3e38))
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"the merged weight has \d+ value\(s\) that a {dtype} "
                                         r"weight stores as inf or NaN .*nothing was changed"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_merge_on_the_meta_device_is_a_clear_error():
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(8, 4), r=2)
    with pytest.raises(ValueError, match=r"weights are on the meta device .*to_empty"):
        layer.merge()
    assert not layer.merged


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"r must be an integer >= 1, got 0"),
    (dict(r=2.5), r"r must be an integer >= 1, got 2.5"),
    (dict(r=True), r"r must be an integer >= 1, got True"),
    (dict(r=np.int64(0)), r"r must be an integer >= 1, got (np.int64\()?0"),
    (dict(alpha=0), r"alpha must be a finite number > 0, got 0"),
    (dict(alpha=-3.0), r"alpha must be a finite number > 0, got -3.0"),
    (dict(alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
    (dict(alpha=math.nan), r"alpha must be a finite number > 0, got nan"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\), got -0.1"),
    (dict(init="xavier"), r"init must be one of \('kaiming', 'gaussian'\), got 'xavier'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(dense(4, 4), **kwargs)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_any_integral_rank_is_accepted(cls):
    layer = cls(dense(5, 7), r=np.int64(3), alpha=6)
    want = cls(dense(5, 7), r=3, alpha=6)
    assert type(layer.r) is int and layer.r == 3 and layer.scaling == want.scaling == 2.0
    assert layer.lora_A.shape == (3, 7)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("x", [torch.arange(16).view(2, 8), torch.ones(2, 8, dtype=torch.bool),
                               torch.randn(2, 8, dtype=torch.complex64)])
def test_input_that_is_not_real_floating_point_is_refused(cls, quantized, x):
    # nn.Linear refuses these; a cast would truncate the output to integers or drop x.imag
    base = dense(3, 8, dtype=torch.float32)
    if quantized:
        base = NF4Linear.from_linear(base, blocksize=64)
    layer = cls(base, r=2)
    with pytest.raises(TypeError, match=rf"x must be a real floating-point tensor .*got {x.dtype}"):
        layer(x)


def test_bad_base():
    with pytest.raises(TypeError, match="base must be an nn.Linear or minidora.NF4Linear, "
                                        "got Conv1d"):
        LoRALinear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("shape", [(64, 0), (0, 8)])
def test_empty_base_is_refused(cls, shape):
    with pytest.raises(ValueError, match="in_features >= 1 and out_features >= 1"):
        cls(nn.Linear(*shape))


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
def test_non_real_float_base_is_refused(cls, dtype):
    lin = nn.Linear(6, 5)
    lin.weight = nn.Parameter(torch.ones(5, 6, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=rf"base.weight must be a real floating-point tensor, "
                                        rf"got {dtype}"):
        cls(lin)
