r"""Claim 5, DoRA sec. 4.3: treating the norm as a constant in backward saves memory, not accuracy.

Liu et al. 2024 (arXiv 2402.09353), sec. 4.3: with :math:`\lVert V + \Delta V\rVert_c` detached
(``detach_norm=True``, :mod:`minidora.dora`), fine-tuning LLaMA takes 24.4% less training memory
with no notable loss of accuracy.

Here: DoRA on every linear layer of SmolLM2-135M's decoder (the dense float32 base), the same
seed, batches and AdamW steps with ``detach_norm`` True and False, each configuration in a
process of its own (so that its peak memory is its own), alternating. Measured:

- the bytes autograd saves for backward, alive at the end of one forward (each storage once,
  the model's parameters left out: they are held anyway): deterministic;
- the same count with the plain formula (:func:`minidora.dora.dora_reference`, which builds
  :math:`V' = W_0 + sBA` as an [out, in] tensor, as the paper's code did);
- the peak resident memory over the training steps above the memory after loading (Linux
  ``VmHWM``, :func:`minidora.apps.common.peak_rss`), and the time per step (median);
- after the N steps: the relative difference of the two adapters,
  :math:`\lVert\theta_T - \theta_F\rVert / \lVert\theta_F - \theta_0\rVert`, and of the
  logits on held-out windows, :math:`\lVert y_T - y_F\rVert / \lVert y_F - y_0\rVert` (0: the
  same model; 1: as far apart as training moved them).

minidora's DoRA never builds the [out, in] :math:`V'`: the norm comes from [out, r] products
(module docstring of :mod:`minidora.dora`). What detaching saves is then the small graph of those
products, and the verdict says what that means for the 24.4%.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from ..demo.progress import Progress
from .results import CANNOT_TELL, DOES_NOT, REPRODUCES
from .results import verdict as make_verdict

__all__ = ["NAME", "NUMBER", "TITLE", "PAPER", "BUDGETS", "TARGETS", "saved_bytes", "worker",
           "run", "summarize", "verdict", "report", "plot", "MEMORY_SHARE", "CLOSE"]

NAME, NUMBER = "detach", 5
TITLE = "DoRA sec. 4.3: the detached norm (24.4% less memory, same accuracy)"
PAPER = {"source": "Liu et al. 2024, DoRA, arXiv 2402.09353, sec. 4.3 (LLaMA fine-tuning)",
         "memory_reduction": 0.244, "accuracy": "no notable difference"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGETS = {
    "quick": {"steps": 3, "batch": 2, "seq": 64, "repeats": 1, "rank": 8, "lr": 2e-3},
    "full": {"steps": 8, "batch": 2, "seq": 128, "repeats": 2, "rank": 8, "lr": 2e-3},
}
# The verdict's bounds: detaching "saves memory" when the peak RSS over the load falls by at
# least a fifth of the paper's 24.4% in every repeat; the two runs "train alike" when their
# outputs differ by less than a tenth of what training changed.
MEMORY_SHARE = 0.2 * PAPER["memory_reduction"]
CLOSE = 0.1


class _Saved:
    """A tensor autograd saved for backward, kept through this holder (so we see it go)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_bytes(model, forward, params) -> int:
    """Bytes of the tensors autograd saves during ``forward()`` and still holds when it
    returns (a graph dropped in the forward, such as a detached norm's, no longer counts): each
    storage once, the storages of ``params`` left out."""
    import torch

    live = weakref.WeakSet()
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        h = _Saved(t)
        live.add(h)
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        out = forward()
    storages = {}
    for h in list(live):
        s = h.t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
    del out
    return sum(storages.values())


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(spec_path: str) -> None:
    """One configuration, in its own process: read the JSON spec, train, write the results
    (JSON) and the adapters and logits (safetensors) into the spec's folder."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_model, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import minidora
    from minidora.dora import DoRALinear, dora_reference

    from ..common import lr_at, peak_rss, reset_peak_rss

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    config = AutoConfig.from_pretrained(spec["model"], local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_model(model, str(Path(spec["model"]) / "model.safetensors"))
    minidora.wrap(model, "dora", target_modules=TARGETS, r=spec["rank"], alpha=2 * spec["rank"],
                  detach_norm=spec["detach_norm"])
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in named.items()}
    params = list(model.parameters())
    train = torch.tensor(spec["train"])                        # [steps, batch, seq]
    held = torch.tensor(spec["held_out"])                      # [k, seq]

    def loss_of(x):
        logits = model(input_ids=x).logits                     # [b, T, vocab]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    result = {"saved_bytes": saved_bytes(model, lambda: loss_of(train[0]), params)}

    class Reference(DoRALinear):     # the plain formula: V' built as [out, in]
        def forward(self, x):
            return dora_reference(x, self.base.weight, self.base.bias, self.lora_A,
                                  self.lora_B, self.magnitude, self.scaling, self.detach_norm)

    layers = [m for m in model.modules() if type(m) is DoRALinear]
    for m in layers:
        m.__class__ = Reference
    result["saved_bytes_reference"] = saved_bytes(model, lambda: loss_of(train[0]), params)
    for m in layers:
        m.__class__ = DoRALinear
    with torch.no_grad():
        y0 = model(input_ids=held).logits
    opt = torch.optim.AdamW(named.values(), lr=spec["lr"], weight_decay=0.0)
    times, losses = [], []
    rss0 = _rss()
    reset_peak_rss()
    for step, x in enumerate(train):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(train), spec["lr"])
        t0 = time.perf_counter()
        loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    result |= {"peak_rss_over_load": peak_rss() - rss0, "rss_after_load": rss0,
               "step_seconds": times, "losses": losses}
    model.eval()
    with torch.no_grad():
        y = model(input_ids=held).logits
    save_file({"y": y.contiguous(), "y0": y0.contiguous(),
               **{f"final.{n}": p.detach().contiguous() for n, p in named.items()},
               **{f"init.{n}": t.contiguous() for n, t in init.items()}},
              spec["tensors"])
    Path(spec["result"]).write_text(json.dumps(result))


def run(ctx) -> dict:
    """Train both configurations, each in a subprocess, and compare them."""
    from safetensors.torch import load_file, save_model

    b = BUDGETS[ctx.budget]
    lm = ctx.lm()
    from .quant import load_text

    ids = lm.fmt.answer_ids(load_text())[:-1]
    rng = np.random.default_rng(ctx.seed)
    starts = rng.choice(len(ids) - b["seq"], b["steps"] * b["batch"] + 2, replace=False)
    wins = np.stack([ids[s:s + b["seq"]] for s in starts])       # [steps * batch + 2, seq]
    configs = [True, False] * b["repeats"]
    runs = {True: [], False: []}
    tensors = {}
    bar = Progress(len(configs), "  detach_norm runs", log=ctx.log)
    with tempfile.TemporaryDirectory(prefix="minidora_detach_") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()                      # the float32 weights, for the workers
        lm.model.config.save_pretrained(tmp / "model")
        save_model(lm.model, str(tmp / "model" / "model.safetensors"))
        for i, detach in enumerate(configs):
            spec = {"model": str(tmp / "model"), "detach_norm": detach, "seed": ctx.seed,
                    "threads": ctx.threads, "rank": b["rank"], "lr": b["lr"],
                    "train": wins[:-2].reshape(b["steps"], b["batch"], b["seq"]).tolist(),
                    "held_out": wins[-2:].tolist(),
                    "result": str(tmp / f"r{i}.json"), "tensors": str(tmp / f"t{i}.st")}
            (tmp / f"s{i}.json").write_text(json.dumps(spec))
            code = ("import sys; from minidora.apps.reproduce.detach import worker; "
                    "worker(sys.argv[1])")
            done = subprocess.run([sys.executable, "-c", code, str(tmp / f"s{i}.json")],
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"the detach_norm={detach} run failed: {tail}")
            runs[detach].append(json.loads((tmp / f"r{i}.json").read_text()))
            if detach not in tensors:
                tensors[detach] = {k: v.double() for k, v in load_file(spec["tensors"]).items()}
            bar.update(i + 1)
            last = runs[detach][-1]
            ctx.log(f"  detach_norm={detach}: {statistics.median(last['step_seconds']):.2f} "
                    f"s/step, loss {last['losses'][-1]:.3f}")
    return summarize(runs, tensors) | {"budget": b, "targets": TARGETS}


def _rel(a, b, c) -> float:
    """||a - b|| / ||b - c|| over dicts of tensors with the same keys."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float((b[k] - c[k]).pow(2).sum()) for k in a)
    return (num / den) ** 0.5 if den > 0 else float("nan")


