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
# QLoRA (Dettmers et al., 2023, arXiv 2305.14314) is LoRA over a frozen base stored in NF4 with
# double quantization; QDoRA is DoRA over the same base. In minidora that is literally
# composition: `LoRALinear(NF4Linear(...))` and `DoRALinear(NF4Linear(...))`. This tutorial:
#
# 1. builds one QLoRA layer by hand and checks it against the formula;
# 2. accounts for the memory of a small transformer under each method;
# 3. fine-tunes the same small model with full fine-tuning, LoRA, DoRA, QLoRA and QDoRA, side
#    by side.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import minidora
from minidora import nf4
from minidora.demo.model import GPT, GPTConfig
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; one thread, seed 0


# %% [markdown]
# ## 1. One QLoRA layer
#
# QLoRA's eq. 5, in PyTorch's row convention:
#
# $$ Y = X\,\text{doubleDequant}(c_1, c_2, W^{\text{NF4}})^\top + b + s\, X A^\top B^\top $$
#
# The base product runs in a *compute dtype* (bfloat16 in QLoRA; float32 here so that we can
# compare tightly), the adapter in float32.

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
    rows[method] = (rep.total_params, trainable, rep.weight_bytes, rep.weight_bytes + 12 * trainable)
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
# The embedding and layer norms stay in float32 here; in a 7B model the linear layers are
# almost all of the parameters, so the ratio approaches 32 / 4.127 (about 7.8x against float32,
# 3.9x against bfloat16). Activations are not counted: they depend on batch and sequence length,
# not on the method (except DoRA's extra [out, r]-sized terms, small).
#
# ## 3. Fine-tuning side by side
#
# A small MLP "pre-trained" on task A, then fine-tuned on task B (task A's teacher with its
# hidden layers perturbed), with each method, the same batches and steps. "full" trains the
# three hidden weights themselves; the others put a rank-8 adapter on the same three layers.
# The NF4 bases compute in bfloat16, as in QLoRA; the adapters train in float32.

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
smooth = lambda v, k=20: [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
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
