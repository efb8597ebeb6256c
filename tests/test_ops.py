"""Tests of minidora/ops.py and the compiled NF4 ops behind it (csrc/, minidora/_register.py).

Every compiled op is checked against the plain PyTorch reference (``ops.reference``: nf4 and
F.linear) on every device that has kernels, and on the CPU with each kernel level it has (scalar,
AVX2, AVX-512, AVX512-BF16): outputs, input gradients, torch.library.opcheck, torch.compile,
gradcheck, fake kernels, and bad input at the Python and the C++ boundary. Which path a call
takes is tested in tests/test_backends.py.

The suite requires the built extension (``make test`` builds it): without it the compiled tests
fail, they do not skip.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import minidora
from helpers import (
    CPU_LEVELS,
    FLOAT_DTYPES,
    as_layout,
    assert_close_to_reference,
    case_seed,
    normal,
    quantized_weight,
    random_weight,
)
from minidora import nf4, ops
from minidora.nf4_linear import NF4Linear

DEVICES = ["cpu"] + (["cuda"] if minidora.ops.cuda_available() else [])


def _kernels():
    """(device, cpu kernel set) pairs: each CPU kernel set this machine can run, and CUDA."""
    best = ops.cpu_isa_best() if ops.extension_available() else "scalar"
    isas = CPU_LEVELS[: CPU_LEVELS.index(best) + 1]
    return [("cpu", isa) for isa in isas] + [(d, None) for d in DEVICES if d != "cpu"]


KERNELS = _kernels()


@pytest.fixture(params=KERNELS, ids=lambda k: k[0] if k[1] is None else f"{k[0]}-{k[1]}")
def device(request):
    """The device to test on, with the requested CPU kernel set forced for the test."""
    dev, isa = request.param
    if isa is None:
        yield dev
    else:
        with ops.use_cpu_isa(isa):
            assert ops.cpu_isa() == isa
            yield dev


# --- nf4_dequantize: bit-exact --------------------------------------------------------------

DEQ_SHAPES = [(1,), (7,), (33, 65), (64, 64), (3, 5, 31), (257, 129), (96, 1000)]


@pytest.mark.parametrize("shape", DEQ_SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-scales", "dq"])
def test_dequantize_bit_exact(device, shape, blocksize, double_quant):
    seed = case_seed(shape, blocksize, double_quant)
    q = quantized_weight(shape, blocksize, double_quant, device, seed)
    for dtype in FLOAT_DTYPES:
        out = ops.nf4_dequantize(q, dtype, backend="compiled")
        ref = nf4.dequantize(q, dtype)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.equal(out, ref), f"{dtype}: {(out.double() - ref.double()).abs().max()}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-scales", "dq"])
def test_dequantize_bit_exact_extreme_scales(device, double_quant):
    """Scales from 1e-30 to 1e30: float16 overflows and underflows, bfloat16 meets subnormals;
    every cast must round exactly as the reference's single .to(dtype)."""
    q = quantized_weight((200, 96), 32, double_quant, device, seed=5, spread=30.0)
    for dtype in FLOAT_DTYPES:
        assert torch.equal(ops.nf4_dequantize(q, dtype, backend="compiled"),
                           nf4.dequantize(q, dtype)), dtype


def test_dequantize_default_dtype_and_zero_block(device):
    w = random_weight((6, 64), seed=3).to(torch.bfloat16)
    w[2] = 0                                                   # one all-zero block
    q = nf4.quantize(w, 64, True)
    q.packed, q.absmax, q.nested_absmax, q.offset = (
        t.to(device) for t in (q.packed, q.absmax, q.nested_absmax, q.offset))
    out = ops.nf4_dequantize(q, backend="compiled")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, nf4.dequantize(q))
    assert torch.isfinite(out).all() and torch.equal(out[2].float(), torch.zeros(64))


# --- nf4_linear and nf4_linear_grad_input vs the reference ----------------------------------

