"""Command line of minidora, ``demo`` and ``verify`` (also installed as ``minidora``).

- ``python -m minidora demo [options]``: the fine-tuning demo. Bad input ends with exit status 1
  (2 for what argparse itself rejects).
- ``python -m minidora verify MODULE:FUNCTION --kind nf4|lora|dora``: check your own
  implementation with :mod:`minidora.testing` (:mod:`minidora.testing.cli`). Exit status 0 when
  every check passed, 1 when one failed, 2 for a usage error.

Either way, errors are a one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


class UsageError(Exception):
    """Bad input found after parsing: reported as one line on stderr, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    d = sub.add_parser("demo", help="pretrain a small GPT, fine-tune it with every method, compare",
                       description="Pretrain a small GPT on text A (cached), fine-tune it on text B with "
                                   "full fine-tuning, LoRA, DoRA, QLoRA and QDoRA, print the comparison "
                                   "and write plots and JSON.")
    d.add_argument("--methods", nargs="+", default=None, metavar="M",
                   help="methods to run, space or comma separated (default: full lora dora qlora qdora)")
    d.add_argument("--rank", type=int, default=None, help="adapter rank r (default 8)")
    d.add_argument("--alpha", type=float, default=None, help="adapter alpha; scaling = alpha / r (default 16)")
    d.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default 300)")
    d.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default 600)")
    d.add_argument("--seed", type=int, default=0, help="seed of model init, batches and adapters (default 0)")
    d.add_argument("--backend", choices=("auto", "reference", "compiled"), default="auto",
                   help="NF4 path of the q-methods: compiled op, plain PyTorch reference, or auto")
    d.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the 4-bit base in the q-methods (default float32: the q-methods then "
                        "differ from lora/dora by the quantization alone; bfloat16 is QLoRA's default)")
    d.add_argument("--out", type=Path, default=Path("minidora_out"), help="output folder (default minidora_out)")
    d.add_argument("--cache-dir", type=Path, default=None,
                   help="pretrained-weights cache (default $MINIDORA_CACHE or ~/.cache/minidora)")
    d.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    d.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: at this model size a second thread gains "
                        "1.7x on an idle machine and loses several times over on a busy one)")
    d.add_argument("--quick", action="store_true", help="a tiny model and a few steps: seconds (for tests)")
    from .testing.cli import add_parser

    add_parser(sub)
    return p


def _config(args):
    from .demo.model import GPTConfig
    from .demo.train import METHODS, RunConfig

    methods = [m.strip() for item in (args.methods or METHODS) for m in item.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods: no method given; expected some of " + ", ".join(METHODS))
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
    methods = list(dict.fromkeys(methods))
    if args.quick:
        cfg = RunConfig(seed=args.seed, model=GPTConfig(n_embd=32, n_head=2), batch_size=8,
                        finetune_batch_size=8, pretrain_steps=40, steps=16, n_checkpoints=4, eval_every=4)
    else:
        cfg = RunConfig(seed=args.seed)
    for name in ("rank", "steps", "pretrain_steps", "threads"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise UsageError(f"--{name.replace('_', '-')}: got {v}; expected an integer >= 1")
            setattr(cfg, name, v)
    if args.alpha is not None:
        if not args.alpha > 0 or args.alpha == float("inf"):
            raise UsageError(f"--alpha: got {args.alpha}; expected a finite number > 0")
        cfg.alpha = args.alpha
    cfg.n_checkpoints = min(cfg.n_checkpoints, cfg.steps)
    cfg.backend, cfg.compute_dtype = args.backend, args.compute_dtype
    return cfg, methods


def _writable_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{what}: cannot write to {str(path)!r} ({e.strerror or e})") from None
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m minidora`` and of the ``minidora`` script. Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from .testing.cli import run as verify

        return verify(args)
    from .demo.train import DemoError

    try:
        cfg, methods = _config(args)
        out = _writable_dir(args.out, "--out")
        cache = None
        if not args.no_cache:
            cache = _writable_dir(args.cache_dir or _default_cache(), "--cache-dir")
        from .demo.main import run

        run(cfg, methods, out, cache)
    except (UsageError, DemoError) as e:
        print(f"minidora demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def _default_cache() -> Path:
    from .demo.train import default_cache_dir

    return default_cache_dir()


if __name__ == "__main__":
    sys.exit(main())
