"""minidora.dora: PEFT's float64 numbers, the plain formula, the efficient norm, gradcheck of the
exact gradient, the spec's closed forms for the detached one, zero rows, QDoRA, merging."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import F64, check_peft_case, close, dense, gradcheck_layer
from minidora import DoRALinear, NF4Linear, dora_reference, nf4
from minidora.base import row_norms_sq as w0_row_norms_sq
from minidora.dora import EPS


def randomize(layer, seed=1):
    """B and m away from their init, as a trained adapter has them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / 3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / 3)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return layer


def reference(layer, x, detach_norm, w0=None):
    w0 = layer.base.weight if w0 is None else w0
    return dora_reference(x, w0, layer.base.bias.to(x.dtype), layer.lora_A, layer.lora_B,
                          layer.magnitude, layer.scaling, detach_norm=detach_norm)


# --- PEFT golden -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["dora", "dora_rslora"])
def test_matches_peft_float64(key):
    # PEFT builds W' and the norm directly; the identity differs by a few ulp: 1e-10 is ample.
    check_peft_case(DoRALinear, key, [("magnitude", "m")])


# --- the norm without an [out, in] temporary -----------------------------------------------------

def direct_norm(layer, w0):
    v = w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    return torch.linalg.vector_norm(v, dim=1)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_efficient_norm_equals_direct_norm_with_zero_row(dtype, rtol):
    lin = dense(41, 29, dtype=dtype, seed=2)
    with torch.no_grad():
        lin.weight[5] = 0
    layer = randomize(DoRALinear(lin, r=5, alpha=7, adapter_dtype=dtype))
    with torch.no_grad():
        layer.lora_B[5] = 0                                    # row 5 of V' is exactly zero
    c2 = layer.weight_norm_sq()
    want = direct_norm(layer, lin.weight)
    close(c2.clamp_min(0).sqrt(), want, rtol=rtol, atol=rtol * want.max())
    c = layer.weight_norm()
    assert c[5] == EPS and torch.isfinite(c).all()


def test_efficient_norm_bf16_dense_base():
    lin = dense(130, 70, dtype=torch.bfloat16, seed=4)
    layer = randomize(DoRALinear(lin, r=4, alpha=8))
    want = direct_norm(layer, lin.weight)
    # W0 A^T is a bf16 product: A rounded to bf16 (2^-9 each), float32 accumulation, the result
    # rounded to bf16 (2^-9): each entry within 2^-8 (|W0| |A|^T), so c^2 moves by at most
    # 2 s 2^-8 (|W0| |A|^T) . |B| per row; plus float32 sums.
    P_abs = lin.weight.double().abs() @ layer.lora_A.double().abs().T
    bound = 2 * layer.scaling * 2 ** -8 * (P_abs * layer.lora_B.double().abs()).sum(1)
    err = (layer.weight_norm().double() ** 2 - want ** 2).abs()
    assert (err <= bound + 1e-5 * want ** 2).all()
    assert (err > 0).any()          # the bound is not vacuous: bf16 rounding is visible


@pytest.mark.parametrize("double_quant", [True, False])
def test_w0_norms_of_nf4_base_chunked_equal_full_dequantize(double_quant, backend):
    lin = dense(150, 77, dtype=torch.float32, seed=6)     # 77 columns: blocks span rows
    base = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    w = nf4.dequantize(base.weight_nf4, torch.bfloat16).double()   # what the bf16 forward uses
    want = w.pow(2).sum(1)
    for chunk in (77, 64 * 77, 1 << 20):                  # one block-aligned unit, several, all
        close(w0_row_norms_sq(base, chunk_elems=chunk), want, rtol=1e-14)


def test_magnitude_starts_at_row_norms_of_dequantized_weight():
    lin = dense(20, 64, dtype=torch.float32)
    base = NF4Linear.from_linear(lin)
    layer = DoRALinear(base, r=4, alpha=8)
    want = torch.linalg.vector_norm(base.dequantize_weight(torch.bfloat16).double(), dim=1)
    close(layer.magnitude, want, rtol=1e-6)         # float32 m of float64 sums
    assert layer.magnitude.dtype == torch.float32


# --- the norms always come from the base as it is now -------------------------------------------

def fresh_copy(layer):
    """A new layer over a copy of the base, with the same adapter state: it has seen nothing."""
    new = DoRALinear(copy.deepcopy(layer.base), r=layer.r, alpha=layer.alpha,
                     adapter_dtype=layer.lora_A.dtype)
    new.load_state_dict(layer.state_dict())
    return new


def nf4_base(seed, compute_dtype=torch.float32):
    return NF4Linear.from_linear(dense(13, 64, dtype=torch.float32, seed=seed),
                                 compute_dtype=compute_dtype)


