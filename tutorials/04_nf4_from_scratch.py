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
# # 4. NF4 from scratch
#
# **Learning objectives.** You will be able to:
#
# - derive the 16 NF4 values from normal quantiles, and say how far they are from an equal
#   split of the probability;
# - quantize a weight blockwise with absmax scaling, and pack two 4-bit codes per byte exactly
#   as bitsandbytes does;
# - compare NF4's error with uniform INT4 and FP4 on normally distributed weights;
# - count the bits per parameter with and without double quantization, and turn them into the
#   memory of a 7B model.
#
# **Prerequisites.** You should know:
#
# - the normal distribution: its density, its quantile function;
# - bits, bytes and binary numbers; float32 and bfloat16.
#
# It needs nothing from tutorials 1-3.
#
# QLoRA (Dettmers et al., 2023, arXiv 2305.14314, section 3) stores the frozen base weights in
# **4-bit NormalFloat (NF4)** with **double quantization**. This tutorial rebuilds the format
# from nothing but the normal distribution and checks every step against `minidora.nf4`, which
# is bit-exact with bitsandbytes:
#
# 1. the 16 NF4 values, from normal quantiles;
# 2. blockwise absmax quantization and the packing of two codes per byte;
# 3. the error of NF4 against uniform INT4 and FP4 on normally distributed weights;
# 4. double quantization, and the arithmetic 4.5 -> 4.127 bits per parameter;
# 5. what that means for the memory of a 7B model;
#
# and ends with three exercises.
#
# Run it as a script (`python tutorials/04_nf4_from_scratch.py`) or open it as a notebook
# (`jupytext --to notebook`). `MINIDORA_TUTORIAL_SIZE=small` makes it faster.

# %%
import math

import matplotlib.pyplot as plt
import torch

from minidora import bnb_checkpoint, nf4
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; one thread, seed 0


# %% [markdown]
# ## 1. Sixteen values from the normal distribution
#
# Pre-trained weights are close to normally distributed, and after dividing a block by its
# largest absolute value they live in $[-1, 1]$. An *information-theoretically optimal* 4-bit
# code for such data would give each of its 16 values the same probability mass, 1/16: its
# values would be **quantiles** of $N(0, 1)$. NF4 is built from quantiles, with two
# compromises that make the masses only approximately equal (measured below).
#
# The quantile function $Q$ is infinite at 0 and 1, so the extreme quantiles are taken at a
# probability slightly inside: $\delta = \tfrac12\big((1 - \tfrac1{30}) + (1 - \tfrac1{32})\big)
# = 0.9677083$. NF4 also wants an **exact zero** (padding and zero weights must stay zero),
# which an even number of symmetric quantiles cannot have. The trick: build the positive and the
# negative half separately,
#
# - 8 positive values $Q(p)$ for $p$ in `linspace(δ, 0.5, 9)[:-1]`,
# - 7 negative values $-Q(p)$ for $p$ in `linspace(δ, 0.5, 8)[:-1]`,
# - and 0,
#
# then divide everything by the largest, $Q(\delta) \approx 1.848$. This asymmetry (8 positive,
# 7 negative, one zero) is what the paper calls "two ranges".

# %%
delta = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
print(f"delta = {delta:.7f}, Q(delta) = {torch.special.ndtri(torch.tensor(delta)).item():.5f}")

# the 8 positive and 7 negative quantiles, computed in float64 as float32 is rounded once below
positive = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())        # [8]
negative = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())       # [7]
values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()  # [16]
my_codebook = values.sort().values / values.max()

for i, v in enumerate(my_codebook.tolist()):
    print(f"  code {i:2d}: {v:+.8f}")

# the values the QLoRA paper / bitsandbytes use, as printed in minidora's format notes
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
assert torch.equal(my_codebook, torch.tensor(PUBLISHED, dtype=torch.float32)), "codebook differs"
assert torch.equal(my_codebook, nf4.NF4_CODEBOOK)
assert (my_codebook > 0).sum() == 8 and (my_codebook < 0).sum() == 7 and my_codebook[7] == 0
print("regenerated in float32, the 16 values match the published table bit for bit")

