"""Claim 3, DoRA's robustness to rank: at a low rank DoRA keeps most of its accuracy, LoRA not.

Liu et al. 2024 (arXiv 2402.09353), fig. 5 and table 15: LLaMA-7B on commonsense reasoning,
average accuracy: LoRA 39.5 at r = 4 and 40.7 at r = 8, DoRA 61.9 and 78.0.

Here: SmolLM2-135M, LoRA and DoRA on ``q_proj`` and ``v_proj`` of all 30 layers at ranks 1, 2,
4 and 8 (alpha = 2r), the same steps, batches and learning rate for every run (:mod:`.tune`),
several seeds (a seed fixes the adapters' initialisation and the batches: the LoRA and DoRA
runs of one seed see the same batches). Measured: the share of the 50 held-out questions
answered exactly (finetune's ``score``), its mean and 95% interval over seeds, and DoRA - LoRA
per seed. The verdict reads the paired difference averaged over the low ranks (r <= 4); its
interval comes from a bootstrap over seeds (a drawn seed brings all its ranks and both methods).
"""

from __future__ import annotations

import numpy as np

from .results import CANNOT_TELL, DOES_NOT, REPRODUCES, bootstrap, interval_sign
from .results import verdict as make_verdict
from .tune import Setup, compute, held_out_run, shipped_data

__all__ = ["NAME", "NUMBER", "TITLE", "PAPER", "BUDGETS", "METHODS", "LOW_RANK", "NO_GAIN",
           "LEARNT", "run", "summarize", "verdict", "report", "plot"]

NAME, NUMBER = "rank", 3
TITLE = "DoRA table 15: DoRA above LoRA at low rank (r = 1, 2, 4, 8)"
PAPER = {
    "source": "Liu et al. 2024, DoRA, arXiv 2402.09353, fig. 5 / table 15 (LLaMA-7B, "
              "commonsense reasoning, average accuracy %)",
    "accuracy": {"lora": {"4": 39.5, "8": 40.7}, "dora": {"4": 61.9, "8": 78.0}},
}
METHODS = ("lora", "dora")
LOW_RANK = 4          # the ranks the verdict reads: r <= LOW_RANK
NO_GAIN = 0.05        # an interval holding 0 whose top is below this rules out a gain of 5 points
LEARNT = 0.10         # below this best mean accuracy the runs learnt too little to compare
BUDGETS = {
    "quick": {"ranks": [1, 8], "seeds": 2, "steps": 6, "batch": 4, "lr": 1e-2},
    "full": {"ranks": [1, 2, 4, 8], "seeds": 5, "steps": 24, "batch": 4, "lr": 1e-2},
}


def setups(budget: dict, method: str, rank: int, seed0: int, dtype: str) -> list[Setup]:
    return [Setup(method, rank, budget["steps"], budget["batch"], budget["lr"], seed0 + i, dtype)
            for i in range(budget["seeds"])]


def run(ctx) -> dict:
    b = BUDGETS[ctx.budget]
    lm = ctx.lm()
    dtype, why = compute()
    ctx.log(f"  {why}; {b['seeds']} seeds x ranks {b['ranks']} x {', '.join(METHODS)}, "
            f"{b['steps']} steps of {b['batch']}, lr {b['lr']:g}")
    data = shipped_data(lm)
    acc, loss = {}, {}
    for rank in b["ranks"]:
        for method in METHODS:
            runs = [held_out_run(lm, s, data, ctx.log)
                    for s in setups(b, method, rank, ctx.seed, dtype)]
            acc.setdefault(method, {})[str(rank)] = [r["accuracy"] for r in runs]
            loss.setdefault(method, {})[str(rank)] = [r["loss"] for r in runs]
    return summarize(acc, loss, ctx.seed) | {"dtype": dtype, "held_out": len(data[1].x)}


def summarize(acc: dict, loss: dict, seed: int) -> dict:
    """Means and intervals from ``acc[method][rank]`` = per-seed held-out accuracies."""
    ranks = list(acc["lora"])
    a = {m: np.array([acc[m][r] for r in ranks]) for m in METHODS}     # [ranks, seeds]
    n = a["lora"].shape[1]
    table = {m: {r: {"mean": float(a[m][i].mean()),
                     "ci": bootstrap(lambda s, x=a[m][i]: float(x[s].mean()), n, seed),
                     "loss": float(np.mean(loss[m][r]))}
                 for i, r in enumerate(ranks)} for m in METHODS}
    diff = a["dora"] - a["lora"]                                        # [ranks, seeds]
    per_rank = {r: {"mean": float(diff[i].mean()),
                    "ci": bootstrap(lambda s, x=diff[i]: float(x[s].mean()), n, seed)}
                for i, r in enumerate(ranks)}
    low = [i for i, r in enumerate(ranks) if int(r) <= LOW_RANK]
    low_diff = diff[low].mean(0)                                        # [seeds]
    return {"accuracy": acc, "loss": loss, "table": table, "dora_minus_lora": per_rank,
            "low_ranks": [ranks[i] for i in low], "low_rank_diff": float(low_diff.mean()),
            "low_rank_ci": bootstrap(lambda s: float(low_diff[s].mean()), n, seed),
            "seeds": n, "resampled": "seeds (each with all its ranks and both methods)"}


