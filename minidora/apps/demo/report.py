"""The comparison table, the plots (matplotlib, Agg backend) and the results JSON.

The dM / dD correlation is the one of the DoRA paper's figure 2 (arXiv 2402.09353, sec. 3): the
Pearson correlation of (dD, dM) over the query projections (``q_proj``) of every layer at every
checkpoint of a run. The paper finds it negative for full fine-tuning (-0.62) and DoRA (-0.31)
and strongly positive for LoRA (+0.83). The JSON also holds the correlation per layer type.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["correlation", "add_correlations", "format_table", "document", "write_json",
           "plot_losses", "plot_decomposition", "SCHEMA_VERSION", "format_bytes", "pyplot",
           "save_png", "log_axis"]

SCHEMA_VERSION = 2
HEADLINE_LAYER = "q_proj"


def correlation(points: list[dict], layer_type: str | None = HEADLINE_LAYER) -> float:
    """Pearson correlation of dD and dM over the points of one layer type (None: all layers)."""
    sel = [p for p in points if layer_type is None or p["layer"].endswith(layer_type)]
    if len(sel) < 3:
        return float("nan")
    dd = np.array([p["dD"] for p in sel])
    dm = np.array([p["dM"] for p in sel])
    if dd.std() == 0 or dm.std() == 0:
        return float("nan")
    return float(np.corrcoef(dd, dm)[0, 1])


def add_correlations(res: dict) -> dict:
    """Add ``corr_dD_dM`` (q_proj) and ``corr_by_layer_type`` to one method's results."""
    types = sorted({p["layer"].split(".")[-1] for p in res["decomposition"]})
    res["corr_dD_dM"] = correlation(res["decomposition"])
    res["corr_by_layer_type"] = {t: correlation(res["decomposition"], t) for t in types}
    return res


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.1 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


COLUMNS = ["method", "trainable", "weights", "peak mem", "ms/step", "train loss", "held-out loss",
           "train acc", "held-out acc", "corr(dD,dM)"]


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['trainable_params']:,}", format_bytes(r["weight_bytes"]),
                     format_bytes(r["peak_bytes"]), f"{1000 * r['seconds_per_step']:.1f}",
                     f"{r['final_train_loss']:.4f}", f"{r['final_held_out_loss']:.4f}",
                     f"{100 * r['final_train_accuracy']:.1f}%",
                     f"{100 * r['final_accuracy']:.1f}%", f"{r['corr_dD_dM']:+.2f}"])
    return rows


def format_table(results: dict[str, dict], baseline: dict) -> str:
    """A plain-text table, one row per method, under a line with the pretrained baseline."""
    rows = [COLUMNS] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    head = (f"pretrained model on text B (before fine-tuning): "
            f"train loss {baseline['train_loss']:.4f}, "
            f"held-out loss {baseline['held_out_loss']:.4f}, "
            f"train acc {100 * baseline['train_accuracy']:.1f}%, "
            f"held-out acc {100 * baseline['accuracy']:.1f}%")
    return "\n".join([head, fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def document(config: dict, pretrain: dict, baseline: dict, results: dict[str, dict],
             sweep: dict | None, seconds: float) -> dict:
    """The results document: every number of the run (``sweep`` None when it did not run)."""
    return {"schema_version": SCHEMA_VERSION, "config": config, "pretrain": pretrain,
            "baseline": baseline, "methods": results, "sweep": sweep, "total_seconds": seconds,
            "columns": COLUMNS, "table": table_rows(results)}


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


def plot_losses(path: Path, results: dict[str, dict], baseline: dict) -> None:
    """Training loss (moving average), held-out loss and held-out accuracy against step, one
    colour per method; the losses are on the answer characters."""
    plt = pyplot()
    from matplotlib import ticker

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for name, r in results.items():
        curve = np.array(r["train_curve"])
        k = max(1, len(curve) // 20)
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, len(curve) + 1), smooth, label=name)
        steps, held, acc = zip(*r["held_out_curve"], strict=True)
        ax2.plot(steps, held, marker=".", label=name)
        ax3.plot(steps, acc, marker=".", label=name)
    for ax, key in ((ax1, "train_loss"), (ax2, "held_out_loss"), (ax3, "accuracy")):
        ax.axhline(baseline[key], color="gray", ls=":", label="pretrained")
        ax.set_xlabel("step")
    for ax in (ax1, ax2):
        log_axis(ax)
    ax1.set_title("training loss on the answers (moving average)")
    ax2.set_title("held-out answer loss")
    ax3.set_title("held-out accuracy (exact answer)")
    ax3.set_ylim(-0.03, 1.03)
    ax3.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax3.legend(fontsize=8)
    fig.suptitle("Fine-tuning on text B, same steps, batches and seed for every method")
    save_png(fig, path)


def plot_decomposition(path: Path, results: dict[str, dict]) -> None:
    """dM against dD of the q_proj weights over the checkpoints, one panel per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(max(7.0, 3.2 * len(results)), 3.4),
                             squeeze=False,
                             constrained_layout=True)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        pts = [p for p in r["decomposition"] if p["layer"].endswith(HEADLINE_LAYER)]
        layers = sorted({p["layer"] for p in pts})
        for i, layer in enumerate(layers):
            sel = [p for p in pts if p["layer"] == layer]
            sc = ax.scatter([p["dD"] for p in sel], [p["dM"] for p in sel],
                            c=[p["step"] for p in sel], cmap="viridis", marker="os^vD<>p"[i % 8],
                            label=layer.split(".q_proj")[0])
        ax.set_title(f"{name}: corr {r['corr_dD_dM']:+.2f}")
        ax.set_xlabel("dD (direction)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        if layers:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dM (magnitude)")
    if results:
        fig.colorbar(sc, ax=axes[0][-1], label="step")
    fig.suptitle("q_proj weights against W0 (DoRA paper eqs. 3-4); colour: step, marker: layer")
    save_png(fig, path)
