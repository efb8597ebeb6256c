"""Which path minidora's NF4 ops take: the compiled extension ``minidora._C`` or the reference.

:mod:`minidora.ops` holds the formula and the dispatch; this module loads the extension and holds
the one switch, :func:`use` (a ``with`` block) or :func:`choose` (until changed), with getters
for what it chose:

- ``backend``: what a ``backend="auto"`` call runs: the compiled op where the extension has a
  kernel for the tensors' device, else the reference (``"auto"``), or always one of them.
- ``cpu_isa``: which CPU kernels the compiled ops run (``"scalar"``, ``"avx2"``, ``"avx512"``,
  ``"avx512bf16"``); the environment variable ``MINIDORA_CPU_ISA=<level>`` caps a whole process.
- ``cuda_kernel``: the CUDA linear kernel for bfloat16/float16 activations.

The backend and the CPU kernels are chosen per thread, so threads (a data loader, a server's
workers, parallel tests) never see each other's choice; a thread that has chosen no backend
follows the process default. :func:`set_backend`, :func:`set_default_backend`,
:func:`use_backend`, :func:`use_reference` and :func:`use_cpu_isa` are shorthands for one
argument of :func:`use` / :func:`choose`. Every name here is also a name of :mod:`minidora.ops`.

Build the extension with ``make build`` (or ``pip install -e .`` then
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading

import torch

from . import nf4

__all__ = [
    "use", "choose", "get_backend", "cpu_isa", "cpu_isa_best", "cuda_kernel", "cuda_linear_path",
    "cpu_native_bf16", "extension_available", "cuda_available", "compiled",
    "set_backend", "set_default_backend", "use_backend", "use_reference", "use_cpu_isa",
]

try:
    from . import _C  # registers torch.ops.minidora.* (schemas and CPU/CUDA kernels)
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not built: the reference path still works
    _C = None
    _IMPORT_ERROR = e
    if importlib.util.find_spec(f"{__package__}._C") is None:  # rather than "partially initialized"
        _IMPORT_ERROR = ModuleNotFoundError("this install has no minidora._C")

BACKENDS = ("auto", "reference", "compiled")
CUDA_KERNELS = ("auto", "mma", "simt")
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


def require_extension() -> None:
    """Raise RuntimeError, saying how to build it, when ``minidora._C`` is not loaded."""
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


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_cuda_kernel(cuda_kernel) -> None:
    if cuda_kernel not in CUDA_KERNELS:
        raise ValueError(f"cuda_kernel must be one of {CUDA_KERNELS}, got {cuda_kernel!r}")


# --- the switch -------------------------------------------------------------------------------

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

    :func:`choose` sets the same things without a block.
    """
    if backend is not None:
        _check_backend(backend)
    if cuda_kernel is not None:
        _check_cuda_kernel(cuda_kernel)
    if cpu_isa is not None or cuda_kernel is not None:
        require_extension()
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
        _check_backend(backend)
        _thread.backend = backend
    if cpu_isa is not None:
        require_extension()
        _C.set_cpu_isa(cpu_isa)
    if cuda_kernel is not None:
        _check_cuda_kernel(cuda_kernel)
        require_extension()
        _C.set_cuda_kernel(cuda_kernel)


def get_backend() -> str:
    """What ``backend="auto"`` means in the calling thread now."""
    return getattr(_thread, "backend", None) or _default_backend


def cpu_isa() -> str:
    """Which CPU kernels the compiled ops called from this thread use now: ``"avx512bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    require_extension()
    return _C.cpu_isa()


def cpu_isa_best() -> str:
    """The best CPU kernel level this process may use: the CPU's own (``"avx512bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"scalar"``), or the cap ``MINIDORA_CPU_ISA`` sets if lower.
    ``use(cpu_isa="auto")`` picks it; a level above it raises ValueError."""
    require_extension()
    return _C.cpu_isa_best()


def cuda_kernel() -> str:
    """The CUDA linear kernel choice now: ``"auto"``, ``"mma"`` or ``"simt"``."""
    require_extension()
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
    require_extension()
    nf4.check_float_dtype(dtype, "dtype")
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_linear_path: no CUDA device to take the compute capability "
                               "from; pass capability=(major, minor)")
        capability = torch.cuda.get_device_capability()
    if (not isinstance(capability, tuple) or len(capability) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in capability)):
        raise TypeError(f"capability must be a (major, minor) tuple of ints, got {capability!r}")
    return _C.cuda_linear_path(*capability, str(dtype).removeprefix("torch."), _C.cuda_kernel())


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


def compiled(backend: str, device: torch.device) -> bool:
    """Whether a call with ``backend=`` on ``device`` runs the compiled op (else the reference).

    Raises:
        RuntimeError: ``backend="compiled"`` without the extension or without a kernel for
            ``device``.
    """
    _check_backend(backend)
    if backend == "auto":
        backend = get_backend()
    if backend == "reference":
        return False
    if backend == "compiled":
        require_extension()
        if device.type not in _DEVICES:
            raise RuntimeError(f"minidora._C has no kernel for device {device.type!r} "
                               f"(built for: {sorted(_DEVICES)}); use backend='reference'")
        return True
    return device.type in _DEVICES


# --- shorthands for one argument of use() / choose() ------------------------------------------

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


def use_backend(backend: str):
    """``use(backend=backend)``: every ``backend="auto"`` call made by this thread inside the
    block runs on ``backend``; the thread's previous choice comes back on exit."""
    _check_backend(backend)
    return use(backend=backend)


def use_reference():
    """``use(backend="reference")``: the plain PyTorch reference inside the block."""
    return use_backend("reference")


def use_cpu_isa(isa: str):
    """``use(cpu_isa=isa)``: force the CPU kernels (``"scalar"``, ``"avx2"``, ``"avx512"``,
    ``"avx512bf16"`` or ``"auto"``) of the ops this thread calls inside the block (for tests and
    benchmarks; a level the CPU lacks raises ValueError)."""
    require_extension()
    return use(cpu_isa=isa)
