"""``python -m minidora verify MODULE:FUNCTION --kind nf4|lora|dora``: the kit from a shell.

Imports your function (``MODULE`` is a module name such as ``my_pkg.nf4``, importable from the
current directory, or a path to a ``.py`` file), runs :func:`~minidora.testing.check_nf4`,
:func:`~minidora.testing.check_lora` or :func:`~minidora.testing.check_dora` on it, prints the
report and exits with 0 when every check passed, 1 when one failed, and 2 for a usage error (a
module that does not import, a missing function, a function with the wrong signature), always
with a one-line message and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .common import MAX_SEED

__all__ = ["add_parser", "run", "main", "load"]

KINDS = ("nf4", "lora", "dora")


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to an argparse subparsers object."""
    v = subparsers.add_parser(
        "verify", help="check your own NF4, LoRA or DoRA implementation against the golden values",
        description="Run minidora's conformance checks on your function and print the report. "
                    "Exit status: 0 all passed, 1 a check failed, 2 usage error.")
    v.add_argument("target", metavar="MODULE:FUNCTION",
                   help="your quantize function (--kind nf4) or layer factory (--kind lora/dora); "
                        "MODULE is a module name (my_pkg.nf4) or a path to a .py file")
    v.add_argument("--kind", required=True, choices=KINDS, help="what FUNCTION implements")
    v.add_argument("--dequantize", metavar="MODULE:FUNCTION", default=None,
                   help="with --kind nf4: your dequantize function, checked too")
    v.add_argument("--double-quant", choices=("both", "on", "off"), default="both",
                   help="with --kind nf4: check plain NF4 (off), double quantization (on), or both")
    v.add_argument("--strict", action="store_true",
                   help="with --kind lora/dora: a failed robustness row (a zero row of W0 + s B A) "
                        "fails the check too (default: shown as WARN, exit status 0)")
    v.add_argument("--seed", type=int, default=0,
                   help="seed of the random cases, 0..2**63-1 (default 0)")
    return v


def load(spec: str):
    """'module.name:function' or 'path/to/file.py:function' -> the function (UsageError if not)."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise UsageError(f"{spec!r}: expected MODULE:FUNCTION, e.g. my_pkg.nf4:quantize or "
                         "path/to/file.py:quantize")
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            path = Path(module)
            if not path.is_file():
                raise UsageError(f"cannot import {module!r}: no such file")
            name = f"_minidora_verify_{path.stem}"
            found = importlib.util.spec_from_file_location(name, path)
            if found is None or found.loader is None:
                raise UsageError(f"cannot import {module!r}: not a Python source file; expected "
                                 "a path to a .py file or a module name (my_pkg.nf4)")
            mod = importlib.util.module_from_spec(found)
            sys.modules[name] = mod
            found.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())      # as `python -m` does
            mod = importlib.import_module(module)
    except UsageError:
        raise
    except (Exception, SystemExit) as e:      # a module may even call sys.exit on import
        raise UsageError(f"cannot import {module!r}: {type(e).__name__}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, expected a function")
    return obj


def run(args: argparse.Namespace) -> int:
    """Run the check the parsed ``args`` ask for; print the report; return the exit status."""
    from minidora.testing import check_dora, check_lora, check_nf4, describe_error

    try:
        if args.kind != "nf4" and (args.dequantize or args.double_quant != "both"):
            raise UsageError("--dequantize and --double-quant go with --kind nf4 only")
        if args.kind == "nf4" and args.strict:
            raise UsageError("--strict goes with --kind lora or dora only")
        if not 0 <= args.seed <= MAX_SEED:
            raise UsageError(f"--seed: got {args.seed}; expected an integer in 0..2**63 - 1")
        fn = load(args.target)
        if args.kind == "nf4":
            deq = load(args.dequantize) if args.dequantize else None
            dq = {"both": None, "on": True, "off": False}[args.double_quant]
            report = check_nf4(fn, deq, double_quant=dq, seed=args.seed)
        else:
            check = check_lora if args.kind == "lora" else check_dora
            report = check(fn, seed=args.seed, strict=args.strict)
    except (UsageError, TypeError, ValueError) as e:
        print(f"minidora verify: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"minidora verify: error: {describe_error(e)}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m minidora.apps.verify MODULE:FUNCTION --kind ...``.

    The same as ``minidora verify``.
    """
    parser = argparse.ArgumentParser(prog="minidora")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["verify", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
