"""The comparison table over seeds, the plots (matplotlib, Agg backend) and the results JSON.

Each method runs once per seed; the table gives, per method and for the pretrained model, the
mean of each held-out metric over the seeds with the range [min, max] beside it, and ranks the
rows so that rows whose ranges overlap share a rank (:mod:`.compare` says why the range and what
non-overlap means). The lines under the table say, for the comparisons that matter, which side
every seed favours, or "not distinguishable here".

The DoRA paper's analysis of magnitude and direction (arXiv 2402.09353, fig. 2) is not in this
report: on a 2-layer model with points taken over training steps, dD and dM both grow with time
and their correlation says nothing. ``python -m minidora reproduce`` measures it per layer on a
real model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import compare

__all__ = ["summarize", "table_rows", "format_table", "document", "write_json", "plot_losses",
           "SCHEMA_VERSION", "BASELINE", "COLUMNS", "format_bytes", "pyplot", "save_png",
           "log_axis"]

SCHEMA_VERSION = 3
BASELINE = "pretrained"     # the row of the pretrained model, without fine-tuning


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.1 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


COLUMNS = ["method", "trainable", "weights", "peak mem", "ms/step", "train acc",
           "held-out acc", "rank", "held-out loss", "rank"]


def summarize(runs: dict[str, list[dict]], baseline: dict) -> dict[str, dict[str, dict]]:
    """{metric: {row: :func:`.compare.stats`}} for each metric of :data:`.compare.METRICS`: the
    :data:`BASELINE` row (the pretrained model, one value) first, then every method over its
    seeds (``runs``: {method: [one result per seed]})."""
    out = {}
    for metric, (key, _, _) in compare.METRICS.items():
        out[metric] = {BASELINE: compare.stats([baseline[metric]])}
        out[metric].update({m: compare.stats([r[key] for r in rs]) for m, rs in runs.items()})
    return out


def _cell(s: dict, fmt: str) -> str:
    """``mean [min, max]``; the mean alone for one value; how many were NaN or infinite if any."""
    if s.get("non_finite"):
        return f"non-finite: {s['non_finite']} of {s['n']}"
    if s["n"] == 1:
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"


def table_rows(runs: dict[str, list[dict]], baseline: dict,
               summary: dict[str, dict[str, dict]]) -> list[list[str]]:
    """The rows of :func:`format_table` (the :data:`BASELINE` row first), as strings. Weights and
    trainable parameters are the same for every seed; peak memory is the largest over the seeds,
    ms/step and train accuracy the mean."""
    ranks = {metric: compare.ranks(summary[metric], compare.METRICS[metric][2])
             for metric in compare.METRICS}
    acc, loss = summary["accuracy"], summary["held_out_loss"]
    rows = [[BASELINE, "-", "-", "-", "-", f"{100 * baseline['train_accuracy']:.1f}%",
             _cell({k: 100 * v if k != "n" else v for k, v in acc[BASELINE].items()}, "{:.1f}%"),
             ranks["accuracy"][BASELINE], _cell(loss[BASELINE], "{:.3f}"),
             ranks["held_out_loss"][BASELINE]]]
    for name, rs in runs.items():
        pct = {k: 100 * v if k != "n" else v for k, v in acc[name].items()}
        rows.append([name, f"{rs[0]['trainable_params']:,}", format_bytes(rs[0]["weight_bytes"]),
                     format_bytes(max(r["peak_bytes"] for r in rs)),
                     f"{1000 * np.mean([r['seconds_per_step'] for r in rs]):.1f}",
                     f"{100 * np.mean([r['final_train_accuracy'] for r in rs]):.1f}%",
                     _cell(pct, "{:.1f}%"), ranks["accuracy"][name],
                     _cell(loss[name], "{:.3f}"), ranks["held_out_loss"][name]])
    return rows


def format_table(runs: dict[str, list[dict]], baseline: dict, seeds: list[int]) -> str:
    """The headline table: one row for the pretrained model and one per method, the held-out
    metrics as mean [min, max] over ``seeds`` with a rank each; under it the comparisons that
    matter, in words computed from the ranges, and what the ranks mean."""
    summary = summarize(runs, baseline)
    rows = [COLUMNS] + table_rows(runs, baseline, summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    n = len(seeds)
    seed_text = ", ".join(map(str, seeds)) if n <= 4 else f"{seeds[0]}..{seeds[-1]}"
    head = (f"fine-tuning on text B, held-out metrics as mean [min, max] over {n} seed"
            f"{'s' if n > 1 else ''} ({seed_text}) per method; the pretrained model is one model")
    lines = [head, fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])]
    comparisons = compare.comparison_lines(summary, list(runs), BASELINE)
    if comparisons:
        lines += ["", "what the seeds tell apart, on held-out accuracy and loss (better: every "
                      "seed of one beats every seed of the other):", *comparisons]
    lines += ["", "rank: 1 is best; rows whose [min, max] ranges overlap, directly or through "
                  "another row, share a rank (=) and are not ordered."]
    if n > 1:
        lines += [f"With {n} seeds each, two methods that do not differ have disjoint ranges by "
                  f"chance {compare.chance_apart(n):.1%} of the time (2 / C({2 * n}, {n}))."]
    else:
        lines += ["With one seed every range is a point: run --seeds 4 or more to compare."]
    lines += ["The magnitude/direction analysis of the DoRA paper (fig. 2) is not measured on "
              "this 2-layer toy: `python -m minidora reproduce` measures it per layer on a real "
              "model."]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def document(config: dict, pretrain: dict, baseline: dict, runs: dict[str, list[dict]],
             seeds: list[int], sweep: dict | None, seconds: float) -> dict:
    """The results document: every number of the run, every seed's run of every method
    (``methods``: {method: [result per seed, in the order of ``seeds``]}), the summary the table
    is computed from (``summary``: {metric: {row: stats}}), the ranks, the comparisons and the
    table as printed (``sweep`` None when it did not run)."""
    summary = summarize(runs, baseline)
    ranks = {metric: compare.ranks(summary[metric], compare.METRICS[metric][2])
             for metric in compare.METRICS}
    comparisons = [{"question": what, "a": a, "b": b,
                    **{metric: compare.verdict(a, b, summary[metric], higher)
                       for metric, (_, _, higher) in compare.METRICS.items()}}
                   for what, a, b in compare.pairs(list(runs), BASELINE)]
    return {"schema_version": SCHEMA_VERSION, "config": config, "pretrain": pretrain,
            "baseline": baseline, "seeds": seeds, "methods": runs, "summary": summary,
            "ranks": ranks, "comparisons": comparisons, "sweep": sweep,
            "total_seconds": seconds, "columns": COLUMNS,
            "table": table_rows(runs, baseline, summary)}


def write_json(path: Path, doc: dict) -> None:
    """Write a :func:`document`; non-finite floats become null (strict JSON)."""
    path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 80) -> None:
    """Save ``fig`` as a PNG with a 256-colour palette (Pillow comes with matplotlib): the same
    picture as matplotlib's RGBA file in about a third of the bytes. Closes the figure."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256).save(path, format="png", optimize=True)


