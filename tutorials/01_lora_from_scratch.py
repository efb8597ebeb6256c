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
# # 1. LoRA from scratch
#
# **Learning objectives.** You will be able to:
#
# - write a LoRA layer in a dozen lines of PyTorch and check it against a reference, outputs and
#   gradients;
# - explain why $A$ starts random and $B$ at zero, and what breaks with any other choice;
# - say how the scalings $\alpha/r$ and rsLoRA's $\alpha/\sqrt r$ behave as the rank grows;
# - count an adapter's trainable parameters, and merge it into the weight.
#
# **Prerequisites.** You should know:
#
# - PyTorch's `nn.Linear`, `nn.Parameter` and autograd (`loss.backward()`);
# - matrix products and the rank of a matrix;
# - what an optimiser step (SGD, Adam) does.
#
# LoRA (Hu et al., 2021, arXiv 2106.09685) fine-tunes a large model by training, next to each
# frozen weight $W_0$, a low-rank update $s\,BA$. This tutorial builds it in plain PyTorch and
# checks it against `minidora.LoRALinear`:
#
# 1. why a low-rank update is enough;
# 2. the factorisation, and why it is never multiplied out while training;
# 3. the initialisation (A random, B zero) and what goes wrong otherwise;
# 4. the scaling $s = \alpha / r$ and rsLoRA's $\alpha / \sqrt r$;
# 5. parameter counts;
# 6. merging the update into the weight;
#
# and ends with three exercises.
#
# Conventions (PyTorch's, used throughout minidora): $W_0$ is [out, in], $A$ is [r, in],
# $B$ is [out, r], and a layer computes $y = x W^\top + b$ for $x$ of shape [..., in].

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import minidora
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; one thread, seed 0


# %% [markdown]
# ## 1. Why a low-rank update?
#
# Full fine-tuning learns a dense $\Delta W$ with $d_{out} \cdot d_{in}$ numbers per layer.
# The LoRA paper's bet (after Aghajanyan et al., 2020, on the low *intrinsic dimension* of
# fine-tuning) is that the update that matters has a small rank $r$: it can be written
# $\Delta W = s\,BA$ with $r \ll \min(d_{out}, d_{in})$.
#
# A toy version we can see completely: a frozen "pre-trained" layer $W_0$, and a new task whose
# ideal weight differs from $W_0$ by a rank-4 matrix plus a little noise. Full fine-tuning by
# least squares recovers $\Delta W$; its singular values show how much of it a rank-$r$ update
# can hold.

# %%
d = 48 if SMALL else 128
n_train = 4 * d
W0 = torch.randn(d, d) / math.sqrt(d)                            # [out, in] frozen
true_rank = 4
U, V = torch.randn(d, true_rank), torch.randn(true_rank, d)
W_task = W0 + 0.5 * (U @ V) / d + 3e-4 * torch.randn(d, d)       # what the new task wants
X = torch.randn(n_train, d)                                      # [n, in]
Y = X @ W_task.T                                                 # [n, out]

# full fine-tuning, solved exactly: the least-squares weight, and its update over W0
W_full = torch.linalg.lstsq(X, Y).solution.T                     # [out, in]
dW = W_full - W0
sv = torch.linalg.svdvals(dW)
energy = (sv**2).cumsum(0) / (sv**2).sum()
print(f"singular values of the full fine-tuning update: {[round(v, 3) for v in sv[:8].tolist()]}"
      " ...")
print(f"fraction of the update's energy in the top 4 directions: {energy[3]:.4f}")
assert energy[3] > 0.98

fig, ax = plt.subplots(figsize=(7, 3))
ax.semilogy(range(1, d + 1), sv, ".-")
ax.set_xlabel("index")
ax.set_ylabel("singular value of ΔW")
ax.set_title("the update full fine-tuning finds has (nearly) rank 4")
show(fig, "lora_singular_values.png")

