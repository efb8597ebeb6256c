"""``python -m minidora demo``: the options of the fine-tuning demo, checked, and the run.

Bad input ends with one line on stderr and exit status 1 (2 for what argparse itself rejects)
before any work starts.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from ..common import (
    MAX_ALPHA,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    UsageError,
    cache_folder,
    check_int,
    path,
    writable_dir,
)

__all__ = ["add_parser", "run", "config"]

# The bound of the demo's own option (the others are in minidora.apps.common).
MAX_SEEDS = 20           # fine-tuning seeds per method and sweep point (seed .. seed + N - 1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse subparsers object."""
    d = subparsers.add_parser(
        "demo", help="pretrain a small GPT, fine-tune it with every method, compare",
        description="Pretrain a small GPT on text A (cached), fine-tune it on text B with full "
                    "fine-tuning, LoRA, DoRA, QLoRA and QDoRA over several seeds, sweep the "
                    "adapters' rank, print the comparison (mean and range over the seeds; "
                    "methods whose ranges overlap are not ordered) and write plots and JSON.")
    d.add_argument("--methods", nargs="+", default=None, metavar="M",
                   help="methods to run, space or comma separated "
                        "(default: full lora dora qlora qdora)")
    d.add_argument("--rank", type=int, default=None,
                   help="adapter rank r, at most min(in, out) of the adapted layers (default 8)")
    d.add_argument("--alpha", type=float, default=None,
                   help=f"adapter alpha in (0, {MAX_ALPHA:.0f}]; scaling = alpha / r (default 16)")
    d.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per run, 1..{MAX_STEPS} (default 300)")
    d.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"pretraining steps, 1..{MAX_STEPS} (default 600)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of pretraining and the first fine-tuning seed (adapters, "
                        "batches), 0..2**63-1 (default 0)")
    d.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="run the rank sweep (default: on; --no-sweep skips it)")
    d.add_argument("--sweep-methods", nargs="+", default=None, metavar="M",
                   help="adapter methods of the sweep, space or comma separated (default: lora "
                        "dora)")
    d.add_argument("--sweep-ranks", nargs="+", default=None, metavar="R",
                   help="ranks of the sweep, space or comma separated, each at most min(in, out) "
                        "of the adapted layers (default: 2 8)")
    d.add_argument("--seeds", type=int, default=None,
                   help=f"fine-tuning seeds per method and per sweep point, 1..{MAX_SEEDS}: "
                        "--seed, --seed + 1, ... (default 4; 2 with --quick)")
    d.add_argument("--backend", choices=("auto", "reference", "compiled"), default="auto",
                   help="NF4 path of the q-methods: compiled op, plain PyTorch reference, or auto")
    d.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the 4-bit base in the q-methods (default float32: the "
                        "q-methods then differ from lora/dora by the quantization alone; bfloat16 "
                        "is QLoRA's default)")
    d.add_argument("--out", type=path, default=Path("minidora_out"),
                   help="output folder (default minidora_out)")
    d.add_argument("--cache-dir", type=path, default=None,
                   help="pretrained-weights cache (default $MINIDORA_CACHE or ~/.cache/minidora)")
    d.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    d.add_argument("--threads", type=int, default=1,
                   help=f"CPU threads for torch, 1..{MAX_THREADS} (default 1: at this model size a "
                        "second thread gains 1.7x on an idle machine and loses several times "
                        "over on a busy one)")
    d.add_argument("--quick", action="store_true",
                   help="a tiny model and a few steps, 2 seeds: seconds (for tests)")
    return d


def _names(option: str, given: list[str] | None, default: tuple[str, ...],
           allowed: tuple[str, ...]) -> list[str]:
    """Space or comma separated names from ``allowed``, deduplicated, in the given order."""
    items = (m.strip() for item in (given or default) for m in item.split(","))
    names = [m for m in items if m]
    if not names:
        raise UsageError(f"{option}: no method given; expected some of {', '.join(allowed)}")
    for m in names:
        if m not in allowed:
            raise UsageError(f"{option}: unknown method {m!r}; expected some of "
                             f"{', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _ranks(given: list[str], hi: int, why: str) -> tuple[int, ...]:
    """--sweep-ranks: integers in 1..hi, space or comma separated, sorted and deduplicated."""
    items = [r.strip() for item in given for r in item.split(",") if r.strip()]
    if not items:
        raise UsageError("--sweep-ranks: no rank given; expected integers such as 1 2 4 8")
    ranks = set()
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--sweep-ranks: got {item!r}; expected an integer in "
                             f"1..{hi}{why}") from None
        ranks.add(check_int("--sweep-ranks", value, 1, hi, why))
    return tuple(sorted(ranks))


def config(args: argparse.Namespace):
    """The :class:`~minidora.apps.demo.train.RunConfig` and the methods of parsed ``args``
    (UsageError if bad)."""
    from .train import ADAPTERS, DEMO_MODEL, METHODS, RunConfig, max_rank

    methods = _names("--methods", args.methods, METHODS, METHODS)
    check_int("--seed", args.seed, 0, MAX_SEED, " (2**63 - 1)")
    if args.quick:
        cfg = RunConfig(seed=args.seed, model=replace(DEMO_MODEL, n_embd=32, n_head=2),
                        batch_size=8, finetune_batch_size=8, pretrain_steps=40, steps=16,
                        eval_every=4, seeds=2)
    else:
        cfg = RunConfig(seed=args.seed)
    why_rank = " (min(in_features, out_features) of the adapted layers"
    why_rank += " in --quick)" if args.quick else ")"
    bounds = {"rank": (max_rank(cfg.model), why_rank), "steps": (MAX_STEPS, ""),
              "pretrain_steps": (MAX_STEPS, ""), "threads": (MAX_THREADS, ""),
              "seeds": (MAX_SEEDS, "")}
    for name, (hi, why) in bounds.items():
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, check_int("--" + name.replace("_", "-"), value, 1, hi, why))
    if args.alpha is not None:
        if not (math.isfinite(args.alpha) and 0 < args.alpha <= MAX_ALPHA):
            raise UsageError(f"--alpha: got {args.alpha}; expected a finite number > 0 and "
                             f"<= {MAX_ALPHA:.0f}")
        cfg.alpha = args.alpha
    cfg.sweep_methods = tuple(_names("--sweep-methods", args.sweep_methods, cfg.sweep_methods,
                                     ADAPTERS))
    if args.sweep_ranks is not None:
        cfg.sweep_ranks = _ranks(args.sweep_ranks, max_rank(cfg.model), why_rank)
    if args.sweep_ranks is not None or args.sweep_methods is not None:
        if not args.sweep:
            raise UsageError("--no-sweep: --sweep-methods and --sweep-ranks set the sweep; drop "
                             "them or drop --no-sweep")
    if not args.sweep:
        cfg.sweep_methods = ()
    cfg.backend, cfg.compute_dtype = args.backend, args.compute_dtype
    return cfg, methods


def run(args: argparse.Namespace) -> int:
    """Run ``demo`` with parsed ``args``; return the exit status."""
    from .main import outputs
    from .main import run as run_all
    from .train import DemoError

    try:
        cfg, methods = config(args)
        out = writable_dir(args.out, "--out", outputs(cfg))
        run_all(cfg, methods, out, cache_folder(args.cache_dir, args.no_cache))
    except (UsageError, DemoError) as e:
        print(f"minidora demo: error: {e}", file=sys.stderr)
        return 1
    return 0
