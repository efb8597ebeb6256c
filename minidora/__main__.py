"""Command line of minidora: demo, finetune, train, verify and reproduce (also ``minidora``).

- ``python -m minidora demo [options]``: the fine-tuning demo (:mod:`minidora.apps.demo`).
- ``python -m minidora finetune [options]``: fine-tune the built-in model or a real LLM on
  instruction data (:mod:`minidora.apps.finetune`).
- ``python -m minidora train [options]``: train adapters with FSDP2 or DDP, on one process or many
  with ``torchrun ... -m minidora train`` (:mod:`minidora.apps.train`).
- ``python -m minidora verify MODULE:FUNCTION --kind nf4|lora|dora``: check your own
  implementation with :mod:`minidora.testing` (:mod:`minidora.apps.verify`). Exit status 0 when
  every check passed, 1 when one failed, 2 for a usage error.
- ``python -m minidora reproduce [CLAIM ...] [--budget quick|full]``: the papers' measurable
  claims checked on SmolLM2-135M, each with the paper's figure, ours and a verdict
  (:mod:`minidora.apps.reproduce`).

demo, finetune, train and reproduce end bad input with exit status 1 (2 for what argparse
itself rejects) before any work starts. Errors are a one-line message on stderr, never a
traceback. Ctrl-C prints ``minidora demo: interrupted`` (or the command run) and exits with
status 130. An unexpected error inside a run prints one line with its type and message and exits
with status 1; set ``MINIDORA_DEBUG=1`` to let it (and Ctrl-C) propagate with the full
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main"]

# The subcommands, in the order --help lists them: modules whose ``add_parser(subparsers)``
# returns the new parser and whose ``run(args)`` returns the exit status. They are imported when
# the parser is built; their heavy imports (torch and the rest) happen inside ``run``.
SUBCOMMANDS = (".apps.demo.cli", ".apps.verify", ".apps.finetune.cli", ".apps.train.cli",
               ".apps.reproduce.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name in SUBCOMMANDS:
        importlib.import_module(name, __package__).add_parser(sub).set_defaults(module=name)
    return p


def _one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return type(e).__name__ + (f": {msg[:200]}" if msg else "")


def _command(argv: list[str] | None) -> str:
    """``minidora SUBCOMMAND`` as far as argv tells before parsing (for the interrupt line)."""
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), "")
    return f"minidora {first}" if first.isidentifier() else "minidora"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m minidora`` and of ``minidora``; returns the exit status."""
    name = _command(argv)
    debug = os.environ.get("MINIDORA_DEBUG", "") not in ("", "0")
    try:   # Ctrl-C while the parser imports the subcommands is an interrupt like any other
        args = _parser().parse_args(argv)
        name = f"minidora {args.command}"
        return importlib.import_module(args.module, __package__).run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"{name}: error: {_one_line(e)} (run with MINIDORA_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
