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
# # 6. The fast path: a fused dequantize-matmul
#
# **Learning objectives.** You will be able to:
#
# - compute the arithmetic intensity of a linear layer and tell whether it is limited by
#   memory traffic or by arithmetic;
# - explain why a fused dequantize-matmul beats "dequantize, then matmul" when generating
#   text, and when it stops doing so;
# - read the loop a fused NF4 kernel runs, and extend it to blocks that span rows;
# - check a compiled op against its reference before timing it, and report ratios measured in
#   the same run.
#
# **Prerequisites.** You should know:
#
# - tutorial 4 (the NF4 format);
# - FLOPs, bytes and memory bandwidth;
# - what a matrix product costs in multiply-adds.
#
# The readable reference computes an NF4 layer in two steps: decode the whole weight to a dense
# matrix, then call `F.linear`. Correct, and the specification, but it moves far more memory
# than the 4-bit format needs. minidora's compiled op `torch.ops.minidora.nf4_linear` does both
# in one pass. This tutorial:
#
# 1. explains why small-batch inference ("decode") is limited by memory traffic, not arithmetic;
# 2. writes the fused loop in plain Python, to see what the kernel does;
# 3. checks the compiled op against the reference;
# 4. runs a small benchmark, with ratios against a dense layer measured in the same run;
#
# and ends with three exercises.

# %%
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from minidora import nf4, ops
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; one thread, seed 0
HAVE_C = ops.extension_available()
print("compiled extension minidora._C:", "built" if HAVE_C else "NOT built (reference only)")


# %% [markdown]
# ## 1. Why decode is memory-bound
#
# A linear layer $y = x W^\top$ with $x$ of shape [M, K] and $W$ of shape [N, K] does
# $2MNK$ floating-point operations and must at least read $W$ once: $NK \cdot b/8$ bytes at
# $b$ bits per weight. Generating text one token at a time means $M = 1$ (or a handful of
# sequences): **2 operations per weight read**. The *arithmetic intensity* is
#
# $$ I = \frac{2MNK}{NK\,b/8 + \text{(activations)}} \approx \frac{16M}{b}\ \text{FLOP/byte}. $$
#
# A processor can do far more than that per byte it loads from memory (a modern GPU several
# hundred FLOP per byte of HBM bandwidth, a CPU core with AVX-512 several to a few tens per
# byte of DRAM bandwidth), so at
# small $M$ the time is set by the bytes: **fewer bits per weight means proportionally less
# time**, if, and only if, the weight is read in its compressed form.
#
# The two-step reference does the opposite: it reads the 4-bit weight, *writes* a dense copy
# (4 bytes per weight in float32), then reads that copy again for the matmul.

# %%
N, K = (1024, 1024) if SMALL else (4096, 4096)
bits = {"dense float32": 32, "dense bfloat16": 16, "NF4 + DQ, fused": 4.127,
        "NF4, dequantize then matmul (float32)": 4.127 + 32 + 32}
print(f"bytes moved for the weight of one {N}x{K} layer at M = 1:")
for name, b in bits.items():
    print(f"  {name:40s} {N * K * b / 8 / 2**20:8.2f} MiB  -> intensity {2 * 8 / b:5.2f} FLOP/byte")

Ms = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
fig, ax = plt.subplots(figsize=(7, 3.3))
for name, b in bits.items():
    ax.loglog(Ms, [2 * M * N * K / (N * K * b / 8 + 2 * M * K * 4) for M in Ms], "o-", ms=3,
              label=name)
ax.set_xlabel("M (tokens in the batch)")
ax.set_ylabel("FLOP per byte moved")
ax.set_title("arithmetic intensity of y = x W^T")
ax.legend(fontsize=7)
show(fig, "fast_path_intensity.png")

# %% [markdown]
# ### Check your understanding
#
# 1. At $M = 1$, ignoring activations: what is the arithmetic intensity of a dense bfloat16
#    layer, and of an NF4 + DQ one?
# 2. How many times more weight bytes does the two-step reference move than the fused kernel?
#
# Predict, then run the cell below; the asserts give the answers.

