"""The claims ``reproduce`` knows, in the order it runs them.

A claim module has ``NAME`` (the command-line name), ``NUMBER`` (its place in docs/reproduce.md),
``TITLE``, ``PAPER`` (the paper's figures, as data), ``BUDGETS`` (``{"quick": {...}, "full":
{...}}``), ``run(ctx) -> dict`` (the measurements, JSON-ready), ``verdict(ours) -> dict``
(:func:`minidora.apps.reproduce.results.verdict`'s form, computed from ``ours`` alone),
``report(ours) -> list[str]`` (the lines printed) and ``plot(result, path)`` (one PNG).
Nothing here imports torch.
"""

from __future__ import annotations

import importlib

__all__ = ["CLAIMS", "claim_module", "claim_names"]

# name -> module (relative to this package). Claims 2-4 of docs/reproduce.md come in here.
CLAIMS = {
    "quant": ".quant",      # 1: QLoRA Table 2, perplexity of the 4-bit formats
    "decomposition": ".decomp",   # 2: DoRA fig. 2, corr(dD, dM) per method
    "rank": ".rank",        # 3: DoRA table 15, DoRA vs LoRA at r = 1, 2, 4, 8
    "qlora16": ".qlora16",  # 4: QLoRA table 4, QLoRA on NF4 + DQ vs LoRA on a 16-bit base
    "detach": ".detach",    # 5: DoRA sec. 4.3, the detached norm's memory and step time
}


def claim_module(name: str):
    """The module of claim ``name`` (a key of :data:`CLAIMS`)."""
    return importlib.import_module(CLAIMS[name], __package__)


def claim_names() -> str:
    return ", ".join(CLAIMS)
