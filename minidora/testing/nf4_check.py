"""check_nf4: is your NF4 quantizer bit-exact with bitsandbytes?

NF4 is a storage format, so the comparison is exact: the same 4-bit codes in the same nibbles,
the same float32 scales, the same 8-bit scale codes, nested scales and offset with double
quantization, and a dequantized value ``float32(code value) * float32(scale)`` cast once. One
different bit is a different file. The cases are the bitsandbytes golden vectors shipped in
:mod:`minidora.testing.golden`, then fresh random weights chosen for the edges: odd element
counts, blocks spanning rows, all-zero blocks, bfloat16 and float16 inputs, heavy tails, more
than 256 blocks, values exactly on a midpoint or one ulp from it. The oracle is
:func:`minidora.nf4.quantize`, bit-exact with bitsandbytes. When something differs, the row
says where first and, if your output equals a known mistake
(:mod:`~minidora.testing.nf4_mistakes`), which one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import nf4
from . import nf4_mistakes as M
from ._util import (
    USER_ERRORS,
    Malformed,
    Tally,
    as_tensor,
    check_seed,
    check_signature,
    describe_error,
)
from .nf4_cases import Case, golden_cases, random_cases

__all__ = ["check_nf4"]

_FIELDS = {  # row label -> (field, modes where it exists: False plain, True double quant)
    "packed codes": ("packed", (False, True)),
    "absmax (float32 scales)": ("absmax", (False,)),
    "DQ scale codes": ("absmax", (True,)),
    "DQ nested absmax": ("nested_absmax", (True,)),
    "DQ offset": ("offset", (True,)),
}
CONVENTION = ("quantize_fn(weight, blocksize, double_quant) returning an object with attributes "
              "packed, absmax, nested_absmax, offset (like minidora.nf4.NF4Weight) or a dict with "
              "those keys")


def _fields_of(result) -> dict:
    """The user's quantize result -> dict of raw fields; TypeError if it is neither form."""
    if isinstance(result, dict) and "packed" in result and "absmax" in result:
        return {k: result.get(k) for k in ("packed", "absmax", "nested_absmax", "offset")}
    if hasattr(result, "packed") and hasattr(result, "absmax"):
        return {k: getattr(result, k, None)
                for k in ("packed", "absmax", "nested_absmax", "offset")}
    raise TypeError(f"quantize_fn returned {type(result).__name__}; expected {CONVENTION}")


def _location(case: Case, i: int) -> str:
    n = case.weight.numel()
    if i >= n:
        return "the padding nibble after the last element"
    where = ", ".join(str(int(j)) for j in np.unravel_index(i, tuple(case.weight.shape)))
    return f"block {i // case.blocksize}, element {i % case.blocksize} (weight[{where}])"