# %%
assert 2 * 8 / 16 == 1.0                                   # 1. bfloat16: 1 FLOP per byte
assert round(2 * 8 / 4.127, 2) == 3.88                     #    NF4 + DQ: 3.88 FLOP per byte
ratio = bits["NF4, dequantize then matmul (float32)"] / bits["NF4 + DQ, fused"]
assert round(ratio, 1) == 16.5                             # 2. (4.127 + 32 + 32) / 4.127
print(f"the two-step reference moves {ratio:.1f}x the bytes of the fused kernel")

# %% [markdown]
# ## 2. The fused loop, in plain Python
#
# For every output row $n$, walk along the row's packed bytes one block of 64 weights (32
# bytes) at a time: split each byte into its two 4-bit codes (high nibble first), look the codes
# up in the 16-entry table, multiply by the block's scale, and accumulate the dot product with
# $x$. The dense weight never exists; the 16 NF4 values live in registers.
#
# The loop below does exactly that, vectorised over the M rows of $x$ and over the 64 weights of
# a block so that it finishes in a reasonable time. It assumes K is a multiple of the block size
# (blocks do not span rows); the compiled kernels also handle the general case.

# %%
def fused_nf4_linear(x, q):
    """y = x @ dequantize(q).T without a dense weight. x [M, K] float32 -> [M, N]."""
    n_out, k = q.shape
    bs = q.blocksize
    assert k % bs == 0, "this teaching version needs whole blocks per row"
    table = nf4.NF4_CODEBOOK                                # [16], "in registers"
    scales = q.scales()                                     # [n_blocks] float32
    y = torch.zeros(x.shape[0], n_out)
    blocks_per_row = k // bs
    for n in range(n_out):
        acc = torch.zeros(x.shape[0])                       # float32 accumulator per row of x
        for j in range(blocks_per_row):
            b = n * blocks_per_row + j                      # block index
            byte = q.packed[b * bs // 2:(b + 1) * bs // 2]  # 32 bytes = 64 codes
            codes = torch.stack([byte >> 4, byte & 0xF], 1).view(-1).long()   # [64]
            w = table[codes] * scales[b]                    # [64], the decoded block
            acc += x[:, j * bs:(j + 1) * bs] @ w            # [M]
        y[:, n] = acc
    return y


q_small = nf4.quantize(torch.randn(48, 256) * 0.02, blocksize=64, double_quant=True)
x_small = torch.randn(3, 256)
y_fused = fused_nf4_linear(x_small, q_small)
y_ref = F.linear(x_small, nf4.dequantize(q_small, torch.float32))
# same products, summed in a different order: float32 rounding, bounded by sum |x||w|
bound = 1e-6 * (x_small.abs() @ nf4.dequantize(q_small, torch.float32).abs().T) + 1e-7
assert ((y_fused - y_ref).abs() <= bound).all()
print("fused Python loop vs dequantize + F.linear: max difference "
      f"{(y_fused - y_ref).abs().max():.1e}")

# %% [markdown]
# ### Check your understanding
#
# 3. With blocksize 64 and double quantization, how many bytes does one block of weights take
#    for its codes, and how many for its scale?

# %%
n_blocks = q_small.absmax.numel()
assert q_small.packed.numel() // n_blocks == 32              # 64 codes of 4 bits
assert q_small.absmax.dtype == torch.uint8                   # one 8-bit scale code per block
print(f"{q_small.packed.numel() // n_blocks} bytes of codes and 1 byte of scale per block "
      "(+ 4 bytes per 256 blocks for the nested float32 scale)")

# %% [markdown]
# ## 3. The compiled op against the reference
#
# All NF4 matmuls in minidora go through one dispatch point, `minidora.ops.nf4_linear(x, q,
# bias, backend=...)`: `"reference"` is the two-step PyTorch version above, `"compiled"` the
# C++ (CPU) or CUDA kernels of `minidora._C`, `"auto"` the compiled one when it is built.
# (`minidora.ops.use_reference()` forces the reference inside a `with` block.)
#
# Dequantization must be **bit-exact**; the matmul may differ by float32 rounding only (the
# kernel sums in a different order), which we bound by $\epsilon \sum_k |x_k||w_k|$.

# %%
q = nf4.quantize(torch.randn(N, K) * 0.02, blocksize=64, double_quant=True)
W_dense = nf4.dequantize(q, torch.float32)                 # [N, K]
if HAVE_C:
    assert torch.equal(ops.nf4_dequantize(q, torch.float32, backend="compiled"), W_dense)
    assert torch.equal(ops.nf4_dequantize(q, torch.bfloat16, backend="compiled"),
                       nf4.dequantize(q, torch.bfloat16))
    for M in (1, 5, 64):
        x = torch.randn(M, K, requires_grad=True)
        y_c = ops.nf4_linear(x, q, backend="compiled")
        y_r = ops.nf4_linear(x, q, backend="reference")
        bound = 2e-6 * (x.detach().abs() @ W_dense.abs().T) + 1e-6
        assert ((y_c - y_r).abs() <= bound).all(), M
        g = torch.randn(M, N)
        gx_c, = torch.autograd.grad(y_c, x, g)
        gx_r, = torch.autograd.grad(y_r, x, g)
        assert ((gx_c - gx_r).abs() <= 2e-6 * (g.abs() @ W_dense.abs()) + 1e-6).all(), M
    print("compiled dequantize: bit-exact; compiled linear and its input gradient: within "
          "float32 rounding of the reference, M = 1, 5, 64")
    print("CPU kernels in use:", ops.cpu_isa())
else:
    print("minidora._C is not built: build it with `make build` to compare and time it")

# %% [markdown]
# ## 4. A small benchmark
#
# Every variant computes the same $y = x W^\top$ for the same 4-bit weight; the dense layers use
# its dequantized values. Each variant is timed in turn, repeatedly, and the median is reported
# together with its ratio to the dense float32 layer measured in the same run: absolute times
# depend on the machine (and its load), ratios much less. The full benchmark, with more sizes
# and bitsandbytes, is `benchmarks/bench_nf4.py` (see the benchmark pages).

# %%
def median_time(fn, repeats):
    fn()                                                    # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


W_bf16 = W_dense.to(torch.bfloat16)
variants = {
    "dense float32": lambda x: F.linear(x, W_dense),
    "dense bfloat16": lambda x: F.linear(x.to(torch.bfloat16), W_bf16),
    "NF4 reference": lambda x: ops.nf4_linear(x, q, backend="reference"),
}
if HAVE_C:
    variants["NF4 compiled"] = lambda x: ops.nf4_linear(x, q, backend="compiled")
Ms_bench = [1, 16] if SMALL else [1, 8, 64]
repeats = 5 if SMALL else 15
results = {}
with torch.no_grad():
    for M in Ms_bench:
        x = torch.randn(M, K)
        results[M] = {name: median_time(lambda f=f, x=x: f(x), repeats)
                      for name, f in variants.items()}

print(f"y = x W^T, W {N}x{K}, one thread; median of {repeats} runs")
print(f"{'M':>4} " + "".join(f"{name:>17}" for name in variants))
for M, row in results.items():
    base_t = row["dense float32"]
    print(f"{M:>4} " + "".join(f"{1e3 * t:>8.2f} ms {base_t / t:>5.2f}x" for t in row.values()))
print("(ratio = dense float32 time / this variant's time: above 1 is faster than dense float32)")
for row in results.values():
    assert all(t > 0 for t in row.values())

fig, ax = plt.subplots(figsize=(7.5, 3.3))
width = 0.8 / len(variants)
for i, name in enumerate(variants):
    ax.bar([j + i * width for j in range(len(Ms_bench))],
           [1e3 * results[M][name] for M in Ms_bench], width, label=name)
ax.set_xticks([j + 0.4 - width / 2 for j in range(len(Ms_bench))], [f"M = {M}" for M in Ms_bench])
ax.set_yscale("log")
ax.set_ylabel("ms (median)")
ax.set_title(f"y = x W^T, W {N} x {K}, one CPU thread")
ax.legend(fontsize=8)
show(fig, "fast_path_benchmark.png")

# %% [markdown]
# What to look for in the table: at $M = 1$ the reference is the slowest by far, since it
# decodes and writes the whole weight before a single multiply; the fused kernel reads 4.127
# bits per weight instead of 32, and its speed relative to dense float32 shows how close it
# comes to the memory-traffic limit on this machine. As $M$ grows, the same weight is reused for
# more rows of $x$, the layer becomes compute-bound, and the dense BLAS matmul (highly tuned) is
# hard to beat; that is why the CUDA op switches to dequantize-then-GEMM for large $M$ (see the
# CUDA benchmark page).

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/06_solutions.py](solutions/06_solutions.py).
#
# ### Exercise 1: the arithmetic intensity of a decode step
#
# Write `intensity(M, N, K, weight_bits, act_bytes)`: the FLOP per byte of $y = x W^\top$ with
# $x$ [M, K] and $W$ [N, K], counting every multiply and every add, the weight read once at
# `weight_bits` per weight, $x$ read and $y$ written at `act_bytes` per value. Then: what is
# it for one decode step ($M = 1$) of a 4096 x 4096 layer in bfloat16, and in NF4 + DQ with
# bfloat16 activations? Classic mistakes: counting a multiply-add as one FLOP, and bits where
# bytes belong.

