"""The float64 cases :func:`~minidora.testing.check_lora` and :func:`~minidora.testing.check_dora`
run: PEFT 0.21.2's golden cases, with PEFT's outputs, gradients and merged weights, and fresh
random ones (odd sizes, rsLoRA, no bias, a batch of [2, 3, in], r = 1, a zero row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import adapter_mistakes as M
from . import golden

__all__ = ["Case", "golden_cases", "random_cases", "random_case"]


@dataclass
class Case:
    """One float64 layer and input. m is None for LoRA; ``golden``: PEFT's values, or None."""

    name: str
    W0: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    m: torch.Tensor | None
    r: int
    alpha: float
    rslora: bool
    x: torch.Tensor
    grad_y: torch.Tensor
    golden: dict | None = None
    zero_row: bool = False


def golden_cases(dora: bool) -> list[Case]:
    """PEFT's float64 cases (``lora``, ``lora_rslora`` or ``dora``, ``dora_rslora``)."""
    g, out = golden.adapters_peft(), []
    for key in [k for k in golden.peft_cases() if k.startswith("dora" if dora else "lora")]:
        t = lambda n, key=key: torch.from_numpy(np.asarray(g[f"{key}.{n}"])).clone()
        want = {q: t(q) for q in ("y", "grad_x", "grad_A", "grad_B")}
        want["merged"] = t("merged_weight")
        if dora:
            want["grad_m"] = t("grad_m")
        out.append(Case(f"PEFT {key}", t("W0"), t("bias"), t("A"), t("B"), t("m") if dora else None,
                        int(t("r")), float(t("alpha")), "rslora" in key, t("x"), t("grad_y"), want))
    return out


def random_case(gen, dora, name, out_f, in_f, r, alpha, rslora, batch, bias=True, zero_row=None):
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    W0, A, B = randn(out_f, in_f) * 0.5, randn(r, in_f) / in_f ** 0.5, randn(out_f, r) * 0.5
    m = None
    if dora:
        V = W0 + M.scaling(r, alpha, rslora) * B @ A
        m = V.norm(dim=1) * (0.5 + torch.rand(out_f, generator=gen, dtype=torch.float64))
    if zero_row is not None:     # a zero row of W0 + s B A, as at init in a large model: c = 0
        W0[zero_row], B[zero_row] = 0, 0
        if dora:
            m[zero_row] = 0
    return Case(name, W0, randn(out_f) if bias else None, A, B, m, r, alpha, rslora,
                randn(*batch, in_f), randn(*batch, out_f), zero_row=zero_row is not None)


def random_cases(dora: bool, seed: int = 0) -> list[Case]:
    """Fresh float64 cases from ``seed``: odd sizes, rsLoRA, no bias, a batch of [2, 3, in],
    r = 1, and a zero row (c = 0 must not give NaN)."""
    gen = torch.Generator().manual_seed(seed)
    return [random_case(gen, dora, "7x11 r=3", 7, 11, 3, 6.0, False, (5,)),
            random_case(gen, dora, "12x9 r=4 rslora, no bias, x [2, 3, 9]", 12, 9, 4, 2.0, True,
                         (2, 3), bias=False),
            random_case(gen, dora, "6x16 r=1, zero row 2", 6, 16, 1, 1.5, False, (4,), zero_row=2)]