def verdict(ours: dict) -> dict:
    """Reproduces when DoRA - LoRA at the low ranks has an interval above 0; does not when it
    lies below 0, or holds 0 but stops short of a gain of :data:`NO_GAIN`; else cannot tell."""
    d, (lo, hi) = ours["low_rank_diff"], ours["low_rank_ci"]
    where = (f"DoRA - LoRA at r in {{{', '.join(ours['low_ranks'])}}}: {100 * d:+.1f} points, "
             f"95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}] over {ours['seeds']} seeds")
    best = max(c["mean"] for t in ours["table"].values() for c in t.values())
    if best < LEARNT:
        return make_verdict(CANNOT_TELL, f"{where}; no run learnt enough to compare (best mean "
                            f"held-out accuracy {best:.0%} < {LEARNT:.0%})")
    sign = interval_sign(lo, hi)
    if sign > 0:
        return make_verdict(REPRODUCES, f"{where}: DoRA is above LoRA at low rank")
    if sign < 0:
        return make_verdict(DOES_NOT, f"{where}: DoRA is below LoRA at low rank")
    if hi < NO_GAIN:
        return make_verdict(DOES_NOT, f"{where}: the interval rules out a gain of "
                            f"{100 * NO_GAIN:.0f} points (the paper's is 22 at r = 4)")
    return make_verdict(CANNOT_TELL, f"{where}: the interval holds 0 and gains of "
                        f"{100 * NO_GAIN:.0f} points or more; more seeds would narrow it")


def report(ours: dict) -> list[str]:
    paper = PAPER["accuracy"]
    lines = [f"{'rank':>4}  {'method':<6}{'paper %':>8}{'ours %':>8}  {'95% interval':<15}"
             f"{'loss':>7}   {'DoRA-LoRA':>9}  95% interval"]
    for r, d in ours["dora_minus_lora"].items():
        for m in METHODS:
            c = ours["table"][m][r]
            p = f"{paper[m][r]:.1f}" if r in paper[m] else "-"
            tail = (f"   {100 * d['mean']:>+9.1f}  [{100 * d['ci'][0]:+.1f}, "
                    f"{100 * d['ci'][1]:+.1f}]" if m == "dora" else "")
            lines.append(f"{r:>4}  {m:<6}{p:>8}{100 * c['mean']:>8.1f}  [{100 * c['ci'][0]:5.1f}, "
                         f"{100 * c['ci'][1]:5.1f}]{c['loss']:>7.3f}{tail}")
    lines.append(f"(held-out exact answers of {ours['held_out']} questions, mean over "
                 f"{ours['seeds']} seeds; intervals: bootstrap over {ours['resampled']}; the "
                 "paper's figures are LLaMA-7B on commonsense tasks)")
    return lines


def plot(result: dict, path) -> None:
    from ..demo.report import pyplot, save_png

    plt = pyplot()
    ours = result["ours"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    paper = result["paper"]["accuracy"]
    for m, color, shift in zip(METHODS, ("#d0703c", "#3b6ea8"), (0.95, 1.05), strict=True):
        ranks = [int(r) * shift for r in ours["table"][m]]      # side by side at each rank
        mean = np.array([100 * c["mean"] for c in ours["table"][m].values()])
        ci = np.array([[100 * x for x in c["ci"]] for c in ours["table"][m].values()])
        b.errorbar(ranks, mean, yerr=np.abs(ci.T - mean), capsize=4, marker="o", color=color,
                   label=m)
        for r, xs in ours["accuracy"][m].items():
            b.scatter([int(r) * shift] * len(xs), [100 * x for x in xs], s=8, color=color,
                      alpha=0.4)
        a.plot([int(r) for r in paper[m]], list(paper[m].values()), marker="o", color=color,
               label=m)
    a.set_title("paper: LLaMA-7B, commonsense (table 15)")
    b.set_title(f"ours: SmolLM2-135M, held-out exact, {ours['seeds']} seeds", fontsize=10)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("accuracy %")
        ax.legend()
    fig.suptitle(f"Claim 3: {result['verdict']['word']}")
    fig.tight_layout()
    save_png(fig, path)
