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
# # 3. DoRA: formula, gradient, and the detach trick
#
# **Learning objectives.** You will be able to:
#
# - write DoRA's forward pass (eq. 5) from the formula, with the norm over the right axis;
# - derive its gradient (eqs. 6-7) and check a closed form against autograd;
# - explain what treating the norm as a constant (section 4.3) changes, in the gradient and in
#   the memory kept for backward;
# - verify a layer with `torch.autograd.gradcheck`, and know why the detached form fails it.
#
# **Prerequisites.** You should know:
#
# - tutorials 1 and 2 (LoRA; magnitude and direction);
# - the chain rule, for a vector divided by its norm;
# - that autograd keeps tensors from forward for the backward pass.
#
# DoRA (Liu et al., ICML 2024, arXiv 2402.09353) trains the magnitude of each weight row
# directly, and the direction through a LoRA update. This tutorial:
#
# 1. writes the formula (eq. 5) in plain PyTorch and checks it against `minidora.DoRALinear`;
# 2. derives its gradient (eqs. 6-7) and checks the closed form against autograd;
# 3. explains the section 4.3 trick (treat the norm as a constant in backward) and measures the
#    memory it saves;
# 4. runs `torch.autograd.gradcheck`;
#
# and ends with three exercises.

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
# ## 1. The formula (eq. 5)
#
# $$ W' = \underbrace{m}_{\text{trained}} \cdot \frac{V'}{\lVert V' \rVert_r},
#    \qquad V' = W_0 + s\,BA, \qquad c_n = \lVert V'[n] \rVert $$
#
# one magnitude per **output row** $n$. (The paper's "column norm": its
# $W \in \mathbb{R}^{d\times k}$ is [in, out], so a column holds the weights of one output;
# code that takes norms over `dim=0` of a PyTorch [out, in] weight normalises the wrong axis.)
# At init $B = 0$ and $m = \lVert W_0 \rVert_r$, so $W' = W_0$. The bias is never scaled.
#
# Building $W'$ is the clearest way to write it:

# %%
def my_dora(x, W0, b, A, B, m, s, detach_norm=False):
    """x [..., in] -> [..., out], by building V' and W' ([out, in])."""
    V = W0 + s * (B @ A)                                    # [out, in]
    c = torch.linalg.vector_norm(V, dim=1)                  # [out]
    if detach_norm:
        c = c.detach()
    return F.linear(x, (m / c)[:, None] * V, b)


out_f, in_f, r = 12, 10, 3
dt = torch.float64
base = nn.Linear(in_f, out_f, dtype=dt)
layer = minidora.DoRALinear(base, r=r, alpha=6, detach_norm=False, adapter_dtype=dt)
x = torch.randn(4, 5, in_f, dtype=dt)
assert torch.allclose(layer(x), base(x), rtol=1e-13, atol=1e-13), "at init DoRA = the base layer"
with torch.no_grad():  # move everything away from its init, so every term is exercised
    layer.lora_B.normal_()
    layer.magnitude.mul_(1 + 0.2 * torch.randn(out_f, dtype=dt))

W0, b = base.weight, base.bias
A, B, m, s = layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling
tol = lambda ref: 1e-12 + 1e-12 * ref.abs()              # float64, a few dozen roundings
y_mine = my_dora(x, W0, b, A, B, m, s)
y_theirs = layer(x)
assert ((y_mine - y_theirs).abs() <= tol(y_theirs)).all()
print("my_dora and minidora.DoRALinear agree (float64):", (y_mine - y_theirs).abs().max().item())