@pytest.mark.parametrize("quantized", [False, True])
def test_norms_follow_writes_through_data(quantized):
    # .data writes leave the parameter's version counter as it was: a cache keyed on it went stale
    dtype = torch.float32 if quantized else torch.float64
    base = nf4_base(seed=2) if quantized else dense(13, 64, seed=2)
    layer = randomize(DoRALinear(base, r=3, alpha=6, adapter_dtype=dtype))
    x = torch.randn(5, 64, dtype=dtype)
    before = layer(x)
    if quantized:                                  # other codes: another weight, same layout
        layer.base.packed.data.copy_(nf4_base(seed=3).packed)
    else:
        layer.base.weight.data.mul_(2)
    y = layer(x)
    assert (y - before).abs().max() > 1e-2
    assert torch.equal(y, fresh_copy(layer)(x))
    if not quantized:
        close(y, reference(layer, x, True), rtol=1e-12, atol=1e-13)


def test_norms_follow_a_fused_optimizer_step_on_an_unfrozen_base():
    layer = randomize(DoRALinear(dense(13, 21, dtype=torch.float32, seed=4), r=3, alpha=6))
    layer.base.weight.requires_grad_(True)                  # the user trains the base too
    opt = torch.optim.AdamW([layer.base.weight, layer.lora_A], lr=0.05, fused=True)
    x = torch.randn(6, 21)
    layer(x).square().sum().backward()
    opt.step()                                              # in place, no version bump
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, fresh_copy(layer)(x))
        close(y, reference(layer, x, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_compiled_layer_follows_load_state_dict(quantized):
    a = randomize(DoRALinear(nf4_base(5) if quantized else dense(13, 64, torch.float32, seed=5),
                             r=2, alpha=4))
    b = randomize(DoRALinear(nf4_base(6) if quantized else dense(13, 64, torch.float32, seed=6),
                             r=2, alpha=4), seed=2)
    x = torch.randn(4, 64)
    compiled = torch.compile(a, fullgraph=True)
    close(compiled(x), a(x), rtol=1e-5, atol=1e-6)
    a.load_state_dict(b.state_dict())
    want = b(x)                                             # no eager call of a in between
    assert (want - fresh_copy(a)(x)).abs().max() == 0
    close(compiled(x), want, rtol=1e-5, atol=1e-6)


# --- efficient forward / backward == the plain formula -----------------------------------------

@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("shape", [(9, 23), (2, 3, 23)])
def test_forward_backward_equal_plain_formula(detach_norm, shape):
    layer = randomize(DoRALinear(dense(17, 23), r=3, alpha=5, detach_norm=detach_norm, **F64))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(*shape[:-1], 17, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    got = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]
    for p in (x, layer.lora_A, layer.lora_B, layer.magnitude):
        p.grad = None
    (reference(layer, x, detach_norm) * gy).sum().backward()
    want = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]
    close(layer(x), reference(layer, x, detach_norm), rtol=1e-12, atol=1e-13)
    for a, b in zip(got, want, strict=True):
        close(a, b, rtol=1e-11, atol=1e-13)


def test_detached_gradients_equal_closed_forms():
    layer = randomize(DoRALinear(dense(12, 15), r=3, alpha=4, **F64))
    x = torch.randn(10, 15, dtype=torch.float64)
    gy = torch.randn(10, 12, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    with torch.no_grad():
        s, A, B, m = layer.scaling, layer.lora_A, layer.lora_B, layer.magnitude
        V = layer.base.weight + s * B @ A                            # [out, in]
        c = V.norm(dim=1)
        G = gy.T @ x                                                 # g_i rows: [out, in]
        grad_m = (G * V).sum(1) / c
        grad_V = (m / c)[:, None] * G
        close(layer.magnitude.grad, grad_m, rtol=1e-12, atol=1e-13)
        close(layer.lora_B.grad, s * grad_V @ A.T, rtol=1e-12, atol=1e-13)
        close(layer.lora_A.grad, s * B.T @ grad_V, rtol=1e-12, atol=1e-13)


def test_exact_gradients_equal_projected_closed_form():
    layer = randomize(DoRALinear(dense(12, 15), r=3, alpha=4, detach_norm=False, **F64))
    x = torch.randn(10, 15, dtype=torch.float64)
    gy = torch.randn(10, 12, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    with torch.no_grad():
        s, A, B, m = layer.scaling, layer.lora_A, layer.lora_B, layer.magnitude
        V = layer.base.weight + s * B @ A
        c = V.norm(dim=1)
        G = gy.T @ x
        # (I - v v^T / c^2) g per row
        grad_V = (m / c)[:, None] * (G - ((G * V).sum(1) / c ** 2)[:, None] * V)
        close(layer.lora_B.grad, s * grad_V @ A.T, rtol=1e-11, atol=1e-13)
        close(layer.lora_A.grad, s * B.T @ grad_V, rtol=1e-11, atol=1e-13)
        close(layer.magnitude.grad, (G * V).sum(1) / c, rtol=1e-12, atol=1e-13)


def test_gradcheck_exact_dora_dense():
    layer = randomize(DoRALinear(dense(7, 10), r=2, alpha=3, detach_norm=False, **F64))
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, x, ["lora_A", "lora_B", "magnitude"])


def test_gradcheck_exact_qdora_float64_compute(backend):
    base = NF4Linear.from_linear(dense(7, 10, dtype=torch.float32), compute_dtype=torch.float64)
    layer = randomize(DoRALinear(base, r=2, alpha=3, detach_norm=False, **F64))
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, x, ["lora_A", "lora_B", "magnitude"])


# --- zero rows, dropout, QDoRA, dtypes ----------------------------------------------------------

@pytest.mark.parametrize("detach_norm", [True, False])
def test_zero_weight_row_gives_finite_values_and_gradients(detach_norm):
    lin = dense(6, 8)
    with torch.no_grad():
        lin.weight[2] = 0
    layer = DoRALinear(lin, r=2, alpha=2, detach_norm=detach_norm, **F64)   # B = 0: row 2 of V' = 0
    assert layer.magnitude[2] == 0
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad):
        assert torch.isfinite(t).all()
    close(y, lin(x), rtol=1e-14, atol=1e-15)
    # m_2 = 0 and V'_2 = 0: that row's gradients are exactly zero; the others learn.
    assert layer.lora_B.grad[2].abs().sum() == 0 and layer.magnitude.grad[2] == 0
    assert (layer.lora_B.grad.abs().sum(1) > 0).sum() == 5