# (out_features, in_features, blocksize, double_quant): odd sizes, partial blocks, rows that
# start inside a block (in % blocksize != 0, with in % 32 == 0 for the vector kernels), more than
# 256 blocks (several nested scales), out % 4 != 0 and in % 128 != 0 (the remainder paths of the
# vector kernels), a block larger than the whole weight. 40x2592 with blocksize 32 has 81 blocks
# per row: the kernels decode the scales of 64 blocks at a time, 16 at once, and such a run of 16
# may straddle two nested scales (in 12 of the 40 rows).
LINEAR_CASES = [(50, 160, 32, True), (33, 65, 64, False), (64, 512, 32, True),
                (20, 4096, 4096, True), (130, 257, 128, False), (42, 96, 64, True),
                (27, 224, 512, False), (40, 2592, 32, True)]
# batch shapes: M = 1, 3, 7, 16 take the fused few-rows kernels; 17, 30 and 300 the tiled one.
BATCHES = [(1,), (3,), (7,), (16,), (17,), (2, 3, 5), (300,)]


def _case_id(case) -> str:
    out_f, in_f, blocksize, _ = case
    return f"{out_f}x{in_f}-bs{blocksize}"


@pytest.mark.parametrize("case", LINEAR_CASES, ids=_case_id)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_forward(device, case, batch, dtype):
    out_f, in_f, blocksize, dq = case
    seed = case_seed(case, batch)
    q = quantized_weight((out_f, in_f), blocksize, dq, device, seed)
    layout = ["contiguous", "strided", "transposed"][seed % 3]
    x = as_layout(normal(*batch, in_f, dtype=dtype, device=device, seed=seed + 1), layout)
    w = nf4.dequantize(q, dtype)                                          # [out, in]
    for bias in (None, normal(out_f, dtype=dtype, device=device, seed=seed + 2)):
        y = ops.nf4_linear(x, q, bias, backend="compiled")                # [*batch, out]
        ref = F.linear(x, w, bias)
        magnitude = x.double().abs() @ w.double().abs().T
        if bias is None:
            assert_close_to_reference(y, ref, magnitude, in_f)
        else:
            assert_close_to_reference(y, ref, magnitude + bias.double().abs(), in_f,
                                      rounded_before=(x.double() @ w.double().T).abs())