# %% [markdown]
# `DoRALinear` gets there without ever forming $W'$ (or any other [out, in] matrix): with
# $k = m / c$, $\; y = k \odot (x W_0^\top + s\, x A^\top B^\top) + b$, and since $W_0$ is
# frozen, $c^2$ comes from cached row norms of $W_0$ plus [out, r]-sized terms:
#
# $$c_n^2 = \lVert W_0[n]\rVert^2 + 2s\,[(W_0A^\top)\odot B]_n\mathbf 1
#   + s^2[(BAA^\top)\odot B]_n\mathbf 1 .$$
#
# ## 2. The gradient (eqs. 6-7)
#
# Let $G = \partial L / \partial W'$ ([out, in]; for $y = xW'^\top$ it is $g^\top x$ summed
# over tokens, $g = \partial L/\partial y$). Per row $n$, with $v = V'[n]$, $c = \lVert v\rVert$:
#
# $$ \nabla_{m_n} L = \frac{G[n] \cdot v}{c}  \qquad (7) $$
#
# $$ \nabla_{v} L = \frac{m_n}{c}\Big(I - \frac{v v^\top}{c^2}\Big) G[n]  \qquad (6) $$
#
# and through $V' = W_0 + sBA$: $\nabla_B L = s\, \nabla_{V'}L\, A^\top$,
# $\nabla_A L = s\, B^\top \nabla_{V'} L$.
#
# Eq. 6 says two things the paper builds on: the gradient reaching the direction is **scaled by
# $m/c$** and **projected orthogonally to the current weight** (the part of $G$ along $v$ can
# only change the length, and the length is $m$'s job).

# %%
g = torch.randn(4, 5, out_f, dtype=dt)                   # dL/dy
G = torch.einsum("...o,...i->oi", g, x)                  # dL/dW' [out, in]
with torch.no_grad():
    V = W0 + s * (B @ A)                                 # [out, in]
    c = V.norm(dim=1, keepdim=True)                      # [out, 1]
    grad_m = (G * V).sum(1) / c[:, 0]                    # eq. 7
    proj = G - V * (V * G).sum(1, keepdim=True) / c**2   # (I - v v^T / c^2) G[n], per row
    grad_V = (m[:, None] / c) * proj                     # eq. 6
    grad_B, grad_A = s * grad_V @ A.T, s * B.T @ grad_V
    grad_V_detached = (m[:, None] / c) * G               # c treated as a constant

(y_theirs * g).sum().backward()
for name, mine, ref in (("m", grad_m, m.grad), ("A", grad_A, A.grad), ("B", grad_B, B.grad)):
    assert ((mine - ref).abs() <= tol(ref) * 10).all(), name
print("closed-form gradients (eqs. 6-7) = autograd through DoRALinear, for m, A and B")
print(f"the direction gradient is orthogonal to each row: max |cos| = "
      f"{F.cosine_similarity(grad_V, V, dim=1).abs().max():.1e}")
assert F.cosine_similarity(grad_V, V, dim=1).abs().max() < 1e-12

# %% [markdown]
# ### Check your understanding
#
# 1. Double $m$ and leave $A$ and $B$ alone: what happens to $y - b$?
# 2. At init ($B = 0$, $m = \lVert W_0\rVert_r$), which of $m$, $A$, $B$ get a non-zero
#    gradient?
#
# Predict, then run the cell below; the asserts give the answers.

# %%
# 1. W' = (m / c) V' is linear in m: y - b doubles
y_double = my_dora(x, W0, b, A, B, 2 * m, s)
assert torch.allclose(y_double - b, 2 * (y_mine - b), rtol=1e-12, atol=1e-12)
# 2. m and B do; A does not: grad A = s B^T grad V' is zero while B is
fresh = minidora.DoRALinear(nn.Linear(in_f, out_f, dtype=dt), r=r, alpha=6, adapter_dtype=dt)
(fresh(x) ** 2).sum().backward()
assert torch.count_nonzero(fresh.lora_A.grad) == 0
assert fresh.lora_B.grad.norm() > 0 and fresh.magnitude.grad.norm() > 0
print("at init: grad m and grad B are non-zero, grad A is zero (as in LoRA)")

