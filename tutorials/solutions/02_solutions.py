# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Solutions: 2. Magnitude and direction
#
# The exercises of [tutorial 2](../02_magnitude_direction.py). Each solution is followed by the
# check the tutorial runs (the same code, copied) and by the classic mistakes that check
# catches. Run it as a script: it stops at the first solution that fails its check, or at the
# first mistake a check lets through.

# %%
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from checking import must_fail  # tutorials/solutions/checking.py

import minidora
from minidora import analysis
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the paper's convention
#
# The paper's column $j$ is everything that feeds output $j$: the norm runs over the input
# axis, which is `dim=0` of the [in, out] matrix (and `dim=1` of PyTorch's [out, in] weight).

# %%
def paper_magnitude(W_paper: torch.Tensor) -> torch.Tensor:
    """W_paper: [in, out] (the paper's d x k) -> m: [out], one magnitude per output."""
    return torch.linalg.vector_norm(W_paper, dim=0)


def check_exercise_1(paper_magnitude):
    torch.manual_seed(11)
    for out_f, in_f in ((8, 8), (6, 10)):
        lin = nn.Linear(in_f, out_f)
        W_paper = lin.weight.detach().T.clone()                    # [in, out] = d x k
        m = paper_magnitude(W_paper)
        assert m.shape == (out_f,), f"one magnitude per output: shape ({out_f},), got {m.shape}"
        want = minidora.DoRALinear(lin, r=2, alpha=4).magnitude.detach()
        assert torch.allclose(m, want, rtol=1e-5, atol=0), \
            f"{out_f}x{in_f} weight: wrong values; the paper's columns are the outputs"


check_exercise_1(paper_magnitude)
print("exercise 1: correct")
must_fail(check_exercise_1, lambda W_paper: torch.linalg.vector_norm(W_paper, dim=1))


# %% [markdown]
# ## Exercise 2: a change of length only

# %%
def scale_lengths(W0: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """W0: [out, in], factors: [out] -> [out, in], row n scaled by factors[n]."""
    return W0 * factors[:, None]                               # [out, 1] broadcast over in


def check_exercise_2(scale_lengths):
    torch.manual_seed(12)
    W0 = torch.randn(16, 16, dtype=torch.float64)      # square: a shape check cannot help
    factors = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    Wt = scale_lengths(W0, factors)
    assert Wt.shape == W0.shape, f"expected shape {tuple(W0.shape)}, got {tuple(Wt.shape)}"
    dm, dd = analysis.weight_decomposition(Wt, W0)
    assert dd < 1e-12, f"dD = {dd:.3g}: the directions moved; which axis did you scale?"
    assert torch.allclose(Wt.norm(dim=1), factors * W0.norm(dim=1), rtol=1e-12, atol=0), \
        "row n must become factors[n] times as long"


check_exercise_2(scale_lengths)
print("exercise 2: correct")
must_fail(check_exercise_2, lambda W0, factors: W0 * factors)   # scales the columns


# %% [markdown]
# ## Exercise 3: a change of direction only
#
# With $u \perp w$ and $\lVert u\rVert = \lVert w\rVert$, the row
# $w\cos\theta + u\sin\theta$ has the length of $w$ and makes the angle $\theta$ with it.

# %%
def rotate_rows(W0: torch.Tensor, theta: float) -> torch.Tensor:
    """W0: [out, in] -> [out, in], each row turned by theta, its length kept."""
    u = torch.randn_like(W0)                                            # [out, in]
    u = u - W0 * (u * W0).sum(1, keepdim=True) / (W0 * W0).sum(1, keepdim=True)  # u . w = 0
    u = u * (W0.norm(dim=1, keepdim=True) / u.norm(dim=1, keepdim=True))         # |u| = |w|
    return W0 * math.cos(theta) + u * math.sin(theta)


def check_exercise_3(rotate_rows):
    torch.manual_seed(13)
    W0 = torch.randn(12, 9, dtype=torch.float64)
    for theta in (0.1, 0.5, 1.2):
        Wt = rotate_rows(W0, theta)
        assert Wt.shape == W0.shape, f"expected shape {tuple(W0.shape)}, got {tuple(Wt.shape)}"
        assert torch.allclose(Wt.norm(dim=1), W0.norm(dim=1), rtol=1e-9, atol=0), \
            f"theta = {theta}: the row lengths changed; is the added part orthogonal to the row?"
        cos = F.cosine_similarity(Wt, W0, dim=1)
        assert torch.allclose(cos, torch.full_like(cos, math.cos(theta)), rtol=0, atol=1e-9), \
            f"theta = {theta}: every row must turn by exactly theta"
        dm, dd = analysis.weight_decomposition(Wt, W0)
        assert dm < 1e-9 and abs(dd - (1 - math.cos(theta))) < 1e-9, (dm, dd)


check_exercise_3(rotate_rows)
print("exercise 3: correct")


def rotate_not_orthogonal(W0, theta):        # a random push of the right size, not orthogonal
    u = torch.randn_like(W0)
    return W0 + math.tan(theta) * u * (W0.norm(dim=1, keepdim=True) / u.norm(dim=1, keepdim=True))


must_fail(check_exercise_3, rotate_not_orthogonal)
