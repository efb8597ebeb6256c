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
# # Solutions: 5. QLoRA and QDoRA
#
# The exercises of [tutorial 5](../05_qlora_qdora.py). Each solution is followed by the check
# the tutorial runs (the same code, copied) and by the classic mistakes that check catches. Run
# it as a script: it stops at the first solution that fails its check, or at the first mistake
# a check lets through.

# %%
import torch
import torch.nn as nn
from checking import must_fail  # tutorials/solutions/checking.py

import minidora
from minidora import nf4
from minidora.tutorial import setup

setup()  # one thread, seed 0


# %% [markdown]
# ## Exercise 1: the memory of a 7B and a 13B model in NF4
#
# Linear parameters: $n_{\text{layer}}(4d^2 + 3\,d\,d_{ff})$, at 4.5 bits (4 + 32/64) or
# 4.127 bits (4 + 8/64 + 32/(64·256)) each. The rest: $2\,V d + (2 n_{\text{layer}} + 1)\,d$ at
# 16 bits. For Llama-2-13B: $40 (4 \cdot 5120^2 + 3 \cdot 5120 \cdot 13824) = 12{,}687{,}769{,}600$
# linear parameters (6.10 GiB with DQ) and 328,094,720 others (0.61 GiB in bfloat16).

# %%
def llama_weights_gib(n_layer: int, d_model: int, d_ff: int, vocab: int,
                      double_quant: bool) -> float:
    """GiB of a Llama-shaped model's weights: linear projections in NF4, the rest in bfloat16."""
    n_linear = n_layer * (4 * d_model * d_model + 3 * d_model * d_ff)
    n_other = 2 * vocab * d_model + (2 * n_layer + 1) * d_model
    nf4_bits = 4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)
    return (n_linear * nf4_bits + 16 * n_other) / 8 / 2**30


def check_exercise_1(llama_weights_gib):
    cases = {(32, 4096, 11008, 32000): (3.8814, 3.6001),      # Llama-2-7B: without, with DQ
             (40, 5120, 13824, 32000): (7.2579, 6.7068)}      # Llama-2-13B
    for arch, wants in cases.items():
        for double_quant, want in zip((False, True), wants, strict=True):
            got = llama_weights_gib(*arch, double_quant)
            assert abs(got - want) < 1e-3 * want, \
                f"{arch}, double_quant={double_quant}: {got:.4f} GiB is wrong"

check_exercise_1(llama_weights_gib)
print("exercise 1: correct; Llama-2-13B: "
      f"{llama_weights_gib(40, 5120, 13824, 32000, False):.2f} GiB without DQ, "
      f"{llama_weights_gib(40, 5120, 13824, 32000, True):.2f} GiB with DQ")
must_fail(check_exercise_1,                          # GB instead of GiB
          lambda *arch: llama_weights_gib(*arch) * 2**30 / 1e9)


def all_in_nf4(n_layer, d_model, d_ff, vocab, double_quant):   # embedding and head quantized too
    n_all = n_layer * (4 * d_model**2 + 3 * d_model * d_ff) + 2 * vocab * d_model
    return n_all * (4.127 if double_quant else 4.5) / 8 / 2**30


def no_scales(n_layer, d_model, d_ff, vocab, double_quant):     # 4 bits and nothing else
    n_linear = n_layer * (4 * d_model**2 + 3 * d_model * d_ff)
    return (4 * n_linear + 16 * (2 * vocab * d_model + (2 * n_layer + 1) * d_model)) / 8 / 2**30


must_fail(check_exercise_1, all_in_nf4)
must_fail(check_exercise_1, no_scales)

# %% [markdown]
# ## Exercise 2: what QLoRA trains
#
# A rank-$r$ adapter on an [out, in] layer trains $r\,(in + out)$ numbers: per block
# $4 \cdot r \cdot 2d + 3 \cdot r\,(d + d_{ff})$. Llama-2-7B at $r = 64$:
# $32 \cdot 64 \cdot (4 \cdot 8192 + 3 \cdot 15104) = 159{,}907{,}840$, 2.4 % of the model;
# with float32 gradients and Adam moments, 16 bytes each: 2.38 GiB.

# %%
def lora_trainable(n_layer: int, d_model: int, d_ff: int, r: int) -> int:
    """Trainable parameters of rank-r adapters on the seven projections of every block."""
    return n_layer * r * (4 * 2 * d_model + 3 * (d_model + d_ff))


def check_exercise_2(lora_trainable):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def llama_like(n_layer, d, f):                    # only the linear layers matter here
        def block():
            return nn.ModuleDict({**{n: nn.Linear(d, d, bias=False) for n in names[:4]},
                                  "gate_proj": nn.Linear(d, f, bias=False),
                                  "up_proj": nn.Linear(d, f, bias=False),
                                  "down_proj": nn.Linear(f, d, bias=False)})
        return nn.ModuleList(block() for _ in range(n_layer))

    for n_layer, d, f, r in ((2, 16, 40, 4), (3, 32, 72, 8)):
        model = minidora.wrap(llama_like(n_layer, d, f), "qlora", target_modules=list(names), r=r)
        want = minidora.report(model).trainable_params
        got = lora_trainable(n_layer, d, f, r)
        assert got == want, f"n_layer={n_layer}, d_model={d}, d_ff={f}, r={r}: got {got}"

check_exercise_2(lora_trainable)
n_7b = lora_trainable(32, 4096, 11008, 64)
assert n_7b == 159_907_840
print(f"exercise 2: correct; Llama-2-7B at r = 64: {n_7b:,d} trainable parameters, "
      f"{16 * n_7b / 2**30:.2f} GiB with float32 gradients and Adam moments")
must_fail(check_exercise_2,                          # r * in * out
          lambda n, d, f, r: n * r * (4 * d * d + 3 * d * f))
must_fail(check_exercise_2,                          # every projection taken as d x d
          lambda n, d, f, r: n * r * 7 * 2 * d)

# %% [markdown]
# ## Exercise 3: where QDoRA's magnitude starts
#
# The layer equals its base at init only if $m$ equals the norms of the weight the base
# actually applies: the dequantized one.

# %%
def qdora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """weight: [out, in] float32 -> m: [out], QDoRA's magnitude at init."""
    w_hat = nf4.dequantize(nf4.quantize(weight, blocksize=64, double_quant=True), torch.float32)
    return torch.linalg.vector_norm(w_hat, dim=1)                     # [out]


def check_exercise_3(qdora_magnitude):
    torch.manual_seed(53)
    lin = nn.Linear(96, 40)
    m = qdora_magnitude(lin.weight.detach().clone())
    base = minidora.NF4Linear.from_linear(lin, blocksize=64, double_quant=True,
                                          compute_dtype=torch.float32)
    want = minidora.DoRALinear(base, r=4, alpha=8).magnitude.detach()
    assert m.shape == want.shape, f"one magnitude per output row: {tuple(want.shape)}"
    assert torch.allclose(m, want, rtol=1e-5, atol=0), \
        "the norms of which weight? At init QDoRA must equal its 4-bit base"

check_exercise_3(qdora_magnitude)
print("exercise 3: correct")
must_fail(check_exercise_3, lambda w: torch.linalg.vector_norm(w, dim=1))   # the float weight
must_fail(check_exercise_3, lambda w: torch.linalg.vector_norm(             # no DQ
    nf4.dequantize(nf4.quantize(w, blocksize=64, double_quant=False), torch.float32), dim=1))