# %% [markdown]
# ## 3. Section 4.3: treat the norm as a constant
#
# The exact gradient needs the backward pass of $c = \lVert W_0 + sBA \rVert_r$, so autograd has
# to keep $V'$, a full [out, in] matrix per adapted layer, from forward to backward. The paper
# proposes to treat $c$ as a constant ("detach" it): $\nabla_{V'} L = \tfrac{m}{c} G$, with no
# projection. Every result of the paper uses it, and so do PEFT, torchtune and minidora by
# default (`DoRALinear(..., detach_norm=True)`). How different is that gradient?

# %%
cos = F.cosine_similarity(grad_V.flatten(), grad_V_detached.flatten(), dim=0).item()
rel = ((grad_V - grad_V_detached).norm() / grad_V.norm()).item()
print(f"exact vs detached direction gradient: cosine {cos:.4f}, relative difference {rel:.3f}")
assert 0.5 < cos < 1 and 0 < rel

layer_d = minidora.DoRALinear(base, r=r, alpha=6, detach_norm=True, adapter_dtype=dt)
with torch.no_grad():
    for p_d, p in zip((layer_d.lora_A, layer_d.lora_B, layer_d.magnitude), (A, B, m),
                      strict=True):
        p_d.copy_(p)
(layer_d(x) * g).sum().backward()
grad_B_detached = s * grad_V_detached @ A.T
assert ((grad_B_detached - layer_d.lora_B.grad).abs() <= tol(layer_d.lora_B.grad) * 10).all()
assert ((layer_d.magnitude.grad - grad_m).abs() <= tol(grad_m) * 10).all()  # eq. 7 unchanged
print("detach_norm=True gives exactly (m/c) G for V' and the same gradient for m")

# %% [markdown]
# The gradient for $m$ is unchanged; the direction's gradient keeps a component along $v$ that
# the exact one removes. The paper's ablation (section 4.3) finds the effect on accuracy
# negligible, while the memory saving is real.
#
# **Measuring the memory.** What autograd keeps for the backward pass is visible with
# `torch.autograd.graph.saved_tensors_hooks`: we add up the bytes of the distinct storages saved
# during one forward, not counting the weights and the input, which exist anyway. Two
# implementations, each with exact and detached norms:
#
# - *the straightforward one*, as PEFT writes it:
#   $y = \tfrac{m}{c}(x W_0^\top + s\,xA^\top B^\top) + b$
#   with $c$ computed from the [out, in] matrix $W_0 + sBA$ (under `no_grad` when detached);
# - *minidora's* `DoRALinear`, which never forms an [out, in] matrix.

