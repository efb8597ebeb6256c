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
# # Solutions: 8. What the papers claim, checked
#
# The exercises of [tutorial 8](../08_papers_checked.py). Each solution is followed by the check
# the tutorial runs (the same code, copied) and by the classic mistakes that check catches. Run
# it as a script: it stops at the first solution that fails its check, or at the first mistake
# a check lets through. Neither the `[llm]` extra nor the model is needed.

# %%
import math

import numpy as np
import torch
from checking import must_fail  # tutorials/solutions/checking.py

from minidora import analysis
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: perplexity from per-window losses
#
# The mean loss per predicted token is the total summed loss over the total number of
# predictions; the perplexity is its exponential. With $n$ windows of $p$ predictions each:
# $\exp\big(\sum_w \ell_w / (n p)\big)$.

# %%
def perplexity(window_nll: np.ndarray, predicted_per_window: int) -> float:
    """exp(mean loss per predicted token) of a text scored in windows."""
    return math.exp(float(np.sum(window_nll)) / (len(window_nll) * predicted_per_window))


def check_exercise_1(perplexity):
    rng = np.random.default_rng(1)
    for n, t in ((1, 7), (5, 127), (12, 255)):
        per_token = rng.uniform(1.0, 4.0, size=(n, t))                 # losses of every token
        want = math.exp(per_token.mean())
        got = perplexity(per_token.sum(1), t)
        assert math.isclose(got, want, rel_tol=1e-12), f"{n} windows of {t}: got {got}, " \
                                                        f"want {want}"

check_exercise_1(perplexity)
print("exercise 1: correct")
must_fail(check_exercise_1,                          # the mean of the windows' perplexities
          lambda nll, t: float(np.mean(np.exp(np.asarray(nll) / t))))
must_fail(check_exercise_1,                          # the mean summed loss, not per token
          lambda nll, t: math.exp(float(np.mean(nll))))

# %% [markdown]
# ## Exercise 2: a paired bootstrap interval
#
# Draw the item indices once per resample and take the difference of the two means on them;
# the 2.5th and 97.5th percentiles of those differences are the interval. When `b` is `a`
# shifted by a constant, every resample gives that constant: the paired interval has width 0,
# while resampling `a` and `b` apart mixes in their whole spread.

# %%
def paired_interval(a: np.ndarray, b: np.ndarray, samples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b), resampling the pairs (a[i], b[i])."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))              # [samples, n]
    diffs = a[idx].mean(1) - b[idx].mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def check_exercise_2(paired_interval):
    rng = np.random.default_rng(2)
    a = rng.normal(10.0, 3.0, size=40)
    lo, hi = paired_interval(a, a - 0.25, 2000, 0)            # the same items, shifted
    assert abs(lo - 0.25) < 1e-9 and abs(hi - 0.25) < 1e-9, \
        f"b = a - 0.25 item by item: the paired difference is always 0.25, got [{lo}, {hi}]"
    d = rng.normal(0.5, 1.0, size=400)                        # independent differences
    lo, hi = paired_interval(d, np.zeros_like(d), 4000, 1)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))           # the normal theory's 95%
    assert lo < d.mean() < hi, f"[{lo}, {hi}] misses the observed {d.mean()}"
    assert abs((hi - lo) / (2 * half) - 1) < 0.15, \
        f"width {hi - lo:.3f}, a 95% interval of this mean is about {2 * half:.3f} wide"

check_exercise_2(paired_interval)
print("exercise 2: correct")


def unpaired(a, b, samples=2000, seed=0):
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = [np.mean(a[rng.integers(0, n, n)]) - np.mean(b[rng.integers(0, n, n)])
             for _ in range(samples)]
    return tuple(np.percentile(diffs, [2.5, 97.5]))


def ninety(a, b, samples=2000, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    return tuple(np.percentile(np.asarray(a)[idx].mean(1) - np.asarray(b)[idx].mean(1), [5, 95]))


must_fail(check_exercise_2, unpaired)                 # a and b resampled apart
must_fail(check_exercise_2, ninety)                   # a 90% interval

# %% [markdown]
# ## Exercise 3: magnitude and direction of one weight
#
# The norms and the cosines run along dimension 1 (each output row over its inputs); dM takes
# the absolute change of each row's norm before the mean.

# %%
def dm_dd(w: torch.Tensor, w0: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of w [out, in] against w0 [out, in], over the output rows."""
    w, w0 = w.double(), w0.double()
    dm = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    dd = (1 - torch.nn.functional.cosine_similarity(w, w0, dim=1)).mean()
    return dm.item(), dd.item()


def check_exercise_3(dm_dd):
    g = torch.Generator().manual_seed(3)
    for out_f, in_f in ((7, 13), (64, 32), (1, 5)):
        w0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        w = w0 * (1 + 0.3 * torch.randn(out_f, 1, generator=g, dtype=torch.float64)) \
            + 0.1 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        want = analysis.weight_decomposition(w, w0)
        got = dm_dd(w, w0)
        same = [math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-15)
                for x, y in zip(got, want, strict=True)]
        assert all(same), f"[{out_f}, {in_f}]: got (dM, dD) = {got}, want {want}"

check_exercise_3(dm_dd)
print("exercise 3: correct")
must_fail(check_exercise_3,                          # norms over the input columns
          lambda w, w0: dm_dd(w.T, w0.T))
must_fail(check_exercise_3,                          # a signed dM
          lambda w, w0: ((w.norm(dim=1) - w0.norm(dim=1)).mean().item(), dm_dd(w, w0)[1]))
