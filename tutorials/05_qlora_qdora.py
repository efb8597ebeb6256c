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
# # 5. QLoRA and QDoRA: putting the pieces together
#
# **Learning objectives.** You will be able to:
#
# - build a QLoRA or QDoRA layer by composing an adapter with a frozen NF4 base, and check it
#   against QLoRA's eq. 5;
# - say what each layer equals at init, and why QDoRA's magnitude starts from the dequantized
#   weight;
# - account for the memory of weights, gradients and optimiser states under each method, from
#   a small model up to 7B and 13B;
# - fine-tune one model five ways and compare them fairly.
#
# **Prerequisites.** You should know:
#
# - tutorials 1, 3 and 4 (LoRA, DoRA, NF4);
# - what Adam keeps per trained parameter;
# - bfloat16 and float32, and what each costs in bytes.
#
# QLoRA (Dettmers et al., 2023, arXiv 2305.14314) is LoRA over a frozen base stored in NF4 with
# double quantization; QDoRA is DoRA over the same base. In minidora that is literally
# composition: `LoRALinear(NF4Linear(...))` and `DoRALinear(NF4Linear(...))`. This tutorial:
#
# 1. builds one QLoRA layer by hand and checks it against the formula;
# 2. accounts for the memory of a small transformer under each method;
# 3. fine-tunes the same small model with full fine-tuning, LoRA, DoRA, QLoRA and QDoRA, side
#    by side;
#
# and ends with three exercises.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import minidora
from minidora import nf4
from minidora.apps.demo.model import GPT, GPTConfig
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; one thread, seed 0


# %% [markdown]
# ## 1. One QLoRA layer
#
# QLoRA's eq. 5 puts a dtype on every factor:
#
# $$ Y^{\text{BF16}} = X^{\text{BF16}}\,\text{doubleDequant}(c_1^{\text{FP32}}, c_2^{\text{k-bit}},
#    W^{\text{NF4}}) + X^{\text{BF16}} L_1^{\text{BF16}} L_2^{\text{BF16}} $$
#
# In PyTorch's row convention, with minidora's names ($L_1 L_2 = s\,A^\top B^\top$):
#
# $$ Y = X\,\text{doubleDequant}(c_1, c_2, W^{\text{NF4}})^\top + b + s\, X A^\top B^\top $$
#
# The base product runs in a *compute dtype*: bfloat16 in QLoRA, float32 here so that we can
# compare tightly. The paper's adapters $L_1, L_2$ are bfloat16 too; minidora keeps adapters in
# float32 by default (`adapter_dtype=torch.float32`, so that small updates are not rounded
# away; tutorial 3, exercise 3). Pass `adapter_dtype=torch.bfloat16` to train as the paper does.

# %%
lin = nn.Linear(96, 80)
base = minidora.NF4Linear.from_linear(lin, blocksize=64, double_quant=True,
                                      compute_dtype=torch.float32)
qlora = minidora.LoRALinear(base, r=8, alpha=16)
with torch.no_grad():
    qlora.lora_B.normal_(0, 0.1)  # away from init

x = torch.randn(4, 96)
W_hat = nf4.dequantize(nf4.quantize(lin.weight.detach(), 64, double_quant=True), torch.float32)
y_formula = x @ W_hat.T + lin.bias + qlora.scaling * (x @ qlora.lora_A.T) @ qlora.lora_B.T
y = qlora(x)
err = (y - y_formula).abs().max().item()
print(f"QLoRA layer vs the formula: max difference {err:.1e}")
assert torch.allclose(y, y_formula, rtol=1e-5, atol=1e-5)  # float32, two summation orders
print(qlora)

w_err = ((W_hat - lin.weight).norm() / lin.weight.norm()).item()
print(f"the 4-bit base is not the original weight: relative error {w_err:.3f}")
assert 0.05 < w_err < 0.15

# %% [markdown]
# Note what QLoRA fine-tunes: the adapter learns on top of the *quantized* weight, so it can
# also compensate for part of the quantization error. QDoRA's magnitude vector starts at the
# row norms of the **dequantized** weight, so at init it too equals its 4-bit base exactly.

# %%
qdora = minidora.DoRALinear(base, r=8, alpha=16)
assert torch.allclose(qdora(x), base(x), rtol=1e-6, atol=1e-6)
assert torch.allclose(qdora.magnitude, W_hat.norm(dim=1), rtol=1e-6, atol=0)
print("QDoRA at init = its NF4 base; m = row norms of the dequantized weight")