# %% [markdown]
# Real models are not this clean, but the LoRA paper measured the same effect on GPT-3:
# the updates learned with $r = 8$ and $r = 64$ share their top directions, and $r$ of 1 to 8
# already matches full fine-tuning on the tasks they report (WikiSQL, MultiNLI).
#
# ## 2. The factorisation
#
# $$ y = x W_0^\top + b + s\,\text{dropout}(x)\,A^\top B^\top,
#    \qquad A \in \mathbb{R}^{r \times in},\; B \in \mathbb{R}^{out \times r}. $$
#
# The order of the products matters: $x A^\top$ is [..., r], then $(\cdot) B^\top$ is
# [..., out]. That costs $r(in + out)$ multiply-adds per token, and the [out, in] matrix
# $BA$ is never built during training.

# %%
class MyLoRALinear(nn.Module):
    """y = x W0^T + b + s x A^T B^T, W0 and b frozen; A [r, in], B [out, r] trained."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.A = nn.Parameter(torch.empty(r, base.in_features))    # [r, in]
        self.B = nn.Parameter(torch.zeros(base.out_features, r))   # [out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))           # U(-1/sqrt(in), 1/sqrt(in))

    def forward(self, x):                                          # x: [..., in]
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T   # [..., out]


base = nn.Linear(d, d)
layer = MyLoRALinear(base, r=8, alpha=16)
x = torch.randn(5, 3, d)
print("x", tuple(x.shape), "-> y", tuple(layer(x).shape))

# %% [markdown]
# ## 3. Initialisation: A random, B zero
#
# - $B = 0$: at the start the layer computes exactly what the pre-trained one did; training
#   starts from the model we were given, not from a perturbed one.
# - $A$ random (Kaiming-uniform with $a = \sqrt 5$, which is $U(\pm 1/\sqrt{in})$, PyTorch's
#   default for `nn.Linear`): then $\partial L / \partial B = s\, g^\top (x A^\top)$ is not zero,
#   so B moves at the first step, and A follows once B is non-zero.
#
# If both were zero, both gradients would be zero forever:
# $\partial L/\partial A = s\,B^\top g^\top x = 0$ and
# $\partial L/\partial B = s\,g^\top (x A^\top) = 0$.

# %%
assert layer.A.abs().max() <= 1 / math.sqrt(d)
assert layer.A.abs().max() > 0.9 / math.sqrt(d)  # really spread over the whole interval
assert torch.equal(layer(x), base(x)), "at init LoRA must equal the base layer exactly"

loss = (layer(x) ** 2).sum()
loss.backward()
print(f"at init: |grad A| = {layer.A.grad.norm():.3g}, |grad B| = {layer.B.grad.norm():.3g}")
assert torch.count_nonzero(layer.A.grad) == 0 and layer.B.grad.norm() > 0

stuck = MyLoRALinear(base, r=8, alpha=16)
nn.init.zeros_(stuck.A)
(stuck(x) ** 2).sum().backward()
assert torch.count_nonzero(stuck.A.grad) == 0 and torch.count_nonzero(stuck.B.grad) == 0
print("A = B = 0: both gradients are exactly zero, nothing would ever train")

# %% [markdown]
# ### Check your understanding
#
# Predict the answers, then run the cell below; each `assert` states one.
#
# 1. At init the layer's output does not depend on $\alpha$. Why?
# 2. A's gradient is zero at init. After one SGD step on $B$, does $A$ get a gradient?

# %%
# 1. B = 0, so s B A = 0 whatever s is: any alpha gives the base layer
assert torch.equal(MyLoRALinear(base, r=8, alpha=1000.0)(x), base(x))
# 2. yes: dL/dA = s B^T g^T x is no longer zero once B is not
probe = MyLoRALinear(base, r=8, alpha=16)
(probe(x) ** 2).sum().backward()
with torch.no_grad():
    probe.B -= 0.1 * probe.B.grad                # one SGD step; A stays where it was
probe.zero_grad()
(probe(x) ** 2).sum().backward()
assert torch.count_nonzero(probe.A.grad) > 0
print(f"after one step on B: |grad A| = {probe.A.grad.norm():.3g}")

# %% [markdown]
# ## 4. The scaling: $\alpha / r$ and rsLoRA's $\alpha / \sqrt r$
#
# The update is multiplied by $s$. LoRA uses $s = \alpha / r$ so that, in the authors' words,
# one can change $r$ without retuning the learning rate much. Kalajdzievski (2023,
# arXiv 2312.03732, "rsLoRA") showed that this makes learning *slower* as $r$ grows, and that
# $s = \alpha / \sqrt r$ keeps it rank-independent.
#
# The reason fits on one line. With $A \sim U(\pm 1/\sqrt{in})$, each of the $r$ columns of
# $h = x A^\top$ has a size independent of $r$, so the gradient of B,
# $\partial L/\partial B = s\, g^\top h$ ([out, r], $g = \partial L/\partial y$), has $r$ columns of
# a size independent of $r$:
#
# $$\lVert \partial L/\partial B \rVert \propto s\sqrt r = \begin{cases}
#   \alpha/\sqrt r & s = \alpha/r \\ \alpha & s = \alpha/\sqrt r \text{ (rsLoRA)} \end{cases}$$
#
# With $\alpha / r$ the gradient (and with SGD the step, which then enters the output multiplied
# by $s$ once more) shrinks as the rank grows; with $\alpha/\sqrt r$ it does not. Measured over
# random draws at the LoRA init:

# %%
def grad_B_norm(r, rslora, trials):
    """Mean |dL/dB| at init over `trials` random layers and batches."""
    norms = []
    for t in range(trials):
        torch.manual_seed(1000 + t)
        lay = MyLoRALinear(nn.Linear(d, d), r=r, alpha=8, rslora=rslora)
        F.mse_loss(lay(torch.randn(64, d)), torch.randn(64, d)).backward()
        norms.append(lay.B.grad.norm().item())
    return sum(norms) / trials


ranks = [2, 8, 32] if SMALL else [2, 4, 8, 16, 32, 64, 128]
trials = 4 if SMALL else 10
gnorm = {rs: [grad_B_norm(r, rs, trials) for r in ranks] for rs in (False, True)}
for i, r in enumerate(ranks):
    print(f"r = {r:3d}: |dL/dB|  alpha/r: {gnorm[False][i]:.3e}   "
          f"alpha/sqrt(r): {gnorm[True][i]:.3e}")
ratio_std = gnorm[False][-1] / gnorm[False][0]
ratio_rs = gnorm[True][-1] / gnorm[True][0]
expected = math.sqrt(ranks[0] / ranks[-1])
print(f"r {ranks[-1]} vs r {ranks[0]}: alpha/r {ratio_std:.3f}x (theory {expected:.3f}), "
      f"alpha/sqrt(r) {ratio_rs:.2f}x (theory 1)")
assert 0.8 * expected < ratio_std < 1.25 * expected
assert 0.8 < ratio_rs < 1.25

# %% [markdown]
# And in training? Fit the rank-4 task of section 1 from the LoRA init, with Adam (the usual
# optimiser) at one learning rate for every rank, and compare the loss after a fixed number of
# steps:

# %%
def train_lora(r, rslora, steps, lr=2e-3):
    torch.manual_seed(0)
    base_t = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base_t.weight.copy_(W0)
    lay = MyLoRALinear(base_t, r=r, alpha=8, rslora=rslora)
    opt = torch.optim.Adam([lay.A, lay.B], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(lay(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


steps = 60 if SMALL else 200
train_ranks = [4, 16, 48] if SMALL else [4, 16, 64, 128]
curves = {(r, rs): train_lora(r, rs, steps) for r in train_ranks for rs in (False, True)}
loss0 = F.mse_loss(X @ W0.T, Y).item()
for r in train_ranks:
    print(f"r = {r:3d}: loss after {steps} Adam steps (start {loss0:.2e}):  "
          f"alpha/r {curves[(r, False)][-1]:.2e}   alpha/sqrt(r) {curves[(r, True)][-1]:.2e}")
for key, losses in curves.items():
    assert math.isfinite(losses[-1]) and losses[-1] < loss0, key
r_max = train_ranks[-1]
assert curves[(r_max, True)][-1] < curves[(r_max, False)][-1]  # rsLoRA ahead at the top rank

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ax1.loglog(ranks, gnorm[False], "o-", label="s = α / r  (LoRA)")
ax1.loglog(ranks, gnorm[True], "s-", label="s = α / √r  (rsLoRA)")
ax1.set_xticks(ranks, [str(r) for r in ranks])
ax1.minorticks_off()
ax1.set_xlabel("rank r")
ax1.set_ylabel("|dL/dB| at init")
ax1.legend()
ax1.set_title("gradient of B at init")
for i, r in enumerate(train_ranks):
    ax2.semilogy(curves[(r, False)], color=f"C{i}", label=f"r={r}, α/r")
    ax2.semilogy(curves[(r, True)], color=f"C{i}", ls="--", label=f"r={r}, α/√r")
ax2.set_xlabel("Adam step")
ax2.set_ylabel("training loss")
ax2.legend(fontsize=7, ncol=2)
ax2.set_title("fitting the rank-4 task")
show(fig, "lora_scaling.png")

# %% [markdown]
# What came out: at small ranks the two scalings train alike (Adam divides each gradient by its
# own running size, so a constant factor in the gradient matters little), and at the largest
# rank $\alpha/\sqrt r$ ends lower. That is the direction of the rsLoRA paper's finding on
# LLaMA fine-tuning: with $\alpha / r$ larger ranks barely help, with $\alpha/\sqrt r$ they
# do. (This toy task is small and its ideal update has rank 4, so read the gap as an
# illustration, not a measurement.) minidora offers both: `LoRALinear(..., rslora=True)`.

# %%
assert minidora.LoRALinear(nn.Linear(d, d), r=16, alpha=32).scaling == 32 / 16
assert minidora.LoRALinear(nn.Linear(d, d), r=16, alpha=32, rslora=True).scaling == 32 / 4

# %% [markdown]
# ## 5. Parameter counts
#
# A rank-$r$ adapter on a [out, in] layer trains $r\,(in + out)$ numbers instead of
# $out \cdot in$. For a 4096 x 4096 attention projection of a 7B model:

# %%
for r in (1, 8, 64):
    n_lora, n_full = r * (4096 + 4096), 4096 * 4096
    print(f"  r = {r:2d}: {n_lora:9,d} trainable instead of {n_full:,d} "
          f"({100 * n_lora / n_full:.2f} %)")

# and counted by minidora on a small model
mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
n_total = sum(p.numel() for p in mlp.parameters())
minidora.wrap(mlp, "lora", target_modules=["0", "2"], r=8, alpha=16)
rep = minidora.report(mlp)
print(rep)
assert rep.trainable_params == 8 * (d + 4 * d) + 8 * (4 * d + d)
assert rep.total_params == n_total + rep.trainable_params

# %% [markdown]
# ### Check your understanding
#
# 3. A rank-16 adapter on a 7B model's MLP up-projection, [out, in] = [11008, 4096]: how many
#    trainable numbers, and what share of the layer's $11008 \cdot 4096$?

# %%
n_adapter = 16 * (4096 + 11008)                  # r (in + out)
assert n_adapter == 241_664 and round(100 * n_adapter / (11008 * 4096), 2) == 0.54
print(f"{n_adapter:,d} numbers, 0.54 % of the layer")

# %% [markdown]
# ## 6. Merging: no cost at inference
#
# After training, $W = W_0 + s\,BA$ is an ordinary weight of the same shape: fold it in and the
# model runs exactly as fast as before. We check our layer against `minidora.LoRALinear` in
# float64 (same A and B: same outputs and gradients to rounding), then merge.

# %%
torch.manual_seed(1)
base64 = nn.Linear(d, d - 3).double()                 # out != in, to catch a transposition
mine = MyLoRALinear(base64, r=4, alpha=8).double()
theirs = minidora.LoRALinear(base64, r=4, alpha=8, adapter_dtype=torch.float64)
with torch.no_grad():
    mine.B.normal_()                                  # away from init, so the update is real
    theirs.lora_A.copy_(mine.A)
    theirs.lora_B.copy_(mine.B)
xx = torch.randn(7, d, dtype=torch.float64)
g = torch.randn(7, d - 3, dtype=torch.float64)
y_mine, y_theirs = mine(xx), theirs(xx)
(y_mine * g).sum().backward()
(y_theirs * g).sum().backward()
tol = lambda ref: 1e-12 + 1e-12 * ref.abs()           # float64, a handful of roundings
assert ((y_mine - y_theirs).abs() <= tol(y_theirs)).all()
assert ((mine.A.grad - theirs.lora_A.grad).abs() <= tol(theirs.lora_A.grad)).all()
assert ((mine.B.grad - theirs.lora_B.grad).abs() <= tol(theirs.lora_B.grad)).all()
print("our 12-line LoRA and minidora.LoRALinear agree: outputs and gradients, float64")

with torch.no_grad():
    W_merged = base64.weight + mine.scaling * mine.B @ mine.A   # [out, in]
    merged_by_hand = F.linear(xx, W_merged, base64.bias)
    err = theirs.merge()                                         # folds s B A into base64
    y_merged = theirs(xx)
assert ((merged_by_hand - y_theirs).abs() <= tol(y_theirs)).all()
assert ((y_merged - y_theirs).abs() <= tol(y_theirs)).all() and err < 1e-15
theirs.unmerge()
print(f"merged: same outputs (weight error {err:.1e}); unmerged again: {theirs}")

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/01_solutions.py](solutions/01_solutions.py).
#
# ### Exercise 1: the scaling, and rsLoRA at a large rank
#
# (a) Write `my_scaling(alpha, r, rslora)`, the factor $s$ that multiplies $BA$.
#
# (b) Section 4 found $\lVert \partial L/\partial B\rVert \propto s\sqrt r$ at init. Write
# `grad_ratio(r, r0, rslora)`: the predicted $\lVert \partial L/\partial B\rVert$ at rank `r`
# divided by the one at rank `r0`, for the same $\alpha$. How much smaller is the gradient at
# $r = 256$ than at $r = 4$ with $\alpha/r$, and with $\alpha/\sqrt r$?
#
# The classic mistake is to scale by $\alpha$ itself, forgetting the $1/r$: each rank then needs
# its own learning rate, and only $r = 1$ looks right.

# %%
def my_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    raise NotImplementedError("exercise 1 (a): your code here")


def grad_ratio(r: int, r0: int, rslora: bool = False) -> float:
    """Predicted |dL/dB| at init at rank r, over the one at rank r0 (same alpha)."""
    raise NotImplementedError("exercise 1 (b): your code here")


# %%
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


try:
    check_exercise_1(my_scaling, grad_ratio)
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: the initialisation
#
# Write `my_init_(A, B)`, which initialises an adapter's $A$ [r, in] and $B$ [out, r] in place
# as section 3 describes. The check builds a layer with them and asks three questions: does it
# equal its base at step 0, is $A$ spread over $U(\pm 1/\sqrt{in})$, does $B$ get a gradient?
# Then try the classic mistake, a random $B$ (`nn.init.normal_(B)`), and see which question
# catches it.

# %%
def my_init_(A: torch.Tensor, B: torch.Tensor) -> None:
    """Initialise A [r, in] and B [out, r] in place, as LoRA does."""
    raise NotImplementedError("exercise 2: your code here")


# %%
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


try:
    check_exercise_2(my_init_)
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: merge and unmerge
#
# Write `my_merge(W0, A, B, s)`, the merged weight [out, in], and `my_unmerge(W, A, B, s)`,
# which gives $W_0$ back. The check compares the merged layer with the adapter in float64 and
# asks for $W_0$ after the round trip. Classic mistakes: forgetting $s$, and the transposed
# product $A^\top B^\top$ (the wrong shape whenever out $\neq$ in; a square weight hides it).

# %%
def my_merge(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """W0 [out, in], A [r, in], B [out, r] -> the merged weight [out, in]."""
    raise NotImplementedError("exercise 3: your code here")


def my_unmerge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The merged weight W [out, in] -> W0 [out, in]."""
    raise NotImplementedError("exercise 3: your code here")


# %%
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


try:
    check_exercise_3(my_merge, my_unmerge)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