@pytest.mark.parametrize("quantized", [False, True])
def test_init_output_equals_base_exactly_with_dropout(quantized):
    base = dense(19, 33, dtype=torch.float32)
    if quantized:
        base = NF4Linear.from_linear(base, compute_dtype=torch.bfloat16)
    layer = DoRALinear(base, r=4, alpha=8, dropout=0.25).train()
    x = torch.randn(7, 33)
    assert torch.equal(layer(x), base(x))


def test_dropout_uses_one_mask_for_both_terms():
    layer = randomize(DoRALinear(dense(8, 10), r=2, alpha=2, dropout=0.5, **F64)).train()
    x = torch.randn(30, 10, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    W0, b, s = layer.base.weight, layer.base.bias, layer.scaling
    k = layer.magnitude / direct_norm(layer, W0)
    want = x @ W0.T + b + (k - 1) * (xd @ W0.T) + k * s * (xd @ layer.lora_A.T @ layer.lora_B.T)
    close(y, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("compute_dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_qdora_equals_dora_over_dequantized_weight(compute_dtype, rtol, backend):
    lin = dense(37, 45, dtype=torch.float32, seed=3)
    base = NF4Linear.from_linear(lin, compute_dtype=compute_dtype)
    layer = randomize(DoRALinear(base, r=4, alpha=8, adapter_dtype=compute_dtype))
    w = nf4.dequantize(nf4.quantize(lin.weight, 64, True), compute_dtype)
    x = torch.randn(5, 45, dtype=compute_dtype)
    close(layer(x), reference(layer, x, True, w0=w), rtol=rtol, atol=rtol)


def test_bf16_dense_base_float32_adapters():
    base = dense(16, 24, dtype=torch.bfloat16)
    layer = randomize(DoRALinear(base, r=4, alpha=8))
    assert layer.magnitude.dtype == torch.float32
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = dora_reference(x.float(), base.weight.float(), base.bias.float(), layer.lora_A,
                         layer.lora_B, layer.magnitude, layer.scaling)
    close(y, ref, rtol=1e-2, atol=1e-2)                  # bf16 products and output rounding
    y.float().sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32 and layer.magnitude.grad.abs().sum() > 0


def test_module_cast_keeps_adapters_and_uses_the_norms_of_the_cast_base():
    layer = DoRALinear(dense(5, 9, dtype=torch.float32), r=2, alpha=2)
    before = layer.w0_norm_sq().clone()
    layer.to(torch.bfloat16)                  # the base is cast; the trainable adapters are not
    assert layer.base.weight.dtype == torch.bfloat16
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.magnitude)} == {torch.float32}
    want = layer.base.weight.double().pow(2).sum(1)       # the norms of what forward now uses
    got = layer.w0_norm_sq()
    # float32 sums of 9 squares, then a square root and a square: one rounding each (2^-24)
    assert got.dtype == torch.float32 and not torch.equal(got, before)
    close(got, want, rtol=(9 + 2) * 2 ** -24)


# --- merge -----------------------------------------------------------------------------------

def test_merge_unmerge_dense_with_zero_magnitude_row():
    lin = dense(9, 14)
    with torch.no_grad():
        lin.weight[4] = 0
    layer = randomize(DoRALinear(lin, r=3, alpha=6, **F64))
    with torch.no_grad():
        layer.magnitude[4] = 0            # k = 0: that row of W0 cannot be recovered by division
        lin.weight[4] = torch.randn(14, dtype=torch.float64)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, 14, dtype=torch.float64)
    y = layer(x)
    assert layer.merge() == 0.0
    V = w0 + layer.scaling * layer.lora_B @ layer.lora_A
    close(lin.weight, (layer.magnitude / V.norm(dim=1))[:, None] * V, rtol=1e-14, atol=1e-15)
    close(layer(x), y, rtol=1e-12, atol=1e-13)
    layer.unmerge()
    close(lin.weight, w0, rtol=1e-12, atol=1e-13)
    close(layer(x), y, rtol=1e-12, atol=1e-13)


