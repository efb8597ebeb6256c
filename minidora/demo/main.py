"""The whole demo run: pretrain (or load), fine-tune with each method, report."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import report
from .data import eval_windows, load_corpora
from .model import GPT
from .train import RunConfig, answer_accuracy, evaluate, finetune, pretrain

__all__ = ["OUTPUTS", "run"]

OUTPUTS = ("results.json", "losses.png", "decomposition.png")


def run(cfg: RunConfig, methods: list[str], out: Path, cache_dir: Path | None, log=print) -> dict:
    """Run the comparison and write :data:`OUTPUTS` (``results.json``, ``losses.png``,
    ``decomposition.png``) to ``out``.

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
    state, pre = pretrain(cfg, text_a, tok.alphabet, cache_dir, log=log)
    base = GPT(cfg.model)
    base.load_state_dict(state)
    T = cfg.model.block_size
    baseline = {"train_loss": evaluate(base, eval_windows(text_b.train, T)),
                "held_out_loss": evaluate(base, eval_windows(text_b.held_out, T)),
                "accuracy": answer_accuracy(base, tok, text_b.held_out_lines)}
    log(f"fine-tuning on {text_b.name}: {', '.join(methods)}; {cfg.steps} steps each, "
        f"rank {cfg.rank}, alpha {cfg.alpha:g}, seed {cfg.seed}")
    results = {}
    for m in methods:
        results[m] = report.add_correlations(finetune(m, state, cfg, tok, text_b))
    seconds = time.perf_counter() - t0
    log("")
    log(report.format_table(results, baseline))
    report.plot_losses(out / "losses.png", results, baseline)
    report.plot_decomposition(out / "decomposition.png", results)
    report.write_json(out / "results.json", cfg.to_dict(), pre, baseline, results, seconds)
    log(f"\ntotal {seconds:.1f} s; wrote {out / 'results.json'}, {out / 'losses.png'}, "
        f"{out / 'decomposition.png'}")
    return {"config": cfg.to_dict(), "pretrain": pre, "baseline": baseline, "methods": results,
            "total_seconds": seconds}
