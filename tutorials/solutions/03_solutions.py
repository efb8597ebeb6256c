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
# # Solutions: 3. DoRA
#
# The exercises of [tutorial 3](../03_dora.py). Each solution is followed by the check the
# tutorial runs (the same code, copied) and by the classic mistakes that check catches. Run it
# as a script: it stops at the first solution that fails its check, or at the first mistake a
# check lets through.

# %%
import math

import torch
import torch.nn as nn
from checking import must_fail  # tutorials/solutions/checking.py

import minidora
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the norm, over the right axis

# %%
def my_dora_norm(V: torch.Tensor) -> torch.Tensor:
    """V: [out, in] -> c: [out], the norm of each output row."""
    return torch.linalg.vector_norm(V, dim=1)


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

check_exercise_1(my_dora_norm)
print("exercise 1: correct")
must_fail(check_exercise_1, lambda V: torch.linalg.vector_norm(V, dim=0))   # the wrong axis

# %% [markdown]
# ## Exercise 2: $c^2$ without building $V'$
#
# With $w = W_0[n]$ and $v = (BA)[n] = B[n]\,A$:
# $\lVert w + s v\rVert^2 = \lVert w\rVert^2 + 2s\, w\cdot v + s^2 \lVert v\rVert^2$, where
# $w \cdot v = W_0[n]\,A^\top B[n]^\top = [(W_0A^\top) \odot B]_n \mathbf 1$ and
# $\lVert v\rVert^2 = B[n]\,(AA^\top)\,B[n]^\top = [(B\,AA^\top) \odot B]_n \mathbf 1$.
# Everything is [out, r] or [r, r].

# %%
def my_row_norm_sq(w0_norm_sq: torch.Tensor, W0_At: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor, s: float) -> torch.Tensor:
    """||W0 + s B A||^2 per row: [out], from ||W0[n]||^2 [out], W0 A^T [out, r], A [r, in],
    B [out, r], without any [out, in] matrix."""
    cross = (W0_At * B).sum(1)                                   # [out]  W0[n] . (BA)[n]
    quad = ((B @ (A @ A.T)) * B).sum(1)                          # [out]  ||(BA)[n]||^2
    return w0_norm_sq + 2 * s * cross + s * s * quad


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

check_exercise_2(my_row_norm_sq)
print("exercise 2: correct")
must_fail(check_exercise_2, lambda n, WA, A, B, s:                   # no factor 2
          n + s * (WA * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1))
must_fail(check_exercise_2, lambda n, WA, A, B, s:                   # s where s^2 belongs
          n + 2 * s * (WA * B).sum(1) + s * ((B @ (A @ A.T)) * B).sum(1))

# %% [markdown]
# ## Exercise 3: why $m$ stays in float32
#
# Next to `value` (a power of two) the bfloat16 values are `value * 2**-7` apart. A sum lands
# on the nearer neighbour; exactly half-way, on the one with an even last bit, which is `value`
# itself. So every step up to half the spacing, `value * 2**-8`, is lost: 0.0039 for a
# magnitude of 1, several times an Adam step of 1e-3.

# %%
def lost_update(value: float) -> float:
    """The largest d >= 0 with bfloat16(value + d) == value, for value a power of two."""
    return value * 2.0 ** -8


def check_exercise_3(lost_update):
    for value in (1.0, 0.25, 4.0):
        d = lost_update(value)
        v, vd = torch.tensor(value), torch.tensor(value + d)              # float32
        assert vd.to(torch.bfloat16) == v, f"value {value}: a step of {d} is not lost in bfloat16"
        above = torch.nextafter(vd, torch.tensor(math.inf))
        assert above.to(torch.bfloat16) != v, \
            f"value {value}: steps a little larger than {d} are lost too; look for the largest"

check_exercise_3(lost_update)
print("exercise 3: correct")
m_bf16, m_fp32 = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0)
for _ in range(100):                                                   # 100 Adam-sized steps
    m_bf16, m_fp32 = m_bf16 + 1e-3, m_fp32 + 1e-3
print(f"  100 steps of 1e-3 on m = 1: {m_bf16.item()} in bfloat16, {m_fp32.item():.4f} in float32")
assert m_bf16.item() == 1.0 and abs(m_fp32.item() - 1.1) < 1e-5
must_fail(check_exercise_3, lambda value: value * 2.0 ** -7)           # the spacing itself
