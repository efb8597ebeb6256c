"""Where a long training loop is, in lines, for output that is not a terminal.

On a terminal the loops of demo and finetune draw a tqdm bar (on stderr). Redirected to a file
(``finetune ... > log``) a bar shows nothing, so :class:`Progress` prints a line instead, about
one per tenth of the steps and at least one every :data:`EVERY_S` seconds, each with the time
so far and an estimate of the rest::

      qlora: step 8/40, loss 1.914, 6m40s elapsed, about 26m40s left

A loop done within :data:`QUIET_S` seconds prints none (the run's own lines say enough).
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "duration", "timing", "QUIET_S", "EVERY_S"]

QUIET_S = 10.0      # no line before a loop has run this long
EVERY_S = 30.0      # a line at least this often after that


def duration(seconds: float) -> str:
    """``42 s``, ``6m40s``, ``2h05m``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def timing(elapsed: float, done: int, left: int) -> str:
    """``6m40s elapsed, about 26m40s left``: ``done`` steps took ``elapsed`` seconds, ``left``
    steps to go at the same pace (``..., done`` when none is left)."""
    if left <= 0:
        return f"{duration(elapsed)} elapsed, done"
    return f"{duration(elapsed)} elapsed, about {duration(elapsed / max(1, done) * left)} left"


class Progress:
    """Progress lines of a loop of ``total`` steps, made when :meth:`update` says where it is.

    Args:
        total: the number of steps.
        desc: the line's start (``"  qlora"``, ``"pretraining"``).
        log: where lines go.
        enabled: print lines; default: when stdout is not a terminal.
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, total: int, desc: str, log=print, enabled: bool | None = None,
                 clock=time.monotonic):
        self.total, self.desc, self.log, self.clock = total, desc, log, clock
        self.enabled = (not _isatty(sys.stdout)) if enabled is None else enabled
        self.every = max(1, total // 10)
        self.t0 = self.last = clock()

    def update(self, done: int, **values) -> None:
        """After ``done`` of the steps: print a line if one is due (values: ``loss=1.914``)."""
        now = self.clock()
        if not self.enabled or now - self.t0 < QUIET_S:
            return
        if not (done % self.every == 0 or done >= self.total or now - self.last >= EVERY_S):
            return
        self.last = now
        shown = "".join(f", {k} {v:.3f}" if isinstance(v, float) else f", {k} {v}"
                        for k, v in values.items())
        self.log(f"{self.desc}: step {done}/{self.total}{shown}, "
                 f"{timing(now - self.t0, done, self.total - done)}")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):    # no isatty, or a closed stream
        return False
