"""What the applications share: the usage error, the checks of option values, the output folder.

Every subcommand (``demo``, ``finetune``, ``train``) reports bad input as one line naming the
option, the value it got and what it expected, before any work starts. Nothing here imports
torch: the command-line modules import this one while ``python -m minidora`` builds its parser.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

__all__ = ["UsageError", "path", "check_int", "check_float", "items", "writable_dir"]


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


def writable_dir(path: Path, what: str, files: tuple[str, ...] = (), hint: str = "") -> Path:
    """``path`` as a folder we can write ``files`` into (created if missing), else UsageError."""
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{what}: {str(path)!r} exists and is not a folder{hint}")
        for name in files:
            if (path / name).exists() and not (path / name).is_file():
                raise UsageError(f"{what}: {str(path / name)!r} is in the way: it exists and "
                                 "is not a file")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or e
        raise UsageError(f"{what}: cannot write to {str(path)!r} ({reason}){hint}") from None
    return path
