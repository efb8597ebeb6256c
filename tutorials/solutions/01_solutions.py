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
# # Solutions: 1. LoRA from scratch
#
# The exercises of [tutorial 1](../01_lora_from_scratch.py). Each solution is followed by the
# check the tutorial runs (the same code, copied) and by the classic mistakes that check
# catches. Run it as a script: it stops at the first solution that fails its check, or at the
# first mistake a check lets through.

# %%
import math

import torch
import torch.nn as nn
from checking import must_fail  # tutorials/solutions/checking.py

import minidora
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the scaling, and rsLoRA at a large rank
#
# $\lVert \partial L/\partial B\rVert \propto s\sqrt r$, so the ratio between two ranks is
# $s(r)\sqrt r / (s(r_0)\sqrt{r_0})$: $\sqrt{r_0/r}$ with $\alpha/r$ (1/8 from 4 to 256) and
# exactly 1 with $\alpha/\sqrt r$.

# %%
def my_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def grad_ratio(r: int, r0: int, rslora: bool = False) -> float:
    """Predicted |dL/dB| at init at rank r, over the one at rank r0 (same alpha)."""
    return (my_scaling(1.0, r, rslora) * math.sqrt(r)
            / (my_scaling(1.0, r0, rslora) * math.sqrt(r0)))


def check_exercise_1(my_scaling, grad_ratio):
    for alpha, r in ((16, 8), (8, 64), (32, 256), (1, 3)):
        for rslora in (False, True):
            want = minidora.LoRALinear(nn.Linear(4, 4), r=r, alpha=alpha, rslora=rslora).scaling
            got = my_scaling(alpha, r, rslora)
            assert math.isclose(got, want, rel_tol=1e-12), \
                f"my_scaling({alpha}, {r}, rslora={rslora}) = {got}, expected {want}"
    for (r, r0), want in (((256, 4), (1 / 8, 1.0)), ((9, 1), (1 / 3, 1.0))):
        for rslora, w in zip((False, True), want, strict=True):
            got = grad_ratio(r, r0, rslora)
            assert math.isclose(got, w, rel_tol=1e-9), \
                f"grad_ratio({r}, {r0}, rslora={rslora}) = {got}: |dL/dB| grows like s sqrt(r)"


check_exercise_1(my_scaling, grad_ratio)
print("exercise 1: correct")
print(f"  r = 256, alpha = 16: s = {my_scaling(16, 256):.4f} with alpha/r, "
      f"{my_scaling(16, 256, True):.4f} with alpha/sqrt(r)")
# scaling by alpha alone; the ratio of the scalings without the sqrt(r) of the gradient
must_fail(check_exercise_1, lambda alpha, r, rslora=False: float(alpha), grad_ratio)
must_fail(check_exercise_1, my_scaling,
          lambda r, r0, rslora=False: my_scaling(1.0, r, rslora) / my_scaling(1.0, r0, rslora))

# %% [markdown]
# ## Exercise 2: the initialisation
#
# Kaiming-uniform with $a = \sqrt 5$ is $U(\pm 1/\sqrt{in})$; $B = 0$.

# %%
def my_init_(A: torch.Tensor, B: torch.Tensor) -> None:
    """Initialise A [r, in] and B [out, r] in place, as LoRA does."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def check_exercise_2(my_init_):
    torch.manual_seed(2)
    base = nn.Linear(64, 24)
    A, B = torch.empty(8, 64), torch.empty(24, 8)
    with torch.no_grad():
        my_init_(A, B)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.randn(6, 64)
    y = base(x) + 2.0 * (x @ A.T) @ B.T
    assert torch.equal(y, base(x)), "the layer must equal its base at step 0: is B zero?"
    bound = 1 / math.sqrt(64)
    assert A.abs().max() <= bound, f"A must lie in [-1/sqrt(in), 1/sqrt(in)] = +-{bound:.3f}"
    assert 0.45 * bound < A.std() < 0.7 * bound, "A must be spread uniformly over that interval"
    (y ** 2).sum().backward()
    assert B.grad.norm() > 0, "B gets no gradient at step 0: is A zero?"


check_exercise_2(my_init_)
print("exercise 2: correct")
must_fail(check_exercise_2, lambda A, B: (my_init_(A, B), nn.init.normal_(B)))   # B != 0
must_fail(check_exercise_2, lambda A, B: (nn.init.zeros_(A), nn.init.zeros_(B)))  # stuck
must_fail(check_exercise_2, lambda A, B: (nn.init.normal_(A), nn.init.zeros_(B)))  # A too large

# %% [markdown]
# ## Exercise 3: merge and unmerge

# %%
def my_merge(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """W0 [out, in], A [r, in], B [out, r] -> the merged weight [out, in]."""
    return W0 + s * (B @ A)


def my_unmerge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The merged weight W [out, in] -> W0 [out, in]."""
    return W - s * (B @ A)


def check_exercise_3(my_merge, my_unmerge):
    torch.manual_seed(3)
    W0, A, B = (torch.randn(*shape, dtype=torch.float64) for shape in ((5, 7), (3, 7), (5, 3)))
    s, x = 2.5, torch.randn(4, 7, dtype=torch.float64)
    W = my_merge(W0, A, B, s)
    assert W.shape == W0.shape, f"the merged weight must be [out, in] = {tuple(W0.shape)}"
    y_adapter = x @ W0.T + s * (x @ A.T) @ B.T
    assert torch.allclose(x @ W.T, y_adapter, rtol=1e-12, atol=1e-12), \
        "the merged layer must compute what the adapter computes: is s there?"
    assert torch.allclose(my_unmerge(W, A, B, s), W0, rtol=1e-12, atol=1e-12), \
        "unmerging must give W0 back"


check_exercise_3(my_merge, my_unmerge)
print("exercise 3: correct")
must_fail(check_exercise_3, lambda W0, A, B, s: W0 + B @ A, my_unmerge)         # no s
must_fail(check_exercise_3, lambda W0, A, B, s: W0 + s * A.T @ B.T, my_unmerge)  # transposed
