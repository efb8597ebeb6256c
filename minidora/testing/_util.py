"""Small helpers shared by the checks: calling user code safely and tallying results."""

from __future__ import annotations

import inspect

import numpy as np
import torch

__all__ = ["Malformed", "Tally", "USER_ERRORS", "as_tensor", "check_seed", "check_signature",
           "describe_error"]

# What a call into the code under test may raise and still be a failed row: any exception, and
# SystemExit (a sys.exit() inside it must not end the check, with any status). KeyboardInterrupt
# is not among them: Ctrl-C still interrupts.
USER_ERRORS = (Exception, SystemExit)

MAX_SEED = 2**63 - 1    # torch takes seed + 2 as an unsigned 64-bit seed


class Malformed(Exception):
    """A user's value has the wrong type, dtype or size; the message says what was expected."""


def describe_error(e: BaseException) -> str:
    """'raised ValueError: first line of the message' (at most 200 characters)."""
    if isinstance(e, SystemExit):
        return f"raised SystemExit({e.code!r}): a sys.exit() in the code under test"
    msg = (str(e).strip().splitlines() or [""])[0]
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"raised {type(e).__name__}" + (f": {msg}" if msg else "")


def check_seed(seed) -> int:
    """``seed`` if an int in 0..2**63 - 1, else TypeError / ValueError naming it."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..2**63 - 1, got {seed}")
    return seed


def check_signature(fn, name: str, convention: str, *args, **kwargs) -> None:
    """TypeError naming the expected convention unless ``fn(*args, **kwargs)`` could bind."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, {convention}; got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):     # some builtins have no signature: just try them
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        empty = inspect.Parameter.empty
        bare = sig.replace(
            parameters=[p.replace(annotation=empty) for p in sig.parameters.values()],
            return_annotation=empty)
        raise TypeError(f"{name} has the signature {bare}, expected {convention} ({e})") from None


def as_tensor(value, name: str, dtype: torch.dtype, numel: int, why: str = "",
              hints: dict | None = None) -> torch.Tensor:
    """A user's array as a flat CPU tensor of ``dtype`` and ``numel`` elements, or Malformed.

    Args:
        value: a torch.Tensor, a numpy array, or (for a float scalar) a Python number.
        why: how ``numel`` follows, e.g. ``"ceil(2541 / 2)"``.
        hints: extra explanation keyed by the wrong value seen: None (missing), a dtype, a count.
    """
    hints = hints or {}
    if value is None:
        raise Malformed(hints.get(None, f"{name} is missing"))
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)
          and dtype.is_floating_point):
        value = torch.tensor(value, dtype=dtype)
    if not isinstance(value, torch.Tensor):
        raise Malformed(f"{name} is a {type(value).__name__}, expected a {dtype} tensor")
    value = value.detach().cpu()
    if value.dtype != dtype:
        hint = hints.get(value.dtype)
        raise Malformed(f"{name} has dtype {value.dtype}, expected {dtype}"
                        + (f": {hint}" if hint else ""))
    if value.numel() != numel:
        hint = hints.get(value.numel())
        raise Malformed(f"{name} has {value.numel()} elements, expected {numel}"
                        + (f" = {why}" if why else "") + (f": {hint}" if hint else ""))
    return value.reshape(-1)


class Tally:
    """Results of one row over many cases: (case label, ok, worst, note) each."""

    def __init__(self):
        self.items: list[tuple[str, bool | None, float | None, str]] = []

    def add(self, label: str, ok: bool | None, worst: float | None, note: str) -> None:
        self.items.append((label, ok, worst, note))

    def result(self, passed_note: str) -> tuple[bool | None, float | None, str]:
        """(ok, worst, note): the first failure's note with its case, or ``passed_note``."""
        worsts = [w for _, ok, w, _ in self.items if w is not None]
        worst = max(worsts, default=None)
        fails = [(label, note) for label, ok, _, note in self.items if ok is False]
        skips = [(label, note) for label, ok, _, note in self.items if ok is None]
        if fails:
            k = len(fails) - 1
            more = f" (and {k} more case{'s' if k > 1 else ''})" if k else ""
            return False, worst, f"{fails[0][0]}: {fails[0][1]}{more}"
        if len(skips) == len(self.items):
            return None, worst, skips[0][1] if skips else "nothing to check"
        tail = f"; {len(skips)} skipped: {skips[0][1]}" if skips else ""
        return True, worst, passed_note + tail
