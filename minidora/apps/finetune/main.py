"""The whole ``finetune`` run: load the model and the data, fine-tune with each method, report.

Writes into the output folder: ``results.json`` (every number), ``losses.png`` (the curves),
and for each adapter method ``<method>/adapters`` (minidora's folder,
:func:`minidora.save_adapters`) and ``<method>/peft`` (a PEFT adapter folder,
:func:`minidora.save_peft_adapter`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..common import available_memory
from . import report
from .data import load_dataset
from .models import load
from .train import FinetuneConfig, check_full_memory, run_method

__all__ = ["OUTPUTS", "run"]

OUTPUTS = ("results.json", "losses.png")


def run(cfg: FinetuneConfig, out: Path, data_path: Path | None = None,
        cache_dir: Path | None = None, log=print) -> dict:
    """Run every method of ``cfg`` and write :data:`OUTPUTS` (and the adapters) into ``out``.

    Returns:
        The results document (as written to ``results.json``), each method's entry with its
        trained ``"model"`` added.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, data_path, cache_dir, log)
    finally:
        torch.set_num_threads(previous)


def _run(cfg, out, data_path, cache_dir, log) -> dict:
    t0 = time.perf_counter()
    data = load_dataset(data_path)             # a bad data file fails before the model loads
    if not cfg.probes:
        cfg.probes = [ex.prompt for ex in data.held_out[:2]]
    log(f"loading {cfg.model} ...")
    lm = load(cfg.model, threads=cfg.threads, cache_dir=cache_dir, log=log)
    n_params = sum(p.numel() for p in lm.model.parameters())
    if "full" in cfg.methods:
        check_full_memory(n_params, available_memory())
    log(f"{lm.name}: {n_params:,} parameters, from {lm.source} "
        f"({time.perf_counter() - t0:.1f} s)")
    log(f"fine-tuning on {data.name} ({len(data.train)} examples, {len(data.held_out)} held "
        f"out): {', '.join(cfg.methods)}; {cfg.steps} steps of {cfg.batch_size} examples, "
        f"rank {cfg.rank}, alpha {cfg.alpha:g}, lr {cfg.lr:g}, {cfg.compute_dtype}, "
        f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''}, seed {cfg.seed}")
    results = {m: run_method(lm, m, cfg, data, out, log=log) for m in cfg.methods}
    models = {m: r.pop("model") for m, r in results.items()}
    seconds = time.perf_counter() - t0
    log("")
    log(report.format_table(results))
    log("")
    log(report.format_probes(results))
    report.plot_losses(out / "losses.png", results,
                       f"{lm.name} on {data.name}: same steps, batches and seed for every method")
    doc = report.document(cfg.to_dict(), {"name": lm.name, "source": lm.source,
                                          "parameters": n_params},
                          {"name": data.name, "train": len(data.train),
                           "held_out": len(data.held_out)}, results, seconds)
    report.write_json(out / "results.json", doc)
    saved = [p for r in results.values() for p in r["saved"].values()]
    log(f"\ntotal {seconds:.1f} s; wrote {out / 'results.json'}, {out / 'losses.png'}"
        + (f", {', '.join(saved)}" if saved else ""))
    for m, model in models.items():
        results[m]["model"] = model
    return doc
