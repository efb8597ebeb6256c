"""Claim 4, QLoRA matches 16-bit LoRA: fine-tuning over an NF4 + DQ base costs no accuracy.

Dettmers et al. 2023 (arXiv 2305.14314), table 4: LLaMA 7B-65B fine-tuned on Alpaca and
FLAN v2, mean 5-shot MMLU: LoRA over a BF16 base 53.0, QLoRA over NF4 + double quantization
53.1.

Here: SmolLM2-135M, LoRA over the float base (in the compute dtype: bfloat16 where the CPU has
it natively, as the paper's, float32 elsewhere) against QLoRA over the same weights quantized to
NF4 + DQ, blocks of 64 (:mod:`minidora.nf4`), adapters on ``q_proj`` and ``v_proj`` of all 30
layers, rank 8, with claim 3's steps, batches and learning rate (:mod:`.tune`; a LoRA run both
claims need is trained once). The seeds pair the runs: a seed fixes the adapters' initialisation
and the batches of both. Measured: the share of the 50 held-out questions answered exactly, and
QLoRA - LoRA per seed, its mean and a 95% bootstrap interval over seeds.

"Narrow" means the whole interval within +-:data:`NARROW` (5 points: 2.5 of the 50 questions);
the paper's difference is 0.1 points.
"""

from __future__ import annotations

import numpy as np

from . import rank as claim3
from .results import CANNOT_TELL, DOES_NOT, REPRODUCES, bootstrap, interval_sign
from .results import verdict as make_verdict
from .tune import Setup, compute, held_out_run, shipped_data

__all__ = ["NAME", "NUMBER", "TITLE", "PAPER", "BUDGETS", "METHODS", "NARROW", "run",
           "summarize", "verdict", "report", "plot"]

NAME, NUMBER = "qlora16", 4
TITLE = "QLoRA table 4: QLoRA over NF4 + DQ matches LoRA over a 16-bit base"
PAPER = {
    "source": "Dettmers et al. 2023, QLoRA, arXiv 2305.14314, table 4 (LLaMA 7B-65B on Alpaca "
              "and FLAN v2, mean 5-shot MMLU %)",
    "mmlu": {"lora_bf16": 53.0, "qlora_nf4_dq": 53.1},
}
METHODS = ("lora", "qlora")
NARROW = 0.05
LEARNT = claim3.LEARNT
BUDGETS = {b: {"rank": 8, "seeds": c["seeds"], "steps": c["steps"], "batch": c["batch"],
               "lr": c["lr"]} for b, c in claim3.BUDGETS.items()}


def run(ctx) -> dict:
    b = BUDGETS[ctx.budget]
    lm = ctx.lm()
    dtype, why = compute()
    ctx.log(f"  {why}; {b['seeds']} seeds, rank {b['rank']}, {b['steps']} steps of "
            f"{b['batch']}, lr {b['lr']:g}")
    data = shipped_data(lm)
    acc, loss = {}, {}
    for method in METHODS:
        runs = [held_out_run(lm, Setup(method, b["rank"], b["steps"], b["batch"], b["lr"],
                                       ctx.seed + i, dtype), data, ctx.log)
                for i in range(b["seeds"])]
        acc[method] = [r["accuracy"] for r in runs]
        loss[method] = [r["loss"] for r in runs]
    return summarize(acc, loss, ctx.seed) | {"dtype": dtype, "held_out": len(data[1].x),
                                             "rank": b["rank"]}


def summarize(acc: dict, loss: dict, seed: int) -> dict:
    """Means, intervals and the paired difference from ``acc[method]`` = per-seed accuracies."""
    a = {m: np.array(acc[m], np.float64) for m in METHODS}
    n = len(a["lora"])
    diff = a["qlora"] - a["lora"]                                       # [seeds]
    ldiff = np.array(loss["qlora"]) - np.array(loss["lora"])
    return {"accuracy": acc, "loss": loss,
            "mean": {m: float(a[m].mean()) for m in METHODS},
            "ci": {m: bootstrap(lambda s, x=a[m]: float(x[s].mean()), n, seed) for m in METHODS},
            "diff": float(diff.mean()),
            "diff_ci": bootstrap(lambda s: float(diff[s].mean()), n, seed),
            "loss_diff": float(ldiff.mean()),
            "loss_diff_ci": bootstrap(lambda s: float(ldiff[s].mean()), n, seed),
            "seeds": n, "narrow": NARROW, "resampled": "seeds (each with both methods)"}


