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
# # Solutions: 4. NF4 from scratch
#
# The exercises of [tutorial 4](../04_nf4_from_scratch.py). Each solution is followed by the
# check the tutorial runs (the same code, copied) and by the classic mistakes that check
# catches. Run it as a script: it stops at the first solution that fails its check, or at the
# first mistake a check lets through.

# %%
import torch
from checking import must_fail  # tutorials/solutions/checking.py

from minidora import nf4
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: bits per parameter at other block sizes
#
# Codes: 4 bits. Plain scales: one float32 per block, $32/b$. With double quantization each
# scale becomes an 8-bit code, $8/b$, and every 256 scales share one float32,
# $32/(256\,b)$. At $b = 128$: $4 + 0.0625 + 0.0009766 = 4.0635$ bits (4.25 without DQ).

# %%
def my_bits_per_param(blocksize: int, double_quant: bool) -> float:
    """Bits per parameter of a large NF4 tensor: 4-bit codes plus the scales' share."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def check_exercise_1(my_bits_per_param):
    n = 2**24                                      # whole blocks and whole nested blocks
    for bs in (32, 64, 128, 256, 1024):
        for dq in (False, True):
            want = nf4.storage_bits_per_param(n, bs, dq) - (32 / n if dq else 0)  # no offset
            got = my_bits_per_param(bs, dq)
            assert abs(got - want) < 1e-12, \
                f"blocksize {bs}, double_quant={dq}: {got} bits is wrong; count codes, scales " \
                "and, with double quantization, one float32 per 256 scales"

check_exercise_1(my_bits_per_param)
print(f"exercise 1: correct; blocksize 128: {my_bits_per_param(128, True):.4f} bits with DQ, "
      f"{my_bits_per_param(128, False):.4f} without")
must_fail(check_exercise_1,                      # one nested float32 per 256 parameters
          lambda bs, dq: 4 + 8 / bs + 32 / 256 if dq else 4 + 32 / bs)
must_fail(check_exercise_1,                      # the 8-bit codes added to the float32 scales
          lambda bs, dq: 4 + 32 / bs + (8 / bs + 32 / (bs * 256) if dq else 0))

# %% [markdown]
# ## Exercise 2: the INT4 baseline

# %%
def int4_roundtrip(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x: [n] float32, n a multiple of blocksize -> [n], quantized to INT4 and back."""
    blocks = x.view(-1, blocksize)                                          # [n_blocks, bs]
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    k = (blocks * 7 / absmax).round().clamp(-7, 7)                          # integers -7..7
    return (k * absmax / 7).view(-1)


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

mse_int4, mse_nf4 = check_exercise_2(int4_roundtrip)
print(f"exercise 2: correct; blocksize 64 on N(0, 1): INT4 {mse_int4:.5f}, NF4 {mse_nf4:.5f} "
      f"({mse_int4 / mse_nf4:.2f}x)")


def int4_one_scale(x, blocksize):                # one absmax for the whole tensor
    absmax = x.abs().max()
    return (x * 7 / absmax).round() * absmax / 7


def int4_eighths(x, blocksize):                  # 16 levels k/8, k in -8..7
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return ((blocks * 8 / absmax).round().clamp(-8, 7) * absmax / 8).view(-1)


def int4_truncated(x, blocksize):                # rounds towards zero
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return ((blocks * 7 / absmax).trunc() * absmax / 7).view(-1)


for wrong in (int4_one_scale, int4_eighths, int4_truncated):
    must_fail(check_exercise_2, wrong)

# %% [markdown]
# ## Exercise 3: which nibble comes first
#
# The first element sits in the high nibble: `byte = (code0 << 4) | code1`.

# %%
def my_unpack(byte: int) -> tuple[int, int]:
    """A packed byte (0..255) -> (code of the first element, code of the second)."""
    return byte >> 4, byte & 0xF


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

check_exercise_3(my_unpack)
print("exercise 3: correct")
must_fail(check_exercise_3, lambda byte: (byte & 0xF, byte >> 4))       # low nibble first