# %%
def saved_bytes(fn, existing):
    """Bytes of the distinct tensors autograd saves for backward while running fn(), not
    counting tensors that exist anyway (`existing`: weights, parameters, the input)."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def straightforward_dora(x, base, A, B, m, s, detach_norm):
    if detach_norm:
        with torch.no_grad():
            c = torch.linalg.vector_norm(base.weight + s * (B @ A), dim=1)   # [out]
    else:
        c = torch.linalg.vector_norm(base.weight + s * (B @ A), dim=1)       # [out]
    lora = s * (x @ A.T) @ B.T                                               # [..., out]
    return (m / c) * (F.linear(x, base.weight) + lora) + base.bias


d_big = 256 if SMALL else 2048
big = nn.Linear(d_big, d_big).requires_grad_(False)
xb = torch.randn(16, d_big)
rows = []
for detach in (False, True):
    lay = minidora.DoRALinear(big, r=8, alpha=16, detach_norm=detach)
    existing = [xb, *big.parameters(), *lay.parameters(), *lay.buffers()]
    n_straight, y1 = saved_bytes(lambda lay=lay, detach=detach: straightforward_dora(
        xb, big, lay.lora_A, lay.lora_B, lay.magnitude, lay.scaling, detach), existing)
    n_minidora, y2 = saved_bytes(lambda lay=lay: lay(xb), existing)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-5)
    rows.append((detach, n_straight, n_minidora))
weight_mib = d_big * d_big * 4 / 2**20
print(f"one {d_big}x{d_big} layer (its float32 weight: {weight_mib:.1f} MiB), x [16, {d_big}]:")
print(f"{'norm':>10} {'straightforward':>18} {'minidora':>12}   (new memory kept for backward)")
for detach, n1, n2 in rows:
    print(f"{'detached' if detach else 'exact':>10} {n1 / 2**20:>14.2f} MiB {n2 / 2**20:>8.2f} MiB")
(_, exact_straight, exact_mini), (_, det_straight, det_mini) = rows
assert exact_straight - det_straight >= d_big * d_big * 4        # at least one [out, in] matrix
assert max(exact_mini, det_mini) < 0.5 * d_big * d_big * 4       # never an [out, in] matrix

fig, ax = plt.subplots(figsize=(6.5, 3))
labels = ["straightforward\nexact", "straightforward\ndetached", "minidora\nexact",
          "minidora\ndetached"]
vals = [exact_straight, det_straight, exact_mini, det_mini]
ax.bar(labels, [v / 2**20 for v in vals], color=["C3", "C1", "C0", "C2"])
ax.axhline(weight_mib, color="k", ls=":", label="size of W0 (float32)")
ax.set_ylabel("new MiB kept for backward")
ax.set_title(f"one DoRA layer, {d_big} x {d_big}")
ax.legend()
show(fig, "dora_saved_memory.png")

# %% [markdown]
# With the straightforward implementation, detaching the norm frees the [out, in] matrices that
# the norm's backward would need: on a 7B model that is one weight-sized buffer per adapted
# layer, which is where the paper's 24 % memory saving on LLaMA comes from. minidora's layer
# gets the norm from [out, r]-sized pieces, so it keeps no such matrix in either mode, and the
# exact gradient costs almost nothing extra.
#
# ## 4. gradcheck
#
# Finite differences in float64 against autograd, for the input and all three trained
# tensors, through `DoRALinear` with the exact gradient. The detached version **must fail**:
# finite differences see $c$ move, and its gradient pretends it does not. A zero row of $W_0$
# (real models have them) must not produce NaN.

# %%
def as_function(layer):
    def f(x, A, B, m):
        params = {"lora_A": A, "lora_B": B, "magnitude": m}
        return torch.func.functional_call(layer, params, (x,))
    return f


inputs = tuple(t.detach().clone().requires_grad_(True)
               for t in (torch.randn(3, in_f, dtype=dt), A, B, m))
assert torch.autograd.gradcheck(as_function(layer), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
print("gradcheck of DoRALinear (exact gradient): passed")
assert torch.autograd.gradcheck(lambda *a: my_dora(a[0], W0, b, *a[1:], s), inputs)
print("gradcheck of my_dora (exact gradient): passed")
passed = torch.autograd.gradcheck(as_function(layer_d), inputs, raise_exception=False)
assert not passed
print("gradcheck of the detached version: fails, as it must")

with torch.no_grad():
    base_zero = nn.Linear(in_f, out_f, dtype=dt)
    base_zero.weight[3] = 0                                     # a dead output row
lay0 = minidora.DoRALinear(base_zero, r=r, alpha=6, detach_norm=False, adapter_dtype=dt)
y0 = lay0(x)
(y0 * g).sum().backward()
assert torch.isfinite(y0).all() and all(torch.isfinite(p.grad).all() for p in
                                        (lay0.lora_A, lay0.lora_B, lay0.magnitude))
print("a zero row: finite output and gradients (c is clamped at eps, as F.normalize does)")

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/03_solutions.py](solutions/03_solutions.py).
#
# ### Exercise 1: the norm, over the right axis
#
# Write `my_dora_norm(V)`: DoRA's $c$, one norm per output row of $V'$ [out, in]. The check
# compares it with `DoRALinear.weight_norm()`. Once it passes, reintroduce the classic bug (the
# norm over `dim=0`, as some blog code has it) and watch the check catch it, on the square
# weight first, where the shape is still right.

# %%
def my_dora_norm(V: torch.Tensor) -> torch.Tensor:
    """V: [out, in] -> c: [out], the norm of each output row."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(my_dora_norm):
    torch.manual_seed(21)
    for out_f, in_f in ((8, 8), (12, 10)):      # square first: there the shape cannot tell
        lay = minidora.DoRALinear(nn.Linear(in_f, out_f, dtype=torch.float64), r=3, alpha=6,
                                  adapter_dtype=torch.float64)
        with torch.no_grad():
            lay.lora_B.normal_()
            V = lay.base.weight + lay.scaling * lay.lora_B @ lay.lora_A          # [out, in]
        c = my_dora_norm(V)
        assert c.shape == (out_f,), f"one norm per output row: shape ({out_f},), got {c.shape}"
        assert torch.allclose(c, lay.weight_norm().detach(), rtol=1e-10, atol=0), \
            f"{out_f}x{in_f} weight: wrong norms; over which axis did you sum?"