def summarize(runs: dict, tensors: dict) -> dict:
    """The comparison of the two configurations' results and tensors."""
    t, f = tensors[True], tensors[False]
    names = [k[len("final."):] for k in t if k.startswith("final.")]
    out = {}
    for detach in (True, False):
        rs = runs[detach]
        key = "detached" if detach else "exact"
        out[key] = {
            "saved_bytes": rs[0]["saved_bytes"],
            "saved_bytes_reference": rs[0]["saved_bytes_reference"],
            "peak_rss_over_load": [r["peak_rss_over_load"] for r in rs],
            "step_seconds_median": statistics.median(s for r in rs for s in r["step_seconds"][1:]
                                                     or r["step_seconds"]),
            "final_loss": [r["losses"][-1] for r in rs]}
    d, e = out["detached"], out["exact"]
    out["saved_reduction"] = 1 - d["saved_bytes"] / e["saved_bytes"]
    out["saved_reduction_reference"] = 1 - d["saved_bytes_reference"] / e["saved_bytes_reference"]
    out["rss_reduction"] = [1 - a / b for a, b in zip(d["peak_rss_over_load"],
                                                     e["peak_rss_over_load"], strict=True)]
    out["time_ratio"] = d["step_seconds_median"] / e["step_seconds_median"]
    out["adapter_rel_diff"] = _rel({n: t[f"final.{n}"] for n in names},
                                   {n: f[f"final.{n}"] for n in names},
                                   {n: f[f"init.{n}"] for n in names})
    out["output_rel_diff"] = _rel({"y": t["y"]}, {"y": f["y"]}, {"y": f["y0"]})
    out["same_start"] = all(bool((t[f"init.{n}"] == f[f"init.{n}"]).all()) for n in names)
    return out