# %% [markdown]
# **How equal are the masses?** A value's *bucket* is the set of inputs that round to it: from
# the midpoint with its lower neighbour to the midpoint with its upper one (the two outer
# buckets are open-ended). Scale the code back to $N(0, 1)$ units, multiplying by $Q(\delta)$ so
# that the extreme quantile sits at $\pm 1$ of the code, and measure the probability of each
# bucket:

# %%
q_delta = torch.special.ndtri(torch.tensor(delta, dtype=torch.float64)).item()
mids = (my_codebook[:-1] + my_codebook[1:]).double() / 2 * q_delta           # [15], N(0,1) units
inf = torch.tensor([math.inf], dtype=torch.float64)
cdf = torch.special.ndtr(torch.cat([-inf, mids, inf]))                         # [17]
mass = cdf[1:] - cdf[:-1]                                                      # [16]
print("probability of each code's bucket under N(0, 1), against 1/16 = 0.0625:")
print("  " + " ".join(f"{p:.4f}" for p in mass.tolist()))
print(f"min {mass.min():.4f} (code {mass.argmin()}), max {mass.max():.4f} (code {mass.argmax()}):"
      f" {16 * mass.min():.2f} to {16 * mass.max():.2f} times 1/16")
# between neighbouring values (not buckets) the mass is even within each half, but not across
gap = torch.special.ndtr(my_codebook.double() * q_delta).diff()                # [15]
print(f"mass between neighbouring values: {gap[:7].mean():.4f} on the negative side "
      f"((delta - 0.5) / 7 = {(delta - 0.5) / 7:.4f}), {gap[7:].mean():.4f} on the positive side "
      f"((delta - 0.5) / 8 = {(delta - 0.5) / 8:.4f})")
assert abs(mass.sum().item() - 1) < 1e-12
assert abs(mass.min().item() - 0.0557) < 1e-4 and mass.argmin() == 15
assert abs(mass.max().item() - 0.0710) < 1e-4 and mass.argmax() == 1
assert torch.allclose(gap[:7], torch.full((7,), (delta - 0.5) / 7, dtype=torch.float64), atol=1e-6)
assert torch.allclose(gap[7:], torch.full((8,), (delta - 0.5) / 8, dtype=torch.float64), atol=1e-6)

# %% [markdown]
# Equal, then, only approximately: the buckets hold 5.57 % to 7.10 % of the probability where
# an equal split would give each 6.25 %, i.e. 0.89 to 1.14 times 1/16. Two choices cause it.
# The **8/7 split**: the 7 negative values share the same half of the probability as the 8
# positive ones, so the negative side is spaced by $(\delta - \tfrac12)/7 = 0.0668$ and the
# positive side by $(\delta - \tfrac12)/8 = 0.0585$. The **offset** $\delta < 1$: the extreme
# values sit at the 96.8 % quantile, so each outer bucket gets the 3.2 % tail beyond it plus
# part of the last gap: 5.57 % at $+1$, 5.85 % at $-1$.

# %% [markdown]
# Drawn on the standard normal density (scaled back by $Q(\delta)$), the values crowd where the
# density is high. The uniform INT4 grid, for comparison, spends as many levels on the rare
# tails as on the busy middle.

# %%
grid = torch.linspace(-2.6, 2.6, 400, dtype=torch.float64)
density = torch.exp(-grid**2 / 2) / math.sqrt(2 * math.pi)
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.fill_between(grid, density, alpha=0.25, label="N(0, 1) density")
ax.vlines(my_codebook.double() * q_delta, 0, 0.42, colors="C3", label="NF4 values x Q(δ)")
ax.plot(torch.linspace(-1, 1, 16) * q_delta, [-0.03] * 16, "k|", ms=12,
        label="uniform INT4 grid, same range")
