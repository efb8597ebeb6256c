"""The whole demo run: pretrain (or load), fine-tune with each method over the seeds, sweep the
rank, report."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import report, sweep
from .data import load_corpora, problems
from .model import GPT
from .precision import compute_dtype
from .train import DemoError, RunConfig, finetune, pretrain, score

__all__ = ["OUTPUTS", "SWEEP_OUTPUTS", "outputs", "run"]

OUTPUTS = ("results.json", "losses.png")
SWEEP_OUTPUTS = ("rank_sweep.png",)


def outputs(cfg: RunConfig) -> tuple[str, ...]:
    """The files a run with ``cfg`` writes."""
    return OUTPUTS + (SWEEP_OUTPUTS if cfg.sweep_methods else ())


def run(cfg: RunConfig, methods: list[str], out: Path, cache_dir: Path | None, log=print) -> dict:
    """Run the comparison and the rank sweep and write :func:`outputs` to ``out``.

    Returns:
        The results document (as written to ``results.json``, before the JSON null conversion).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, methods, out, cache_dir, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: RunConfig, methods: list[str], out: Path, cache_dir: Path | None, log) -> dict:
    t0 = time.perf_counter()
    tok, text_a, text_b = load_corpora()
    if len(tok.alphabet) != cfg.model.vocab_size:
        raise DemoError(f"the texts have {len(tok.alphabet)} characters but the model "
                        f"vocab_size is {cfg.model.vocab_size}")
    train, held = problems(tok, text_b.train_lines), problems(tok, text_b.held_out_lines)
    state, pre = pretrain(cfg, text_a, tok.alphabet, cache_dir, log=log)
    base = GPT(cfg.model)
    base.load_state_dict(state)
    (train_loss, train_acc), (held_loss, held_acc) = score(base, train), score(base, held)
    baseline = {"train_loss": train_loss, "held_out_loss": held_loss,
                "train_accuracy": train_acc, "accuracy": held_acc}
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    log(f"fine-tuning on {text_b.name} ({len(train.lines)} problems, {len(held.lines)} held "
        f"out): {', '.join(methods)}; {cfg.steps} steps of {cfg.finetune_batch_size} problems "
        f"each, rank {cfg.rank}, alpha {cfg.alpha:g}, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}")
    if any(m.startswith("q") for m in methods):     # the dtype of the 4-bit base's matmul
        log(compute_dtype(None if cfg.compute_dtype == "float32" else cfg.compute_dtype,
                          preferred="float32")[1])
    runs: dict[str, list[dict]] = {}
    for m in methods:
        runs[m] = []
        for seed in seeds:
            r = finetune(m, state, replace(cfg, seed=seed), train, held, log=log)
            runs[m].append(r)
            log(f"  {m:<5} seed {seed}: held-out loss {r['final_held_out_loss']:.3f}, "
                f"acc {100 * r['final_accuracy']:5.1f}% ({r['seconds']:.1f} s)")
    sweep_doc = None
    if cfg.sweep_methods:
        n_runs = len(sweep.sweep_points(cfg))
        log(f"rank sweep: {', '.join(cfg.sweep_methods)} at r = "
            f"{', '.join(map(str, cfg.sweep_ranks))}, {cfg.seeds} seed"
            f"{'s' if cfg.seeds > 1 else ''} each ({n_runs} runs, those of the table reused)")
        done = [r for rs in runs.values() for r in rs]
        points = sweep.run_sweep(state, cfg, train, held, done, log=log)
        sweep_doc = {"methods": list(cfg.sweep_methods), "ranks": list(cfg.sweep_ranks),
                     "seeds": seeds, "alpha_over_rank": cfg.alpha / cfg.rank, "runs": points,
                     "summary": sweep.summarize(points)}
    seconds = time.perf_counter() - t0
    log("")
    log(report.format_table(runs, baseline, seeds))
    if sweep_doc:
        log("")
        log(sweep.format_sweep(sweep_doc["summary"]))
    written = [out / name for name in outputs(cfg)]
    report.plot_losses(out / "losses.png", runs, baseline)
    if sweep_doc:
        refs = {"pretrained": (baseline["held_out_loss"], baseline["accuracy"])}
        if "full" in runs:
            full = report.summarize({"full": runs["full"]}, baseline)
            refs = {f"full (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})": (
                full["held_out_loss"]["full"]["mean"], full["accuracy"]["full"]["mean"]), **refs}
        sweep.plot_rank_sweep(out / "rank_sweep.png", sweep_doc["runs"], sweep_doc["summary"],
                              refs)
    doc = report.document(cfg.to_dict(), pre, baseline, runs, seeds, sweep_doc, seconds)
    report.write_json(out / "results.json", doc)
    log(f"\ntotal {seconds:.1f} s; wrote {', '.join(map(str, written))}")
    return doc
