"""The NF4 linear op: its formula, the checks of its arguments, and the dispatch to a path.

Every NF4 matmul in minidora goes through :func:`nf4_linear`:

.. math::  y = x\\,\\hat W^\\top + b, \\qquad \\hat W = \\operatorname{dequantize}(W_{\\text{NF4}})

computed in x's dtype (QLoRA, Dettmers et al., 2023, arXiv 2305.14314, eq. 5, without the
adapter term). :func:`reference` is that line in plain PyTorch, the specification. The compiled
op ``torch.ops.minidora.nf4_linear`` (csrc/, loaded by :mod:`minidora.backends`) computes the
same where the extension is built and has a kernel for x's device; its backward, the input
gradient :math:`\\partial L/\\partial x = g\\,\\hat W`, is the op ``nf4_linear_grad_input``
(the 4-bit weight is frozen; :mod:`minidora._register` adds the autograd formulas and the fake
kernels that let ``torch.compile`` trace the ops).

Which path ``backend="auto"`` takes, which CPU kernels and which CUDA kernel the compiled ops
run: one switch, :func:`use` (a ``with`` block) or :func:`choose` (until changed), defined in
:mod:`minidora.backends` and named here too, with its getters and shorthands.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import (
    _register,  # noqa: F401  (fake kernels and autograd of torch.ops.minidora.*)
    backends,
    nf4,
)
from .backends import (  # noqa: F401  (the switch, also reachable as minidora.ops.<name>)
    choose,
    cpu_isa,
    cpu_isa_best,
    cpu_native_bf16,
    cuda_available,
    cuda_kernel,
    cuda_linear_path,
    extension_available,
    get_backend,
    set_backend,
    set_default_backend,
    use,
    use_backend,
    use_cpu_isa,
    use_reference,
)

__all__ = [
    "reference", "nf4_linear", "nf4_dequantize",
    "use", "choose", "get_backend", "cpu_isa", "cpu_isa_best", "cuda_kernel", "cuda_linear_path",
    "cpu_native_bf16", "extension_available", "cuda_available",
    "set_backend", "set_default_backend", "use_backend", "use_reference", "use_cpu_isa",
]


def reference(x: torch.Tensor, q: nf4.NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: ``F.linear(x, nf4.dequantize(q, x.dtype), bias)``.

    Decode the 4-bit weight to x's dtype (bit-exact, :func:`minidora.nf4.dequantize`), then one
    dense matmul. No argument checks: :func:`nf4_linear` makes them, then calls this or the
    compiled op.

    Args:
        x: [..., in_features].
        q: NF4 weight of shape (out_features, in_features).
        bias: [out_features] or None.

    Returns:
        [..., out_features] in x's dtype.
    """
    return F.linear(x, nf4.dequantize(q, x.dtype), bias)


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


def _weight_args(q: nf4.NF4Weight) -> tuple:
    """The NF4Weight as the ops' arguments (packed, absmax, nested_absmax, nested_code, offset,
    blocksize)."""
    code = _dynamic_code(q.packed.device) if q.double_quant else None
    return (q.packed, q.absmax, q.nested_absmax, code, q.offset, q.blocksize)


_DYNAMIC_CODES: dict[torch.device, torch.Tensor] = {}   # nf4.DYNAMIC_CODE per device, copied once


def _dynamic_code(device: torch.device) -> torch.Tensor:
    """The double quantization's 256-entry code on ``device`` (copied there once, not per call;
    a call being traced by torch.compile gets its own copy, which the graph holds)."""
    if device.type == "cpu":
        return nf4.DYNAMIC_CODE
    if torch.compiler.is_compiling():
        return nf4.DYNAMIC_CODE.to(device)
    code = _DYNAMIC_CODES.get(device)
    if code is None:
        code = _DYNAMIC_CODES[device] = nf4.DYNAMIC_CODE.to(device)
    return code


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
    nf4.check_float_dtype(dtype, "dtype")
    if not backends.compiled(backend, q.packed.device):
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
    nf4.check_float_dtype(x.dtype, "x")
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
    if not backends.compiled(backend, x.device):
        return reference(x, q, bias)
    return torch.ops.minidora.nf4_linear(x, *_weight_args(q), out_features, in_features, bias)
