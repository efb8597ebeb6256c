r"""Claim 2, DoRA fig. 2: full fine-tuning and DoRA move magnitude and direction apart; LoRA
moves them together.

Liu et al. 2024 (arXiv 2402.09353), sec. 2.2: for each layer's weight at each of several
checkpoints, against the pre-trained :math:`W_0` (:mod:`minidora.analysis`, eqs. 3-4),

.. math::  \Delta M_t = \frac1k \sum_n \big|\, \lVert W_t[n] \rVert - \lVert W_0[n] \rVert \,\big|,
           \qquad \Delta D_t = \frac1k \sum_n \big(1 - \cos(W_t[n], W_0[n])\big)

(n runs over the k output rows of PyTorch's [out, in] weight: the paper's columns). Plotted as
points (dD, dM) over layers and checkpoints, the query matrices give a negative correlation for
full fine-tuning (-0.62) and DoRA (-0.31) and a positive one for LoRA (+0.83).

Here: SmolLM2-135M, ``q_proj`` and ``v_proj`` of all 30 layers, full fine-tuning (of those
weights only), LoRA and DoRA (rank 8) on the shipped question set with the same batches and
steps (:mod:`.tune`), dM and dD at every checkpoint. Pearson's r over the (layer, checkpoint)
points; its 95% interval from a bootstrap that resamples *layers* (each drawn layer brings all
its checkpoints: the points of one layer are not independent of each other). The verdict is
read on ``q_proj`` (the paper's figure); ``v_proj`` is reported beside it.
"""

from __future__ import annotations

import numpy as np

from minidora.analysis import effective_weight, weight_decomposition

from .results import CANNOT_TELL, DOES_NOT, REPRODUCES, bootstrap, interval_sign
from .results import verdict as make_verdict
from .tune import TARGETS, Setup, compute, finetune, shipped_data

__all__ = ["NAME", "NUMBER", "TITLE", "PAPER", "BUDGETS", "METHODS", "EXPECTED", "pearson",
           "layer_bootstrap", "run", "summarize", "verdict", "report", "plot"]

NAME, NUMBER = "decomposition", 2
TITLE = "DoRA fig. 2: corr(dD, dM) is negative for full fine-tuning and DoRA, positive for LoRA"
PAPER = {
    "source": "Liu et al. 2024, DoRA, arXiv 2402.09353, sec. 2.2 and fig. 2 (query matrices, "
              "(dD, dM) over layers and intermediate checkpoints)",
    "correlation": {"full": -0.62, "lora": 0.83, "dora": -0.31},
}
METHODS = ("full", "lora", "dora")
LABELS = {"full": "full FT", "lora": "LoRA", "dora": "DoRA"}
EXPECTED = {"full": -1, "lora": +1, "dora": -1}          # the sign of the paper's correlation
VERDICT_ON = "q_proj"
BUDGETS = {
    "quick": {"steps": 4, "batch": 2, "checkpoints": [1, 2, 3, 4], "rank": 8,
              "lr": {"full": 1e-4, "lora": 1e-2, "dora": 1e-2}},
    "full": {"steps": 32, "batch": 8, "checkpoints": [8, 16, 24, 32], "rank": 8,
             "lr": {"full": 1e-4, "lora": 1e-2, "dora": 1e-2}},
}


