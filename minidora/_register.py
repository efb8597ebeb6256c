"""The compiled ops' fake kernels and autograd formulas, registered with torch.library.

``minidora._C`` registers the schemas and the CPU / CUDA kernels of ``torch.ops.minidora.*``
(csrc/ops.cpp). This module adds what PyTorch needs besides, as pytorch/extension-cpp does:

- a fake (shape-only) kernel per op, so ``torch.compile`` and ``torch.library.opcheck`` can trace
  through them;
- the backward of ``nf4_linear``: only the input gradient, dL/dx = g @ W_hat (the 4-bit
  weight is frozen), which is the op ``nf4_linear_grad_input``; and the backward of that one
  (linear in g, so ``nf4_linear`` again), for double backward.

Imported by :mod:`minidora.ops`; nothing here is public.
"""

from __future__ import annotations

import torch

from . import backends


def _check_one_device(op: str, device: torch.device, device_name: str, **tensors) -> None:
    """The fake kernels' device check (the dispatcher sends a call with any meta tensor to them,
    so a CPU x with a meta scale would otherwise get an uninitialised CPU result)."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {device_name} is on {device}; "
                               "every tensor of the call must be on one device")


if backends.extension_available():

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