class _Context:
    """One (case, mode): the expected fields, the user's, and the mistakes, computed lazily."""

    def __init__(self, case: Case, dq: bool, raw: dict):
        self.case, self.dq, self.raw = case, dq, raw
        ref = nf4.quantize(case.weight, case.blocksize, dq)
        oracle = {"packed": ref.packed, "absmax": ref.absmax,
                  "nested_absmax": ref.nested_absmax, "offset": ref.offset}
        self.expected = case.expected[dq] if case.expected else oracle
        n, bs = case.weight.numel(), case.blocksize
        nb = -(-n // bs)
        self.shapes = {  # field -> (dtype, number of elements, how that number follows)
            "packed": (torch.uint8, -(-n // 2), f"ceil({n} / 2)"),
            "absmax": (torch.uint8 if dq else torch.float32, nb, f"ceil({n} / {bs}) blocks"),
            "nested_absmax": (torch.float32, -(-nb // M.NESTED), f"ceil({nb} / {M.NESTED})"),
            "offset": (torch.float32, 1, "a scalar")}
        self._variants = {}

    def got(self, field: str) -> torch.Tensor:
        dtype, numel, why = self.shapes[field]
        return as_tensor(self.raw[field], field, dtype, numel, why, self._hint(field))

    def _hint(self, field: str) -> dict:
        """Messages for a field with the wrong number of elements or dtype, by value."""
        w, bs = self.case.weight, self.case.blocksize
        n, hints = w.numel(), {}
        if field == "packed":
            hints[n] = "one code per byte? NF4 packs two codes per byte"
        if field == "absmax" and w.dim() == 2 and w.shape[1] % bs:
            hints[w.shape[0] * -(-w.shape[1] // bs)] = "; ".join(M.MISTAKES["per_row"])
        if field == "absmax" and self.dq:
            hints[torch.float32] = ("with double_quant=True absmax holds the uint8 codes of the "
                                    "scales (check plain NF4 only with "
                                    "check_nf4(..., double_quant=False))")
        if field in ("nested_absmax", "offset"):
            hints[None] = f"{field} is missing: double quantization must return it"
        return hints

    def mistake(self, field: str, got: torch.Tensor) -> str:
        """Name the classic mistake whose output ``got`` equals, or ''."""
        want = self.expected[field].reshape(-1)
        for key in M.QUANTIZE_MISTAKES:
            if key not in self._variants:
                self._variants[key] = M.quantize(self.case.weight, self.case.blocksize,
                                                 self.dq, key)
            v = self._variants[key].get(field)
            if v is None or v.numel() != got.numel() or torch.equal(v.reshape(-1), want):
                continue
            if torch.equal(v.reshape(-1), got):
                return "looks like {}: {}".format(*M.MISTAKES[key])
        return ""


def _compare(ctx: _Context, field: str) -> tuple[bool, float, str]:
    """(ok, worst |diff|, note) for one field of one case and mode."""
    got = ctx.got(field)
    want = ctx.expected[field].reshape(-1)
    if field == "packed":
        got_v, want_v = M.unpack(got), M.unpack(want)
        unit = "codes"
    else:
        got_v, want_v = got, want
        unit = "scale codes" if field == "absmax" and ctx.dq else "values"
    differ = got_v.double() != want_v.double()          # NaN differs from everything
    if not differ.any():
        return True, 0.0, ""
    worst = float((got_v.double() - want_v.double()).abs().nan_to_num(math.inf).max())
    i = int(differ.nonzero()[0])
    e, g = want_v[i].item(), got_v[i].item()
    if field == "packed" or (field == "absmax" and ctx.dq):
        e, g = f"code {e}", f"code {g}"
    where = {"packed": _location(ctx.case, i) if field == "packed" else "",
             "absmax": f"block {i}" + (f" (nested block {i // M.NESTED})" if ctx.dq else ""),
             "nested_absmax": f"nested block {i}", "offset": "the offset"}[field]
    note = (f"{int(differ.sum())} of {differ.numel()} {unit} differ; first at {where}: "
            f"expected {e}, got {g}")
    why = ctx.mistake(field, got)
    if not why and field == "packed":
        zero = ctx.case.weight.detach().float().reshape(-1)
        blocks = torch.nn.functional.pad(zero, (0, -zero.numel() % ctx.case.blocksize))
        zero_block = blocks.view(-1, ctx.case.blocksize).abs().amax(1) == 0
        bad_blocks = differ.nonzero().view(-1).clamp_max(zero.numel() - 1) // ctx.case.blocksize
        if zero_block[bad_blocks].all():
            why = ("an all-zero block must store code 7 (byte 0x77) and absmax 0: clamp only the "
                   "divisor (to 1e-38), never produce NaN")
    return False, worst, note + (f"; {why}" if why else "")


def _check_dequantize(ctx: _Context, dequantize_fn, result) -> tuple[bool, float, str]:
    case = ctx.case
    names = ("packed", "absmax", "nested_absmax", "offset") if ctx.dq else ("packed", "absmax")
    try:
        fields = {k: ctx.got(k) for k in names}
    except Malformed:
        return None, None, "quantize_fn's output is malformed (see above)"
    if ctx.dq:
        fields["offset"] = fields["offset"].reshape(())
    try:
        out = dequantize_fn(result)
    except USER_ERRORS as e:
        return False, None, "dequantize_fn " + describe_error(e)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        what = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        return False, None, (f"dequantize_fn returned {what}; "
                             "expected a float tensor of the weight's shape")
    if tuple(out.shape) != tuple(case.weight.shape):
        return False, None, (f"dequantize_fn returned shape {tuple(out.shape)}; expected the "
                             f"weight's shape {tuple(case.weight.shape)}")
    out = out.detach().cpu()
    q = nf4.NF4Weight(fields["packed"], fields["absmax"], tuple(case.weight.shape), out.dtype,
                      case.blocksize, fields.get("nested_absmax"), fields.get("offset"))
    want = nf4.dequantize(q, out.dtype)
    differ = out.double().view(-1) != want.double().view(-1)
    if not differ.any():
        return True, 0.0, ""
    worst = float((out.double() - want.double()).abs().nan_to_num(math.inf).max())
    i = int(differ.nonzero()[0])
    note = (f"{int(differ.sum())} of {differ.numel()} values differ; "
            f"first at {_location(case, i)}: "
            f"expected {want.view(-1)[i].item()!r}, got {out.view(-1)[i].item()!r}")
    for key in M.DEQUANTIZE_MISTAKES:
        v = M.dequantize(fields, tuple(case.weight.shape), case.blocksize, out.dtype, key)
        if not torch.equal(v, want) and torch.equal(v, out):
            return False, worst, note + "; looks like {}: {}".format(*M.MISTAKES[key])
    return False, worst, note


def _name(fn) -> str:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "__main__" else name


def check_nf4(quantize_fn, dequantize_fn=None, *, double_quant: bool | None = None,
              seed: int = 0):
    """Check an NF4 quantizer (and dequantizer) against bitsandbytes' format, bit for bit.

    Args:
        quantize_fn: called as ``quantize_fn(weight, blocksize, double_quant)`` (positional
            arguments) with ``weight`` a float32, bfloat16 or float16 tensor of any shape,
            ``blocksize`` a power of two and ``double_quant`` a bool. Returns an object with
            attributes ``packed``, ``absmax``, ``nested_absmax``, ``offset`` (such as
            :class:`minidora.nf4.NF4Weight`) or a dict with those keys: packed
            [ceil(n/2)] uint8 (first element in the high nibble; a shape (ceil(n/2), 1) is fine),
            absmax [n_blocks] float32 (uint8 codes with double quantization), nested_absmax
            [ceil(n_blocks/256)] float32 and offset (0-dim float32 or a number) with double
            quantization (None or absent without it).
        dequantize_fn: optional, called as ``dequantize_fn(q)`` with what ``quantize_fn``
            returned; returns a float tensor of the weight's shape (the weight's dtype, or
            float32). Compared exactly with the decoding of your own fields.
        double_quant: check only plain NF4 (False) or only double quantization (True); default
            both.
        seed: seed of the random cases.

    Returns:
        A :class:`~minidora.testing.Report`.

    Raises:
        TypeError: a function that is not callable, cannot take these arguments, or returns
            something that is neither form; a seed that is not an int.
        ValueError: a seed outside 0..2**63 - 1.
    """
    from .report import Report, Row

    probe = torch.zeros(2, 32)
    check_signature(quantize_fn, "quantize_fn", CONVENTION, probe, 64, True)
    if dequantize_fn is not None:
        check_signature(dequantize_fn, "dequantize_fn", "dequantize_fn(q) with q what quantize_fn "
                        "returns", object())
    if double_quant not in (None, True, False):
        raise TypeError(f"double_quant must be None, True or False, got {double_quant!r}")
    check_seed(seed)
    modes = (False, True) if double_quant is None else (double_quant,)
    report = Report(f"check_nf4({_name(quantize_fn)}"
                    + (f", {_name(dequantize_fn)})" if dequantize_fn is not None else ")"))
    for group, cases in (("golden", golden_cases()), ("random", random_cases(seed))):
        tallies = {label: Tally() for label, (_, m) in _FIELDS.items() if set(m) & set(modes)}
        if dequantize_fn is not None:
            tallies["dequantize"] = Tally()
        for case in cases:
            for dq in modes:
                label = f"{case.name} ({'DQ' if dq else 'plain'})"
                try:
                    result = quantize_fn(case.weight.clone(), case.blocksize, dq)
                except USER_ERRORS as e:
                    for t in tallies.values():
                        t.add(label, False, None, "quantize_fn " + describe_error(e))
                    continue
                ctx = _Context(case, dq, _fields_of(result))
                for row, (field, field_modes) in _FIELDS.items():
                    if dq in field_modes:
                        try:
                            tallies[row].add(label, *_compare(ctx, field))
                        except Malformed as e:
                            tallies[row].add(label, False, None, str(e))
                if dequantize_fn is not None:
                    tallies["dequantize"].add(label, *_check_dequantize(ctx, dequantize_fn, result))
        what = "bitsandbytes 0.50.2" if group == "golden" else f"seed {seed}"
        for row, t in tallies.items():
            ok, worst, note = t.result(f"{len(cases)} cases, {what}")
            report.rows.append(Row(f"{group}: {row}", ok, worst, "exact", note))
    return report
