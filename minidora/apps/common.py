"""What the applications share, written once: option checks and limits, the pretraining cache,
the learning-rate schedule, peak memory and the data's split and loss conventions.

Every subcommand (``demo``, ``finetune``, ``train``) reports bad input as one line naming the
option, the value it got and what it expected, before any work starts. Nothing here imports
torch: the command-line modules import this one while ``python -m minidora`` builds its parser.
The plots and the results JSON of demo and finetune are :mod:`minidora.apps.demo.report`'s.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
from pathlib import Path

__all__ = ["UsageError", "path", "check_int", "check_float", "items", "writable_dir",
           "MAX_STEPS", "MAX_THREADS", "MAX_ALPHA", "MAX_SEED", "MAX_BATCH", "default_cache_dir",
           "cache_folder", "lr_at", "reset_peak_rss", "peak_rss", "available_memory", "proc_bytes",
           "IGNORE", "HELD_OUT_FRACTION", "SPLIT_SEED"]

# Bounds of the options. Far above the core count, torch's thread pool fails to start and takes
# the process down with it; more steps than this is not a demo any more; alpha / r scales the
# update, and an alpha far above the usual 8..512 only drives float32 to inf and NaN.
MAX_STEPS = 100_000
MAX_THREADS = 256
MAX_ALPHA = 1e6
MAX_SEED = 2**63 - 1     # torch takes it as a signed or an unsigned 64-bit seed; so does seed + 1
MAX_BATCH = 4096

# The data: the target id outside the answers (F.cross_entropy's default ignore_index), and the
# seeded share of lines held out where a data set does not say which.
IGNORE = -100
HELD_OUT_FRACTION = 0.15
SPLIT_SEED = 1234


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


def default_cache_dir() -> Path:
    """The pretrained-weights cache: ``$MINIDORA_CACHE``, else ``~/.cache/minidora``."""
    env = os.environ.get("MINIDORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minidora"


def cache_folder(cache_dir: Path | None, no_cache: bool) -> Path | None:
    """The cache of ``--cache-dir`` / ``--no-cache``: None with ``no_cache``, else ``cache_dir``
    or :func:`default_cache_dir`, writable (UsageError naming where it came from if not)."""
    if no_cache:
        return None
    what = ("--cache-dir" if cache_dir else
            "$MINIDORA_CACHE" if os.environ.get("MINIDORA_CACHE") else "cache folder")
    return writable_dir(cache_dir or default_cache_dir(), what,
                        hint="; choose another with --cache-dir or run with --no-cache")


def lr_at(step: int, total: int, peak: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: a linear warm-up over the first
    10% of the steps to ``peak``, then a cosine decay to 10% of it."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process' RSS (Linux), True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_bytes(path: str, field: str) -> int | None:
    """The ``field:`` line of a /proc file given in KiB (``VmHWM`` of /proc/self/status,
    ``MemAvailable`` of /proc/meminfo), in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident memory of this process in bytes: Linux's ``VmHWM`` (since the last
    :func:`reset_peak_rss`), else ``ru_maxrss`` (bytes on macOS, KiB elsewhere)."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")
