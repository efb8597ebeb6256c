r"""check_lora and check_dora: does your adapter layer compute what PEFT computes?

Your layer is built by a factory from given float64 tensors, run on PEFT 0.21.2's golden cases
(:mod:`minidora.testing.golden`) and on fresh random ones, and compared with the reference
formulas of :mod:`minidora.lora` and :mod:`minidora.dora`:

.. math::  y = x W_0^\top + b + s\, x A^\top B^\top \quad\text{(LoRA)}, \qquad
           y = x \Big(\frac{m}{\lVert V' \rVert_{\text{row}}} V'\Big)^\top + b,\;
           V' = W_0 + s B A \quad\text{(DoRA)}

output, the gradients of ``sum(y * grad_y)`` with respect to x, A, B (and m), the merged
weight, that dropout leaves the base path alone, and a float64 ``torch.autograd.gradcheck``.
One robustness row holds a layer with a zero row of W0 + s B A (c = 0) to the reference, which
clamps c at a small eps; PEFT itself gives NaN there, so that row fails as ``WARN`` and only
counts with ``strict=True``.
Everything is float64, so the same formula summed in another order agrees to ~1e-15; the
tolerance ``|got - ref| <= 1e-13 + 1e-10 |ref|`` leaves room for an algebraically different
route (minidora's DoRA computes the row norm from cached pieces) and none for a mistake, which
moves values by 1e-3 or more. When a row fails and your numbers equal one classic mistake
(:mod:`~minidora.testing.adapter_mistakes`), the note names it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import adapter_mistakes as M
from ._run import QUANTITIES, run_layer
from ._util import (
    USER_ERRORS,
    Malformed,
    Tally,
    check_seed,
    check_signature,
    describe_error,
)
from .adapter_cases import Case, golden_cases, random_case, random_cases

__all__ = ["check_lora", "check_dora", "RTOL", "ATOL"]

RTOL, ATOL = 1e-10, 1e-13
TOLERANCE = "1e-13+1e-10|ref|"
_LABELS = {"y": "output y", "grad_x": "grad x", "grad_A": "grad A", "grad_B": "grad B",
           "grad_m": "grad m", "merged": "merged_weight()"}


def _close(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """True where |got - want| <= ATOL + RTOL |want| (NaN is never close)."""
    return (got - want).abs() <= ATOL + RTOL * want.abs()


def _compare(case: Case, q: str, got, want: torch.Tensor, dora: bool) -> tuple:
    """(ok, worst, note) of one quantity of one case."""
    if isinstance(got, Malformed):
        return False, None, str(got)
    if got is None:
        return None, None, "the layer has no merged_weight() method"
    ok = _close(got, want)
    worst = float((got - want).abs().nan_to_num(float("inf")).max())
    if ok.all():
        return True, worst, ""
    i = int((~ok).reshape(-1).nonzero()[0])
    where = ", ".join(str(int(j)) for j in np.unravel_index(i, tuple(want.shape)))
    e, g = want.reshape(-1)[i].item(), got.reshape(-1)[i].item()
    note = (f"{int((~ok).sum())} of {ok.numel()} values off; first at [{where}]: "
            f"expected {e:.10g}, got {g:.10g}")
    return False, worst, note + "; " + _diagnose(case, q, got, want, dora)


def _diagnose(case: Case, q: str, got: torch.Tensor, want: torch.Tensor, dora: bool) -> str:
    for key in M.DORA_MISTAKES if dora else M.LORA_MISTAKES:
        v = M.expected(case, key)[q]
        if not _close(v, want).all() and _close(got, v).all():
            return "looks like {}: {}".format(*M.MISTAKES[key])
    if not torch.isfinite(got).all():
        if case.zero_row:
            return ("non-finite values where a row of W0 + s B A is zero (c = 0): clamp c at a "
                    "small eps, as torch.nn.functional.normalize does")
        return "non-finite values"
    return "no known mistake matches; compare step by step with minidora's reference"


def _dropout_row(factory, dora: bool, seed: int):
    """With B = 0 (and m = ||W0|| per row) the layer equals its base, dropout or not."""
    gen = torch.Generator().manual_seed(seed + 1)
    case = random_case(gen, False, "dropout", 9, 13, 2, 4.0, False, (6,))
    case = replace(case, B=torch.zeros_like(case.B), m=case.W0.norm(dim=1) if dora else None)
    base = torch.nn.functional.linear(case.x, case.W0, case.bias)
    outs = {}
    for p in (0.0, 0.5):
        got = run_layer(factory, case, dropout=p, grads=False)["y"]
        if isinstance(got, Malformed):
            return False, None, str(got)
        outs[p] = _close(got, base).all(), float((got - base).abs().nan_to_num(float("inf")).max())
    (ok0, worst0), (ok5, worst5) = outs[0.0], outs[0.5]
    if ok0 and ok5:
        return True, max(worst0, worst5), "B = 0, dropout 0.5, training mode: output = base output"
    if ok0:
        return False, worst5, ("with dropout 0.5 the output differs from x W0^T + b; "
                               "looks like {}: {}".format(*M.MISTAKES["dropout_base"]))
    return False, worst0, "with B = 0 and no dropout the output already differs from x W0^T + b"


def _gradcheck_row(factory, dora: bool, seed: int):
    gen = torch.Generator().manual_seed(seed + 2)
    case = random_case(gen, dora, "gradcheck", 4, 5, 2, 3.0, False, (3,))
    try:
        fn, inputs = run_layer(factory, case, detach_norm=False, functional=True)
    except Malformed as e:
        if isinstance(e.__cause__, NotImplementedError):      # no exact-gradient mode: skip
            return None, None, "layer_factory(detach_norm=False) " + describe_error(e.__cause__)
        return False, None, str(e)
    try:
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    except USER_ERRORS as e:
        note = "torch.autograd.gradcheck " + describe_error(e)
        got = run_layer(factory, case, detach_norm=False)
        if dora and all(not isinstance(got[q], Malformed) and _close(got[q], v).all()
                        for q, v in M.expected(case, "detached_grad", detach_norm=False).items()
                        if q.startswith("grad")):
            note += "; looks like {}: {}".format(*M.MISTAKES["detached_grad"])
        return False, None, note
    what = "x, A, B, m; exact norm gradient (detach_norm=False)" if dora else "x, A, B"
    return True, None, f"eps 1e-6, atol 1e-8, rtol 1e-6 w.r.t. {what}"


def _check(kind: str, factory, seed: int, strict: bool):
    """Every row of check_lora / check_dora, with gradients on and the caller's RNG untouched."""
    check_seed(seed)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)                                # the dropout row's masks
        return _rows(kind, factory, seed, strict)


