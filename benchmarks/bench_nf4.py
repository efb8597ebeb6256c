"""Benchmark of the NF4 linear layer on the CPU: reference vs compiled vs dense vs bitsandbytes.

Every row of a table is measured in the same run, interleaved (one call of each variant in turn,
repeated), and the median is reported, so the ratios compare like with like on a machine whose
load may change. Run:

    python benchmarks/bench_nf4.py            # the sizes in docs/bench-nf4-cpu.md
    python benchmarks/bench_nf4.py --cold     # weights not in the cache, as in a model's decode
    python benchmarks/bench_nf4.py --quick    # small sizes, a few seconds
    python benchmarks/bench_nf4.py --isa avx2 # force a kernel level (e.g. AVX2 on an AVX-512 CPU)

Variants, for y = x @ W^T with W [out, in] and x [M, in]:
    reference   ops.nf4_linear(..., backend="reference"): F.linear(x, nf4.dequantize(q, x.dtype))
    compiled    ops.nf4_linear(..., backend="compiled"): the minidora._C kernels
    dense f32   F.linear with a dense float32 W (x cast to float32)
    dense bf16  F.linear with a dense bfloat16 W (x cast to bfloat16)
    bnb         bitsandbytes.matmul_4bit on the CPU, when bitsandbytes is importable
    bnb packed  bitsandbytes.matmul_4bit on a weight converted with its
                functional._convert_weight_packed_for_cpu (its CPU GEMV, only used in eval,
                where the CPU has AVX512_BF16 and out_features % 32 == 0)
The NF4 weights use blocksize 64 with double quantization (bitsandbytes' QLoRA layout).

Hot (the default): every call reads the same weight, which stays in the cache when it fits.
Cold (--cold): each variant cycles through enough distinct copies of its weight that they
exceed four times the last-level cache (its size is read from the OS and printed; a virtual
machine's two cores may sit on two dies with one L3 each), so that every call reads its weight
from memory, as a model's decode reads each layer once per token. The cold run also measures the
memory bandwidth of the machine on a buffer four times the L3: copy (torch's copy_, bytes read +
written) and read (torch's sum), and prints which fraction of each the M = 1 compiled kernel's
weight stream reaches.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidora import backends, nf4, ops  # noqa: E402

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
        return bitsandbytes
    except Exception:  # not installed, or no usable backend
        return None


def _bnb_packed_runs(bnb, out_f: int) -> bool:
    """bitsandbytes uses its packed CPU GEMV only where the CPU has AVX512_BF16, and packs only
    weights with out_features % 32 == 0."""
    return (bnb is not None and out_f % 32 == 0
            and bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)()))


def _bnb_quantize(bnb, w: torch.Tensor, dtype: torch.dtype, packed: bool):
    """(weight, quant_state) of bitsandbytes for w in dtype, optionally converted to its packed CPU
    layout (the conversion changes the quant_state in place, so each call quantizes afresh)."""
    weight, state = bnb.functional.quantize_4bit(w.to(dtype), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4")
    if packed:
        weight, state = bnb.functional._convert_weight_packed_for_cpu(weight, state)
    return weight, state


# ---- the machine --------------------------------------------------------------------------------

def caches() -> dict:
    """Cache sizes in bytes by name (L1d, L2, L3) from /sys (the OS's view), for CPU 0."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        out[f"L{level}" + ("d" if kind == "Data" else "")] = value
    return out


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_line() -> str:
    flags = cpu_flags()
    amx = sorted(f for f in flags if f.startswith("amx"))
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16")
              if f in flags]
    return (f"ISA: {'AMX (' + ', '.join(amx) + ')' if amx else 'no AMX'}; "
            f"{', '.join(vector) or 'no AVX2'}; minidora kernels: {ops.cpu_isa()} "
            f"(best {ops.cpu_isa_best()})")


