"""Property-based tests of the compiled NF4 ops against the reference (minidora/ops.py, csrc/).

tests/test_ops.py checks hand-picked cases; here hypothesis draws them: weight shapes with odd
sizes and partial blocks, blocksizes 32..4096, double quantization on and off, 1 to 72 rows (both
the fused few-rows kernels and the tiled many-rows ones, several tiles per thread), every
activation dtype, contiguous and non-contiguous inputs, every CPU kernel set this machine has and
1 or 2 threads. Properties: nf4_dequantize is bit-exact with nf4.dequantize; nf4_linear and its
input gradient are within the tolerance of tests/test_ops.py (assert_close_to_reference).

The draw is derandomized (the same examples on every run) and nothing is written to an example
database. The file takes about 5 s on two idle cores (40 s measured while other processes kept
both busy: the 2-thread examples then wait for a core at every parallel region).
"""

import contextlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

from helpers import (
    FLOAT_DTYPES,
    as_layout,
    assert_close_to_reference,
    normal,
    quantized_weight,
)
from minidora import nf4, ops

# Every CPU kernel set this machine can run (each level includes the one before). Like
# tests/test_ops.py, the file fails rather than skips when minidora._C is not built.
LEVELS = ["scalar", "avx2", "avx512", "avx512bf16"]
ISAS = LEVELS[: LEVELS.index(ops.cpu_isa_best() if ops.extension_available() else "scalar") + 1]

SETTINGS = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# Even without a database hypothesis caches the constants it finds in the source in .hypothesis/
# under the working directory: keep that out of the repository.
configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "minidora-hypothesis")

blocksizes = st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096])
# in_features: any size (scalar kernel paths, rows starting inside a block), or a multiple of 32
# (the vector kernels, with and without the remainders of their 128-wide steps)
in_features = st.one_of(st.integers(1, 300), st.integers(1, 20).map(lambda k: 32 * k))
# rows of x: 1..16 take the fused kernels, 17.. the tiled ones
rows = st.one_of(st.just(1), st.integers(2, 16), st.integers(17, 72))
kernels = st.tuples(st.sampled_from(ISAS), st.sampled_from([1, 2]))  # (cpu isa, threads)


@contextlib.contextmanager
def _kernels(isa, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ops.use_cpu_isa(isa):
            yield
    finally:
        torch.set_num_threads(before)


@settings(SETTINGS, max_examples=200)
@given(shape=st.lists(st.integers(1, 48), min_size=1, max_size=3), blocksize=blocksizes,
       double_quant=st.booleans(), kernel=kernels, seed=st.integers(0, 2**31 - 1))
def test_dequantize_bit_exact(shape, blocksize, double_quant, kernel, seed):
    q = quantized_weight(tuple(shape), blocksize, double_quant, "cpu", seed)
    with _kernels(*kernel):
        for dtype in FLOAT_DTYPES:
            assert torch.equal(ops.nf4_dequantize(q, dtype, backend="compiled"),
                               nf4.dequantize(q, dtype)), dtype


@settings(SETTINGS, max_examples=600)
@given(out_features=st.integers(1, 80), in_features=in_features, blocksize=blocksizes,
       double_quant=st.booleans(), rows=rows, split=st.booleans(),
       dtype=st.sampled_from(FLOAT_DTYPES), layout=st.sampled_from(["contiguous", "strided",
                                                                    "transposed"]),
       bias=st.booleans(), kernel=kernels, seed=st.integers(0, 2**31 - 1))
def test_linear_and_input_gradient(out_features, in_features, blocksize, double_quant, rows,
                                   split, dtype, layout, bias, kernel, seed):
    q = quantized_weight((out_features, in_features), blocksize, double_quant, "cpu", seed)
    w = nf4.dequantize(q, dtype)                                          # [out, in]
    batch = (2, rows) if split else (rows,)                               # 2 * rows rows if split
    x = as_layout(normal(*batch, in_features, dtype=dtype, device="cpu", seed=seed + 1), layout)
    x.requires_grad_()
    b = normal(out_features, dtype=dtype, device="cpu", seed=seed + 2) if bias else None
    grad_y = as_layout(normal(*batch, out_features, dtype=dtype, device="cpu", seed=seed + 3),
                     layout)
    with _kernels(*kernel):
        y = ops.nf4_linear(x, q, b, backend="compiled")                   # [*batch, out]
        (gx,) = torch.autograd.grad(y, x, grad_y)                         # [*batch, in]
    magnitude = x.double().abs() @ w.double().abs().T
    if b is None:
        assert_close_to_reference(y, F.linear(x, w), magnitude, in_features)
    else:
        assert_close_to_reference(y, F.linear(x, w, b), magnitude + b.double().abs(), in_features,
                                  rounded_before=(x.double() @ w.double().T).abs())
    assert_close_to_reference(gx, grad_y @ w, grad_y.double().abs() @ w.double().abs(),
                              out_features)
