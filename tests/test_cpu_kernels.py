"""The edges of the CPU kernels of csrc/, at every ISA level, against the reference.

Each vector kernel handles the regular part of its work in chunks and tiles and the rest in
remainder paths: a row of W that starts inside an absmax block, a last block of W that is only
partly filled, an in_features that is not a multiple of the 32 (AVX-512) or 8 (AVX2) weights of a
chunk (which sends the few-rows forward to a lower level's kernel), out_features that is not a
multiple of the rows of W a kernel takes at once (8, 4, 2), M that is not a multiple of the tile
height (the rows of x a kernel takes at once: 2 for AVX2, 4 for AVX-512, up to 8 for AVX512_BF16),
and activations, gradients and weight tensors that are not contiguous. Every M of the few-rows
regime (1..16) and the first of the many-rows one (17) is tried, with two checks each. M = 17 in
bfloat16 below the avx512bf16 level, and in float16 at every level, takes the float32 tiles
rounded through the dtype (decode_rounded); the AVX2 kernels take 32 weights a step when
in_features % 32 == 0 and 8 otherwise.

* one-hot rows of x (or of grad_y) make every result element a single product, so the kernel
  must return the dequantized weights bit for bit;
* random rows must match the reference within the float tolerance of test_ops.py.

A level this CPU lacks is skipped, with the reason; the ids of the tests say which level ran.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import as_layout, assert_close_to_reference, case_seed, normal, quantized_weight
from minidora import nf4, ops

LEVELS = ["scalar", "avx2", "avx512", "avx512bf16"]  # each includes the ones before it
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # float64 always takes the tiled path

# (out_features, in_features, blocksize), with what each one exercises:
SHAPES = [
    (39, 96, 64),     # rows start inside a block (96 % 64), last block partial, out % 8 == 7
    (37, 97, 32),     # odd in_features: no vector forward kernel fits, every level runs scalar
    (21, 136, 64),    # in % 8 == 0 but in % 32 != 0: the AVX2 forward at the AVX-512 levels,
                      # 8-weight steps of the AVX2 kernels
    (35, 320, 64),    # rows on block boundaries: scales decoded 64 blocks at a time; K % 64 == 0
                      # and blocksize >= 64: the bfloat16 kernel's 64-element steps
    (19, 192, 128),   # the same steps in rows that start inside a block
    (13, 2080, 4096), # one block longer than several rows; out % 4 == 1
    (131, 64, 32),    # more than 2 x 64 rows of W: the AVX2 input gradient's buffer of 64 rows
                      # (3 or more rows of gy) twice and then 3 rows; odd pairs at M = 1
]
ROWS = range(1, 18)   # 1..16: few-rows kernels, every remainder of every tile height; 17: tiled


@pytest.fixture(params=LEVELS)
def level(request):
    """Force one ISA level for the test's thread; skip when this CPU does not have it."""
    best = ops.cpu_isa_best()
    if LEVELS.index(request.param) > LEVELS.index(best):
        pytest.skip(f"this CPU has no {request.param} (its best level is {best})")
    with ops.use(cpu_isa=request.param):
        assert ops.cpu_isa() == request.param
        yield request.param


def _strided_weight(q):
    """The same NF4 weight, each tensor a non-contiguous view (every other element of a buffer
    twice as long)."""
    def spread(t):
        if t is None or t.dim() == 0:
            return t
        wide = torch.empty(2 * t.numel(), dtype=t.dtype)
        wide[::2] = t
        out = wide[::2]
        assert torch.equal(out, t) and (t.numel() == 1 or not out.is_contiguous())
        return out
    return nf4.NF4Weight(spread(q.packed), spread(q.absmax), q.shape, q.dtype, q.blocksize,
                         spread(q.nested_absmax), q.offset)


def _one_hot(rows, features, dtype, seed):
    """[rows, features] with one 1 per row, at columns spread over the blocks, and those columns."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(features, generator=g)[:rows] if rows <= features else \
        torch.randint(features, (rows,), generator=g)
    x = torch.zeros(rows, features, dtype=dtype)
    x[torch.arange(rows), cols] = 1
    return x, cols


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-bs{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_every_m(level, shape, dtype):
    out_f, in_f, blocksize = shape
    seed = case_seed(shape, str(dtype), "forward")
    q = quantized_weight((out_f, in_f), blocksize, True, "cpu", seed)
    w = nf4.dequantize(q, dtype)                                         # [out, in]
    strided = _strided_weight(q)
    for rows in ROWS:
        x, cols = _one_hot(rows, in_f, dtype, seed + rows)
        y = ops.nf4_linear(x, q, backend="compiled")                     # [rows, out]
        assert torch.equal(y, w[:, cols].T.contiguous()), (level, rows)
        layout = ["strided", "transposed"][rows % 2]
        x = as_layout(normal(2, rows, in_f, dtype=dtype, device="cpu", seed=seed + rows), layout)
        bias = as_layout(normal(out_f, dtype=dtype, device="cpu", seed=seed - rows), "strided")
        y = ops.nf4_linear(x, strided, bias, backend="compiled")         # [2, rows, out]
        ref = F.linear(x, w, bias)
        assert_close_to_reference(y, ref, x.double().abs() @ w.double().abs().T
                                  + bias.double().abs(), in_f,
                                  rounded_before=(x.double() @ w.double().T).abs())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-bs{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_gradient_every_m(level, shape, dtype):
    out_f, in_f, blocksize = shape
    seed = case_seed(shape, str(dtype), "grad")
    q = quantized_weight((out_f, in_f), blocksize, False, "cpu", seed)
    w = nf4.dequantize(q, dtype)                                         # [out, in]
    args = ops._weight_args(_strided_weight(q))
    grad = torch.ops.minidora.nf4_linear_grad_input
    for rows in ROWS:
        gy, picked = _one_hot(rows, out_f, dtype, seed + rows)
        assert torch.equal(grad(gy, *args, out_f, in_f), w[picked].contiguous()), (level, rows)
        layout = ["strided", "transposed"][rows % 2]
        gy = as_layout(normal(rows, 3, out_f, dtype=dtype, device="cpu", seed=seed + rows), layout)
        gx = grad(gy, *args, out_f, in_f)                                # [rows, 3, in]
        assert_close_to_reference(gx, gy @ w, gy.double().abs() @ w.double().abs(), out_f)