def _rows(kind: str, factory, seed: int, strict: bool):
    from .report import Report, Row

    dora = kind == "dora"
    keys = "W0, bias, A, B, r, alpha, rslora, dropout" + (", m, detach_norm" if dora else "")
    convention = f"layer_factory(*, {keys}) returning a layer (y = layer(x))"
    probe = dict(W0=None, bias=None, A=None, B=None, r=1, alpha=1.0, rslora=False, dropout=0.0)
    if dora:
        probe.update(m=None, detach_norm=True)
    check_signature(factory, "layer_factory", convention, **probe)
    name = getattr(factory, "__qualname__", type(factory).__name__)
    report = Report(f"check_{kind}({name})")
    quantities = [q for q in QUANTITIES if dora or q != "grad_m"]
    drawn = random_cases(dora, seed)
    edges, regular = [c for c in drawn if c.zero_row], [c for c in drawn if not c.zero_row]
    for group, cases in (("golden", golden_cases(dora)), ("random", regular)):
        tallies = {q: Tally() for q in quantities}
        for case in cases:
            got = run_layer(factory, case)
            want = case.golden or M.expected(case)
            for q in quantities:
                tallies[q].add(case.name, *_compare(case, q, got[q], want[q], dora))
        what = "PEFT 0.21.2" if group == "golden" else f"seed {seed}"
        for q in quantities:
            ok, worst, note = tallies[q].result(f"{len(cases)} cases, {what}")
            report.rows.append(Row(f"{group}: {_LABELS[q]}", ok, worst, TOLERANCE, note))
    ok, worst, note = _dropout_row(factory, dora, seed)
    report.rows.append(Row("dropout only on the adapter path", ok, worst, TOLERANCE, note))
    ok, worst, note = _gradcheck_row(factory, dora, seed)
    report.rows.append(Row("gradcheck (float64)", ok, worst, "numerical vs analytical", note))
    tally = Tally()
    for case in edges:
        got, want = run_layer(factory, case), M.expected(case)
        for q in quantities:
            tally.add(f"{case.name}, {_LABELS[q]}", *_compare(case, q, got[q], want[q], dora))
    ok, worst, note = tally.result("finite, and equal to the reference with c clamped at eps")
    report.rows.append(Row("robustness: zero row of W0 + s B A", ok, worst, TOLERANCE, note,
                           counts=strict))
    return report