def log_axis(ax) -> None:
    """A log-scale y axis labelled at 1, 2 and 5 times the powers of ten, in plain numbers."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _band(ax, x, curves: list, label: str) -> None:
    """The mean of ``curves`` (one per seed, same length) as a line, their range as a band."""
    c = np.array(curves)                                               # [seeds, points]
    (line,) = ax.plot(x, c.mean(0), label=label)
    if len(c) > 1:
        ax.fill_between(x, c.min(0), c.max(0), color=line.get_color(), alpha=0.15)


def plot_losses(path: Path, runs: dict[str, list[dict]], baseline: dict) -> None:
    """Training loss (moving average), held-out loss and held-out accuracy against step, one
    colour per method: the mean over the seeds as a line, their range as a band; the losses are
    on the answer characters."""
    plt = pyplot()
    from matplotlib import ticker

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for name, rs in runs.items():
        k = max(1, len(rs[0]["train_curve"]) // 20)
        smooth = [np.convolve(r["train_curve"], np.ones(k) / k, mode="valid") for r in rs]
        _band(ax1, np.arange(k, len(rs[0]["train_curve"]) + 1), smooth, name)
        steps = [p[0] for p in rs[0]["held_out_curve"]]
        _band(ax2, steps, [[p[1] for p in r["held_out_curve"]] for r in rs], name)
        _band(ax3, steps, [[p[2] for p in r["held_out_curve"]] for r in rs], name)
    for ax, key in ((ax1, "train_loss"), (ax2, "held_out_loss"), (ax3, "accuracy")):
        ax.axhline(baseline[key], color="gray", ls=":", label=BASELINE)
        ax.set_xlabel("step")
    for ax in (ax1, ax2):
        log_axis(ax)
    ax1.set_title("training loss on the answers (moving average)")
    ax2.set_title("held-out answer loss")
    ax3.set_title("held-out accuracy (exact answer)")
    ax3.set_ylim(-0.03, 1.03)
    ax3.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax3.legend(fontsize=8)
    n = len(next(iter(runs.values()))) if runs else 0
    fig.suptitle(f"Fine-tuning on text B: mean over {n} seed{'s' if n != 1 else ''} (line) and "
                 "their range (band); the same batches for every method at each seed")
    save_png(fig, path)