def test_merge_nf4_base_error_and_exact_unmerge():
    base = NF4Linear.from_linear(dense(24, 64, dtype=torch.float32), compute_dtype=torch.float32)
    layer = randomize(DoRALinear(base, r=4, alpha=8))
    packed = base.packed.clone()
    x = torch.randn(3, 64)
    y = layer(x)
    w0, exact = base.dequantize_weight(torch.float32), layer.merged_weight()
    err = layer.merge()                                 # relative to the update W' - W0
    stored = base.dequantize_weight(torch.float32)
    assert abs(err - ((stored - exact).norm() / (exact - w0).norm()).item()) <= 1e-5 * err
    # the merged layer is within the re-quantization error of the adapted one
    assert (layer(x) - y).norm() / y.norm() < 3 * err * (exact - w0).norm() / exact.norm()
    layer.unmerge()
    assert torch.equal(base.packed, packed)
    close(layer(x), y, rtol=0, atol=0)


# --- no [out, in] temporary ------------------------------------------------------------------

class _LargestOutput(TorchDispatchMode):
    """Records the largest new tensor any aten op allocates (forward and backward); views of
    the inputs (a transposed weight, say) allocate nothing and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_builds_no_full_size_temporary(detach_norm, dtype):
    n_out, n_in, m = 96, 160, 5
    layer = randomize(DoRALinear(dense(n_out, n_in, dtype=dtype), r=4, alpha=8,
                                 detach_norm=detach_norm))
    x = torch.randn(m, n_in, dtype=dtype, requires_grad=True)
    with _LargestOutput() as probe:
        layer(x).float().sum().backward()
    assert probe.largest < n_out * n_in // 4, probe.largest     # [M, out], [out, r], [r, in]...
    with _LargestOutput() as control:                            # the plain formula builds W'
        dora_reference(x.float(), layer.base.weight.float(), None, layer.lora_A, layer.lora_B,
                       layer.magnitude, layer.scaling).sum().backward()
    assert control.largest >= n_out * n_in


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(dense(24, 64, dtype=torch.float32), compute_dtype=torch.float32)
    layer = randomize(DoRALinear(base, r=4, alpha=8, detach_norm=False))
    x = torch.randn(6, 64, requires_grad=True)
    layer(x).sum().backward()
    want = [x.grad, layer.lora_A.grad, layer.magnitude.grad]
    x.grad = layer.lora_A.grad = layer.magnitude.grad = None
    y = torch.compile(layer, fullgraph=True)(x)               # no graph break anywhere
    close(y, layer(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    for got, w in zip([x.grad, layer.lora_A.grad, layer.magnitude.grad], want, strict=True):
        close(got, w, rtol=1e-5, atol=1e-6)


def test_reference_and_layer_share_the_detach_norm_default():
    layer = randomize(DoRALinear(dense(7, 12), r=2, alpha=4, **F64))
    x = torch.randn(5, 12, dtype=torch.float64)
    gy = torch.randn(5, 7, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    m = layer.magnitude.detach().clone().requires_grad_(True)
    ref = dora_reference(x, layer.base.weight, layer.base.bias, A, layer.lora_B.detach(), m,
                         layer.scaling)                              # both with their defaults
    (ref * gy).sum().backward()
    close(layer.lora_A.grad, A.grad, rtol=1e-10, atol=1e-12)
    close(layer.magnitude.grad, m.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("quantized", [False, True])
def test_unmerge_leaves_no_merge_state_behind(quantized):
    base = dense(12, 64, dtype=torch.float32)
    if quantized:
        base = NF4Linear.from_linear(base, compute_dtype=torch.float32)
    layer = randomize(DoRALinear(base, r=2, alpha=4))
    layer.merge(warn=False)
    assert layer._unmerge_state is not None
    layer.unmerge()
    assert layer._unmerge_state is None and not layer.merged
    assert not {"_merge_k", "_merge_rows", "_saved_nf4"} & set(vars(layer))
