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
# # Solutions: 7. QLoRA and QDoRA on a real LLM
#
# The exercises of [tutorial 7](../07_real_llm.py). Each solution is followed by the check
# the tutorial runs (the same code, copied) and by the classic mistakes that check catches. Run
# it as a script: it stops at the first solution that fails its check, or at the first mistake
# a check lets through. Neither the `[llm]` extra nor the model is needed.

# %%
import torch
import torch.nn as nn
from checking import must_fail  # tutorials/solutions/checking.py

import minidora
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the bytes of one NF4 weight
#
# $n = out \cdot in$ parameters in $\lceil n / 64 \rceil$ blocks. Codes: $\lceil n/2 \rceil$
# bytes. Scales: 4 bytes per block, or with double quantization 1 byte per block plus 4 bytes
# per group of 256 blocks (the last group may be partial) plus a 4-byte offset. For
# [192, 576]: 55,296 + 1,728 + 4 x 7 + 4 = 57,056 bytes, 4.127 bits per parameter.

# %%
def nf4_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes of an [out, in] NF4 weight, blocksize 64."""
    n = out_features * in_features
    blocks = -(-n // 64)
    codes = -(-n // 2)
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // 256) + 4


def check_exercise_1(nf4_bytes):
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (37, 101)]   # SmolLM2, odd
    for out_f, in_f in shapes:
        for dq in (False, True):
            want = minidora.nf4.quantize(torch.randn(out_f, in_f), 64, double_quant=dq).nbytes
            got = nf4_bytes(out_f, in_f, dq)
            assert got == want, f"[{out_f}, {in_f}], double_quant={dq}: got {got}, want {want}"

check_exercise_1(nf4_bytes)
assert nf4_bytes(192, 576, True) == 57_056
per_layer = sum(nf4_bytes(o, i, True) for o, i in ((576, 576), (192, 576), (192, 576),
                (576, 576), (1536, 576), (1536, 576), (576, 1536)))
print(f"exercise 1: correct; one SmolLM2 block in NF4 + DQ: {per_layer:,} bytes, "
      f"30 blocks: {30 * per_layer / 2**20:.1f} MiB")
must_fail(check_exercise_1,                          # 4.127 bits times the parameters
          lambda o, i, dq: round(o * i * (4.127 if dq else 4.5) / 8))
must_fail(check_exercise_1,                          # no offset
          lambda o, i, dq: nf4_bytes(o, i, dq) - (4 if dq else 0))

# %% [markdown]
# ## Exercise 2: what QLoRA and QDoRA train on SmolLM2
#
# A rank-$r$ adapter on an [out, in] layer trains $A$ [r, in] and $B$ [out, r]: $r\,(in + out)$
# numbers; DoRA adds $m$ [out]. One SmolLM2 block at $r = 8$: $8 \cdot 10{,}176 = 81{,}408$
# (QLoRA), $+ 5{,}184$ magnitudes (QDoRA); 30 blocks: 2,442,240 and 2,597,760.

# %%
def adapter_params(shapes: list[tuple[int, int]], r: int, dora: bool) -> int:
    """Trainable parameters of rank-r LoRA (or DoRA) adapters on layers of [out, in] shapes."""
    return sum(r * (i + o) + (o if dora else 0) for o, i in shapes)


def check_exercise_2(adapter_params):
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)]
    for method, r in (("qlora", 8), ("qdora", 8), ("lora", 3), ("dora", 5)):
        layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
        minidora.wrap(layers, method, [str(k) for k in range(len(shapes))], r=r)
        want = minidora.report(layers).trainable_params
        got = adapter_params(shapes, r, method.endswith("dora"))
        assert got == want, f"{method}, r={r}: got {got}, want {want}"

check_exercise_2(adapter_params)
block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
assert 30 * adapter_params(block, 8, False) == 2_442_240
assert 30 * adapter_params(block, 8, True) == 2_597_760
print(f"exercise 2: correct; SmolLM2 at r = 8: QLoRA {30 * adapter_params(block, 8, False):,}"
      f", QDoRA {30 * adapter_params(block, 8, True):,} trainable parameters")
must_fail(check_exercise_2,                          # r * in * out
          lambda shapes, r, dora: sum(r * i * o for o, i in shapes))
must_fail(check_exercise_2,                          # a magnitude per input column
          lambda shapes, r, dora: sum(r * (i + o) + (i if dora else 0) for o, i in shapes))
