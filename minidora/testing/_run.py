"""Build a user's adapter layer from a case, run it, and read its gradients.

The factory gets float64 leaf tensors A, B (and m) that require grad. A layer may use them
directly, or copy them into ``nn.Parameter`` s; a parameter of the same shape, dtype and values
is taken to hold them, and the layer is then called through ``torch.func.functional_call`` with
the kit's tensors in its place, so that gradients (and gradcheck's perturbations) reach them
either way. Every failure becomes a :class:`~minidora.testing._util.Malformed` whose message
says what was expected.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._util import USER_ERRORS, Malformed, describe_error

__all__ = ["QUANTITIES", "run_layer"]

QUANTITIES = ("y", "grad_x", "grad_A", "grad_B", "grad_m", "merged")


def _bindings(layer, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> the kit's tensor, for each parameter that holds a copy of one."""
    if not isinstance(layer, nn.Module):
        return {}
    out, params = {}, list(layer.named_parameters())
    for t in leaves.values():
        for pname, p in params:
            if (pname not in out and p.shape == t.shape and p.dtype == t.dtype
                    and torch.equal(p.detach().cpu(), t.detach())):
                out[pname] = t
                break
    return out


def _call(layer, bind: dict, x: torch.Tensor, out_shape: tuple) -> torch.Tensor:
    try:
        y = torch.func.functional_call(layer, bind, (x,)) if bind else layer(x)
    except USER_ERRORS as e:
        raise Malformed("layer(x) " + describe_error(e)) from None
    if not isinstance(y, torch.Tensor):
        raise Malformed(f"layer(x) returned {type(y).__name__}; "
                        "expected a tensor [..., out_features]")
    if tuple(y.shape) != out_shape:
        raise Malformed(f"layer(x) returned shape {tuple(y.shape)}; expected {out_shape} = "
                        "[..., out_features] for x [..., in_features]")
    if y.dtype != torch.float64:
        raise Malformed(f"layer(x) returned {y.dtype}; expected torch.float64 (the kit passes "
                        "float64 tensors: keep their dtype)")
    return y


def _build(factory, case, dropout: float, detach_norm: bool):
    leaves = {"A": case.A.clone().requires_grad_(True), "B": case.B.clone().requires_grad_(True)}
    kwargs = dict(W0=case.W0.clone(), bias=None if case.bias is None else case.bias.clone(),
                  r=case.r, alpha=case.alpha, rslora=case.rslora, dropout=dropout)
    if case.m is not None:
        leaves["m"] = case.m.clone().requires_grad_(True)
        kwargs["detach_norm"] = detach_norm
    try:
        layer = factory(**kwargs, **leaves)
    except USER_ERRORS as e:
        raise Malformed("layer_factory " + describe_error(e)) from e
    if not callable(layer):
        raise Malformed(f"layer_factory returned {type(layer).__name__}; expected a layer: a "
                        "callable mapping x [..., in_features] to y [..., out_features]")
    if dropout > 0 and isinstance(layer, nn.Module):
        layer.train()
    return layer, leaves


def run_layer(factory, case, dropout: float = 0.0, detach_norm: bool = True, grads: bool = True,
              functional: bool = False):
    """Run the user's layer on ``case``.

    Returns:
        dict: for each of QUANTITIES a float64 tensor, a Malformed (what went wrong), or None
        (merged: the layer has no ``merged_weight()``). With ``functional=True``: instead
        ``(fn, inputs)`` for gradcheck, fn(x, A, B[, m]) -> y; Malformed is raised then (its
        ``__cause__`` is the factory's own exception, if it raised one).
    """
    out_shape = tuple(case.x.shape[:-1]) + (case.W0.shape[0],)
    try:
        layer, leaves = _build(factory, case, dropout, detach_norm)
    except Malformed as e:
        if functional:
            raise
        return {q: e for q in QUANTITIES}
    bind = _bindings(layer, leaves)
    if functional:
        slot = {id(t): i for i, t in enumerate(leaves.values(), start=1)}
        names = {p: slot[id(t)] for p, t in bind.items()}
        fn = lambda x, *vals: _call(layer, {p: vals[i - 1] for p, i in names.items()}, x, out_shape)
        return fn, (case.x.clone().requires_grad_(True), *leaves.values())
    x = case.x.clone().requires_grad_(True)
    try:
        y = _call(layer, bind, x, out_shape)
    except Malformed as e:
        return {q: e for q in QUANTITIES}
    result = {q: None for q in QUANTITIES}
    result["y"] = y.detach()
    if grads:
        _gradients(y, x, leaves, case.grad_y, result)
        result["merged"] = _merged(layer, tuple(case.W0.shape))
    return result


def _gradients(y, x, leaves, grad_y, result) -> None:
    inputs = {"x": x, **leaves}
    try:
        gs = (torch.autograd.grad(y, list(inputs.values()), grad_y, allow_unused=True)
              if y.requires_grad else [None] * len(inputs))
    except USER_ERRORS as e:
        gs = [Malformed("backward " + describe_error(e))] * len(inputs)
    for name, g in zip(inputs, gs, strict=True):
        if g is None:
            g = Malformed(f"no gradient reached {name}: " + (
                "y must depend on x through autograd" if name == "x" else
                f"use the tensor passed as {name}, or copy it into an nn.Parameter of the "
                "same shape and dtype"))
        result[f"grad_{name}"] = g


def _merged(layer, shape: tuple):
    fn = getattr(layer, "merged_weight", None)
    if not callable(fn):
        return None
    try:
        with torch.no_grad():
            w = fn()
    except USER_ERRORS as e:
        return Malformed("merged_weight() " + describe_error(e))
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape or w.dtype != torch.float64:
        got = (f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__)
        return Malformed(f"merged_weight() returned {got}; "
                         f"expected a float64 tensor {shape} = [out, in]")
    return w.detach()