# %% [markdown]
# ### Check your understanding
#
# 1. A fresh QLoRA layer ($B = 0$): does it equal the original `nn.Linear`, or its 4-bit copy?
# 2. The paper's setting, `adapter_dtype=torch.bfloat16`: what dtype do $A$ and $B$ get, and
#    what dtype does the layer return for a float32 input?
#
# Predict, then run the cell below; the asserts give the answers.

# %%
fresh = minidora.LoRALinear(base, r=8, alpha=16)
assert torch.equal(fresh(x), base(x))                   # 1. the 4-bit copy, exactly,
assert not torch.allclose(fresh(x), lin(x), atol=1e-3)  #    not the original layer
paper_style = minidora.LoRALinear(base, r=8, alpha=16, adapter_dtype=torch.bfloat16)
assert paper_style.lora_A.dtype == paper_style.lora_B.dtype == torch.bfloat16   # 2. bfloat16,
assert paper_style(x).dtype == torch.float32            #    and the output in the input's dtype
print("at init QLoRA is its NF4 base; bfloat16 adapters still return x's dtype")

# %% [markdown]
# ## 2. Memory accounting of a small transformer
#
# `minidora.report` counts trainable and total parameters and the bytes that hold the weights
# (packed 4-bit codes, scales, caches included). For training we add what the optimiser needs:
# a float32 gradient and Adam's two float32 moments for every trainable parameter.
# The model is the demo's small GPT, with all six projections of each block adapted.

# %%
cfg = GPTConfig(n_layer=2, n_embd=128) if SMALL else GPTConfig(n_layer=4, n_embd=256)
torch.manual_seed(0)
pretrained_gpt = GPT(cfg)
rows = {}
for method in ("full", "lora", "dora", "qlora", "qdora"):
    model = GPT(cfg)
    model.load_state_dict(pretrained_gpt.state_dict())
    if method != "full":
        minidora.wrap(model, method, target_modules=list(GPTConfig.TARGETS), r=8, alpha=16)
    rep = minidora.report(model)
    trainable = rep.total_params if method == "full" else rep.trainable_params
    rows[method] = (rep.total_params, trainable, rep.weight_bytes,
                    rep.weight_bytes + 12 * trainable)
print(f"{'method':>7} {'total params':>13} {'trainable':>10} {'weights':>10} "
      f"{'+ grads + Adam':>15}")
for method, (total, trainable, wbytes, train_bytes) in rows.items():
    print(f"{method:>7} {total:>13,d} {trainable:>10,d} {wbytes / 2**20:>7.2f} MiB "
          f"{train_bytes / 2**20:>11.2f} MiB")

# the adapted linear layers: float32 vs NF4 + double quantization
n_linear = sum(m.weight.numel() for n, m in pretrained_gpt.named_modules()
               if isinstance(m, nn.Linear))
nf4_bytes = sum(m.weight_nf4.nbytes for m in model.modules() if isinstance(m, minidora.NF4Linear))
print(f"adapted linear weights: {4 * n_linear / 2**20:.2f} MiB in float32, "
      f"{nf4_bytes / 2**20:.2f} MiB in NF4 ({8 * nf4_bytes / n_linear:.3f} bits/param)")
assert abs(8 * nf4_bytes / n_linear - 4.127) < 0.01
assert rows["qlora"][2] < rows["lora"][2] and rows["qdora"][2] < rows["dora"][2]
assert rows["lora"][1] < 0.1 * rows["full"][1]

fig, ax = plt.subplots(figsize=(7, 3.2))
names = list(rows)
ax.bar(names, [rows[n][2] / 2**20 for n in names], color="C0", label="weights")
ax.bar(names, [(rows[n][3] - rows[n][2]) / 2**20 for n in names],
       bottom=[rows[n][2] / 2**20 for n in names], color="C1", label="grads + Adam states")
ax.set_ylabel("MiB")
ax.set_title(f"training memory of a {rows['full'][0] / 1e6:.1f} M-parameter GPT (no activations)")
ax.legend()
show(fig, "qlora_memory.png")

# %% [markdown]
# ### Check your understanding
#
# 3. QDoRA trains a few more parameters than QLoRA on the same layers. How many more, and
#    where do they come from?

