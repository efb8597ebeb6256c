"""The rank sweep: adapters at several ranks and seeds under the demo's one budget.

The DoRA paper (arXiv 2402.09353) reports, in its study of rank settings on LLaMA-7B, that DoRA
keeps more of its accuracy than LoRA as the rank shrinks. Here every adapter method of
``cfg.sweep_methods`` trains at every rank of ``cfg.sweep_ranks`` with ``cfg.seeds`` seeds
(``cfg.seed``, ``cfg.seed + 1``, ...): the same steps, batch size, schedule and learning rate as
the main comparison, and the same scaling s = alpha / r at every rank (alpha = s r, s taken from
``--alpha`` / ``--rank``), so that a rank changes the capacity of the update and not its size.
A seed sets the adapters' initialisation and the order of the batches; the pretrained model is
the same for all. The spread over seeds is the uncertainty of a point: one seed says little, and
two points are told apart only where their ranges over the seeds do not overlap (:mod:`.compare`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import compare
from .data import Problems
from .report import pyplot, save_png
from .train import RunConfig, finetune

__all__ = ["sweep_points", "run_sweep", "summarize", "verdicts", "format_sweep",
           "plot_rank_sweep"]

KEPT = ("method", "rank", "alpha", "seed", "trainable_params", "final_train_loss",
        "final_held_out_loss", "final_accuracy", "seconds")


def sweep_points(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """(method, rank, seed) of every run of the sweep, in the order they run."""
    return [(m, r, cfg.seed + k) for m in cfg.sweep_methods for r in cfg.sweep_ranks
            for k in range(cfg.seeds)]


def _key(res: dict) -> tuple:
    return res["method"], res.get("rank"), res.get("alpha"), res["seed"]


def run_sweep(state: dict, cfg: RunConfig, train: Problems, held_out: Problems,
              done: list[dict] = (), log=print) -> list[dict]:
    """Fine-tune at every point of :func:`sweep_points`; a run of ``done`` (the main comparison)
    with the same method, rank, alpha and seed is reused, not repeated. Sweep runs evaluate on
    the held-out problems only at the end (the table's runs every ``cfg.eval_every`` steps):
    the training is the same, and the numbers kept are the final ones.

    Returns:
        One dict per run: the keys of :data:`KEPT`.
    """
    scale = cfg.alpha / cfg.rank
    known = {_key(r): r for r in done}
    cfg = replace(cfg, eval_every=cfg.steps)   # no curves: the final numbers are what is kept
    runs = []
    points = sweep_points(cfg)
    for i, (method, rank, seed) in enumerate(points):
        c = replace(cfg, rank=rank, alpha=scale * rank, seed=seed)
        res = known.get((method, rank, c.alpha, seed))
        if res is None:
            res = finetune(method, state, c, train, held_out, log=log)
        run = {k: res[k] for k in KEPT}
        runs.append(run)
        log(f"  sweep {i + 1:>2}/{len(points)}: {method:<5} r={rank:<3} seed {seed}: held-out "
            f"loss {run['final_held_out_loss']:.3f}, acc {100 * run['final_accuracy']:5.1f}%")
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, rank), in the order of ``runs``: ``method``, ``rank``,
    ``trainable_params`` and, for ``accuracy`` and ``held_out_loss``, the stats over the seeds
    (:func:`.compare.stats`: mean, min, max, sample standard deviation, count n)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["rank"]), []).append(run)
    rows = []
    for (method, rank), rs in groups.items():
        rows.append({"method": method, "rank": rank, "trainable_params": rs[0]["trainable_params"],
                     **{metric: compare.stats([r[key] for r in rs])
                        for metric, (key, _, _) in compare.METRICS.items()}})
    return rows


def verdicts(summary: list[dict]) -> list[str]:
    """In words, computed from the ranges: for each method its lowest rank against its highest,
    and at each rank every later method against the first (e.g. dora vs lora)."""
    cell = {(row["method"], row["rank"]): row for row in summary}
    methods = list(dict.fromkeys(row["method"] for row in summary))
    ranks = sorted({row["rank"] for row in summary})

    def say(a, b, label_a, label_b):
        words = []
        for metric, (_, name, higher) in compare.METRICS.items():
            s = {label_a: cell[a][metric], label_b: cell[b][metric]}
            words.append(f"{name}: {compare.verdict(label_a, label_b, s, higher)}")
        return f"  {label_a} vs {label_b}: " + "; ".join(words)

    lines = []
    for m in methods:
        rs = [r for r in ranks if (m, r) in cell]
        if len(rs) > 1:
            lines.append(say((m, rs[-1]), (m, rs[0]), f"{m} r={rs[-1]}", f"{m} r={rs[0]}"))
    for r in ranks:
        ms = [m for m in methods if (m, r) in cell]
        for m in ms[1:]:
            lines.append(say((m, r), (ms[0], r), f"{m} r={r}", f"{ms[0]} r={r}"))
    return lines


def format_sweep(summary: list[dict]) -> str:
    """Held-out accuracy and loss per method and rank: mean and [min, max] over the seeds, then
    :func:`verdicts`."""
    ranks = sorted({row["rank"] for row in summary})
    cell = {(row["method"], row["rank"]): row for row in summary}
    head = ["method", "metric"] + [f"r={r}" for r in ranks]
    rows = []
    for method in dict.fromkeys(row["method"] for row in summary):
        for metric, name, fmt in (("accuracy", "acc", "{:.0%}"),
                                  ("held_out_loss", "loss", "{:.3f}")):
            cells = []
            for r in ranks:
                s = cell[method, r][metric] if (method, r) in cell else None
                cells.append("" if s is None else f"{fmt.format(s['mean'])} "
                             f"[{fmt.format(s['min'])}, {fmt.format(s['max'])}]")
            rows.append([method, name] + cells)
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    n = max(row["accuracy"]["n"] for row in summary)
    title = f"rank sweep: held-out accuracy and loss, mean [min, max] over {n} seed(s)"
    told = verdicts(summary)
    return "\n".join([title, line(head), "  ".join("-" * w for w in widths), *map(line, rows),
                      *(["what the seeds tell apart:", *told] if told else [])])


def plot_rank_sweep(path: Path, runs: list[dict], summary: list[dict], references: dict) -> None:
    """Held-out accuracy and loss against rank, one colour per method: every seed as a dot, the
    mean as a line, the min-max range as a band; ``references`` ({label: (loss, accuracy)},
    e.g. full fine-tuning and the pretrained model) as grey horizontal lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    ranks = sorted({row["rank"] for row in summary})
    panels = (("accuracy", "final_accuracy", "held-out accuracy (exact answer)"),
              ("held_out_loss", "final_held_out_loss", "held-out answer loss"))
    for ax, (metric, key, title) in zip(axes, panels, strict=True):
        for method in dict.fromkeys(row["method"] for row in summary):
            rows = [row for row in summary if row["method"] == method]
            rs = [row["rank"] for row in rows]
            (line,) = ax.plot(rs, [row[metric]["mean"] for row in rows], marker="o",
                              label=f"{method}, mean")
            ax.fill_between(rs, [row[metric]["min"] for row in rows],
                            [row[metric]["max"] for row in rows], color=line.get_color(),
                            alpha=0.15)
            pts = [(run["rank"], run[key]) for run in runs if run["method"] == method]
            ax.scatter(*zip(*pts, strict=True), s=12, color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r (alpha = s r)")
        ax.set_title(title)
        if metric == "accuracy":
            for i, (name, (_, acc)) in enumerate(references.items()):
                ax.axhline(acc, color="gray", ls=(":", "--", "-.")[i % 3], label=name)
            ax.set_ylim(-0.03, 1.03)
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        else:   # the references would squash the sweep: named in a corner instead
            ax.text(0.98, 0.97, "\n".join(f"{name}: {loss:.3g}"
                                          for name, (loss, _) in references.items()),
                    transform=ax.transAxes, ha="right", va="top", fontsize=8, color="gray")
        ax.legend(fontsize=8, loc="center left" if metric == "accuracy" else "lower left")
    n = max(row["accuracy"]["n"] for row in summary)
    fig.suptitle(f"Rank sweep on text B: a dot per seed ({n} per point), the band their range")
    save_png(fig, path)
