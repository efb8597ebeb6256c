"""The results table, the probe answers, the loss curves (PNG) and the results JSON of
``finetune``, in the demo's style (:mod:`minidora.apps.demo.report`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..demo.report import format_bytes, log_axis, pyplot, save_png, write_json

__all__ = ["COLUMNS", "table_rows", "format_table", "format_probes", "plot_losses", "document",
           "write_json", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
COLUMNS = ["method", "trainable", "weights", "peak RSS", "s/step", "loss before", "loss after",
           "held-out before", "held-out after", "held-out acc"]


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    return [[name, f"{r['trainable_params']:,}", format_bytes(r["weight_bytes"]),
             format_bytes(r["peak_rss_bytes"]), f"{r['seconds_per_step']:.3f}",
             f"{r['initial_train_loss']:.3f}", f"{r['final_train_loss']:.3f}",
             f"{r['initial_held_out_loss']:.3f}", f"{r['final_held_out_loss']:.3f}",
             f"{100 * r['final_accuracy']:.0f}%"] for name, r in results.items()]


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table, one row per method (losses on the answer tokens)."""
    rows = [COLUMNS] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


def format_probes(results: dict[str, dict]) -> str:
    """Each probe prompt with the greedy answer before and after fine-tuning, per method."""
    lines = []
    first = next(iter(results.values()), {})
    for prompt, before in first.get("probes_before", {}).items():
        lines.append(f"Q: {prompt}")
        lines.append(f"   before            : {before!r}")
        for name, r in results.items():
            lines.append(f"   after {name:<12}: {r['probes_after'][prompt]!r}")
    return "\n".join(lines)


def plot_losses(path: Path, results: dict[str, dict], title: str) -> None:
    """Training loss per step and held-out loss at each evaluation, one colour per method."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for name, r in results.items():
        curve = np.array(r["train_curve"])
        ax1.plot(np.arange(1, len(curve) + 1), curve, label=name)
        steps, held, _ = zip(*r["held_out_curve"], strict=True)
        ax2.plot(steps, held, marker=".", label=name)
    for ax, what in ((ax1, "training loss (answer tokens)"), (ax2, "held-out loss")):
        log_axis(ax)
        ax.set_xlabel("step")
        ax.set_title(what)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    save_png(fig, path)


def document(config: dict, model: dict, data: dict, results: dict[str, dict],
             seconds: float) -> dict:
    """The results document: every number of the run."""
    return {"schema_version": SCHEMA_VERSION, "config": config, "model": model, "data": data,
            "methods": results, "total_seconds": seconds, "columns": COLUMNS,
            "table": table_rows(results)}