# %%
extra = rows["qdora"][1] - rows["qlora"][1]
out_rows = sum(m.out_features for m in model.modules() if isinstance(m, minidora.DoRALinear))
assert extra == out_rows            # the magnitude vector: one number per output row
print(f"QDoRA - QLoRA = {extra:,d} trainable numbers = the output rows of the adapted layers")

# %% [markdown]
# The embedding and layer norms stay in float32 here. In Llama-2-7B the linear layers hold 96 %
# of the parameters (tutorial 4, section 5): their weights shrink 32 / 4.127 = 7.8x against
# float32 (3.9x against bfloat16), and the whole model, embedding and head kept in bfloat16,
# from 12.55 GiB in bfloat16 to 3.60 GiB. Activations are not counted: they depend on batch
# and sequence length, not on the method (except DoRA's extra [out, r]-sized terms, small).
#
# ## 3. Fine-tuning side by side
#
# A small MLP "pre-trained" on task A, then fine-tuned on task B (task A's teacher with its
# hidden layers perturbed), with each method, the same batches and steps. "full" trains the
# three hidden weights themselves; the others put a rank-8 adapter on the same three layers.
# The NF4 bases compute in bfloat16, as in QLoRA; the adapters train in float32, minidora's
# default (QLoRA's own adapters are bfloat16).

# %%
D_IN, WIDTH, D_OUT = (16, 64, 4) if SMALL else (32, 192, 8)
TARGETS = ["2", "4", "6"]


def make_mlp():
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         nn.Linear(WIDTH, D_OUT))


teacher_a = make_mlp().requires_grad_(False)
teacher_b = make_mlp().requires_grad_(False)
teacher_b.load_state_dict(teacher_a.state_dict())
with torch.no_grad():
    for name in TARGETS:
        w = teacher_b.get_submodule(name).weight
        w.mul_(1 + 0.3 * torch.randn(WIDTH, 1))
        w.add_(0.3 * w.norm(dim=1, keepdim=True) * torch.randn_like(w) / WIDTH**0.5)


def batch(teacher, n=256):
    x = torch.randn(n, D_IN)
    return x, 3 * teacher(x)


def train(model, teacher, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        xb, yb = batch(teacher)
        loss = F.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


pretrained = make_mlp()
train(pretrained, teacher_a, 300 if SMALL else 1500, lr=3e-3)
torch.manual_seed(123)
x_eval, y_eval = batch(teacher_b, 4096)
with torch.no_grad():
    loss_before = F.mse_loss(pretrained(x_eval), y_eval).item()

steps = 150 if SMALL else 600
LRS = {"full": 1e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "qdora": 3e-3}
curves, final, seconds, trainable = {}, {}, {}, {}
for method in LRS:
    model = make_mlp()
    model.load_state_dict(pretrained.state_dict())
    if method == "full":
        model.requires_grad_(False)
        for n in TARGETS:
            model.get_submodule(n).requires_grad_(True)
    else:
        minidora.wrap(model, method, target_modules=TARGETS, r=8, alpha=16)
    trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(1)  # the same batches for every method
    t0 = time.perf_counter()
    curves[method] = train(model, teacher_b, steps, LRS[method])
    seconds[method] = time.perf_counter() - t0
    with torch.no_grad():
        final[method] = F.mse_loss(model(x_eval), y_eval).item()

print(f"loss on task B before fine-tuning: {loss_before:.4f}")
print(f"{'method':>7} {'trainable':>10} {'eval loss':>10} {'ms/step':>8}")
for method in LRS:
    print(f"{method:>7} {trainable[method]:>10,d} {final[method]:>10.5f} "
          f"{1000 * seconds[method] / steps:>8.2f}")
for method in LRS:
    assert final[method] < 0.5 * loss_before, method          # every method learned task B
assert final["qlora"] < 2.5 * final["lora"] and final["qdora"] < 2.5 * final["dora"]

fig, ax = plt.subplots(figsize=(7, 3.4))
smooth = lambda v, k=20: [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1])
                          for i in range(len(v))]
for method, c in curves.items():
    ax.semilogy(smooth(c), label=f"{method} (eval {final[method]:.4f})")
ax.axhline(loss_before, color="gray", ls=":", label="before fine-tuning")
ax.set_xlabel("step")
ax.set_ylabel("training loss (smoothed)")
ax.set_title("fine-tuning on task B")
ax.legend(fontsize=8)
show(fig, "qlora_finetune.png")