def pearson(x, y) -> float:
    """Pearson's r of two equally long sequences (nan when one is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def layer_bootstrap(dm: np.ndarray, dd: np.ndarray, seed: int) -> tuple[float, float]:
    """95% interval of :func:`pearson` over the points of dm, dd [layers, checkpoints], layers
    resampled with replacement (each with all its checkpoints)."""
    return bootstrap(lambda i: pearson(dm[i].ravel(), dd[i].ravel()), len(dm), seed)


def run(ctx) -> dict:
    """Train each method, measure dM and dD of every target layer at every checkpoint."""
    b = BUDGETS[ctx.budget]
    lm = ctx.lm()
    dtype, why = compute()
    ctx.log(f"  {why}")
    data = shipped_data(lm)
    points = {}
    for method in METHODS:
        setup = Setup(method, b["rank"], b["steps"], b["batch"], b["lr"][method], ctx.seed, dtype)
        w0, dm, dd = {}, {k: [] for k in TARGETS}, {k: [] for k in TARGETS}

        def measure(step, model, w0=w0, dm=dm, dd=dd):
            layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
            if step == 0:
                w0.update({n: effective_weight(m) for n, m in layers.items()})
                return
            row = {k: ([], []) for k in TARGETS}
            for n, m in layers.items():                         # layer order: 0 .. 29
                m_, d_ = weight_decomposition(effective_weight(m), w0[n])
                row[n.rsplit(".", 1)[-1]][0].append(m_)
                row[n.rsplit(".", 1)[-1]][1].append(d_)
            for k in TARGETS:
                dm[k].append(row[k][0])
                dd[k].append(row[k][1])

        ctx.log(f"  {LABELS[method]}: {b['steps']} steps of {b['batch']}, lr {setup.lr:g}")
        finetune(lm, setup, data[0], [0, *b["checkpoints"]], measure, log=ctx.log)
        points[method] = {k: {"dM": np.array(dm[k]).T.tolist(), "dD": np.array(dd[k]).T.tolist()}
                          for k in TARGETS}                    # [layers, checkpoints] each
    return summarize(points, ctx.seed) | {"checkpoints": b["checkpoints"], "dtype": dtype,
                                          "rank": b["rank"], "lr": b["lr"]}


def summarize(points: dict, seed: int) -> dict:
    """Correlations and intervals from ``points[method][target]["dM" | "dD"]`` [layers,
    checkpoints]: pooled over all points, and within each checkpoint (over layers)."""
    corr = {}
    for method, per in points.items():
        corr[method] = {}
        for k, p in per.items():
            dm, dd = np.array(p["dM"]), np.array(p["dD"])
            corr[method][k] = {
                "r": pearson(dm.ravel(), dd.ravel()), "ci": layer_bootstrap(dm, dd, seed),
                "r_within_checkpoint": [pearson(dm[:, c], dd[:, c]) for c in range(dm.shape[1])],
                "n_layers": dm.shape[0], "n_checkpoints": dm.shape[1]}
    return {"points": points, "correlation": corr, "verdict_on": VERDICT_ON,
            "resampled": "layers (each with all its checkpoints)"}


def verdict(ours: dict) -> dict:
    """Reproduces when each method's interval (on ``q_proj``) has the paper's sign; does not
    when one lies wholly on the other side of 0; else cannot tell."""
    k = ours["verdict_on"]
    held, against, open_ = [], [], []
    for method in METHODS:
        c = ours["correlation"][method][k]
        sign = interval_sign(*c["ci"])
        text = (f"{LABELS[method]} {c['r']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] "
                f"(paper {PAPER['correlation'][method]:+.2f})")
        (held if sign == EXPECTED[method] else against if sign == -EXPECTED[method]
         else open_).append(text)
    if against:
        return make_verdict(DOES_NOT, f"on {k} the sign is the paper's opposite for: "
                            + "; ".join(against) + (f" (as the paper: {'; '.join(held)})"
                                                    if held else ""))
    if open_:
        return make_verdict(CANNOT_TELL, f"on {k} the 95% interval holds 0 for: "
                            + "; ".join(open_) + (f" (as the paper: {'; '.join(held)})"
                                                  if held else ""))
    return make_verdict(REPRODUCES, f"on {k} every sign is the paper's, 95% intervals clear of "
                        "0: " + "; ".join(held))


def report(ours: dict) -> list[str]:
    lines = [f"{'method':<9}{'paper':>7}  " + "".join(
        f"{k + ' r':>9}  {'95% interval':<16}{'within':>7}  " for k in TARGETS)]
    for method in METHODS:
        cells = ""
        for k in TARGETS:
            c = ours["correlation"][method][k]
            within = np.nanmean(c["r_within_checkpoint"])
            cells += f"{c['r']:>+9.2f}  [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]  {within:>+7.2f}  "
        lines.append(f"{LABELS[method]:<9}{PAPER['correlation'][method]:>+7.2f}  {cells}")
    c = ours["correlation"][METHODS[0]][TARGETS[0]]
    lines.append(f"(r over {c['n_layers']} layers x {c['n_checkpoints']} checkpoints; interval: "
                 f"bootstrap over {ours['resampled']}; within: mean r over layers at one "
                 "checkpoint)")
    return lines


def plot(result: dict, path) -> None:
    from ..demo.report import pyplot, save_png

    plt = pyplot()
    ours = result["ours"]
    fig, axes = plt.subplots(len(TARGETS), len(METHODS), figsize=(12, 7), squeeze=False)
    cps = ours["checkpoints"]
    cmap = plt.get_cmap("viridis")
    for row, k in enumerate(TARGETS):
        for col, method in enumerate(METHODS):
            ax = axes[row][col]
            dm, dd = np.array(ours["points"][method][k]["dM"]), np.array(
                ours["points"][method][k]["dD"])
            for c, step in enumerate(cps):
                ax.scatter(dd[:, c], dm[:, c], s=14, color=cmap(c / max(1, len(cps) - 1)),
                           label=f"step {step}")
            r = ours["correlation"][method][k]
            ax.set_title(f"{LABELS[method]} {k}: r {r['r']:+.2f} "
                         f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]", fontsize=9)
            ax.set_xlabel("dD")
            ax.set_ylabel("dM")
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Claim 2: {result['verdict']['word']} (paper, query: FT -0.62, LoRA +0.83, "
                 "DoRA -0.31)")
    fig.tight_layout()
    save_png(fig, path)
