"""The weights :func:`~minidora.testing.check_nf4` quantizes: bitsandbytes' golden cases, with
the fields bitsandbytes produced for them, and fresh random weights chosen for the edges of the
format (odd element counts, blocks spanning rows, all-zero blocks, bfloat16 and float16 inputs,
heavy tails, more than 256 blocks, values exactly on a midpoint or a few ulps from one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import nf4
from . import golden

__all__ = ["Case", "golden_cases", "random_cases"]


@dataclass
class Case:
    """One weight to quantize. ``expected[dq]``: bitsandbytes' fields, or None (use the oracle)."""

    name: str
    weight: torch.Tensor
    blocksize: int
    expected: dict | None = None


def golden_cases() -> list[Case]:
    """The bitsandbytes 0.50.2 cases of ``nf4_bitsandbytes.npz``, with their expected fields."""
    g, out = golden.nf4_bitsandbytes(), []
    for name in golden.nf4_cases():
        t = lambda k, name=name: torch.from_numpy(np.asarray(g[f"{name}.{k}"]))
        weight = t("input").to(getattr(torch, str(g[f"{name}.dtype"])))
        plain = {"packed": t("packed").view(-1), "absmax": t("absmax")}
        dq = {"packed": plain["packed"], "absmax": t("dq.absmax_codes"),
              "nested_absmax": t("dq.nested_absmax"), "offset": t("dq.offset")}
        out.append(Case(name, weight, int(g[f"{name}.blocksize"]), {False: plain, True: dq}))
    return out


def _midpoint_ties() -> torch.Tensor:
    """Blocks whose absmax is a power of two and whose other values sit exactly on midpoints."""
    mid = (nf4.NF4_CODEBOOK[:-1] + nf4.NF4_CODEBOOK[1:]) / 2               # [15]
    rows = [torch.cat([torch.tensor([a]), a * mid, torch.zeros(48)]) for a in (1.0, 2.0, 0.25)]
    return torch.stack(rows)                                               # [3, 64]


def _near_midpoints(gen: torch.Generator) -> torch.Tensor:
    """Blocks of values a few ulps from a midpoint, where x / absmax and x * (1 / absmax) differ."""
    mid = (nf4.NF4_CODEBOOK[:-1] + nf4.NF4_CODEBOOK[1:]) / 2
    rows = []
    for a in (torch.rand(64, generator=gen) * 2 + 0.01).tolist():
        a = torch.tensor(a, dtype=torch.float32)
        x = (mid * a)[:, None] * (1 + torch.arange(-8, 9) * 2.0 ** -23)    # [15, 17], +-8 ulp
        x = x.view(-1)
        hit = x[torch.bucketize(x * (1.0 / a), mid) != torch.bucketize(x / a, mid)][:63]
        if hit.numel():
            rows.append(torch.cat([a.view(1), hit, torch.zeros(63 - hit.numel())]))
    return torch.stack(rows[:16])                                          # [<=16, 64]


def random_cases(seed: int = 0) -> list[Case]:
    """Fresh weights for the edges of the format, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    zero_blocks = randn(6, 96)
    zero_blocks.view(-1)[32:96] = 0                                        # two whole blocks
    zero_blocks.view(-1)[-32:] = 0                                         # the last block
    return [
        Case("odd 13x37", randn(13, 37) * 0.02, 64),
        Case("rows span blocks 5x100 bs32", randn(5, 100), 32),
        Case("all-zero blocks 6x96 bs32", zero_blocks, 32),
        Case("bfloat16 24x80", randn(24, 80).bfloat16(), 64),
        Case("float16 16x72 bs128", (randn(16, 72) * 0.1).half(), 128),
        Case("heavy tails 40x70", randn(40, 70) * torch.exp(2 * randn(40, 70)), 64),
        Case("300 blocks 75x256", randn(75, 256) * 0.05, 64),
        Case("blocksize 4096 3x2000", randn(3, 2000), 4096),
        Case("vector 1001", randn(1001), 256),
        Case("exact midpoints", _midpoint_ties(), 64),
        Case("one ulp from midpoints", _near_midpoints(gen), 64),
    ]