def verdict(ours: dict) -> dict:
    """The claim's verdict, computed from the measurements ``ours`` (:func:`run`'s): the
    memory part from the peak RSS of every repeat (all above :data:`MEMORY_SHARE`: saved; all
    below: not; else cannot tell, as with one run per configuration), the accuracy part from
    the outputs' relative difference (below :data:`CLOSE`: alike)."""
    rss, out = ours["rss_reduction"], ours["output_rel_diff"]
    alike = out < CLOSE
    same = (f"the two runs {'train alike' if alike else 'drift apart'} (outputs {out:.1%} apart "
            f"relative to what training changed; adapters {ours['adapter_rel_diff']:.1%})")
    shown = ", ".join(f"{r:+.1%}" for r in rss)
    saved = (f"autograd keeps {ours['saved_reduction']:.2%} fewer bytes between forward and "
             f"backward (the plain formula, which builds V', keeps "
             f"{ours['exact']['saved_bytes_reference'] / ours['exact']['saved_bytes']:.1f}x "
             "minidora's)")
    if len(rss) >= 2 and min(rss) >= MEMORY_SHARE:
        word = REPRODUCES if alike else DOES_NOT
        return make_verdict(word, f"detaching lowers the training memory by {shown} (paper "
                            f"24.4%); {saved}; {same}")
    if len(rss) >= 2 and max(rss) < MEMORY_SHARE:
        return make_verdict(DOES_NOT, f"detaching lowers the training memory by only {shown} "
                            f"(paper 24.4%): minidora's DoRA never builds the [out, in] V', so "
                            f"the exact norm gradient costs [out, r] products only; {saved}; "
                            f"{same}")
    why = ("one run per configuration" if len(rss) < 2 else "the repeats disagree")
    return make_verdict(CANNOT_TELL, f"peak RSS reduction {shown} ({why}; RSS on a shared "
                        f"machine moves by tens of MiB); {saved}; {same}")


def report(ours: dict) -> list[str]:
    d, e = ours["detached"], ours["exact"]
    mib = 2 ** 20
    lines = [f"{'':<30}{'detached':>12}{'exact':>12}{'saved':>9}{'paper':>8}",
             f"{'autograd-saved MiB':<30}{d['saved_bytes'] / mib:>12.1f}"
             f"{e['saved_bytes'] / mib:>12.1f}{ours['saved_reduction']:>9.2%}",
             f"{'  plain formula (builds V)':<30}{d['saved_bytes_reference'] / mib:>12.1f}"
             f"{e['saved_bytes_reference'] / mib:>12.1f}{ours['saved_reduction_reference']:>9.1%}",
             f"{'peak RSS over load, MiB':<30}"
             f"{'/'.join(f'{v / mib:.0f}' for v in d['peak_rss_over_load']):>12}"
             f"{'/'.join(f'{v / mib:.0f}' for v in e['peak_rss_over_load']):>12}"
             f"{'/'.join(f'{v:.0%}' for v in ours['rss_reduction']):>9}{'24.4%':>8}",
             f"{'s/step (median)':<30}{d['step_seconds_median']:>12.2f}"
             f"{e['step_seconds_median']:>12.2f}{1 - ours['time_ratio']:>9.1%}",
             f"{'final training loss':<30}{d['final_loss'][0]:>12.4f}{e['final_loss'][0]:>12.4f}",
             f"adapters {ours['adapter_rel_diff']:.2%} apart, outputs {ours['output_rel_diff']:.2%}"
             " apart (relative to the change training made)"]
    return lines


def plot(result: dict, path) -> None:
    from ..demo.report import pyplot, save_png

    plt = pyplot()
    ours = result["ours"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["paper\n(LLaMA)", "peak RSS\n(mean of repeats)", "autograd-saved\nbytes"]
    vals = [PAPER["memory_reduction"], float(np.mean(ours["rss_reduction"])),
            ours["saved_reduction"]]
    a.bar(labels, [100 * v for v in vals], color=["#999999", "#3b6ea8", "#7aa6d6"])
    a.axhline(0, color="black", linewidth=0.8)
    a.set_ylabel("memory saved by detach_norm=True (%)")
    a.set_title("memory")
    b.bar(["adapters", "outputs"], [100 * ours["adapter_rel_diff"], 100 * ours["output_rel_diff"]],
          color="#3b6ea8")
    b.axhline(100 * CLOSE, color="#aa3333", linestyle="--", linewidth=1,
              label=f"{CLOSE:.0%}: the verdict's bound")
    b.set_ylabel("detached vs exact, % of the training change")
    b.set_title(f"after {result['budget']['steps']} identical steps")
    b.legend()
    fig.suptitle(f"Claim 5: {result['verdict']['word']}")
    fig.tight_layout()
    save_png(fig, path)
