"""The one dispatch point between the readable reference and the compiled NF4 ops.

Every NF4 matmul in minidora goes through :func:`nf4_linear`:

.. math::  y = x\\,\\hat W^\\top + b, \\qquad \\hat W = \\operatorname{dequantize}(W_{\\text{NF4}})

computed in x's dtype (QLoRA, Dettmers et al., 2023, arXiv 2305.14314, eq. 5, without the
adapter term). It runs the compiled op ``torch.ops.minidora.nf4_linear`` when the extension
``minidora._C`` is built and has a kernel for x's device, and otherwise the plain PyTorch
reference ``F.linear(x, nf4.dequantize(q, x.dtype), bias)``, which stays the specification.

The backward pass needs only the input gradient, :math:`\\partial L/\\partial x = g\\,\\hat W`
(the 4-bit weight is frozen); it is the op ``nf4_linear_grad_input``, registered here as the
autograd formula of ``nf4_linear`` together with the fake (shape-only) implementations that let
``torch.compile`` trace through the ops.

Which path ``backend="auto"`` takes, which CPU kernels and which CUDA kernel the compiled ops
run: one switch, :func:`use` (a ``with`` block) or :func:`choose` (until changed). The backend
and the CPU kernels are chosen per thread (:func:`set_backend`, :func:`use_backend`,
:func:`use_reference` and :func:`use_cpu_isa` are shorthands that affect only the calling
thread), so threads (a data loader, a server's workers, parallel tests) never
see each other's choice. A thread that has chosen no backend follows the process default,
:func:`set_default_backend` (``"auto"`` unless changed).

Build the extension with ``make build`` (or ``pip install -e .`` then
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading

import torch
import torch.nn.functional as F

from . import nf4

__all__ = [
    "nf4_linear", "nf4_dequantize", "extension_available", "cuda_available",
    "use", "choose", "set_backend", "get_backend", "set_default_backend", "use_backend",
    "use_reference", "cpu_isa", "use_cpu_isa", "cpu_native_bf16", "cuda_kernel",
    "cuda_linear_path",
]

try:
    from . import _C  # registers torch.ops.minidora.* (schemas and CPU/CUDA kernels)
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not built: the reference path still works
    _C = None
    _IMPORT_ERROR = e
    if importlib.util.find_spec(f"{__package__}._C") is None:  # rather than "partially initialized"
        _IMPORT_ERROR = ModuleNotFoundError("this install has no minidora._C")

_BACKENDS = ("auto", "reference", "compiled")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_default_backend = "auto"   # what backend="auto" means in a thread that chose nothing
_thread = threading.local()  # .backend: this thread's choice (absent or None: the default)


def _kernel_devices() -> frozenset:
    if _C is None:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if has("minidora::nf4_linear", key))


_DEVICES = _kernel_devices()  # device types with a compiled kernel, fixed once loaded


def extension_available() -> bool:
    """True when the compiled extension ``minidora._C`` is built and loaded."""
    return _C is not None


def cuda_available() -> bool:
    """True when a CUDA device is present and the extension has CUDA kernels."""
    return "cuda" in _DEVICES and torch.cuda.is_available()


def _check_backend(backend) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def set_backend(backend: str | None) -> None:
    """Choose what ``backend="auto"`` means in the calling thread: ``"auto"`` (compiled when
    possible), ``"reference"`` or ``"compiled"``; None returns the thread to the process default.
    Other threads keep their own choice."""
    if backend is not None:
        _check_backend(backend)
    _thread.backend = backend


def set_default_backend(backend: str) -> None:
    """Choose what ``backend="auto"`` means in every thread that has not chosen for itself."""
    global _default_backend
    _check_backend(backend)
    _default_backend = backend


def get_backend() -> str:
    """What ``backend="auto"`` means in the calling thread now."""
    return getattr(_thread, "backend", None) or _default_backend


def use_backend(backend: str):
    """Shorthand for ``use(backend=backend)``: every ``backend="auto"`` call made by this thread
    inside the block runs on ``backend``; the thread's previous choice comes back on exit."""
    _check_backend(backend)
    return use(backend=backend)


