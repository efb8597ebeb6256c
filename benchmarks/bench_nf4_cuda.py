"""Validate, then time, the CUDA NF4 ops against dense bf16 ``F.linear`` on one GPU.

Run by ``scripts/gpu_validate.sh`` after it built the extension with CUDA; alone:
``python benchmarks/bench_nf4_cuda.py [--json PATH] [--quick]``.

1. Validation first, as in llm.c's ``validate_result``: nothing is timed until every check passed.
   - ``nf4_dequantize`` must equal the reference ``minidora.nf4.dequantize`` (run on the CPU) bit
     for bit, for float32 / bfloat16 / float16 / float64, with and without double quantization,
     whole and partial blocks, odd element counts, every blocksize class.
   - ``nf4_linear`` and ``nf4_linear_grad_input`` (every M bucket of the fused kernels, the
     dequantize + cuBLAS path, misaligned and 3-D inputs) must lie within a rigorous error bound
     of the float64 product of the same rounded weight: with u the unit roundoff of the output
     dtype and gamma_n = n u32 / (1 - n u32) the bound of an n-term float32 sum,
         |y - y64| <= u (2 |y64| + |b|) + 1.01 gamma_{K+1} (|x| @ |W|^T + |b|)
     (two output roundings at most, on the cuBLAS path with a bias). A wrong nibble, scale or
     row gives errors of the order of |y| and fails it.
2. Timing: device copy bandwidth (a 1 GiB device-to-device copy), then for W [N, K] in
   {(4096, 4096), (11008, 4096)} and M in {1, 16, 64, 512}, bfloat16, blocksize 64 with double
   quantization: the compiled ``nf4_linear``, dense ``F.linear`` with the same (dequantized)
   weight, their ratio, and bytes moved / time as a fraction of the copy bandwidth. Each call is
   timed inside a CUDA graph (no host overhead) with CUDA events, after warmup, median of repeats,
   rotating over enough copies of the weights that they never sit in L2 between uses.
Targets on an H200: M=1 at >= 60% of copy bandwidth and >= 2.5x faster than dense bf16;
M=512 within 1.2x of dense.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed
from minidora import nf4, ops  # noqa: E402

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
     torch.float64: 2.0**-53}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEVICE = "cuda"  # --device cpu runs the validation of the CPU kernels (a dry run of this script)


def op_args(q: nf4.NF4Weight) -> tuple:
    """The weight arguments of the compiled ops, in schema order."""
    code = nf4.DYNAMIC_CODE.to(q.packed.device) if q.double_quant else None
    return (q.packed, q.absmax, q.nested_absmax, code, q.offset, q.blocksize)


def to_device(q: nf4.NF4Weight, device) -> nf4.NF4Weight:
    move = (lambda t: None if t is None else t.to(device))
    return nf4.NF4Weight(q.packed.to(device), q.absmax.to(device), q.shape, q.dtype, q.blocksize,
                         move(q.nested_absmax), move(q.offset))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so that -0.0 != 0.0 and NaN patterns count too."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


# --- 1. validation ---------------------------------------------------------------------------

def validate_dequantize(gen: torch.Generator, failures: list) -> int:
    cases = [((4096, 4096), 64), ((11008, 4096), 64), ((3, 37), 32), ((257, 129), 64),
             ((1, 1), 64), ((65, 4128), 128), ((100, 300), 4096), ((7, 4096), 256),
             ((2, 3, 97), 64)]
    checked = 0
    for shape, bs in cases:
        w = torch.randn(shape, generator=gen) * (1 + torch.rand(shape, generator=gen))
        for dq in (False, True):
            q = nf4.quantize(w, blocksize=bs, double_quant=dq)
            qd = to_device(q, DEVICE)
            for dt in DTYPES:
                want = nf4.dequantize(q, dt)                                      # CPU reference
                got = torch.ops.minidora.nf4_dequantize(*op_args(qd), list(shape), dt).cpu()
                checked += 1
                if got.shape != want.shape or got.dtype != want.dtype:
                    failures.append(f"dequantize {shape} bs={bs} dq={dq} {dt}: got {got.dtype} "
                                    f"{tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
                elif not torch.equal(bits(got), bits(want)):
                    bad = (bits(got) != bits(want)).sum().item()
                    failures.append(f"dequantize {shape} bs={bs} dq={dq} {dt}: {bad} of "
                                    f"{want.numel()} elements differ in bits")
    return checked


def validate_exact(gen: torch.Generator, failures: list) -> int:
    """One-hot activations make the matmuls exact: y = x @ W^T with x[i] = e_k is column k of
    dequantize(W, dtype), with no rounding left to hide a single wrong code. Sweeping k over all
    columns (and grad_y over all rows) checks every weight through every M bucket."""
    shapes = [(256, 512, 64), (300, 96, 32), (37, 72, 64), (33, 65, 128), (64, 4128, 4096)]
    batches = (16, 1, 3, 8, 2, 17, 33, 65)  # cycled through: every fused-kernel bucket, cuBLAS
    checked = 0
    for n_out, k_in, bs in shapes:
        w = torch.randn(n_out, k_in, generator=gen)
        for dq in (True, False):
            q = to_device(nf4.quantize(w, blocksize=bs, double_quant=dq), DEVICE)
            args = op_args(q)
            for dt in DTYPES:
                wd = nf4.dequantize(q, dt)                                        # [N, K]
                for what, size in (("linear", k_in), ("grad_input", n_out)):
                    start, i = 0, 0
                    while start < size:
                        mb = min(batches[i % len(batches)], size - start)
                        onehot = torch.zeros(mb, size, dtype=dt, device=DEVICE)
                        onehot[torch.arange(mb), torch.arange(start, start + mb)] = 1
                        if what == "linear":
                            got = torch.ops.minidora.nf4_linear(onehot, *args, n_out, k_in, None)
                            want = wd[:, start:start + mb].T                      # [mb, N]
                        else:
                            got = torch.ops.minidora.nf4_linear_grad_input(onehot, *args, n_out,
                                                                            k_in)
                            want = wd[start:start + mb]                           # [mb, K]
                        checked += 1
                        if not torch.equal(got, want):
                            bad = int((got != want).sum())
                            failures.append(f"{what} one-hot N={n_out} K={k_in} bs={bs} dq={dq} "
                                            f"{dt} M={mb} rows {start}..: {bad} of {want.numel()} "
                                            "values differ from dequantize")
                        start, i = start + mb, i + 1
    return checked


def error_bound(a: torch.Tensor, w: torch.Tensor, b, y64: torch.Tensor, dt, n_terms: int):
    """The bound from the module docstring; a [M, n], w [n, out] (float64), b [out] or None."""
    u32 = U[torch.float64] if dt == torch.float64 else U[torch.float32]
    gamma = (n_terms + 1) * u32 / (1 - (n_terms + 1) * u32)
    mag = a.abs() @ w.abs()
    babs = torch.zeros_like(y64) if b is None else b.double().abs().expand_as(y64)
    return U[dt] * (2 * y64.abs() + babs) + 1.01 * gamma * (mag + babs)


def check_close(name: str, got: torch.Tensor, y64: torch.Tensor, bound: torch.Tensor,
                failures: list) -> None:
    if got.shape != y64.shape:
        failures.append(f"{name}: shape {tuple(got.shape)}, want {tuple(y64.shape)}")
        return
    err = (got.double() - y64).abs()
    if not torch.isfinite(got).all():
        failures.append(f"{name}: non-finite output")
    elif (err > bound).any():
        i = int((err - bound).argmax())
        failures.append(f"{name}: error {err.view(-1)[i]:.3e} > bound {bound.view(-1)[i]:.3e} "
                        f"at flat index {i} ({int((err > bound).sum())} elements)")


def validate_linear(gen: torch.Generator, failures: list) -> int:
    # (N, K, blocksize): K % 32 == 0 takes the fused kernels, K % 8 == 0 only the fused
    # grad-input kernel, odd K the dequantize + cuBLAS path; blocks span rows when K % bs != 0.
    shapes = [(256, 512, 64), (300, 96, 32), (37, 72, 64), (33, 65, 128), (64, 4128, 4096),
              (1024, 4096, 64)]
    ms = (1, 2, 3, 5, 8, 9, 16, 17, 40, 64, 65)
    checked = 0
    for n_out, k_in, bs in shapes:
        w = torch.randn(n_out, k_in, generator=gen)
        for dq in (True, False):
            q = to_device(nf4.quantize(w, blocksize=bs, double_quant=dq), DEVICE)
            args = op_args(q)
            for dt in DTYPES:
                wd = nf4.dequantize(q, dt).double()                           # [N, K] rounded
                for m in ms:
                    x = torch.randn(m, k_in, generator=gen).to(DEVICE, dt)
                    bias = torch.randn(n_out, generator=gen).to(DEVICE, dt) if m % 2 else None
                    y = torch.ops.minidora.nf4_linear(x, *args, n_out, k_in, bias)
                    y64 = x.double() @ wd.T + (0 if bias is None else bias.double())
                    bound = error_bound(x.double(), wd.T, bias, y64, dt, k_in)
                    check_close(f"linear N={n_out} K={k_in} bs={bs} dq={dq} {dt} M={m}", y, y64,
                                bound, failures)
                    gy = torch.randn(m, n_out, generator=gen).to(DEVICE, dt)
                    gx = torch.ops.minidora.nf4_linear_grad_input(gy, *args, n_out, k_in)
                    gx64 = gy.double() @ wd
                    bound = error_bound(gy.double(), wd, None, gx64, dt, n_out)
                    check_close(f"grad_input N={n_out} K={k_in} bs={bs} dq={dq} {dt} M={m}", gx,
                                gx64, bound, failures)
                    checked += 2
    # 3-D input, and a misaligned x (storage offset of one element): other code paths.
    q = to_device(nf4.quantize(torch.randn(128, 256, generator=gen)), DEVICE)
    wd = nf4.dequantize(q, torch.bfloat16).double()
    x3 = torch.randn(2, 3, 256, generator=gen).to(DEVICE, torch.bfloat16)
    flat = torch.randn(4 * 256 + 1, generator=gen).to(DEVICE, torch.bfloat16)
    for name, x in (("3-D x", x3), ("misaligned x", flat[1:].view(4, 256))):
        y = torch.ops.minidora.nf4_linear(x, *op_args(q), 128, 256, None)
        y64 = x.double() @ wd.T
        check_close(f"linear {name}", y, y64,
                    error_bound(x.double().reshape(-1, 256), wd.T, None, y64.reshape(-1, 128),
                                torch.bfloat16, 256).view_as(y64), failures)
        checked += 1
    return checked


# --- 2. timing -------------------------------------------------------------------------------

def time_us(fns: list, repeats: int = 15, warmup: int = 3) -> tuple[float, bool]:
    """Median time of one call (microseconds); fns are equivalent calls on different copies."""
    reps = len(fns) * max(1, math.ceil(20 / len(fns)))

    def run_all():
        for i in range(reps):
            fns[i % len(fns)]()

    for _ in range(warmup):
        run_all()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_all()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            run_all()
        run, graphed = graph.replay, True
    except RuntimeError as e:  # capture failed: time eagerly (includes launch overhead)
        print(f"  note: CUDA graph capture failed ({e}); timing eagerly", file=sys.stderr)
        run, graphed = run_all, False
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times), graphed


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t, _ = time_us([lambda: dst.copy_(src)], repeats=10)
    return 2 * n / (t * 1e-6)


def bench(quick: bool) -> list[dict]:
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + write)")
    dt, gen = torch.bfloat16, torch.Generator().manual_seed(1)
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]
    rows = []
    for n_out, k_in in shapes:
        w = (torch.randn(n_out, k_in, generator=gen) * 0.02).to("cuda", dt)
        q = nf4.quantize(w, blocksize=64, double_quant=True)
        dense = nf4.dequantize(q, dt)                                          # [N, K] bf16
        q_bytes = q.nbytes + 256 * 4                                           # + nested code
        # Enough copies that the rotation is 3x L2: each call reads its weight from DRAM.
        nq = max(2, math.ceil(3 * l2 / q_bytes))
        nd = max(2, math.ceil(3 * l2 / (dense.numel() * dense.element_size())))
        qs = [op_args(nf4.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, 64,
                                    q.nested_absmax.clone(), q.offset.clone())) for _ in range(nq)]
        ws = [dense.clone() for _ in range(nd)]
        for m in (1, 16, 64, 512):
            x = torch.randn(m, k_in, generator=gen).to("cuda", dt)
            calls = [lambda a=a: torch.ops.minidora.nf4_linear(x, *a, n_out, k_in, None)
                     for a in qs]
            t_q, g1 = time_us(calls)
            t_simt = None
            if m <= 16:  # version 1 of the fused kernel, on CUDA cores, for comparison
                with ops.use(cuda_kernel="simt"):
                    t_simt, _ = time_us(calls)
            t_d, g2 = time_us([lambda wd=wd: F.linear(x, wd) for wd in ws])
            io = (m * k_in + m * n_out) * 2                                    # x read, y written
            b_q, b_d = q_bytes + io, n_out * k_in * 2 + io
            row = dict(N=n_out, K=k_in, M=m, nf4_us=t_q, nf4_simt_us=t_simt, dense_us=t_d,
                       speedup=t_d / t_q,
                       nf4_bytes=b_q, dense_bytes=b_d, nf4_gbs=b_q / t_q / 1e3,
                       dense_gbs=b_d / t_d / 1e3, nf4_frac_copy=b_q / (t_q * 1e-6) / bw,
                       dense_frac_copy=b_d / (t_d * 1e-6) / bw, graphed=g1 and g2)
            if m == 1:
                row["target"] = "M=1: >= 0.60 copy bw and >= 2.5x dense"
                row["met"] = row["nf4_frac_copy"] >= 0.60 and row["speedup"] >= 2.5
            elif m == 512:
                row["target"] = "M=512: within 1.2x of dense"
                row["met"] = t_q <= 1.2 * t_d
            rows.append(row)
        del qs, ws
        torch.cuda.empty_cache()

    print(f"\n{'W [N, K]':>14} {'M':>4} {'nf4 us':>9} {'simt us':>9} {'dense us':>9} "
          f"{'dense/nf4':>9} {'nf4 GB/s':>9} {'nf4 %copy':>9} {'dense GB/s':>10} "
          f"{'dense %copy':>11}  target")
    for r in rows:
        target = "" if "met" not in r else ("met" if r["met"] else "MISSED") + f" ({r['target']})"
        simt = "-" if r["nf4_simt_us"] is None else f"{r['nf4_simt_us']:.2f}"
        print(f"{str((r['N'], r['K'])):>14} {r['M']:>4} {r['nf4_us']:>9.2f} {simt:>9} "
              f"{r['dense_us']:>9.2f} "
              f"{r['speedup']:>9.2f} {r['nf4_gbs']:>9.0f} {100 * r['nf4_frac_copy']:>8.0f}% "
              f"{r['dense_gbs']:>10.0f} {100 * r['dense_frac_copy']:>10.0f}%  {target}")
    return [dict(r, copy_gbs=bw / 1e9, device=props.name) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the validation summary and timings here")
    parser.add_argument("--quick", action="store_true", help="time the (4096, 4096) weight only")
    parser.add_argument("--device", default="cuda",
                        help="device to validate (default cuda); timing runs on cuda only")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE != "cuda":
        failures: list[str] = []
        n = validate_dequantize(torch.Generator().manual_seed(0), failures)
        n += validate_exact(torch.Generator().manual_seed(0), failures)
        n += validate_linear(torch.Generator().manual_seed(0), failures)
        print(f"validation on {DEVICE}: {n} cases, {len(failures)} failure(s)")
        for f in failures[:40]:
            print("  FAIL", f)
        return 1 if failures else 0
    if not torch.cuda.is_available():
        print("bench_nf4_cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if not (ops.extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "minidora::nf4_linear", "CUDA")):
        print("bench_nf4_cuda: minidora._C is not built with CUDA kernels "
              "(MINIDORA_FORCE_CUDA=1 python setup.py build_ext --inplace)", file=sys.stderr)
        return 2
    # cuBLAS (the dequantize + matmul path) must accumulate in float32 like the bound assumes.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    gen = torch.Generator().manual_seed(0)
    failures: list[str] = []
    n_deq = validate_dequantize(gen, failures)
    n_exact = n_lin = 0
    # bf16 / fp16 small-M linear: tensor-core (sm_80+ only) and CUDA-core kernels
    kernels = ("mma", "simt") if torch.cuda.get_device_capability() >= (8, 0) else ("simt",)
    for kernel in kernels:
        found: list[str] = []
        with ops.use(cuda_kernel=kernel):
            n_exact += validate_exact(gen, found)
            n_lin += validate_linear(gen, found)
        failures += [f"[{kernel}] {f}" for f in found]
    print(f"validation: {n_deq} dequantize cases (bit-exact), {n_exact} one-hot linear / "
          f"grad_input cases (exact), {n_lin} random linear / grad_input cases (error bound): "
          f"{len(failures)} failure(s)")
    for f in failures[:40]:
        print("  FAIL", f)
    result = {"validation_failures": failures, "dequantize_cases": n_deq,
              "one_hot_cases": n_exact, "linear_cases": n_lin}
    if not failures:
        result["timings"] = bench(args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
