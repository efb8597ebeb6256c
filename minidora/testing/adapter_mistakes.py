r"""LoRA and DoRA with one classic mistake at a time, and the reference they deviate from.

:func:`expected` computes, in float64 with autograd, what a layer should give on a case (the
output y, the gradients of the loss ``sum(y * grad_y)`` with respect to x, A, B and m, and the
merged weight), from :func:`minidora.lora.lora_reference` and
:func:`minidora.dora.dora_reference`. With ``mistake=`` a key of :data:`MISTAKES` it computes
what a layer with that one mistake gives instead, so that a check can say which mistake your
numbers match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dora import EPS, dora_reference
from ..lora import lora_reference

__all__ = ["MISTAKES", "LORA_MISTAKES", "DORA_MISTAKES", "expected", "scaling"]

# key: (short name, what the method wants instead)
MISTAKES = {  # the rows name these; "detached_grad" and "dropout_base" are tested apart
    "alpha": ("scaling alpha instead of alpha/r",
              "the adapter is scaled by s = alpha / r (alpha / sqrt(r) with rsLoRA), not alpha"),
    "rslora_ignored": ("rsLoRA ignored", "with rslora=True the scaling is s = alpha / sqrt(r)"),
    "bias_dropped": ("bias dropped", "y = x W^T + b keeps the base layer's bias"),
    "dim0": ("norm over dim=0",
             "DoRA's magnitude is one number per OUTPUT row of the [out, in] weight: "
             "c = torch.linalg.norm(W0 + s B A, dim=1), not dim=0"),
    "bias_scaled": ("bias scaled by the magnitude",
                    "y = x ((m / c) V')^T + b: the bias is added after, never multiplied by m / c"),
    "w0_norm": ("norm of W0 alone", "c is the row norm of V' = W0 + s B A, not of W0"),
    "exact_grad": ("exact gradient with detach_norm=True",
                   "with detach_norm=True (PEFT's and the paper's default, sec. 4.3) c is a "
                   "constant in backward: detach it"),
    "detached_grad": ("detached gradient with detach_norm=False",
                      "with detach_norm=False the norm c must stay in the graph "
                      "(the exact gradient)"),
    "dropout_base": ("dropout on the base path",
                     "dropout acts on the adapter's input only: with B = 0 the layer must equal "
                     "its base x W0^T + b exactly, in training mode too"),
}
LORA_MISTAKES = ("alpha", "rslora_ignored", "bias_dropped")
DORA_MISTAKES = LORA_MISTAKES + ("dim0", "bias_scaled", "w0_norm", "exact_grad")


def scaling(r: int, alpha: float, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def _dora(x, W0, bias, A, B, m, s, detach, mistake):
    """(y, merged weight) of DoRA with one mistake; the reference itself when there is none."""
    V = W0 + s * (B @ A)                                              # [out, in]
    if mistake == "dim0":
        c = torch.linalg.vector_norm(V, dim=0, keepdim=True)          # [1, in]: per input column
    else:
        c = torch.linalg.vector_norm(W0 if mistake == "w0_norm" else V, dim=1)[:, None]  # [out, 1]
    c = c.clamp_min(EPS)
    c = c.detach() if detach else c
    k = m[:, None] / c                                                # [out, 1] or [out, in]
    if mistake == "bias_scaled":
        return k[:, 0] * F.linear(x, V, bias), k * V
    if mistake is None or mistake not in ("dim0", "w0_norm"):
        return dora_reference(x, W0, bias, A, B, m, s, detach_norm=detach), k * V
    return F.linear(x, k * V, bias), k * V


def expected(case, mistake: str | None = None, detach_norm: bool = True) -> dict:
    """What a layer gives on ``case`` (x, W0, bias, A, B, m, r, alpha, rslora, grad_y).

    Returns:
        dict of float64 tensors: y [..., out], grad_x [..., in], grad_A [r, in], grad_B [out, r],
        grad_m [out] (DoRA), merged [out, in].
    """
    s = scaling(case.r, case.alpha, case.rslora)
    if mistake == "alpha":
        s = float(case.alpha)
    elif mistake == "rslora_ignored":
        s = case.alpha / case.r
    bias = None if mistake == "bias_dropped" else case.bias
    detach = {"exact_grad": False, "detached_grad": True}.get(mistake, detach_norm)
    names = ["x", "A", "B"] + (["m"] if case.m is not None else [])
    leaves = {n: getattr(case, n).clone().requires_grad_(True) for n in names}
    x, A, B = leaves["x"], leaves["A"], leaves["B"]
    if case.m is None:
        y, merged = lora_reference(x, case.W0, bias, A, B, s), case.W0 + s * (B @ A)
    else:
        y, merged = _dora(x, case.W0, bias, A, B, leaves["m"], s, detach, mistake)
    grads = torch.autograd.grad(y, list(leaves.values()), case.grad_y)
    out = {f"grad_{n}": g for n, g in zip(names, grads, strict=True)}
    out.update(y=y.detach(), merged=merged.detach())
    return out
