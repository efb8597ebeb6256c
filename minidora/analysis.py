r"""Weight-decomposition analysis: how fine-tuning moves each weight in magnitude and direction.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv 2402.09353, sec. 2.2.
For a weight W_t (after t steps) against its pre-trained W_0, over the k output rows
(the paper writes columns of W^{in x out}; in PyTorch's W [out, in] they are rows):

.. math::  \Delta M_t = \frac1k \sum_{n=1}^{k}
           \big|\, \lVert W_t[n] \rVert - \lVert W_0[n] \rVert \,\big|   \qquad (3)

.. math::  \Delta D_t = \frac1k \sum_{n=1}^{k} \big(1 - \cos(W_t[n], W_0[n])\big)   \qquad (4)

Plotting (dD, dM) over checkpoints and layers, the paper finds a negative correlation for full
fine-tuning (-0.62) and DoRA (-0.31), a strongly positive one for LoRA (+0.83).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import base as frozen
from .lora import LoRALinear

__all__ = ["weight_decomposition", "effective_weight", "effective_weights", "decompose_model",
           "correlation"]


def weight_decomposition(w: torch.Tensor, w0: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of eqs. 3-4 for one weight, computed in float64.

    Args:
        w: [out, in] the weight after fine-tuning.
        w0: [out, in] the pre-trained weight.
    """
    if w.dim() != 2 or w.shape != w0.shape:
        raise ValueError(f"w and w0 must be 2-D of the same shape, got {tuple(w.shape)} and "
                         f"{tuple(w0.shape)}")
    w, w0 = w.detach().double(), w0.detach().double()
    dm = (torch.linalg.vector_norm(w, dim=1) - torch.linalg.vector_norm(w0, dim=1)).abs().mean()
    dd = (1 - F.cosine_similarity(w, w0, dim=1, eps=1e-12)).mean()
    return dm.item(), dd.item()


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The [out, in] matrix a layer applies, float32: W0 + sBA (LoRA), (m / c)(W0 + sBA) (DoRA),
    the weight itself for ``nn.Linear`` (the dequantized one for an NF4 base)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float().clone()
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"layer must be an nn.Linear or a minidora adapter layer, "
                        f"got {type(layer).__name__}")
    if layer.merged:
        return frozen.weight(layer.base, torch.float32)                # what the base now stores
    return layer.merged_weight().float()                               # [out, in]


def effective_weights(model: nn.Module, names=None) -> dict[str, torch.Tensor]:
    """{name: effective weight} for every adapter layer (or for the given module names)."""
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {n: effective_weight(model.get_submodule(n)).cpu() for n in names}


def decompose_model(weights: dict[str, torch.Tensor],
                    weights0: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{name: (dM, dD)} of a checkpoint's weights against the pre-trained ones."""
    missing = sorted(set(weights) - set(weights0))
    if missing:
        raise ValueError(f"weights0 lacks the pre-trained weights of {missing}")
    return {n: weight_decomposition(w, weights0[n]) for n, w in weights.items()}


def correlation(dm, dd) -> float:
    """Pearson correlation between dM and dD values (over checkpoints and/or layers)."""
    x = torch.as_tensor(list(dm), dtype=torch.float64)
    y = torch.as_tensor(list(dd), dtype=torch.float64)
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"dm and dd must hold the same number (>= 2) of values, got "
                         f"{x.numel()} and {y.numel()}")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    if denom == 0:
        raise ValueError("correlation is undefined: dm or dd is constant")
    return (x @ y).item() / denom
