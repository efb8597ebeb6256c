"""What the claims share: the run's context, the bootstrap, the verdict words, the results file.

A claim's entry in ``results.json``::

    {"number": 1, "title": ..., "paper": {...}, "ours": {...measurements...},
     "verdict": {"word": "reproduces" | "does not reproduce" | "cannot tell at this scale",
                 "why": "..."}, "seconds": 81.2, "budget": {...}}

``verdict`` is recomputed from ``ours`` by the claim's ``verdict`` function (the tests do that
on altered numbers); it is never written in by hand.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["REPRODUCES", "DOES_NOT", "CANNOT_TELL", "WORDS", "verdict", "Context",
           "bootstrap", "interval_sign", "write_results", "read_results", "RESULTS",
           "SCHEMA_VERSION", "machine", "BOOTSTRAP_SAMPLES", "LEVEL"]

REPRODUCES = "reproduces"
DOES_NOT = "does not reproduce"
CANNOT_TELL = "cannot tell at this scale"
WORDS = (REPRODUCES, DOES_NOT, CANNOT_TELL)
RESULTS = "results.json"
SCHEMA_VERSION = 1
BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95            # the intervals are central 95% percentile intervals


def verdict(word: str, why: str) -> dict:
    """A verdict: one of :data:`WORDS` and the reason in words."""
    if word not in WORDS:
        raise ValueError(f"word must be one of {WORDS}, got {word!r}")
    return {"word": word, "why": why}


@dataclass
class Context:
    """What a claim's ``run`` gets: the budget's settings, the seed, the output folder, where
    lines go, and the model, loaded once for every claim that asks (:meth:`lm`)."""

    out: Path
    budget: str
    seed: int = 0
    threads: int = 2
    log: object = print
    _lm: object = field(default=None, repr=False)

    def lm(self):
        """SmolLM2-135M (:func:`minidora.apps.finetune.models.load`), loaded on first use."""
        if self._lm is None:
            from ..finetune.models import load

            t0 = time.perf_counter()
            self._lm = load("smollm2-135m", threads=self.threads, log=self.log)
            self.log(f"loaded {self._lm.source} in {time.perf_counter() - t0:.0f} s")
        return self._lm


def bootstrap(stat, n: int, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile interval (:data:`LEVEL`) of ``stat(idx)`` over ``samples`` resamplings of the
    ``n`` items with replacement; ``stat`` takes an int array of indices [n] and returns one
    float. The same ``seed`` gives the same resamples, so two statistics bootstrapped with one
    seed are paired item by item."""
    if n < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(samples)])
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return (float(lo), float(hi))


def interval_sign(lo: float, hi: float) -> int:
    """+1 if the interval lies above 0, -1 if below, 0 if it holds 0 (or is undefined)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


def machine() -> dict:
    """The CPU the numbers come from (``lscpu``'s model name and flags) and the software."""
    import torch

    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in f" {flags} "]
    return {"cpu": name, "isa": isa, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def write_results(path: Path, doc: dict) -> None:
    """Write the results document as strict JSON (non-finite floats become null)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    tmp.replace(path)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text())