# %% [markdown]
# All five learn the new task. The quantized variants start from a slightly different (4-bit)
# base and compute it in bfloat16, yet land close to their full-precision counterparts, which is
# QLoRA's central claim; the adapters train a small fraction of the parameters. Where the time
# goes on the quantized path (dequantizing the weight at every step) is the subject of
# tutorial 6.

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/05_solutions.py](solutions/05_solutions.py).
#
# The two counting exercises use Llama-shaped models: `n_layer` blocks, each with four
# [d_model, d_model] attention projections (q, k, v, o) and three MLP projections between
# d_model and d_ff (gate, up, down), all without bias; a token embedding and an output head of
# [vocab, d_model] each; $2\,n_{\text{layer}} + 1$ RMSNorm weight vectors of d_model.
#
# ### Exercise 1: the memory of a 7B and a 13B model in NF4
#
# Write `llama_weights_gib(n_layer, d_model, d_ff, vocab, double_quant)`: the weights of the
# whole model in GiB ($2^{30}$ bytes) when the linear projections are stored in NF4 (blocksize
# 64, with or without double quantization; ignore the one offset per tensor) and everything
# else in bfloat16. Tutorial 4 gives the figures for Llama-2-7B (32, 4096, 11008, 32000); the
# check also asks for Llama-2-13B (40, 5120, 13824, 32000). Classic mistakes: GB ($10^9$ bytes)
# instead of GiB, quantizing the embedding and the head too, and forgetting the scales.

# %%
def llama_weights_gib(n_layer: int, d_model: int, d_ff: int, vocab: int,
                      double_quant: bool) -> float:
    """GiB of a Llama-shaped model's weights: linear projections in NF4, the rest in bfloat16."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(llama_weights_gib):
    cases = {(32, 4096, 11008, 32000): (3.8814, 3.6001),      # Llama-2-7B: without, with DQ
             (40, 5120, 13824, 32000): (7.2579, 6.7068)}      # Llama-2-13B
    for arch, wants in cases.items():
        for double_quant, want in zip((False, True), wants, strict=True):
            got = llama_weights_gib(*arch, double_quant)
            assert abs(got - want) < 1e-3 * want, \
                f"{arch}, double_quant={double_quant}: {got:.4f} GiB is wrong"


try:
    check_exercise_1(llama_weights_gib)
    print("exercise 1: correct; Llama-2-13B: "
          f"{llama_weights_gib(40, 5120, 13824, 32000, False):.2f} GiB without DQ, "
          f"{llama_weights_gib(40, 5120, 13824, 32000, True):.2f} GiB with DQ")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: what QLoRA trains
#
# The QLoRA paper puts adapters on every linear projection. Write
# `lora_trainable(n_layer, d_model, d_ff, r)`: the trainable parameters of rank-`r` adapters
# on all seven projections of every block. The check counts them with `minidora` on small
# models of the same shape; then compute it for Llama-2-7B at $r = 64$, and the memory of
# those parameters with their float32 gradient and Adam's two float32 moments. Classic
# mistakes: $r \cdot in \cdot out$ per layer, and treating the MLP projections as square.

# %%
def lora_trainable(n_layer: int, d_model: int, d_ff: int, r: int) -> int:
    """Trainable parameters of rank-r adapters on the seven projections of every block."""
    raise NotImplementedError("exercise 2: your code here")


# %%
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


try:
    check_exercise_2(lora_trainable)
    n_7b = lora_trainable(32, 4096, 11008, 64)
    print(f"exercise 2: correct; Llama-2-7B at r = 64: {n_7b:,d} trainable parameters, "
          f"{16 * n_7b / 2**30:.2f} GiB with float32 gradients and Adam moments")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: where QDoRA's magnitude starts
#
# Write `qdora_magnitude(weight)`: the magnitude vector a QDoRA layer starts from, for a weight
# [out, in] stored in NF4 with QLoRA's defaults (blocksize 64, double quantization). Use
# `minidora.nf4.quantize` and `dequantize`. The check compares it with `DoRALinear` over an
# `NF4Linear`. The classic mistake takes the norms of the original float weight: the layer then
# does not equal its 4-bit base at init, and every row starts scaled by a stray factor.

# %%
def qdora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """weight: [out, in] float32 -> m: [out], QDoRA's magnitude at init."""
    raise NotImplementedError("exercise 3: your code here")


# %%
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


try:
    check_exercise_3(qdora_magnitude)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