try:
    check_exercise_1(my_dora_norm)
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: $c^2$ without building $V'$
#
# Section 1 quoted the identity `DoRALinear` uses. Derive it: expand
# $\lVert W_0[n] + s\,(BA)[n]\rVert^2$ into three terms, and write `my_row_norm_sq` from what
# it receives: the cached $\lVert W_0[n]\rVert^2$ [out], the product $W_0A^\top$ [out, r], $A$,
# $B$ and $s$. ($W_0$ itself is not passed: the point is never to hold an [out, in] matrix.)
# The classic mistakes are a missing factor 2 on the cross term and $s$ where $s^2$ belongs;
# the check uses two values of $s$ to tell them apart.

# %%
def my_row_norm_sq(w0_norm_sq: torch.Tensor, W0_At: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor, s: float) -> torch.Tensor:
    """||W0 + s B A||^2 per row: [out], from ||W0[n]||^2 [out], W0 A^T [out, r], A [r, in],
    B [out, r], without any [out, in] matrix."""
    raise NotImplementedError("exercise 2: your code here")


# %%
def check_exercise_2(my_row_norm_sq):
    torch.manual_seed(22)
    W0 = torch.randn(20, 30, dtype=torch.float64)
    A, B = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    for s in (0.5, 2.0):
        got = my_row_norm_sq((W0 * W0).sum(1), W0 @ A.T, A, B, s)
        want = torch.linalg.vector_norm(W0 + s * B @ A, dim=1) ** 2
        assert got.shape == want.shape, f"expected shape {tuple(want.shape)}, got {got.shape}"
        assert torch.allclose(got, want, rtol=1e-10, atol=0), \
            f"s = {s}: wrong c^2; expand ||w + s v||^2 = ||w||^2 + 2s w.v + s^2 ||v||^2"


try:
    check_exercise_2(my_row_norm_sq)
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: why $m$ stays in float32
#
# minidora keeps the magnitude in float32 even over a bfloat16 base. bfloat16 has 8 significant
# bits: between 1 and 2 its values are $2^{-7}$ apart. Write `lost_update(value)`: the largest
# step $d \ge 0$ for which `bfloat16(value + d) == value`, for `value` a power of two (round to
# nearest, ties to even). An Adam step is about the learning rate in size, typically $10^{-4}$
# to $10^{-3}$; compare that with your answer for a magnitude of 1. The classic mistake is the
# spacing itself: a step of one spacing lands exactly on the next value.

# %%
def lost_update(value: float) -> float:
    """The largest d >= 0 with bfloat16(value + d) == value, for value a power of two."""
    raise NotImplementedError("exercise 3: your code here")


# %%
def check_exercise_3(lost_update):
    for value in (1.0, 0.25, 4.0):
        d = lost_update(value)
        v, vd = torch.tensor(value), torch.tensor(value + d)              # float32
        assert vd.to(torch.bfloat16) == v, f"value {value}: a step of {d} is not lost in bfloat16"
        above = torch.nextafter(vd, torch.tensor(math.inf))
        assert above.to(torch.bfloat16) != v, \
            f"value {value}: steps a little larger than {d} are lost too; look for the largest"


try:
    check_exercise_3(lost_update)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