# %%
def intensity(M: int, N: int, K: int, weight_bits: float, act_bytes: float) -> float:
    """FLOP per byte moved by y = x W^T, x [M, K], W [N, K]."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(intensity):
    cases = {(1, 4096, 4096, 16, 2): 0.999512, (1, 4096, 4096, 4.127, 2): 3.86958,
             (4096, 4096, 4096, 4.127, 4): 961.968, (64, 4096, 11008, 32, 4): 31.3284}
    for args, want in cases.items():
        got = intensity(*args)
        assert abs(got - want) < 1e-5 * want, \
            f"intensity{args} = {got:.6g} is wrong; count FLOPs (2 per multiply-add) and bytes"


try:
    check_exercise_1(intensity)
    print(f"exercise 1: correct; a decode step of a 4096 x 4096 layer: "
          f"{intensity(1, 4096, 4096, 16, 2):.3f} FLOP/byte in bfloat16, "
          f"{intensity(1, 4096, 4096, 4.127, 2):.2f} in NF4 + DQ")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: when does the batch become compute-bound?
#
# A GPU that does $P$ = 989 TFLOP/s in dense bfloat16 and reads $B$ = 4.8 TB/s from memory
# (an H200's data-sheet figures) is limited by memory traffic while a layer's intensity is below
# $P / B \approx 206$ FLOP/byte. Write `crossover_m(weight_bits, balance)`: the smallest $M$ at
# which a 4096 x 4096 layer with bfloat16 activations reaches an intensity of `balance`
# (exercise 1's definition). Counting the matmul's FLOPs only, where does a bfloat16 layer cross
# over, and where does an NF4 one? The classic mistake drops the activations' bytes: fine at
# $M = 1$, badly off at the $M$ this question is about.

# %%
def crossover_m(weight_bits: float, balance: float) -> int:
    """Smallest M >= 1 with intensity(M, 4096, 4096, weight_bits, 2) >= balance."""
    raise NotImplementedError("exercise 2: your code here")


# %%
def check_exercise_2(crossover_m):
    balance = 989e12 / 4.8e12                                        # FLOP per byte
    cases = {(16, balance): 230, (4.127, balance): 60, (16, 50.0): 52, (4.127, 50.0): 14}
    for (bits_w, beta), want in cases.items():
        got = crossover_m(bits_w, beta)
        assert got == want, \
            f"crossover_m({bits_w}, {beta:.2f}) = {got} is wrong; count the activations too"


try:
    check_exercise_2(crossover_m)
    print(f"exercise 2: correct; compute-bound from M = {crossover_m(16, 989 / 4.8)} in bfloat16, "
          f"from M = {crossover_m(4.127, 989 / 4.8)} in NF4 + DQ")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: blocks that span rows
#
# The loop of section 2 needs every row to start a new block. Write `fused_nf4_linear_any`,
# the same computation for any shape: a block may start in the middle of a row, the last block
# may be partial, and an odd number of weights leaves half of the last byte as padding. Walk
# each row's flat element range $[nK, (n+1)K)$ in pieces that end where a block or the row
# ends. The classic mistake numbers the blocks as if every row started one.

# %%
def fused_nf4_linear_any(x: torch.Tensor, q: nf4.NF4Weight) -> torch.Tensor:
    """y = x @ dequantize(q).T without a dense weight, for any shape. x [M, K] -> [M, N]."""
    raise NotImplementedError("exercise 3: your code here")


# %%
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


try:
    check_exercise_3(fused_nf4_linear_any)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
