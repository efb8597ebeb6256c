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
# # Solutions: 6. The fast path
#
# The exercises of [tutorial 6](../06_fast_path.py). Each solution is followed by the check the
# tutorial runs (the same code, copied) and by the classic mistakes that check catches. Run it
# as a script: it stops at the first solution that fails its check, or at the first mistake a
# check lets through.

# %%
import torch
from checking import must_fail  # tutorials/solutions/checking.py

from minidora import nf4
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the arithmetic intensity of a decode step
#
# $2MNK$ FLOP over $NK\,b/8 + (MK + MN)\,a$ bytes. At $M = 1$, $N = K = 4096$: 0.9995 FLOP/byte
# in bfloat16 ($b = 16$), 3.87 in NF4 + DQ: either way a few FLOP per byte, far below what any
# processor can do per byte it loads.

# %%
def intensity(M: int, N: int, K: int, weight_bits: float, act_bytes: float) -> float:
    """FLOP per byte moved by y = x W^T, x [M, K], W [N, K]."""
    flops = 2 * M * N * K                                         # a multiply and an add
    nbytes = N * K * weight_bits / 8 + (M * K + M * N) * act_bytes
    return flops / nbytes


def check_exercise_1(intensity):
    cases = {(1, 4096, 4096, 16, 2): 0.999512, (1, 4096, 4096, 4.127, 2): 3.86958,
             (4096, 4096, 4096, 4.127, 4): 961.968, (64, 4096, 11008, 32, 4): 31.3284}
    for args, want in cases.items():
        got = intensity(*args)
        assert abs(got - want) < 1e-5 * want, \
            f"intensity{args} = {got:.6g} is wrong; count FLOPs (2 per multiply-add) and bytes"

check_exercise_1(intensity)
print("exercise 1: correct")
must_fail(check_exercise_1, lambda M, N, K, b, a: M * N * K / (N * K * b / 8 + (M * K + M * N) * a))
must_fail(check_exercise_1, lambda M, N, K, b, a: 2 * M * N * K / (N * K * b + (M * K + M * N) * a))

# %% [markdown]
# ## Exercise 2: when does the batch become compute-bound?
#
# With $N = K$ and 2-byte activations the intensity is $2MK / (Kb/8 + 4M)$, which grows with
# $M$ towards $K/2$. It reaches $\beta$ at $M \ge \beta K b / (8(2K - 4\beta))$: 230 for a
# bfloat16 layer on the GPU of the exercise, 60 for NF4. Dropping the activations gives
# $\beta b / 16$: 207 and 54.

# %%
def crossover_m(weight_bits: float, balance: float) -> int:
    """Smallest M >= 1 with intensity(M, 4096, 4096, weight_bits, 2) >= balance."""
    M = 1
    while intensity(M, 4096, 4096, weight_bits, 2) < balance:
        M += 1
    return M


def check_exercise_2(crossover_m):
    balance = 989e12 / 4.8e12                                        # FLOP per byte
    cases = {(16, balance): 230, (4.127, balance): 60, (16, 50.0): 52, (4.127, 50.0): 14}
    for (bits_w, beta), want in cases.items():
        got = crossover_m(bits_w, beta)
        assert got == want, \
            f"crossover_m({bits_w}, {beta:.2f}) = {got} is wrong; count the activations too"

check_exercise_2(crossover_m)
print(f"exercise 2: correct; compute-bound from M = {crossover_m(16, 989 / 4.8)} in bfloat16, "
      f"from M = {crossover_m(4.127, 989 / 4.8)} in NF4 + DQ")
must_fail(check_exercise_2, lambda b, beta: int(-(-beta * b // 16)))   # activations dropped

# %% [markdown]
# ## Exercise 3: blocks that span rows

# %%
def fused_nf4_linear_any(x: torch.Tensor, q: nf4.NF4Weight) -> torch.Tensor:
    """y = x @ dequantize(q).T without a dense weight, for any shape. x [M, K] -> [M, N]."""
    n_out, k = q.shape
    bs, table, scales = q.blocksize, nf4.NF4_CODEBOOK, q.scales()
    y = torch.zeros(x.shape[0], n_out)
    for n in range(n_out):
        acc = torch.zeros(x.shape[0])
        e, row_end = n * k, (n + 1) * k                  # flat indices of the row's elements
        while e < row_end:
            b = e // bs                                  # the block that holds element e
            end = min((b + 1) * bs, row_end)             # up to the end of the block or row
            idx = torch.arange(e, end)
            byte = q.packed[idx // 2]
            codes = torch.where(idx % 2 == 0, byte >> 4, byte & 0xF).long()   # high nibble first
            acc += x[:, e - n * k:end - n * k] @ (table[codes] * scales[b])
            e = end
        y[:, n] = acc
    return y


def check_exercise_3(fused_nf4_linear_any):
    torch.manual_seed(63)
    for (n, k), bs in (((10, 100), 64), ((7, 96), 32), ((5, 13), 32)):
        q = nf4.quantize(torch.randn(n, k) * 0.02, blocksize=bs, double_quant=True)
        x = torch.randn(3, k)
        W = nf4.dequantize(q, torch.float32)                             # [n, k]
        y = fused_nf4_linear_any(x, q)
        assert y.shape == (3, n), f"expected shape (3, {n}), got {tuple(y.shape)}"
        bound = 1e-6 * (x.abs() @ W.abs().T) + 1e-7                     # float32 rounding
        assert ((y - x @ W.T).abs() <= bound).all(), \
            f"W {n}x{k}, blocksize {bs}: wrong output; blocks may start in the middle of a row"

check_exercise_3(fused_nf4_linear_any)
print("exercise 3: correct")


def blocks_per_row(x, q):                # numbers the blocks as if every row started one
    n_out, k = q.shape
    bs, scales = q.blocksize, q.scales()
    w = nf4.NF4_CODEBOOK[torch.stack([q.packed >> 4, q.packed & 0xF], 1).view(-1).long()]
    w = w[: n_out * k].view(n_out, k)
    per_row = -(-k // bs)
    block = torch.arange(n_out)[:, None] * per_row + torch.arange(k)[None, :] // bs
    return x @ (w * scales[block.clamp(max=scales.numel() - 1)]).T


must_fail(check_exercise_3, blocks_per_row)
