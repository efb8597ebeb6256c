"""What the command-line subcommands share: the usage error and the checks of option values.

Every subcommand (``demo``, ``finetune``, ``train``) reports bad input as one line naming the
option, the value it got and what it expected, before any work starts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """Bad input found after parsing: reported as one line on stderr, exit status 1."""


def path(text: str) -> Path:
    """argparse type of a folder or file option: any non-empty text."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; expected a folder")
    return Path(text)


def check_int(option: str, value: int, lo: int, hi: int, why: str = "") -> int:
    """``value`` if ``lo <= value <= hi``, else UsageError naming ``option``; ``why`` says hi."""
    if not lo <= value <= hi:
        raise UsageError(f"{option}: got {value}; expected an integer in {lo}..{hi}{why}")
    return value


def check_float(option: str, value: float, hi: float) -> float:
    """``value`` if finite and in (0, hi], else UsageError naming ``option``."""
    if not (math.isfinite(value) and 0 < value <= hi):
        raise UsageError(f"{option}: got {value}; expected a finite number > 0 and <= {hi:g}")
    return value


def items(values: list[str]) -> list[str]:
    """Space or comma separated items, stripped and deduplicated, in the given order."""
    return list(dict.fromkeys(v.strip() for item in values for v in item.split(",") if v.strip()))