def verdict(ours: dict) -> dict:
    """Reproduces when QLoRA - LoRA has an interval holding 0 and within +-NARROW; does not
    when it excludes 0; cannot tell when it holds 0 but is wider."""
    d, (lo, hi) = ours["diff"], ours["diff_ci"]
    where = (f"QLoRA - LoRA {100 * d:+.1f} points, 95% interval [{100 * lo:+.1f}, "
             f"{100 * hi:+.1f}] over {ours['seeds']} seeds")
    best = max(ours["mean"].values())
    if best < LEARNT:
        return make_verdict(CANNOT_TELL, f"{where}; neither method learnt enough to compare "
                            f"(best mean held-out accuracy {best:.0%} < {LEARNT:.0%})")
    sign = interval_sign(lo, hi)
    if sign != 0:
        return make_verdict(DOES_NOT, f"{where}: the interval excludes 0, QLoRA is "
                            f"{'above' if sign > 0 else 'below'} LoRA")
    if -NARROW <= lo and hi <= NARROW:
        return make_verdict(REPRODUCES, f"{where}: holds 0 and lies within +-{100 * NARROW:.0f} "
                            "points")
    return make_verdict(CANNOT_TELL, f"{where}: holds 0 but reaches beyond +-"
                        f"{100 * NARROW:.0f} points; more seeds would narrow it")


def report(ours: dict) -> list[str]:
    paper = PAPER["mmlu"]
    lines = [f"{'method':<26}{'paper %':>8}{'ours %':>8}  95% interval   per seed"]
    for m, p in zip(METHODS, (paper["lora_bf16"], paper["qlora_nf4_dq"]), strict=True):
        lo, hi = ours["ci"][m]
        name = f"{m} ({'NF4 + DQ' if m == 'qlora' else ours['dtype']} base)"
        seeds = " ".join(f"{100 * x:.0f}" for x in ours["accuracy"][m])
        lines.append(f"{name:<26}{p:>8.1f}{100 * ours['mean'][m]:>8.1f}  [{100 * lo:5.1f}, "
                     f"{100 * hi:5.1f}]  {seeds}")
    lo, hi = ours["diff_ci"]
    llo, lhi = ours["loss_diff_ci"]
    lines.append(f"{'QLoRA - LoRA':<26}{paper['qlora_nf4_dq'] - paper['lora_bf16']:>+8.1f}"
                 f"{100 * ours['diff']:>+8.1f}  [{100 * lo:+.1f}, {100 * hi:+.1f}]  (answer loss "
                 f"{ours['loss_diff']:+.3f} [{llo:+.3f}, {lhi:+.3f}])")
    lines.append(f"(held-out exact answers of {ours['held_out']} questions, rank {ours['rank']}; "
                 f"intervals: bootstrap over {ours['resampled']}; narrow: within "
                 f"+-{100 * ours['narrow']:.0f} points)")
    return lines


def plot(result: dict, path) -> None:
    from ..demo.report import pyplot, save_png

    plt = pyplot()
    ours = result["ours"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    lora, qlora = (100 * np.array(ours["accuracy"][m]) for m in METHODS)
    for x, y in zip(lora, qlora, strict=True):
        a.plot([0, 1], [x, y], color="#999999", marker="o")
    a.set_xticks([0, 1], [f"LoRA ({ours['dtype']})", "QLoRA (NF4 + DQ)"])
    a.set_ylabel("held-out exact answers %")
    a.set_title("each line: one seed")
    d, (lo, hi) = 100 * ours["diff"], (100 * v for v in ours["diff_ci"])
    b.errorbar([0], [d], yerr=[[d - lo], [hi - d]], capsize=6, marker="o", color="#3b6ea8",
               label="ours (95% interval)")
    b.scatter([0], [result["paper"]["mmlu"]["qlora_nf4_dq"] - result["paper"]["mmlu"][
        "lora_bf16"]], marker="x", color="#d0703c", s=60, label="paper (MMLU)", zorder=3)
    b.axhspan(-100 * NARROW, 100 * NARROW, color="#dddddd", label="narrow")
    b.axhline(0, color="black", lw=0.5)
    b.set_xticks([])
    b.set_ylabel("QLoRA - LoRA, points")
    b.legend(fontsize=8)
    fig.suptitle(f"Claim 4: {result['verdict']['word']}")
    fig.tight_layout()
    save_png(fig, path)