def use_reference():
    """Run every ``backend="auto"`` call made by this thread inside the block on the plain
    PyTorch reference (``with ops.use_reference(): ...``)."""
    return use_backend("reference")


def cpu_isa() -> str:
    """Which CPU kernels the compiled ops called from this thread use now: ``"avx512bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    _require_extension()
    return _C.cpu_isa()


def use_cpu_isa(isa: str):
    """Shorthand for ``use(cpu_isa=isa)``: force the CPU kernels (``"scalar"``, ``"avx2"``,
    ``"avx512"``, ``"avx512bf16"`` or ``"auto"``) of the ops this thread calls inside the block
    (for tests and benchmarks; a level the CPU lacks raises ValueError)."""
    _require_extension()
    return use(cpu_isa=isa)


def cpu_native_bf16() -> bool:
    """Whether this thread's CPU kernel level has native bfloat16 arithmetic.

    True at ``"avx512bf16"`` (bfloat16 dot products in hardware); False at ``"avx512"``,
    ``"avx2"`` and ``"scalar"``, where bfloat16 is emulated (widened to float32 first) and runs
    several times slower than float32. A level forced with ``use(cpu_isa=...)`` counts. Without
    the extension, torch's own CPU detection answers (AVX512-BF16 or AMX tiles). The applications
    take bfloat16 as their default compute dtype only where this is True.
    """
    if _C is not None:
        return _C.cpu_isa() in ("avx512bf16", "amx")
    return any(bool(getattr(torch.cpu, name, lambda: False)())
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_CUDA_KERNELS = ("auto", "mma", "simt")


@contextlib.contextmanager
def use(backend: str | None = None, cpu_isa: str | None = None,
        cuda_kernel: str | None = None):
    """The one switch for the path minidora's NF4 ops take, inside a ``with`` block; each choice
    left as None stays as it is, and every one comes back on exit::

        with ops.use(backend="reference"): ...          # the plain PyTorch specification
        with ops.use(cpu_isa="avx2"): ...               # force a CPU kernel level
        with ops.use(cuda_kernel="simt"): ...           # CUDA-core kernel for bf16/fp16

    Args:
        backend: what ``backend="auto"`` calls mean: ``"auto"`` (compiled where built, else the
            reference), ``"reference"`` or ``"compiled"``. For the calling thread only.
        cpu_isa: the CPU kernel level of the compiled ops (``"auto"``, ``"scalar"``, ``"avx2"``,
            ``"avx512"``, ``"avx512bf16"``; one the CPU lacks raises ValueError). For the calling
            thread only; the worker threads of one op run the level of the thread that called it.
            The environment variable ``MINIDORA_CPU_ISA=<level>`` caps the levels of a whole
            process (read once): it runs as on a CPU whose best level is that one.
        cuda_kernel: the CUDA linear kernel for bfloat16/float16 activations: ``"auto"`` (tensor
            cores from compute capability 8.0 on, CUDA cores on V100 / T4), ``"mma"`` (tensor
            cores; a call on a GPU below 8.0 raises RuntimeError naming its capability) or
            ``"simt"`` (CUDA cores). For the whole process, since CUDA's backward runs on
            autograd's own thread. :func:`cuda_linear_path` tells which kernel a call takes.

    :func:`choose` sets the same things without a block; :func:`use_reference`,
    :func:`use_backend` and :func:`use_cpu_isa` are shorthands for one argument of this.
    """
    if backend is not None:
        _check_backend(backend)
    if cuda_kernel is not None and cuda_kernel not in _CUDA_KERNELS:
        raise ValueError(f"cuda_kernel must be one of {_CUDA_KERNELS}, got {cuda_kernel!r}")
    if cpu_isa is not None or cuda_kernel is not None:
        _require_extension()
    before = (getattr(_thread, "backend", None), _C.cpu_isa() if _C is not None else None,
              _C.cuda_kernel() if _C is not None else None)
    try:
        choose(backend, cpu_isa, cuda_kernel)
        yield
    finally:
        _thread.backend = before[0]
        if cpu_isa is not None:
            _C.set_cpu_isa("auto" if before[1] == _C.cpu_isa_best() else before[1])
        if cuda_kernel is not None:
            _C.set_cuda_kernel(before[2])


def choose(backend: str | None = None, cpu_isa: str | None = None,
           cuda_kernel: str | None = None) -> None:
    """Set what :func:`use` sets, until changed (same arguments and scopes; None leaves a choice
    as it is)."""
    if backend is not None:
        set_backend(backend)
    if cpu_isa is not None:
        _require_extension()
        _C.set_cpu_isa(cpu_isa)
    if cuda_kernel is not None:
        if cuda_kernel not in _CUDA_KERNELS:
            raise ValueError(f"cuda_kernel must be one of {_CUDA_KERNELS}, got {cuda_kernel!r}")
        _require_extension()
        _C.set_cuda_kernel(cuda_kernel)


def cuda_kernel() -> str:
    """The CUDA linear kernel choice now: ``"auto"``, ``"mma"`` or ``"simt"``."""
    _require_extension()
    return _C.cuda_kernel()


def cuda_linear_path(dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """Which kernel ``nf4_linear`` runs on a GPU for activations of ``dtype``, with the current
    ``cuda_kernel`` choice: ``"mma"`` (tensor cores, compute capability 8.0+), ``"simt"`` (CUDA
    cores: float32, and bfloat16 / float16 on sm_70 / sm_75 or with ``cuda_kernel="simt"``) or
    ``"cublas"`` (float64: dequantize, then cuBLAS). The fused kernels cover small M; larger or
    unaligned inputs dequantize, then call cuBLAS, whatever this says.

    Args:
        dtype: the activation dtype (float32, bfloat16, float16 or float64).
        capability: (major, minor) compute capability; default: the current CUDA device's.

    Raises:
        RuntimeError: ``cuda_kernel="mma"`` on a GPU below compute capability 8.0 (the error the
            op itself raises there), no extension, or no capability and no CUDA device.
    """
    _require_extension()
    _check_dtype(dtype, "dtype")
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_linear_path: no CUDA device to take the compute capability "
                               "from; pass capability=(major, minor)")
        capability = torch.cuda.get_device_capability()
    if (not isinstance(capability, tuple) or len(capability) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in capability)):
        raise TypeError(f"capability must be a (major, minor) tuple of ints, got {capability!r}")
    return _C.cuda_linear_path(*capability, str(dtype).removeprefix("torch."), _C.cuda_kernel())


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(
            "minidora's compiled extension minidora._C is not available "
            f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}), so this install runs the plain "
            "PyTorch reference path only (a pure-Python install, MINIDORA_NO_EXTENSION=1, has no "
            "extension). The compiled ops are built against torch 2.13.0 (this is torch "
            f"{torch.__version__}): `pip install torch==2.13.0 setuptools wheel ninja`, then "
            "reinstall minidora from its source without MINIDORA_NO_EXTENSION: `pip install "
            "--no-build-isolation --force-reinstall --no-deps <checkout or sdist>`; in a "
            "checkout, `make build` (or `python setup.py build_ext --inplace`). See "
            "docs/install.md. Or pass backend='reference'.")


def _use_compiled(backend: str, device: torch.device) -> bool:
    _check_backend(backend)
    if backend == "auto":
        backend = get_backend()
    if backend == "reference":
        return False
    if backend == "compiled":
        _require_extension()
        if device.type not in _DEVICES:
            raise RuntimeError(f"minidora._C has no kernel for device {device.type!r} "
                               f"(built for: {sorted(_DEVICES)}); use backend='reference'")
        return True
    return device.type in _DEVICES


# --- argument checks: metadata only (shapes, dtypes, devices), so they trace under torch.compile

def _check_part(t, name: str, dtype: torch.dtype, numel: int, what: str, why: str = "") -> None:
    """t must be a 1-D tensor of dtype with numel elements (`what`: how many, and why)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}{why}, got {t.dtype}")
    if t.dim() != 1 or t.numel() != numel:
        raise ValueError(f"{name} must be 1-D with {what}, got shape {tuple(t.shape)}")