ax.set_xlabel("weight / (block scale / Q(δ))")
ax.set_title(f"NF4: values at normal quantiles; each bucket holds {mass.min():.1%} to "
             f"{mass.max():.1%} of N(0, 1)")
ax.legend(loc="upper right", fontsize=8)
show(fig, "nf4_codebook.png")

# %% [markdown]
# ## 2. Blockwise absmax quantization, and packing
#
# One outlier would waste the whole 4-bit range of a tensor if it shared one scale. So the
# weight $W$ (shape [out, in]) is flattened row-major and cut into **blocks** of 64 consecutive
# elements (blocks may span rows; the last one may be partial). Per block $b$:
#
# $$a_b = \max_{x \in b} |x|, \qquad \text{code}(x) = \arg\min_i |c_i - x \cdot (1/a_b)|,
#   \qquad \hat x = c_{\text{code}(x)}\, a_b .$$
#
# Two details make it bit-exact with bitsandbytes: multiply by the float32 reciprocal (not a
# division), and find the nearest value through the 15 midpoints between neighbours, an exact
# tie going to the lower code. Two 4-bit codes go into one byte, the first element in the
# **high** nibble; an odd count is padded with code 7 (the value 0).

# %%
def my_quantize(w, blocksize=64):
    """w: any float tensor -> (packed uint8 [ceil(n/2)], absmax float32 [n_blocks])."""
    x = w.reshape(-1).float()                                           # [n]
    pad = -x.numel() % blocksize
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)   # [n_blocks, bs]
    absmax = blocks.abs().amax(dim=1)                                   # [n_blocks]
    scaled = blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]          # in [-1, 1]
    midpoints = (my_codebook[:-1] + my_codebook[1:]) / 2                # [15]
    codes = torch.bucketize(scaled, midpoints, right=False).view(-1)[: x.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_tensor([7])])
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)          # [ceil(n/2)]
    return packed, absmax


def my_dequantize(packed, absmax, shape, blocksize=64):
    n = math.prod(shape)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n].long()  # [n]
    scales = absmax.repeat_interleave(blocksize)[:n]                              # [n]
    return (my_codebook[codes] * scales).view(shape)


# an odd-sized weight, so that blocks span rows and the last block and byte are partial
out_f, in_f = (45, 77) if SMALL else (1023, 1537)
w = torch.randn(out_f, in_f) * 0.02
packed, absmax = my_quantize(w)
q = nf4.quantize(w, blocksize=64, double_quant=False)
assert torch.equal(packed, q.packed) and torch.equal(absmax, q.absmax)
w_hat = my_dequantize(packed, absmax, w.shape)
assert torch.equal(w_hat, nf4.dequantize(q, torch.float32))
print(f"W {tuple(w.shape)}: {w.numel()} values, {absmax.numel()} blocks, {packed.numel()} bytes "
      f"of codes; same bytes and scales as minidora.nf4 (bit-exact with bitsandbytes)")
rel = ((w_hat - w).norm() / w.norm()).item()
print(f"relative Frobenius error of the round trip: {rel:.4f}")
assert 0.05 < rel < 0.15, rel  # 4 bits of normal data: about 10 % error

# %% [markdown]
# ### Check your understanding
#
# 1. The element of largest magnitude in a block: which code does it get when it is positive,
#    and when it is negative?
# 2. A block of 64 zeros: what are its bytes, and its scale?
#
# Predict, then run the cell below; the asserts give the answers.

# %%
def codes_of(packed):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)            # [2 * bytes]


block = 0.5 * torch.randn(64).clamp(-2, 2)
block[5] = 3.0                                              # the block's absmax, positive
assert codes_of(my_quantize(block)[0])[5] == 15             # 1. scaled to exactly +1: code 15
block[5] = -3.0
assert codes_of(my_quantize(block)[0])[5] == 0              #    and -1: code 0
packed_0, absmax_0 = my_quantize(torch.zeros(64))
assert (packed_0 == 0x77).all() and absmax_0.item() == 0    # 2. code 7 (the value 0) twice
print("absmax -> code 15 (or 0 when negative); a zero block -> bytes 0x77, scale 0")