def mib(n: float) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB" if n < 100 * 2**20 else f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def bandwidths(nbytes: int, repeats: int) -> tuple[float, float]:
    """Bytes per second of torch's copy_ (read + write) and of torch's sum (read) on a buffer of
    nbytes, with the threads torch uses; the median of `repeats` calls each."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(repeats + 1):  # the first of each warms up
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(copy[1:]), nbytes / statistics.median(read[1:])


# ---- cold weights -------------------------------------------------------------------------------

def copies_for(nbytes: int, cache: int | None) -> int:
    """How many distinct copies of a weight of nbytes exceed four times the last-level cache (at
    least 2): the one a call reads was then evicted since its previous call."""
    if cache is None:
        return 1
    return max(2, math.ceil(4 * cache / nbytes))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cycling(make_call, items: list):
    """A call that runs make_call(item) on the next item of items each time it is called."""
    calls = [make_call(item) for item in items]
    position = [0]

    def call():
        position[0] = (position[0] + 1) % len(calls)
        return calls[position[0]]()
    return call


def nf4_copy(q):
    """The same NF4 weight in fresh memory."""
    clone = (lambda t: None if t is None else t.clone())
    return nf4.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize,
                         clone(q.nested_absmax), clone(q.offset))


def nf4_bytes(q) -> int:
    return tensor_bytes(q.packed, q.absmax, q.nested_absmax, q.offset)


def bnb_copy(weight, state):
    """A bitsandbytes weight and quant_state in fresh memory."""
    state = copy.copy(state)
    state.absmax = state.absmax.clone()
    return weight.clone(), state


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


def forward_table(shapes, rows_list, repeats, bnb, cache: int | None = None,
                  bandwidth: tuple | None = None) -> list[str]:
    """Forward times; with `cache` (bytes of the last-level cache) each variant reads a cold weight
    (see copies_for), and with `bandwidth` (copy, read) the M = 1 rows say which fraction of
    those the compiled kernel's weight stream reaches."""
    lines = ["| out x in | M | x dtype | reference | compiled | dense f32 | dense bf16 | bnb "
             "| bnb packed | dense f32 / compiled | dense same dtype / compiled "
             "| bnb packed / compiled | reference / compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    streams = []  # (shape, dtype name, weight bytes, seconds) of the compiled kernel at M = 1
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        q = nf4.quantize(w, 64, double_quant=True)
        w32 = nf4.dequantize(q, torch.float32)
        w16 = nf4.dequantize(q, torch.bfloat16)
        qs = [q] + [nf4_copy(q) for _ in range(copies_for(nf4_bytes(q), cache) - 1)]
        w32s = [w32] + [w32.clone() for _ in range(copies_for(tensor_bytes(w32), cache) - 1)]
        w16s = [w16] + [w16.clone() for _ in range(copies_for(tensor_bytes(w16), cache) - 1)]
        bnb_weights = {}
        for dtype in DTYPE_NAMES if bnb is not None else ():
            for packed in (False, True):
                if packed and not _bnb_packed_runs(bnb, out_f):
                    continue
                weight, state = _bnb_quantize(bnb, w, dtype, packed)
                count = copies_for(tensor_bytes(weight, state.absmax), cache)
                bnb_weights[dtype, packed] = [(weight, state)] + [
                    bnb_copy(weight, state) for _ in range(count - 1)]
        for rows in rows_list:
            for dtype, name in DTYPE_NAMES.items():
                x = torch.randn(rows, in_f).to(dtype)
                x32, x16 = x.float(), x.to(torch.bfloat16)
                variants = {
                    "reference": cycling(lambda q: lambda: ops.nf4_linear(
                        x, q, backend="reference"), qs),
                    "compiled": cycling(lambda q: lambda: ops.nf4_linear(
                        x, q, backend="compiled"), qs),
                    "dense32": cycling(lambda w: lambda: F.linear(x32, w), w32s),
                    "dense16": cycling(lambda w: lambda: F.linear(x16, w), w16s),
                }
                with torch.no_grad():
                    check(ops.nf4_linear(x, q, backend="compiled"),
                          ops.nf4_linear(x, q, backend="reference"), x, w32,
                          f"forward {out_f}x{in_f} M={rows} {name}")
                for packed, key in ((False, "bnb"), (True, "bnb packed")):
                    if (dtype, packed) in bnb_weights:
                        variants[key] = cycling(bnb_call(bnb, x, packed),
                                                bnb_weights[dtype, packed])
                with torch.no_grad():  # bitsandbytes' packed GEMV runs in eval only
                    t = measure(variants, repeats)
                same = t["dense32"] if dtype == torch.float32 else t["dense16"]
                lines.append(
                    f"| {out_f}x{in_f} | {rows} | {name} | {ms(t['reference'])} | "
                    f"{ms(t['compiled'])} | {ms(t['dense32'])} | {ms(t['dense16'])} | "
                    f"{ms(t.get('bnb'))} | {ms(t.get('bnb packed'))} | "
                    f"{ratio(t['dense32'], t['compiled'])} | {ratio(same, t['compiled'])} | "
                    f"{ratio(t.get('bnb packed'), t['compiled'])} | "
                    f"{ratio(t['reference'], t['compiled'])} |")
                print(lines[-1], flush=True)
                if rows == 1:
                    streams.append((f"{out_f}x{in_f}", name, nf4_bytes(q), t["compiled"]))
    if bandwidth is not None and streams:
        lines += stream_table(streams, bandwidth)
    return lines


def bnb_call(bnb, x: torch.Tensor, packed: bool):
    """(weight, quant_state) -> a call of bitsandbytes' matmul_4bit on x: the packed CPU layout
    is passed as it is, the ordinary one transposed (as bitsandbytes' Linear4bit does)."""
    return lambda ws: lambda: bnb.matmul_4bit(x, ws[0] if packed else ws[0].t(),
                                              quant_state=ws[1])


def stream_table(streams, bandwidth: tuple) -> list[str]:
    """The M = 1 compiled kernel's weight stream against the measured bandwidths (copy, read)."""
    copy_bw, read_bw = bandwidth
    lines = ["", f"M = 1, cold: the compiled kernel's weight bytes (packed codes and scales) over "
             f"its time per call, against the copy bandwidth {copy_bw / 1e9:.1f} GB/s and the read "
             f"bandwidth {read_bw / 1e9:.1f} GB/s", "",
             "| out x in | x dtype | weight | compiled | GB/s | of copy bandwidth "
             "| of read bandwidth |", "|---|---|---|---|---|---|---|"]
    for shape, name, nbytes, seconds in streams:
        rate = nbytes / seconds
        lines.append(f"| {shape} | {name} | {mib(nbytes)} | {ms(seconds)} | {rate / 1e9:.1f} "
                     f"| {rate / copy_bw:.0%} | {rate / read_bw:.0%} |")
    print("\n".join(lines), flush=True)
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
    parser.add_argument("--cold", action="store_true",
                        help="forward only, each call on a weight not in the cache (see above)")
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
    parser.add_argument("--isa", default="auto",
                        choices=["auto", "scalar", "avx2", "avx512", "avx512bf16"],
                        help="force the compiled kernels' ISA level (one this CPU has)")
    args = parser.parse_args()
    backends.require_extension()
    try:
        ops.choose(cpu_isa=args.isa)  # the compiled ops run on the calling (main) thread's level
    except ValueError as e:
        raise SystemExit(f"--isa {args.isa}: {e}") from None
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
    sizes = caches()
    print(f"machine: {machine()}")
    print(isa_line())
    print("caches (/sys/devices/system/cpu/cpu0/cache): "
          + (", ".join(f"{name} {mib(size)}" for name, size in sizes.items()) or "unknown"))
    packed = "not used" if bnb is None else (
        "runs here" if _bnb_packed_runs(bnb, 32) else "does not run here (no AVX512_BF16)")
    print(f"bitsandbytes: {bnb.__version__ if bnb else 'not used'}, packed CPU GEMV {packed}\n")
    if args.cold:
        cache = sizes.get("L3") or max(sizes.values(), default=None)
        if cache is None:
            raise SystemExit("--cold: the OS does not say how large the caches are")
        bandwidth = bandwidths(4 * cache, repeats)
        print(f"## NF4 linear forward, cold weights, milliseconds per call ({args.stat})\n")
        print(f"Each variant cycles through copies of its weight that exceed 4 x L3 = "
              f"{mib(4 * cache)}. Bandwidth on {mib(4 * cache)} with {torch.get_num_threads()} "
              f"threads: copy (torch copy_, read + write) {bandwidth[0] / 1e9:.1f} GB/s, read "
              f"(torch sum) {bandwidth[1] / 1e9:.1f} GB/s\n")
        forward_table(shapes, rows_list, repeats, bnb, cache, bandwidth)
        print(f"\nmachine at the end: {machine()}")
        return
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