@pytest.mark.parametrize("rows", [16, 81], ids=["fused", "tiled"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_one_hot_rows_read_weights_exactly(device, rows, dtype):
    """x = e_k makes y = W[:, k] with one exact product and exact zeros, so each kernel must
    return the dequantized weight bit for bit: this checks the scale of every block of every
    row exactly (the fused float32 kernel decodes 16 double-quantized scales at once, with the
    reference's two float32 roundings). 40x2592, blocksize 32: 81 blocks per row, runs of 16
    scales straddling two nested scales; column 32 b + (b % 32) lies in block b."""
    q = quantized_weight((40, 2592), 32, True, device, 31)
    w = nf4.dequantize(q, dtype)                                   # [40, 2592]
    cols = torch.tensor([32 * b + b % 32 for b in range(81)])
    for start in range(0, 81, rows):
        pick = cols[start:start + rows]
        x = torch.zeros(len(pick), 2592, dtype=dtype, device=device)
        x[torch.arange(len(pick)), pick] = 1
        y = ops.nf4_linear(x, q, backend="compiled")               # [len(pick), 40]
        assert torch.equal(y, w[:, pick].T.contiguous()), (start, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_several_tiles(device, dtype):
    """The many-rows regime decodes W in tiles of about 2 MiB, each thread its own (rows of W
    for the forward and the float32/float64 gradient, whose per-thread sums are added at the
    end; columns for the 16-bit gradient): with two threads 4200 x 1056 takes 5 to 17 tiles of
    each kind, the last one partial, with rows starting inside a block (1056 % 64 != 0)."""
    out_f, in_f = 4200, 1056
    q = quantized_weight((out_f, in_f), 64, True, device, 11)
    w = nf4.dequantize(q, dtype)
    x = normal(40, in_f, dtype=dtype, device=device, seed=12).requires_grad_()
    bias = normal(out_f, dtype=dtype, device=device, seed=13)
    y = ops.nf4_linear(x, q, bias, backend="compiled")
    assert_close_to_reference(y, F.linear(x, w, bias), x.double().abs() @ w.double().abs().T
                              + bias.double().abs(), in_f,
                              rounded_before=(x.double() @ w.double().T).abs())
    grad_y = normal(40, out_f, dtype=dtype, device=device, seed=14)
    (gx,) = torch.autograd.grad(y, x, grad_y)
    assert_close_to_reference(gx, grad_y @ w, grad_y.double().abs() @ w.double().abs(), out_f)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_tiles_any_thread_count(threads, dtype):
    """Each thread owns some of the tiles, at least two per thread when W is small: 700 x 544
    takes 2 tiles of each kind on one thread (no parallel region), and 5 or 6 spread unevenly
    over three threads (the float32 gradient then adds three per-thread sums)."""
    q = quantized_weight((700, 544), 64, True, "cpu", 21)
    w = nf4.dequantize(q, dtype)
    x = normal(50, 544, dtype=dtype, device="cpu", seed=22).requires_grad_()
    grad_y = normal(50, 700, dtype=dtype, device="cpu", seed=23)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.nf4_linear(x, q, backend="compiled")
        (gx,) = torch.autograd.grad(y, x, grad_y)
    finally:
        torch.set_num_threads(before)
    assert_close_to_reference(y, F.linear(x, w), x.double().abs() @ w.double().abs().T, 544)
    assert_close_to_reference(gx, grad_y @ w, grad_y.double().abs() @ w.double().abs(), 700)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=_case_id)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_input_gradient(device, case, batch, dtype):
    out_f, in_f, blocksize, dq = case
    seed = case_seed(case, batch, "grad")
    q = quantized_weight((out_f, in_f), blocksize, dq, device, seed)
    w = nf4.dequantize(q, dtype)                                          # [out, in]
    x = normal(*batch, in_f, dtype=dtype, device=device, seed=seed + 1).requires_grad_()
    bias = normal(out_f, dtype=dtype, device=device, seed=seed + 2).requires_grad_()
    grad_y = as_layout(normal(*batch, out_f, dtype=dtype, device=device, seed=seed + 3),
                     ["contiguous", "strided", "transposed"][seed % 3])
    ops.nf4_linear(x, q, bias, backend="compiled").backward(grad_y)
    ref_x, ref_b = torch.autograd.grad(F.linear(x, w, bias), (x, bias), grad_y)
    assert_close_to_reference(x.grad, ref_x, grad_y.double().abs() @ w.double().abs(), out_f)
    # the bias gradient is grad_y summed over the batch dims, the same op on both paths
    assert_close_to_reference(bias.grad, ref_b, grad_y.double().abs().reshape(-1, out_f).sum(0),
                              math.prod(batch))
    # the op itself, called directly
    gx = torch.ops.minidora.nf4_linear_grad_input(grad_y, *ops._weight_args(q), out_f, in_f)
    assert torch.equal(gx, x.grad)


@pytest.mark.parametrize("rows", [1, 16, 64], ids=lambda m: f"M{m}")
def test_linear_realistic_size(device, rows):
    """A transformer-sized layer in both regimes, float32 and bfloat16, forward and backward."""
    q = quantized_weight((1024, 2048), 64, True, device, seed=11)
    for dtype in (torch.float32, torch.bfloat16):
        w = nf4.dequantize(q, dtype)
        x = normal(rows, 2048, dtype=dtype, device=device, seed=rows).requires_grad_()
        y = ops.nf4_linear(x, q, backend="compiled")
        assert_close_to_reference(y, F.linear(x, w), x.double().abs() @ w.double().abs().T, 2048)
        grad_y = normal(rows, 1024, dtype=dtype, device=device, seed=rows + 1)
        (gx,) = torch.autograd.grad(y, x, grad_y)
        assert_close_to_reference(gx, grad_y @ w, grad_y.double().abs() @ w.double().abs(), 1024)


def test_linear_empty_batch(device):
    q = quantized_weight((8, 64), 32, True, device)
    x = torch.zeros(0, 3, 64, device=device)
    assert ops.nf4_linear(x, q, backend="compiled").shape == (0, 3, 8)


# --- opcheck, torch.compile, gradcheck --------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-scales", "dq"])
@pytest.mark.parametrize("rows", [2, 40], ids=lambda m: f"M{m}")
def test_opcheck_linear(device, double_quant, rows):
    q = quantized_weight((24, 96), 32, double_quant, device, seed=rows)
    w = ops._weight_args(q)
    x = normal(rows, 96, dtype=torch.float32, device=device, seed=1).requires_grad_()
    b = normal(24, dtype=torch.float32, device=device, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.minidora.nf4_linear.default, (x, *w, 24, 96, b))
    torch.library.opcheck(torch.ops.minidora.nf4_linear.default, (x.detach(), *w, 24, 96, None))


@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-scales", "dq"])
def test_opcheck_grad_input(device, double_quant):
    q = quantized_weight((24, 96), 32, double_quant, device, seed=4)
    gy = normal(3, 24, dtype=torch.bfloat16, device=device, seed=1).requires_grad_()
    torch.library.opcheck(torch.ops.minidora.nf4_linear_grad_input.default,
                          (gy, *ops._weight_args(q), 24, 96))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_opcheck_dequantize(device, dtype):
    q = quantized_weight((40, 33), 64, True, device, seed=6)
    torch.library.opcheck(torch.ops.minidora.nf4_dequantize.default,
                          (*ops._weight_args(q), [40, 33], dtype))


class _NF4Linear(torch.nn.Module):
    """A minimal frozen 4-bit linear layer whose forward calls ops.nf4_linear."""

    def __init__(self, q, bias):
        super().__init__()
        self.q = q
        self.bias = torch.nn.Parameter(bias)

    def forward(self, x):
        return ops.nf4_linear(x, self.q, self.bias)


def test_torch_compile_fullgraph(device):
    q = quantized_weight((48, 160), 32, True, device, seed=8)
    layer = _NF4Linear(q, normal(48, dtype=torch.float32, device=device, seed=1))
    compiled = torch.compile(layer, fullgraph=True)
    w = nf4.dequantize(q, torch.float32)
    for rows in (3, 40):  # both regimes
        x = normal(2, rows, 160, dtype=torch.float32, device=device, seed=rows).requires_grad_()
        y = compiled(x)
        assert torch.equal(y, layer(x))  # same op, same kernel
        magnitude = x.double().abs() @ w.double().abs().T + layer.bias.double().abs()
        assert_close_to_reference(y, F.linear(x, w, layer.bias), magnitude, 160)
        grad_y = normal(2, rows, 48, dtype=torch.float32, device=device, seed=rows + 1)
        gx, gb = torch.autograd.grad(y, (x, layer.bias), grad_y)
        ref_x, ref_b = torch.autograd.grad(F.linear(x, w, layer.bias), (x, layer.bias), grad_y)
        assert_close_to_reference(gx, ref_x, grad_y.double().abs() @ w.double().abs(), 48)
        assert_close_to_reference(gb, ref_b, grad_y.double().abs().sum((0, 1)), 2 * rows)


@pytest.mark.parametrize("rows", [(3,), (2, 3)], ids=["M3", "2x3"])
def test_gradcheck_float64(device, rows):
    """Gradients of x and bias, and of the backward itself (nf4_linear_grad_input is
    differentiable), against finite differences in float64."""
    q = quantized_weight((12, 40), 32, True, device, seed=9)
    x = normal(*rows, 40, dtype=torch.float64, device=device, seed=1).requires_grad_()
    b = normal(12, dtype=torch.float64, device=device, seed=2).requires_grad_()

    def f(x, b):
        return ops.nf4_linear(x, q, b, backend="compiled")

    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))


