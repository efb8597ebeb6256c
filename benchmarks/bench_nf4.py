"""Benchmark of the NF4 linear layer on the CPU: reference vs compiled vs dense vs bitsandbytes.

Every row of a table is measured in the same run, interleaved (one call of each variant in turn,
repeated), and the median is reported, so the ratios compare like with like on a machine whose
load may change. Run:

    python benchmarks/bench_nf4.py            # the sizes in docs/bench-nf4-cpu.md
    python benchmarks/bench_nf4.py --quick    # small sizes, a few seconds

Variants, for y = x @ W^T with W [out, in] and x [M, in]:
    reference   ops.nf4_linear(..., backend="reference"): F.linear(x, nf4.dequantize(q, x.dtype))
    compiled    ops.nf4_linear(..., backend="compiled"): the minidora._C kernels
    dense f32   F.linear with a dense float32 W (x cast to float32)
    dense bf16  F.linear with a dense bfloat16 W (x cast to bfloat16)
    bnb         bitsandbytes.matmul_4bit on the CPU, when bitsandbytes is importable
The NF4 weights use blocksize 64 with double quantization (bitsandbytes' QLoRA layout).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidora import nf4, ops  # noqa: E402

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
        return bitsandbytes
    except Exception:  # not installed, or no usable backend
        return None


CLOCK = time.perf_counter  # --clock cpu: time.process_time (meaningful with --threads 1)
STAT = statistics.median   # --stat min: the least disturbed sample on a busy machine


def measure(variants: dict, repeats: int, min_seconds: float = 0.02) -> dict:
    """Median seconds per call of each variant, interleaved. variants: name -> callable."""
    calls = {}
    for name, fn in variants.items():      # warm up, and pick calls per sample
        fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        calls[name] = max(1, int(min_seconds / max(once, 1e-7)))
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = CLOCK()
            for _ in range(calls[name]):
                fn()
            samples[name].append((CLOCK() - start) / calls[name])
    return {name: STAT(s) for name, s in samples.items()}


def check(got: torch.Tensor, want: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
          what: str) -> None:
    """Nothing is timed before it is checked: the compiled result must equal the reference within
    the float rounding of its dtype, |got - want| <= 4 eps (|a| @ |w|^T) (a sum computed in
    another order, rounded once to the output dtype)."""
    bound = 4 * torch.finfo(got.dtype).eps * (a.float().abs() @ w.float().abs().T) + 1e-30
    err = (got.float() - want.float()).abs()
    if (err > bound).any():
        raise SystemExit(f"{what}: the compiled result differs from the reference by up to "
                         f"{err.max().item():.3g} (bound {bound.max().item():.3g}); not timing it")


def ms(t: float | None) -> str:
    return "—" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.1f}")


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}x"


def forward_table(shapes, rows_list, repeats, bnb) -> list[str]:
    lines = ["| out x in | M | x dtype | reference | compiled | dense f32 | dense bf16 | bnb "
             "| dense f32 / compiled | dense same dtype / compiled | reference / compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        q = nf4.quantize(w, 64, double_quant=True)
        w32 = nf4.dequantize(q, torch.float32)
        w16 = nf4.dequantize(q, torch.bfloat16)
        bnb_weights = {}
        if bnb is not None:
            for dtype in DTYPE_NAMES:
                bnb_weights[dtype] = bnb.functional.quantize_4bit(
                    w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        for rows in rows_list:
            for dtype, name in DTYPE_NAMES.items():
                x = torch.randn(rows, in_f).to(dtype)
                x32, x16 = x.float(), x.to(torch.bfloat16)
                variants = {
                    "reference": lambda: ops.nf4_linear(x, q, backend="reference"),
                    "compiled": lambda: ops.nf4_linear(x, q, backend="compiled"),
                    "dense32": lambda: F.linear(x32, w32),
                    "dense16": lambda: F.linear(x16, w16),
                }
                with torch.no_grad():
                    check(variants["compiled"](), variants["reference"](), x, w32,
                          f"forward {out_f}x{in_f} M={rows} {name}")
                if dtype in bnb_weights:
                    packed, state = bnb_weights[dtype]
                    variants["bnb"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
                with torch.no_grad():
                    t = measure(variants, repeats)
                same = t["dense32"] if dtype == torch.float32 else t["dense16"]
                lines.append(
                    f"| {out_f}x{in_f} | {rows} | {name} | {ms(t['reference'])} | "
                    f"{ms(t['compiled'])} | {ms(t['dense32'])} | {ms(t['dense16'])} | "
                    f"{ms(t.get('bnb'))} | {ratio(t['dense32'], t['compiled'])} | "
                    f"{ratio(same, t['compiled'])} | {ratio(t['reference'], t['compiled'])} |")
                print(lines[-1], flush=True)
    return lines


def backward_table(shapes, rows, repeats) -> list[str]:
    """Forward + backward (grad of x only: the base weight is frozen) at M rows."""
    lines = ["| out x in | M | x dtype | reference | compiled | dense same dtype "
             "| compiled / dense | reference / compiled |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for out_f, in_f in shapes:
        q = nf4.quantize(torch.randn(out_f, in_f) * 0.02, 64, double_quant=True)
        for dtype, name in DTYPE_NAMES.items():
            wd = nf4.dequantize(q, dtype)
            x = torch.randn(rows, in_f).to(dtype).requires_grad_()
            grad_y = torch.randn(rows, out_f).to(dtype)

            def step(fn):
                return lambda: torch.autograd.grad(fn(), x, grad_y)

            got = step(lambda: ops.nf4_linear(x, q, backend="compiled"))()[0]
            want = step(lambda: ops.nf4_linear(x, q, backend="reference"))()[0]
            check(got, want, grad_y, wd.T, f"input gradient {out_f}x{in_f} M={rows} {name}")
            t = measure({
                "reference": step(lambda: ops.nf4_linear(x, q, backend="reference")),
                "compiled": step(lambda: ops.nf4_linear(x, q, backend="compiled")),
                "dense": step(lambda: F.linear(x, wd)),
            }, repeats)
            lines.append(f"| {out_f}x{in_f} | {rows} | {name} | {ms(t['reference'])} | "
                         f"{ms(t['compiled'])} | {ms(t['dense'])} | "
                         f"{ratio(t['compiled'], t['dense'])} | "
                         f"{ratio(t['reference'], t['compiled'])} |")
            print(lines[-1], flush=True)
    return lines


def dequantize_table(shapes, repeats) -> list[str]:
    lines = ["| out x in | dtype | reference | compiled | reference / compiled |",
             "|---|---|---|---|---|"]
    print("\n".join(lines))
    for out_f, in_f in shapes:
        q = nf4.quantize(torch.randn(out_f, in_f), 64, double_quant=True)
        for dtype, name in DTYPE_NAMES.items():
            if not torch.equal(ops.nf4_dequantize(q, dtype, backend="compiled"),
                               ops.nf4_dequantize(q, dtype, backend="reference")):
                raise SystemExit(f"dequantize {out_f}x{in_f} {name}: the compiled result is not "
                                 "bit-exact with the reference; not timing it")
            t = measure({"reference": lambda: ops.nf4_dequantize(q, dtype, backend="reference"),
                         "compiled": lambda: ops.nf4_dequantize(q, dtype, backend="compiled")},
                        repeats)
            lines.append(f"| {out_f}x{in_f} | {name} | {ms(t['reference'])} | "
                         f"{ms(t['compiled'])} | {ratio(t['reference'], t['compiled'])} |")
            print(lines[-1], flush=True)
    return lines


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, clock: {CLOCK.__name__}, "
            f"{STAT.__name__} of repeats, "
            f"kernels: {ops.cpu_isa()}, "
            f"load average {load:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per variant")
    parser.add_argument("--skip-bnb", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096 (out x in)")
    parser.add_argument("--rows", default=None, help="e.g. 1,16,512 (M values)")
    parser.add_argument("--only", default=None, choices=["forward", "backward", "dequantize"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: the process's CPU time, robust to other jobs with --threads 1")
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="statistic over the repeats (min: least disturbed by other jobs)")
    args = parser.parse_args()
    ops._require_extension()
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    shapes = [(512, 256), (1024, 512)] if args.quick else [(4096, 4096), (11008, 4096)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows_list = [1, 16, 128] if args.quick else [1, 16, 512]
    if args.rows:
        rows_list = [int(v) for v in args.rows.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    bnb = None if args.skip_bnb else _bnb()
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    print(f"bitsandbytes: {bnb.__version__ if bnb else 'not used'}\n")
    if args.only in (None, "forward"):
        print(f"## NF4 linear forward, milliseconds per call ({args.stat})\n")
        forward_table(shapes, rows_list, repeats, bnb)
    if args.only in (None, "backward"):
        print(f"\n## Forward + backward (input gradient) at M = {rows_list[-1]}, "
              f"ms ({args.stat})\n")
        backward_table(shapes, rows_list[-1], repeats)
    if args.only in (None, "dequantize"):
        print(f"\n## Dequantize to a dense tensor, ms ({args.stat})\n")
        dequantize_table(shapes[:1], repeats)
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