def _check_weight(q, name: str = "q") -> None:
    """Every tensor of the NF4 weight has the dtype and size its shape and blocksize imply."""
    if not isinstance(q, nf4.NF4Weight):
        raise TypeError(f"{name} must be an NF4Weight, got {type(q).__name__}")
    shape = q.shape
    if (not isinstance(shape, (tuple, list))
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"{name}.shape must be a tuple of positive ints, got {shape!r}")
    nf4._check_blocksize(q.blocksize)
    n = math.prod(shape)
    n_blocks = -(-n // q.blocksize)
    where = f"for shape {tuple(shape)} and blocksize {q.blocksize}"
    _check_part(q.packed, f"{name}.packed", torch.uint8, (n + 1) // 2,
                f"ceil(n/2) = {(n + 1) // 2} bytes {where}")
    dq = q.double_quant
    _check_part(q.absmax, f"{name}.absmax", torch.uint8 if dq else torch.float32, n_blocks,
                f"ceil(n/blocksize) = {n_blocks} scales {where}",
                " (with double quantization)" if dq else " (without double quantization)")
    if not dq:
        if q.offset is not None:
            raise ValueError(f"{name}.offset must be None without double quantization "
                             "(nested_absmax is None)")
        return
    n_nested = -(-n_blocks // nf4.NESTED_BLOCKSIZE)
    _check_part(q.nested_absmax, f"{name}.nested_absmax", torch.float32, n_nested,
                f"ceil(n_blocks/256) = {n_nested} values for {n_blocks} blocks")
    if not isinstance(q.offset, torch.Tensor) or q.offset.dtype != torch.float32:
        got = q.offset.dtype if isinstance(q.offset, torch.Tensor) else type(q.offset).__name__
        raise TypeError(f"{name}.offset must be a torch.float32 tensor with double quantization, "
                        f"got {got}")
    if q.offset.dim() > 1 or q.offset.numel() != 1:
        raise ValueError(f"{name}.offset must hold one element (0-dim), got shape "
                         f"{tuple(q.offset.shape)}")


def _check_device(t, name: str, device: torch.device, device_name: str) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {device_name} is on {device}; "
                         "every tensor of the call must be on one device")


def _check_weight_device(q, device: torch.device, device_name: str, name: str = "q") -> None:
    for part in ("packed", "absmax", "nested_absmax", "offset"):
        _check_device(getattr(q, part), f"{name}.{part}", device, device_name)


def _check_dtype(dtype, name: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {dtype}")


def _weight_args(q: nf4.NF4Weight) -> tuple:
    """The NF4Weight as the ops' arguments (packed, absmax, nested_absmax, nested_code, offset,
    blocksize)."""
    code = nf4.DYNAMIC_CODE.to(q.packed.device) if q.double_quant else None
    return (q.packed, q.absmax, q.nested_absmax, code, q.offset, q.blocksize)


def nf4_dequantize(q: nf4.NF4Weight, dtype: torch.dtype | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Decode an NF4 weight to a dense tensor, bit-exact with :func:`minidora.nf4.dequantize`.

    Args:
        q: the NF4 weight.
        dtype: output dtype (default: ``q.dtype``).
        backend: ``"auto"``, ``"reference"`` or ``"compiled"``.

    Returns:
        [*q.shape] tensor of ``dtype`` on q's device.
    """
    _check_weight(q)
    _check_weight_device(q, q.packed.device, "q.packed")
    dtype = q.dtype if dtype is None else dtype
    _check_dtype(dtype, "dtype")
    if not _use_compiled(backend, q.packed.device):
        return nf4.dequantize(q, dtype)
    return torch.ops.minidora.nf4_dequantize(*_weight_args(q), list(q.shape), dtype)


def nf4_linear(x: torch.Tensor, q: nf4.NF4Weight, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """y = x @ dequantize(W).T + bias, in x's dtype.

    Args:
        x: [..., in_features], float32 / bfloat16 / float16 / float64.
        q: NF4 weight of shape (out_features, in_features), on x's device.
        bias: [out_features] in x's dtype, or None.
        backend: ``"auto"`` (compiled when built for x's device, else reference),
            ``"reference"`` or ``"compiled"`` (raises if the extension is missing).

    Returns:
        [..., out_features] in x's dtype. Differentiable in x and bias (not in the 4-bit weight).
    """
    _check_weight(q)
    if len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out_features, in_features), got shape {q.shape}")
    out_features, in_features = q.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_dtype(x.dtype, "x")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features = {in_features}, "
                         f"got shape {tuple(x.shape)}")
    _check_weight_device(q, x.device, "x")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        _check_device(bias, "bias", x.device, "x")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if not _use_compiled(backend, x.device):
        return F.linear(x, nf4.dequantize(q, x.dtype), bias)
    return torch.ops.minidora.nf4_linear(x, *_weight_args(q), out_features, in_features, bias)


# --- fake implementations and autograd formulas of the compiled ops ---------------------------

def _check_one_device(op: str, device: torch.device, device_name: str, **tensors) -> None:
    """The fake kernels' device check (the dispatcher sends a call with any meta tensor to them,
    so a CPU x with a meta scale would otherwise get an uninitialised CPU result)."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {device_name} is on {device}; "
                               "every tensor of the call must be on one device")


if _C is not None:

    @torch.library.register_fake("minidora::nf4_dequantize")
    def _dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape,
                         dtype):
        _check_one_device("nf4_dequantize", packed.device, "packed", absmax=absmax,
                          nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
        return packed.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("minidora::nf4_linear")
    def _linear_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                     out_features, in_features, bias):
        _check_one_device("nf4_linear", x.device, "x", packed=packed, absmax=absmax,
                          nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
                          bias=bias)
        torch._check(x.shape[-1] == in_features, lambda: "x's last dimension must be in_features")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("minidora::nf4_linear_grad_input")
    def _grad_input_fake(grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                         out_features, in_features):
        _check_one_device("nf4_linear_grad_input", grad_y.device, "grad_y", packed=packed,
                          absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
                          offset=offset)
        torch._check(grad_y.shape[-1] == out_features,
                     lambda: "grad_y's last dimension must be out_features")
        return grad_y.new_empty((*grad_y.shape[:-1], in_features))

    def _save_weight(ctx, inputs) -> None:
        packed, absmax, nested_absmax, nested_code, offset = inputs[1:6]
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
        ctx.sizes = inputs[6:9]  # blocksize, out_features, in_features

    def _linear_setup_context(ctx, inputs, output) -> None:
        _save_weight(ctx, inputs)
        ctx.has_bias = inputs[9] is not None

    def _linear_backward(ctx, grad_y):
        weight = (*ctx.saved_tensors, *ctx.sizes)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.minidora.nf4_linear_grad_input(grad_y, *weight)   # [..., in]
        if ctx.has_bias and ctx.needs_input_grad[9]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)             # [out]
        return (grad_x,) + (None,) * 8 + (grad_bias,)

    def _grad_input_setup_context(ctx, inputs, output) -> None:
        _save_weight(ctx, inputs)

    def _grad_input_backward(ctx, grad_grad_x):
        # grad_x = grad_y @ W is linear in grad_y, so its own gradient is grad_grad_x @ W^T.
        grad_grad_y = None
        if ctx.needs_input_grad[0]:
            grad_grad_y = torch.ops.minidora.nf4_linear(grad_grad_x, *ctx.saved_tensors,
                                                        *ctx.sizes, None)
        return (grad_grad_y,) + (None,) * 8

    torch.library.register_autograd("minidora::nf4_linear", _linear_backward,
                                    setup_context=_linear_setup_context)
    torch.library.register_autograd("minidora::nf4_linear_grad_input", _grad_input_backward,
                                    setup_context=_grad_input_setup_context)