def _moved(q, to):
    """The same NF4 weight with every tensor passed through `to`."""
    return nf4.NF4Weight(to(q.packed), to(q.absmax), q.shape, q.dtype, q.blocksize,
                         to(q.nested_absmax), to(q.offset))


def test_meta_tensors_use_fake_kernels():
    """A whole model on the meta device (x and every weight tensor) gets shapes from the fake
    kernels of the ops, and from the reference path through ops.nf4_linear."""
    q = _moved(quantized_weight((24, 96), 32, True, "cpu"), lambda t: t.to("meta"))
    x = torch.empty(2, 5, 96, device="meta")
    w = ops._weight_args(q)
    y = torch.ops.minidora.nf4_linear(x, *w, 24, 96, torch.empty(24, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 24)
    gx = torch.ops.minidora.nf4_linear_grad_input(y, *w, 24, 96)
    assert gx.device.type == "meta" and gx.shape == (2, 5, 96)
    d = torch.ops.minidora.nf4_dequantize(*w, [24, 96], torch.bfloat16)
    assert d.device.type == "meta" and d.shape == (24, 96) and d.dtype == torch.bfloat16
    assert ops.nf4_linear(x, q).shape == (2, 5, 24)
    layer = NF4Linear(quantized_weight((24, 96), 32, True, "cpu"), torch.randn(24)).to("meta")
    assert layer(x).shape == (2, 5, 24)


def test_fake_tensor_tracing():
    """Under FakeTensorMode (what torch.compile traces with) the compiled path runs the fake
    kernels, forward and backward; a weight tensor on another device than x still raises."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the constant dynamic map stays real
    q = _moved(quantized_weight((24, 96), 32, True, "cpu"), mode.from_tensor)
    x = mode.from_tensor(torch.randn(2, 5, 96, requires_grad=True))
    with mode:
        y = ops.nf4_linear(x, q, backend="compiled")
        (gx,) = torch.autograd.grad(y.sum(), x)
        d = ops.nf4_dequantize(q, torch.float16, backend="compiled")
    assert y.shape == (2, 5, 24) and gx.shape == (2, 5, 96) and d.shape == (24, 96)
    q.nested_absmax = mode.from_tensor(q.nested_absmax.to("meta"))
    message = "nf4_linear: nested_absmax is on meta but x is on cpu"
    with mode, pytest.raises(RuntimeError, match=message):
        torch.ops.minidora.nf4_linear(x, *ops._weight_args(q), 24, 96, None)


# --- bad input: Python boundary (ValueError / TypeError) and C++ (TORCH_CHECK) --------------

def _bad_input_weight():
    return quantized_weight((16, 64), 32, True, "cpu", seed=12), torch.randn(3, 64)


def test_bad_input_python():
    q, x = _bad_input_weight()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.nf4_linear(x, q, backend="fast")
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64"):
        ops.nf4_linear(x.to(torch.int32), q)
    with pytest.raises(ValueError, match="x must have last dimension in_features = 64"):
        ops.nf4_linear(torch.randn(3, 65), q)
    with pytest.raises(ValueError, match="q.packed is on cpu but x is on meta"):
        ops.nf4_linear(x.to("meta"), q)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        ops.nf4_linear(x, q, torch.randn(16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        ops.nf4_linear(x, q, torch.randn(17))
    with pytest.raises(TypeError, match="q must be an NF4Weight"):
        ops.nf4_linear(x, torch.randn(16, 64))
    with pytest.raises(TypeError, match="dtype must be float32"):
        ops.nf4_dequantize(q, torch.int8)
    with pytest.raises(ValueError, match="q must be a 2-D weight"):
        ops.nf4_linear(x, quantized_weight((4, 4, 64), 32, True, "cpu"))
    bad = nf4.NF4Weight(q.packed, q.absmax[:-1], q.shape, q.dtype, q.blocksize, q.nested_absmax,
                        q.offset)
    with pytest.raises(ValueError, match=r"q.absmax must be 1-D with ceil\(n/blocksize\) = 32 "):
        ops.nf4_linear(x, bad)
    bad = nf4.NF4Weight(q.packed[:-1], q.absmax, q.shape, q.dtype, q.blocksize, q.nested_absmax,
                        q.offset)
    with pytest.raises(ValueError, match=r"q.packed must be 1-D with ceil\(n/2\) = 512 bytes"):
        ops.nf4_linear(x, bad)
    bad = nf4.NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 48, q.nested_absmax, q.offset)
    with pytest.raises(ValueError, match="blocksize must be a power of two in 32..4096, got 48"):
        ops.nf4_linear(x, bad)
    bad = nf4.NF4Weight(q.packed, q.absmax.float(), q.shape, q.dtype, q.blocksize,
                        q.nested_absmax, q.offset)
    with pytest.raises(TypeError, match="absmax must be torch.uint8"):
        ops.nf4_dequantize(bad)


def test_bad_input_cpp():
    """The ops check their arguments themselves (callers may skip ops.py)."""
    q, x = _bad_input_weight()
    packed, absmax, nested, code, offset, bs = ops._weight_args(q)
    linear = torch.ops.minidora.nf4_linear
    with pytest.raises(RuntimeError, match="nf4_linear: x must be float32, bfloat16, float16 or"):
        linear(x.to(torch.int32), packed, absmax, nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="x must have last dimension in_features = 64"):
        linear(torch.randn(3, 63), packed, absmax, nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match=r"packed must hold ceil\(n/2\) = 512 bytes"):
        linear(x, packed[:-1], absmax, nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="packed must be a uint8 tensor"):
        linear(x, packed.to(torch.int8), absmax, nested, code, offset, bs, 16, 64, None)
    # the right number of scales for another shape is the wrong number for this one
    with pytest.raises(RuntimeError, match=r"absmax must be 1-D with ceil\(n/blocksize\) = 16 "):
        linear(torch.randn(3, 32), packed[:256], absmax, nested, code, offset, bs, 16, 32, None)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two in 32..4096, got 16"):
        linear(x, packed, absmax, nested, code, offset, 16, 16, 64, None)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two in 32..4096, got 96"):
        linear(x, packed, absmax, nested, code, offset, 96, 16, 64, None)
    with pytest.raises(RuntimeError, match="needs nested_absmax, nested_code and offset"):
        linear(x, packed, absmax, None, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="must be None when absmax is float32"):
        linear(x, packed, q.scales(), nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError,
                       match=r"nested_absmax must be float32 1-D with ceil\(n_blocks/256\) = 1 "):
        linear(x, packed, absmax, torch.ones(2), code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match=r"nested_code must be the float32 \[256\] dynamic map"):
        linear(x, packed, absmax, nested, code[:128], offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="absmax must be float32 .* or uint8"):
        linear(x, packed, absmax.to(torch.int16), nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        linear(x, packed, absmax, nested, code, offset, bs, 16, 64, torch.randn(16).double())
    with pytest.raises(RuntimeError, match=r"bias must have shape \[out_features\] = \[16\]"):
        linear(x, packed, absmax, nested, code, offset, bs, 16, 64, torch.randn(15))
    with pytest.raises(RuntimeError,
                       match="nf4_linear_grad_input: grad_y must have last dimension out_features "
                             "= 16"):
        torch.ops.minidora.nf4_linear_grad_input(torch.randn(3, 64), packed, absmax, nested, code,
                                                 offset, bs, 16, 64)
    with pytest.raises(RuntimeError, match="nf4_dequantize: dtype must be float32"):
        torch.ops.minidora.nf4_dequantize(packed, absmax, nested, code, offset, bs, [16, 64],
                                          torch.int32)
    with pytest.raises(RuntimeError, match=r"packed must hold ceil\(n/2\) = 520 bytes"):
        torch.ops.minidora.nf4_dequantize(packed, absmax, nested, code, offset, bs, [16, 65],
                                          torch.float32)


def test_bad_weight_python():
    """Every tensor of an NF4Weight is checked at the Python boundary, not first in C++."""
    q, x = _bad_input_weight()
    cases = [
        (dict(offset=None), TypeError, "q.offset must be a torch.float32 tensor"),
        (dict(offset=q.offset.double()), TypeError, "q.offset must be a torch.float32 tensor"),
        (dict(offset=q.offset.repeat(2)), ValueError, r"q.offset must hold one element"),
        (dict(nested_absmax=q.nested_absmax.repeat(2)), ValueError,
         r"q.nested_absmax must be 1-D with ceil\(n_blocks/256\) = 1 values"),
        (dict(nested_absmax=q.nested_absmax.double()), TypeError,
         "q.nested_absmax must be torch.float32"),
        (dict(nested_absmax=None, absmax=q.scales()[:, None]), ValueError,
         r"q.absmax must be 1-D .*, got shape \(32, 1\)"),
        (dict(nested_absmax=None, absmax=q.scales()), ValueError,
         "q.offset must be None without double quantization"),
        (dict(packed=q.packed.view(-1, 2)), ValueError,
         r"q.packed must be 1-D .*got shape \(256, 2\)"),
        (dict(packed=q.packed.numpy()), TypeError, "q.packed must be a torch.Tensor"),
        (dict(shape=(16, 0)), ValueError, "q.shape must be a tuple of positive ints"),
        (dict(shape=(-16, -64)), ValueError, "q.shape must be a tuple of positive ints"),
    ]
    for change, error, message in cases:
        fields = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype,
                      blocksize=q.blocksize, nested_absmax=q.nested_absmax, offset=q.offset)
        bad = nf4.NF4Weight(**{**fields, **change})
        for backend in ("compiled", "reference"):
            with pytest.raises(error, match=message):
                ops.nf4_linear(x, bad, backend=backend)
            with pytest.raises(error, match=message):
                ops.nf4_dequantize(bad, backend=backend)


WEIGHT_PARTS = ["packed", "absmax", "nested_absmax", "offset"]


@pytest.mark.parametrize("part", WEIGHT_PARTS + ["bias"])
def test_mixed_devices_python(part):
    """One tensor on the meta device, the rest on the CPU: a ValueError naming the tensor and
    both devices on every path (the dispatcher sends a call with any meta tensor to the
    shape-only fake kernel, which would return uninitialised memory on the CPU)."""
    q, x = _bad_input_weight()
    bias = torch.randn(16)
    layer = NF4Linear(q, bias, compute_dtype=torch.float32)
    if part == "bias":
        bias, name = bias.to("meta"), "bias"
    else:
        setattr(q, part, getattr(q, part).to("meta"))
        name = f"q.{part}"
    for backend in ("compiled", "reference", "auto"):
        with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
            ops.nf4_linear(x, q, bias, backend=backend)
        if part not in ("bias", "packed"):
            with pytest.raises(ValueError, match=f"{name} is on meta but q.packed is on cpu"):
                ops.nf4_dequantize(q, backend=backend)
    old = getattr(layer, part)
    new = old.to("meta")
    setattr(layer, part, torch.nn.Parameter(new, requires_grad=False)
            if isinstance(old, torch.nn.Parameter) else new)
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        layer(x)


OP_TENSORS = {  # the tensor arguments of each op, in order (x or grad_y first for the matmuls)
    "nf4_linear": ["x", "packed", "absmax", "nested_absmax", "nested_code", "offset", "bias"],
    "nf4_linear_grad_input": ["grad_y", "packed", "absmax", "nested_absmax", "nested_code",
                              "offset"],
    "nf4_dequantize": ["packed", "absmax", "nested_absmax", "nested_code", "offset"],
}


def _op_call(op, q, x, moved=None):
    """(packet, arguments) of a direct call of `op` with the tensor `moved` on the meta device."""
    packed, absmax, nested, code, offset, bs = ops._weight_args(q)
    tensors = dict(x=x, grad_y=torch.randn(3, 16), packed=packed, absmax=absmax,
                   nested_absmax=nested, nested_code=code, offset=offset, bias=torch.randn(16))
    if moved is not None:
        tensors[moved] = tensors[moved].to("meta")
    t = [tensors[name] for name in OP_TENSORS[op]]
    if op == "nf4_linear":
        args = (*t[:6], bs, 16, 64, t[6])
    elif op == "nf4_linear_grad_input":
        args = (*t, bs, 16, 64)
    else:
        args = (*t, bs, [16, 64], torch.float32)
    return getattr(torch.ops.minidora, op).default, args


@pytest.mark.parametrize("op", list(OP_TENSORS))
def test_mixed_devices_ops(op):
    """Called directly, each op rejects one tensor on another device with a RuntimeError naming
    it: in the fake kernel (where the dispatcher sends a call with a meta tensor) and in the C++
    checks shared by the CPU and CUDA kernels (reached here by redispatching to the CPU kernel)."""
    q, x = _bad_input_weight()
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    first = OP_TENSORS[op][0]
    for moved in OP_TENSORS[op][1:]:
        overload, args = _op_call(op, q, x, moved)
        message = f"{op}: {moved} is on meta but {first} is on cpu"
        with pytest.raises(RuntimeError, match=message):
            overload(*args)
        with pytest.raises(RuntimeError, match=message):
            overload.redispatch(cpu_kernel, *args)
    overload, args = _op_call(op, q, x, first)  # the tensor the others are compared with
    second = OP_TENSORS[op][1]
    with pytest.raises(RuntimeError, match=f"{op}: {second} is on cpu but {first} is on meta"):
        overload(*args)
    with pytest.raises(RuntimeError, match=f"{op}: the CPU kernel got {first} on meta"):
        overload.redispatch(cpu_kernel, *args)


def test_sizes_checked_cpp():
    """Each int an op receives is checked before any kernel runs: positive, its products within
    int64, and consistent with the tensors passed. Sized so that a wrapped-around product passes
    the tensor checks, these calls would otherwise index far past packed."""
    q = quantized_weight((4, 4), 32, False, "cpu")      # 16 elements: 8 bytes of codes, one block
    w = ops._weight_args(q)
    linear = torch.ops.minidora.nf4_linear
    grad = torch.ops.minidora.nf4_linear_grad_input
    dequantize = torch.ops.minidora.nf4_dequantize
    big = 2**62 + 4                                # big * 4 wraps around to 16 in int64
    product = r"out_features \* in_features = {} \* {} overflows int64"
    with pytest.raises(RuntimeError, match="nf4_linear: " + product.format(big, 4)):
        linear(torch.randn(3, 4), *w, big, 4, None)
    with pytest.raises(RuntimeError, match="nf4_linear_grad_input: " + product.format(4, big)):
        grad(torch.randn(3, 4), *w, 4, big)
    with pytest.raises(RuntimeError,
                       match=rf"nf4_dequantize: shape \[{big}, 4\] has too many elements"):
        dequantize(*w, [big, 4], torch.float32)
    # a stride-0 batch of 2^60 rows: its result would have 2^66 elements
    rows = 2**60
    wide = ops._weight_args(quantized_weight((64, 4), 32, False, "cpu"))
    with pytest.raises(RuntimeError,
                       match=rf"nf4_linear: x's rows \* out_features = {rows} \* 64 overflows"):
        linear(torch.ones(1, 4).expand(rows, 4), *wide, 64, 4, None)
    tall = ops._weight_args(quantized_weight((4, 64), 32, False, "cpu"))
    with pytest.raises(RuntimeError,
                       match=rf"grad_input: grad_y's rows \* in_features = {rows} \* 64 overflows"):
        grad(torch.ones(1, 4).expand(rows, 4), *tall, 4, 64)
    # zero and negative sizes
    for out_f, in_f, name, value in [(0, 4, "out_features", 0), (-4, 4, "out_features", -4),
                                     (4, 0, "in_features", 0), (4, -4, "in_features", -4)]:
        with pytest.raises(RuntimeError, match=f"nf4_linear: {name} must be positive, got {value}"):
            linear(torch.randn(3, max(in_f, 1)), *w, out_f, in_f, None)
        with pytest.raises(RuntimeError, match=f"grad_input: {name} must be positive, got {value}"):
            grad(torch.randn(3, max(out_f, 1)), *w, out_f, in_f)
    for shape in ([-4, -4], [4, 0], [0]):
        with pytest.raises(RuntimeError, match=r"nf4_dequantize: shape must have positive sizes"):
            dequantize(*w, shape, torch.float32)
    for blocksize in (0, -64, 8192):
        with pytest.raises(RuntimeError,
                           match=f"blocksize must be a power of two in 32..4096, got {blocksize}"):
            linear(torch.randn(3, 4), *w[:5], blocksize, 4, 4, None)


def test_tensor_sizes_checked_cpp():
    """Each tensor of the weight must have the size the ints imply (and the offset one element)."""
    q, x = _bad_input_weight()
    packed, absmax, nested, code, offset, bs = ops._weight_args(q)
    linear = torch.ops.minidora.nf4_linear
    with pytest.raises(RuntimeError,
                       match=r"offset must be a float32 tensor of one element \(0-dim or \[1\]\), "
                             r"got Float of shape \[1, 1\]"):
        linear(x, packed, absmax, nested, code, offset.view(1, 1), bs, 16, 64, None)
    with pytest.raises(RuntimeError, match="offset must be a float32 tensor of one element"):
        linear(x, packed, absmax, nested, code, offset.repeat(2), bs, 16, 64, None)
    with pytest.raises(RuntimeError, match=r"packed must be 1-D \[ceil\(n/2\)\] = \[512\]"):
        linear(x, packed.view(256, 2), absmax, nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match=r"packed must hold ceil\(n/2\) = 512 bytes"):
        linear(x, torch.cat([packed, packed]), absmax, nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError,
                       match=r"absmax must be 1-D with ceil\(n/blocksize\) = 32 scales"):
        linear(x, packed, absmax[:, None], nested, code, offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError, match=r"nested_code must be the float32 \[256\] dynamic map"):
        linear(x, packed, absmax, nested, torch.cat([code, code[:1]]), offset, bs, 16, 64, None)
    with pytest.raises(RuntimeError,
                       match=r"bias must have shape \[out_features\] = \[16\], got \[1, 16\]"):
        linear(x, packed, absmax, nested, code, offset, bs, 16, 64, torch.randn(1, 16))