def check_lora(layer_factory, *, seed: int = 0, strict: bool = False):
    """Check a LoRA layer against PEFT's float64 values and minidora's reference.

    Args:
        layer_factory: called with keyword arguments only, ``layer_factory(W0=, bias=, A=, B=,
            r=, alpha=, rslora=, dropout=)``: W0 [out, in], bias [out] or None, A [r, in],
            B [out, r] (float64 tensors), r int, alpha float, rslora bool (scaling alpha / sqrt(r)
            instead of alpha / r), dropout float (on the adapter's input). Returns the layer: a
            callable, ``layer(x)`` maps x [..., in] to y [..., out] in float64. It must use the
            A and B it is given: directly (the tensors require grad) or copied into
            ``nn.Parameter`` s of the same shape and dtype (found by value). An optional
            method ``layer.merged_weight()`` returns the merged weight [out, in].
        seed: seed of the random cases.
        strict: count the robustness row (a zero row of W0 + s B A, where the row norm c is 0
            and an unclamped division gives NaN, as PEFT's own layers do) as a failure; by
            default it shows as ``WARN`` and does not fail the report.

    Returns:
        A :class:`~minidora.testing.Report`.

    Raises:
        TypeError: ``layer_factory`` is not callable or cannot take these keyword arguments; a
            seed that is not an int; a strict that is not a bool.
        ValueError: a seed outside 0..2**63 - 1.
    """
    return _check("lora", layer_factory, seed, strict)


def check_dora(layer_factory, *, seed: int = 0, strict: bool = False):
    """Check a DoRA layer against PEFT's float64 values and minidora's reference.

    Args:
        layer_factory: as for :func:`check_lora`, plus ``m=`` [out] (the magnitude, one per
            output row) and ``detach_norm=`` bool: True (default of PEFT and of the paper, and
            what the golden gradients use) treats the row norm c as a constant in backward;
            False asks for the exact gradient, which the gradcheck row uses (raise
            NotImplementedError there to skip that row).
        seed: seed of the random cases.
        strict: count the robustness row (a zero row of W0 + s B A, where the row norm c is 0
            and an unclamped division gives NaN, as PEFT's own layers do) as a failure; by
            default it shows as ``WARN`` and does not fail the report.

    Returns:
        A :class:`~minidora.testing.Report`.

    Raises:
        TypeError: ``layer_factory`` is not callable or cannot take these keyword arguments; a
            seed that is not an int; a strict that is not a bool.
        ValueError: a seed outside 0..2**63 - 1.
    """
    return _check("dora", layer_factory, seed, strict)
