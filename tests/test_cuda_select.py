"""Which CUDA kernel nf4_linear runs, for every GPU generation, without a GPU.

The choice is one pure C++ function, ``cuda_linear_path`` in csrc/cuda/nf4_select.h, compiled into
every build of minidora._C (the CPU-only one included) and called by the CUDA op with the
device's compute capability. Here it gets mocked capabilities. The rule it must follow:

- float64: dequantize, then cuBLAS ("cublas"), whatever the setting;
- float32: the CUDA-core kernel ("simt"), whatever the setting;
- bfloat16 / float16: tensor cores ("mma") from compute capability 8.0 on, CUDA cores ("simt")
  on 7.0 / 7.5 (V100, T4: mma.sync m16n8k16 with 16-bit floats does not exist there);
  ``cuda_kernel="simt"`` always gives "simt"; ``cuda_kernel="mma"`` below 8.0 is an error
  naming the capability.

Like tests/test_ops.py, this file fails rather than skips when minidora._C is not built.
"""

import pytest
import torch

from minidora import _C, ops  # an ImportError here: minidora._C is not built (`make build`)

OLD = [(7, 0), (7, 2), (7, 5)]                      # V100, Xavier, T4: no bf16/fp16 m16n8k16
NEW = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]  # A100 .. Blackwell
HALF = ["bfloat16", "float16"]


@pytest.mark.parametrize("cap", OLD + NEW)
@pytest.mark.parametrize("setting", ["auto", "mma", "simt"])
def test_float64_and_float32_ignore_the_setting(cap, setting):
    assert _C.cuda_linear_path(*cap, "float64", setting) == "cublas"
    assert _C.cuda_linear_path(*cap, "float32", setting) == "simt"


@pytest.mark.parametrize("cap", NEW)
@pytest.mark.parametrize("dtype", HALF)
def test_tensor_cores_from_sm80(cap, dtype):
    assert _C.cuda_linear_path(*cap, dtype, "auto") == "mma"
    assert _C.cuda_linear_path(*cap, dtype, "mma") == "mma"
    assert _C.cuda_linear_path(*cap, dtype, "simt") == "simt"


@pytest.mark.parametrize("cap", OLD)
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_cores_before_sm80(cap, dtype):
    assert _C.cuda_linear_path(*cap, dtype, "auto") == "simt"
    assert _C.cuda_linear_path(*cap, dtype, "simt") == "simt"


@pytest.mark.parametrize("cap", OLD)
@pytest.mark.parametrize("dtype", HALF)
def test_forced_mma_before_sm80_names_the_capability(cap, dtype):
    major, minor = cap
    with pytest.raises(RuntimeError, match=rf"compute capability {major}\.{minor} "
                                           rf"\(sm_{major}{minor}\).*'auto' or 'simt'"):
        _C.cuda_linear_path(major, minor, dtype, "mma")


@pytest.mark.parametrize("args, match", [
    ((7, 5, "int8", "auto"), "dtype must be 'float32', 'bfloat16', 'float16' or 'float64', "
                             "got 'int8'"),
    ((8, 0, "bfloat16", "tensor"), "setting must be 'auto', 'mma' or 'simt', got 'tensor'"),
    ((-1, 0, "bfloat16", "auto"), "compute capability must be non-negative, got major = -1"),
    ((8, -3, "float16", "auto"), "compute capability must be non-negative, got .*minor = -3"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        _C.cuda_linear_path(*args)


def test_bad_argument_types():
    with pytest.raises(TypeError):
        _C.cuda_linear_path(7.5, 0, "float16", "auto")
    with pytest.raises(TypeError):
        _C.cuda_linear_path(8, 0, torch.float16, "auto")


# --- the Python entry point: the current setting and the current device's capability -----------

@pytest.fixture
def t4(monkeypatch):
    """A process whose current CUDA device reports compute capability 7.5."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))


def test_ops_without_a_device_asks_for_the_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA device .* pass capability=\(major, minor\)"):
        ops.cuda_linear_path(torch.bfloat16)
    assert ops.cuda_linear_path(torch.bfloat16, (7, 5)) == "simt"


def test_ops_follows_the_setting_and_the_device(t4):
    assert ops.cuda_linear_path(torch.bfloat16) == "simt"
    assert ops.cuda_linear_path(torch.float16, (9, 0)) == "mma"
    with ops.use(cuda_kernel="simt"):
        assert ops.cuda_linear_path(torch.half, (9, 0)) == "simt"
    with ops.use(cuda_kernel="mma"):
        assert ops.cuda_linear_path(torch.bfloat16, (8, 6)) == "mma"
        assert ops.cuda_linear_path(torch.float32) == "simt"
        with pytest.raises(RuntimeError, match=r"compute capability 7\.5 \(sm_75\)"):
            ops.cuda_linear_path(torch.bfloat16)
    assert ops.cuda_kernel() == "auto"
    assert ops.cuda_linear_path(torch.float64, (9, 0)) == "cublas"


@pytest.mark.parametrize("capability", [(8,), (8, 0, 0), "8.0", (8.0, 0), (True, 0)])
def test_ops_rejects_a_bad_capability(capability):
    with pytest.raises(TypeError, match="capability must be a \\(major, minor\\) tuple of ints"):
        ops.cuda_linear_path(torch.bfloat16, capability)


def test_ops_rejects_a_bad_dtype():
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16, float16 or float64, "
                                        "got torch.int8"):
        ops.cuda_linear_path(torch.int8, (8, 0))


# --- on a real GPU (skipped without one): the op takes the path the function names ------------

@pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA device and minidora._C built "
                                                     "with CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forced_mma_on_this_gpu(dtype):
    """cuda_kernel="mma" runs on sm_80+ and is the capability-naming error below it."""
    from minidora import nf4

    major, minor = torch.cuda.get_device_capability()
    gen = torch.Generator().manual_seed(3)
    q = nf4.quantize(torch.randn(40, 96, generator=gen), 64, True)
    q = nf4.NF4Weight(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in (
        q.packed, q.absmax, q.shape, q.dtype, q.blocksize, q.nested_absmax, q.offset)))
    x = torch.randn(3, 96, generator=gen).to("cuda", dtype)
    with ops.use(cuda_kernel="mma"):
        if (major, minor) >= (8, 0):
            assert ops.cuda_linear_path(dtype) == "mma"
            y = ops.nf4_linear(x, q, backend="compiled")
            # float32 sums of the same rounded weights, then one rounding to dtype (unit u)
            w = nf4.dequantize(q, dtype).double()
            y64 = x.double() @ w.T
            u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
            bound = u * y64.abs() + 1e-5 * (x.double().abs() @ w.abs().T)
            assert ((y.double() - y64).abs() <= bound).all()
        else:
            with pytest.raises(RuntimeError, match=rf"compute capability {major}\.{minor} "):
                ops.nf4_linear(x, q, backend="compiled")
    want = "mma" if (major, minor) >= (8, 0) else "simt"
    assert ops.cuda_linear_path(dtype) == want
