"""``python -m minidora reproduce``: the papers' measurable claims, checked on SmolLM2-135M.

Each claim prints the paper's figure beside ours, our uncertainty and a verdict in words, and
writes its measurements to ``results.json`` and one PNG into the output folder. ``--budget
quick`` runs every claim at a small size in a few minutes on 2 cores (the tests run it);
``--budget full`` gives docs/reproduce.md's numbers. Needs the ``[llm]`` extra and the model
wheel, as ``finetune --model smollm2-135m`` does. Bad input ends with one line on stderr and exit
status 1 before any work starts (2 for what argparse itself rejects).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..common import MAX_SEED, MAX_THREADS, UsageError, check_int, items, path, writable_dir
from .claims import CLAIMS, claim_names

__all__ = ["add_parser", "run", "BUDGETS", "selected"]

BUDGETS = ("quick", "full")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an argparse subparsers object."""
    f = subparsers.add_parser(
        "reproduce", help="check the papers' claims on SmolLM2-135M",
        description="Measure the papers' claims on SmolLM2-135M (the [llm] extra): print the "
                    "paper's figure beside ours with its interval and a verdict; write "
                    "results.json and one PNG per claim.")
    f.add_argument("claims", nargs="*", metavar="CLAIM",
                   help=f"claims to run, space or comma separated: {claim_names()} "
                        "(default: all)")
    f.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="quick: every claim in a few minutes on 2 cores; full: the docs' numbers "
                        "(default quick)")
    f.add_argument("--out", type=path, default=Path("minidora_reproduce"),
                   help="output folder (default minidora_reproduce)")
    f.add_argument("--threads", type=int, default=2,
                   help=f"CPU threads for torch, 1..{MAX_THREADS} (default 2)")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap, the adapters and the batches (default 0)")
    return f


def selected(values: list[str]) -> list[str]:
    """The claims asked for (all when none), in :data:`CLAIMS`' order; UsageError if unknown."""
    names = items(values)
    if not values:
        return list(CLAIMS)
    if not names:
        raise UsageError(f"CLAIM: no claim given; expected some of {claim_names()}")
    for name in names:
        if name not in CLAIMS:
            raise UsageError(f"CLAIM: unknown claim {name!r}; expected some of {claim_names()}")
    return [name for name in CLAIMS if name in names]


def outputs(names: list[str]) -> tuple[str, ...]:
    from .results import RESULTS

    return (RESULTS, *(f"{name}.png" for name in names))


def run(args: argparse.Namespace) -> int:
    """Run ``reproduce`` with parsed ``args``; return the exit status."""
    from ..finetune.models import LLMError, check_extra

    try:
        names = selected(args.claims)
        threads = check_int("--threads", args.threads, 1, MAX_THREADS)
        seed = check_int("--seed", args.seed, 0, MAX_SEED)
        check_extra("reproduce")
        out = writable_dir(args.out, "--out", outputs(names))
        run_claims(names, args.budget, out, threads, seed)
    except (UsageError, LLMError) as e:
        print(f"minidora reproduce: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_claims(names: list[str], budget: str, out: Path, threads: int, seed: int,
               log=print) -> dict:
    """Run the claims ``names`` at ``budget``; write results.json and the PNGs into ``out``.

    Returns:
        The results document, as written.
    """
    import torch

    from .claims import claim_module
    from .results import RESULTS, SCHEMA_VERSION, Context, machine, write_results

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ctx = Context(out=out, budget=budget, seed=seed, threads=threads, log=log)
        doc = {"schema_version": SCHEMA_VERSION, "command": "python -m minidora reproduce "
               f"{' '.join(names)} --budget {budget} --seed {seed} --threads {threads}",
               "machine": machine(), "claims": {}}
        t_all = time.perf_counter()
        for name in names:
            mod = claim_module(name)
            log(f"claim {mod.NUMBER} ({name}): {mod.TITLE}")
            t0 = time.perf_counter()
            ours = mod.run(ctx)
            v = mod.verdict(ours)
            entry = {"number": mod.NUMBER, "title": mod.TITLE, "paper": mod.PAPER, "ours": ours,
                     "verdict": v, "budget": mod.BUDGETS[budget],
                     "seconds": round(time.perf_counter() - t0, 1)}
            for line in mod.report(ours):
                log(f"  {line}")
            log(f"  verdict: {v['word']}: {v['why']}")
            mod.plot(entry, out / f"{name}.png")
            doc["claims"][name] = entry
            doc["seconds"] = round(time.perf_counter() - t_all, 1)
            write_results(out / RESULTS, doc)      # after each claim: a stopped run keeps some
        log(f"wrote {out / RESULTS} and {', '.join(f'{n}.png' for n in names)} in {out} "
            f"({doc['seconds']:.0f} s)")
        return doc
    finally:
        torch.set_num_threads(previous)