# %% [markdown]
# ## 3. NF4 against uniform INT4 and FP4
#
# Four 16-level codes, each used with the same blockwise absmax scaling (only the value table
# changes):
#
# - **INT4**: 16 evenly spaced values from -1 to 1 (no exact zero; the symmetric variant with
#   15 levels $k/7$ has one, and is a little worse: exercise 2);
# - **FP4 (OCP E2M1)**: sign, 2 exponent bits, 1 mantissa bit, as the OCP microscaling spec
#   defines it: $\pm\{0, 0.5, 1, 1.5, 2, 3, 4, 6\}/6$;
# - **FP4 (bitsandbytes)**: the FP4 that the QLoRA paper compares NF4 with. Its 4 bits are also
#   sign, 2 exponent bits and 1 mantissa bit, but with another exponent bias and a subnormal:
#   $\pm\{0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1\}$ (`bitsandbytes.functional.get_4bit_type("fp4")`).
#   Where the OCP grid has 1/12 next to zero, this one has 1/192, and nothing between 2/3 and 1;
# - **NF4**.
#
# We quantize normally distributed weights and measure the mean squared error, over block sizes.

# %%
INT4 = torch.linspace(-1, 1, 16)
e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
FP4 = torch.cat([-e2m1.flip(0)[:-1], e2m1])  # 15 distinct values (+0 and -0 are one)
bnb_fp4 = torch.tensor([0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
FP4_BNB = torch.cat([-bnb_fp4.flip(0)[:-1], bnb_fp4])
CODES = {"INT4 (uniform)": INT4, "FP4 (E2M1)": FP4, "FP4 (bnb)": FP4_BNB, "NF4": nf4.NF4_CODEBOOK}


def blockwise_error(x, code, blocksize):
    """Mean squared error of x [n] coded with `code` and per-block absmax scaling."""
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / absmax
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    return ((code[idx] * absmax - blocks) ** 2).mean().item()


x = torch.randn(2**16 if SMALL else 2**22)
blocksizes = [32, 64, 128, 256, 512, 1024, 4096]
errors = {name: [blockwise_error(x, code, bs) for bs in blocksizes] for name, code in CODES.items()}
print("mean squared error on N(0, 1) weights")
print(f"{'blocksize':>10}" + "".join(f"{name:>16}" for name in CODES))
for i, bs in enumerate(blocksizes):
    print(f"{bs:>10}" + "".join(f"{errors[name][i]:>16.5f}" for name in CODES))
for i in range(len(blocksizes)):
    assert errors["NF4"][i] < min(errors[name][i] for name in CODES if name != "NF4")
    # bitsandbytes' FP4 spends a level on 1/192 and leaves 2/3..1 empty: the worst of the four
    assert errors["FP4 (bnb)"][i] > max(errors["FP4 (E2M1)"][i], errors["INT4 (uniform)"][i])
# the OCP grid crowds its values near zero: worse than INT4 in small blocks, better in large ones
assert errors["FP4 (E2M1)"][0] > errors["INT4 (uniform)"][0]
assert errors["FP4 (E2M1)"][-1] < errors["INT4 (uniform)"][-1]
i64 = blocksizes.index(64)
print(f"at blocksize 64 NF4's error is {errors['INT4 (uniform)'][i64] / errors['NF4'][i64]:.2f}x "
      f"smaller than INT4's, {errors['FP4 (E2M1)'][i64] / errors['NF4'][i64]:.2f}x smaller than "
      f"OCP FP4's and {errors['FP4 (bnb)'][i64] / errors['NF4'][i64]:.2f}x smaller than "
      f"bitsandbytes' FP4's")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
for name in CODES:
    ax1.plot(blocksizes, errors[name], "o-", label=name)
ax1.set_xscale("log", base=2)
ax1.set_xlabel("blocksize")
ax1.set_ylabel("mean squared error")
ax1.set_title("error on N(0,1) weights (lower is better)")
ax1.legend()
scaled = (x[: 64 * 2000].view(-1, 64) / x[: 64 * 2000].view(-1, 64).abs().amax(1, keepdim=True))
ax2.hist(scaled.flatten(), bins=120, density=True, alpha=0.4, color="gray")
for k, (name, code) in enumerate(CODES.items()):
    ax2.plot(code, [-0.15 * (k + 1)] * len(code), "|", ms=10, mew=2, label=name)
ax2.set_title("2,000 blocks of 64, each divided by its own absmax, and the 4 codes",
              fontsize=9)
ax2.legend(fontsize=7, loc="upper right")
show(fig, "nf4_vs_int4_fp4.png")

# %% [markdown]
# Larger blocks mean larger absmax values, so more of the block's values fall into the few
# levels near zero: the error grows with the block size for every code, and NF4 stays best
# at every size. OCP FP4 and INT4 trade places: FP4 crowds its levels near zero and has only
# three of them between 0.5 and 1, which costs it in small blocks (where the absmax is close to
# the typical value) and pays off in large ones (where most values are far below the absmax).
# bitsandbytes' FP4 is the worst of the four on Gaussian weights: a level at 1/192 is almost
# never the nearest one, and the gap between 2/3 and 1 is wide. The QLoRA paper's Table 2 still
# finds it better than INT4 in a model's perplexity, which a mean squared error on N(0, 1) does
# not measure: `python -m minidora reproduce` checks that table on a real model.
#
# ## 4. Double quantization: 4.5 -> 4.127 bits per parameter
#
# Each block of 64 codes carries one float32 scale: $32/64 = 0.5$ extra bits per parameter,
# 4.5 bits in total. QLoRA's **double quantization** quantizes the scales themselves:
#
# - subtract their mean (the *offset*; the scales are all positive, centring them uses the
#   signed code fully);
# - code them with 8 bits (bitsandbytes' *dynamic* 8-bit map) in blocks of 256 scales, each
#   block with one float32 absmax.
#
# Per parameter that is $8/64 + 32/(64 \cdot 256) = 0.125 + 0.00195 = 0.127$ bits for the
# scales, **4.127 bits** in total (plus one float32 offset per tensor).

# %%
n_big = 4096 * 4096  # the arithmetic does not need the tensor itself
per_param_plain = 4 + 32 / 64
per_param_dq = 4 + 8 / 64 + 32 / (64 * 256)
print(f"without DQ: {per_param_plain} bits/param, with DQ: {per_param_dq:.6f} bits/param")
assert per_param_plain == 4.5 and round(per_param_dq, 3) == 4.127
assert nf4.storage_bits_per_param(n_big, 64, double_quant=False) == 4.5
bits_dq = nf4.storage_bits_per_param(n_big, 64, double_quant=True)
assert abs(bits_dq - (per_param_dq + 32 / n_big)) < 1e-12             # + one float32 offset

# and on a real tensor: count the bytes minidora stores
shape = (512, 1024) if SMALL else (2048, 4096)
w = torch.randn(shape) * 0.02
q_plain = nf4.quantize(w, double_quant=False)
q_dq = nf4.quantize(w, double_quant=True)
print(f"W {shape}: {q_plain.nbytes} bytes ({q_plain.bits_per_param:.4f} bits/param) without DQ, "
      f"{q_dq.nbytes} bytes ({q_dq.bits_per_param:.4f} bits/param) with DQ")
assert q_plain.bits_per_param == 4.5
assert abs(q_dq.bits_per_param - 4.127) < 2e-3

# %% [markdown]
# What does it cost in accuracy? The scales come back with a small error; the weights barely
# notice, because a scale error of a fraction of a percent is tiny next to the 4-bit rounding.

# %%
scale_rel = (q_dq.scales() - q_plain.scales()).abs() / q_plain.scales()
scale_err, scale_err_mean = scale_rel.max().item(), scale_rel.mean().item()
err_plain = ((nf4.dequantize(q_plain, torch.float32) - w).norm() / w.norm()).item()
err_dq = ((nf4.dequantize(q_dq, torch.float32) - w).norm() / w.norm()).item()
print(f"relative error of a double-quantized scale: {scale_err_mean:.2e} on average, "
      f"{scale_err:.2e} at most")
print(f"weight error: {err_plain:.5f} without DQ, {err_dq:.5f} with DQ")
assert scale_err_mean < 0.005 and scale_err < 0.03 and abs(err_dq - err_plain) < 0.01 * err_plain

fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(q_plain.scales(), bins=80, alpha=0.8)
ax.axvline(q_dq.offset.item(), color="C3", label=f"offset (mean) = {q_dq.offset.item():.4f}")
ax.set_xlabel("block absmax (float32 scale)")
ax.set_title("the scales that double quantization codes with 8 bits")
ax.legend()
show(fig, "nf4_scales.png")

# %% [markdown]
# ## 5. A 7B model's memory
#
# QLoRA quantizes the linear layers of the transformer blocks; the token embedding, the output
# head and the norms stay in 16 bits. So count the two kinds of parameters separately. For
# Llama-2-7B (LLaMA-7B has the same shapes): 32 blocks, each with four 4096 x 4096 attention
# projections (q, k, v, o) and three MLP projections between 4096 and 11008 (gate, up, down),
# and a vocabulary of 32,000 tokens:
#
# $$ 32 \times (4 \cdot 4096^2 + 3 \cdot 4096 \cdot 11008) = 6{,}476{,}005{,}376
#    \text{ linear parameters,} $$
#
# $$ \underbrace{2 \cdot 32000 \cdot 4096}_{\text{embedding, head}}
#    + \underbrace{(2 \cdot 32 + 1) \cdot 4096}_{\text{RMSNorm weights}} = 262{,}410{,}240
#    \text{ others,} $$
#
# 6.74 billion in all, 96 % of them in linear layers. The linear weights stored as bfloat16, as
# NF4 with float32 scales, and as NF4 with double quantization (the exact bytes `minidora.nf4`
# stores, per weight shape), and then the whole model with the rest in bfloat16:

# %%
n_layer, d_model, d_ff, vocab = 32, 4096, 11008, 32000
shapes = [(d_model, d_model)] * 4 + [(d_ff, d_model)] * 2 + [(d_model, d_ff)]  # [out, in]
n_linear = n_layer * sum(o * i for o, i in shapes)
n_other = 2 * vocab * d_model + (2 * n_layer + 1) * d_model
assert n_linear == 6_476_005_376 and n_other == 262_410_240


def linear_bits(double_quant):
    """Bits of all linear weights in NF4 (codes, scales and, with DQ, nested scales and offset)."""
    return n_layer * sum(o * i * nf4.storage_bits_per_param(o * i, 64, double_quant)
                         for o, i in shapes)


GiB = 8 * 2**30                                                   # bits in a GiB
linear = {"bfloat16": 16 * n_linear, "NF4, float32 scales": linear_bits(False),
          "NF4 + double quant": linear_bits(True)}
print(f"{'linear weights as':>20} {'linear weights':>15} {'whole model':>12} "
      f"(embedding, head, norms in bfloat16: {16 * n_other / GiB:.2f} GiB)")
for name, bits in linear.items():
    print(f"{name:>20} {bits / GiB:11.2f} GiB {(bits + 16 * n_other) / GiB:8.2f} GiB")
gib = {name: (round(b / GiB, 2), round((b + 16 * n_other) / GiB, 2)) for name, b in linear.items()}
assert gib == {"bfloat16": (12.06, 12.55), "NF4, float32 scales": (3.39, 3.88),
               "NF4 + double quant": (3.11, 3.60)}
saved = (linear_bits(False) - linear_bits(True)) / GiB
print(f"double quantization saves {saved:.2f} GiB on this 7B model; "
      f"{65.2e9 * (per_param_plain - per_param_dq) / 8 / 1e9:.1f} GB on a 65B one "
      f"(all its 65.2e9 parameters at {per_param_plain - per_param_dq:.3f} bits fewer)")
assert 3.0 < 65.2e9 * (per_param_plain - per_param_dq) / 8 / 1e9 < 3.1  # the paper's ~3 GB at 65B
assert 3.8 < linear["bfloat16"] / linear["NF4 + double quant"] < 3.9    # 16 / 4.127

# %% [markdown]
# The linear weights shrink from 12.06 GiB to 3.11 GiB (16 / 4.127 = 3.9x); with the
# embedding and head still in bfloat16 the whole model takes 3.60 GiB instead of 12.55 GiB: the
# 7B base fits, with room for activations and the adapters, on a 6-8 GB GPU. The 0.37 bits
# saved by double quantization are 0.28 GiB here, and what the paper counts as "about 3 GB for
# a 65B model" (a count over all its parameters).
#
# ## 6. On disk: bitsandbytes' checkpoint keys
#
# `minidora.bnb_checkpoint.to_bnb_state_dict` writes exactly the keys a bitsandbytes `Linear4bit`
# saves, so QLoRA checkpoints move both ways. The non-tensor facts (block size, dtype, shape,
# offset) ride along as UTF-8 JSON in a uint8 tensor.

# %%
q_256 = nf4.quantize(torch.randn(256, 512), double_quant=True)
sd = bnb_checkpoint.to_bnb_state_dict(q_256, "weight")
for key, t in sd.items():
    print(f"  {key:42s} {str(tuple(t.shape)):12s} {t.dtype}")
print(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
back = bnb_checkpoint.from_bnb_state_dict(sd, "weight")
assert all(torch.equal(getattr(back, k), getattr(q_256, k))
           for k in ("packed", "absmax", "nested_absmax", "offset"))
assert torch.equal(nf4.dequantize(back), nf4.dequantize(q_256))
assert tuple(sd["weight"].shape) == (65536, 1) and tuple(sd["weight.absmax"].shape) == (2048,)
print("round trip through the checkpoint layout: OK")

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/04_solutions.py](solutions/04_solutions.py).
#
# ### Exercise 1: bits per parameter at other block sizes
#
# Write `my_bits_per_param(blocksize, double_quant)`: the storage per parameter of a large NF4
# tensor (codes and scales; ignore the one float32 offset per tensor), for any block size.
# How many bits at blocksize 128 with double quantization? The classic mistakes: counting one
# nested float32 per 256 *parameters* instead of per 256 *scales*, and forgetting that double
# quantization replaces the 32-bit scales rather than adding to them.

# %%
def my_bits_per_param(blocksize: int, double_quant: bool) -> float:
    """Bits per parameter of a large NF4 tensor: 4-bit codes plus the scales' share."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(my_bits_per_param):
    n = 2**24                                      # whole blocks and whole nested blocks
    for bs in (32, 64, 128, 256, 1024):
        for dq in (False, True):
            want = nf4.storage_bits_per_param(n, bs, dq) - (32 / n if dq else 0)  # no offset
            got = my_bits_per_param(bs, dq)
            assert abs(got - want) < 1e-12, \
                f"blocksize {bs}, double_quant={dq}: {got} bits is wrong; count codes, scales " \
                "and, with double quantization, one float32 per 256 scales"


try:
    check_exercise_1(my_bits_per_param)
    print("exercise 1: correct")
    q_128 = nf4.quantize(torch.randn(512, 1024), blocksize=128, double_quant=True)
    print(f"blocksize 128 with DQ: {my_bits_per_param(128, True):.4f} bits per parameter; "
          f"a [512, 1024] weight stores {q_128.bits_per_param:.4f} (with its offset)")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: the INT4 baseline
#
# Write `int4_roundtrip(x, blocksize)`: quantize `x` (1-D, a multiple of `blocksize` long) with
# the symmetric uniform INT4 code, one absmax per block and the 15 levels $k/7$,
# $k = -7 \dots 7$, rounding to the nearest level, and return the dequantized values. The check
# tests the levels and the rounding, then compares the mean squared error with NF4's on normal
# data. Classic mistakes: one absmax for the whole tensor (one outlier then coarsens every
# block), 16 levels $k/8$ that overflow $-8 \dots 7$, and truncating instead of rounding.

# %%
def int4_roundtrip(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x: [n] float32, n a multiple of blocksize -> [n], quantized to INT4 and back."""
    raise NotImplementedError("exercise 2: your code here")


# %%
def check_exercise_2(int4_roundtrip):
    torch.manual_seed(42)
    bs = 64
    x = torch.randn(bs * 40)
    x[bs * 7 + 3] = 25.0                               # an outlier: only its block may notice
    y = int4_roundtrip(x, bs)
    assert y.shape == x.shape and y.dtype == x.dtype, "same shape and dtype as x"
    blocks, y_blocks = x.view(-1, bs), y.view(-1, bs)
    absmax = blocks.abs().amax(dim=1, keepdim=True)                        # [n_blocks, 1]
    level = y_blocks * 7 / absmax
    assert (level - level.round()).abs().max() < 1e-4 and level.abs().max() < 7 + 1e-4, \
        "every output must be k/7 times its own block's absmax, k in -7..7"
    assert ((y_blocks - blocks).abs() <= absmax / 14 * (1 + 1e-5)).all(), \
        "round to the nearest level: no error may exceed half a step, absmax / 14"
    x = torch.randn(2**14)
    mse_int4 = ((int4_roundtrip(x, bs) - x) ** 2).mean().item()
    q = nf4.quantize(x, blocksize=bs, double_quant=False)
    mse_nf4 = ((nf4.dequantize(q, torch.float32) - x) ** 2).mean().item()
    assert mse_nf4 < mse_int4
    return mse_int4, mse_nf4


try:
    mse_int4, mse_nf4 = check_exercise_2(int4_roundtrip)
    print(f"exercise 2: correct; blocksize 64 on N(0, 1): INT4 {mse_int4:.5f}, NF4 {mse_nf4:.5f} "
          f"({mse_int4 / mse_nf4:.2f}x)")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: which nibble comes first
#
# Write `my_unpack(byte)`: the two 4-bit codes of one packed byte, in the order of the elements
# they encode. The check packs known values with `minidora.nf4` and unpacks them with your
# function. The classic mistake reads the low nibble first: every pair comes out swapped, and
# a weight dequantizes to a scrambled copy of itself.

# %%
def my_unpack(byte: int) -> tuple[int, int]:
    """A packed byte (0..255) -> (code of the first element, code of the second)."""
    raise NotImplementedError("exercise 3: your code here")


# %%
def check_exercise_3(my_unpack):
    cb = nf4.NF4_CODEBOOK
    pairs = ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, cb[3].item()), (cb[12].item(), -1.0))
    for pair in pairs:                   # each pair holds +-1, so its scale is 1 and x = c[code]
        byte = int(nf4.quantize(torch.tensor(pair), blocksize=64, double_quant=False).packed[0])
        want = tuple(int((cb == v).nonzero()) for v in pair)
        got = tuple(my_unpack(byte))
        assert got == want, f"values {pair} are packed as {byte:#04x}: codes {want}, got {got}"
    decoded = {tuple(my_unpack(b)) for b in range(256)}
    assert len(decoded) == 256 and all(0 <= c < 16 for p in decoded for c in p), \
        "every byte holds two codes in 0..15, and different bytes different pairs"


try:
    check_exercise_3(my_unpack)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
