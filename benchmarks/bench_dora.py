"""Benchmark: what DoRA costs over LoRA, in minidora and in PEFT, on one linear layer (CPU).

One training step = forward + backward of ``(layer(x) * g).sum()`` with x [M, in] requiring a
gradient (as inside a network) and the base weight frozen. All variants of a table are measured
in the same run, interleaved (one step of each in turn, repeated), and the median is reported,
so the ratios compare like with like on a machine whose load changes. By default one thread
runs and the clock is the process's CPU time, which other jobs on a shared machine barely
disturb (``--threads 2`` uses wall time). Run:

    python benchmarks/bench_dora.py            # 4096 x 4096, M = 512, r = 8: docs/bench-dora.md
    python benchmarks/bench_dora.py --quick    # 1024 x 1024, M = 128: a few seconds

Variants: ``base`` (the frozen layer alone), ``LoRA`` and ``DoRA`` (minidora), ``PEFT LoRA`` and
``PEFT DoRA`` (peft's LoRA layer with ``use_dora`` false/true, when peft is importable), and
``DoRA: W0 row norms alone``: the ||W0[i, :]||^2 that every DoRA forward computes afresh (no
cache), timed alone, i.e. the part of the DoRA step that a cache would save. Settings:
float32 everywhere; a bfloat16 dense base with float32 adapters; an NF4 base (double quant,
blocksize 64) computing in bfloat16 (minidora only).

Peak memory: the largest resident-set growth during one step, read from Linux's VmHWM after
resetting it (``/proc/self/clear_refs``). The script re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc returns large freed blocks at once and the
resident set follows the live tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:   # before torch allocates anything
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minidora  # noqa: E402
from minidora import DoRALinear, LoRALinear, NF4Linear, ops  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_mib(step) -> float:
    """Peak resident-set growth (MiB) while ``step()`` runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def measure(steps: dict, repeats: int, clock) -> dict:
    """Median seconds per step of each variant, interleaved."""
    for fn in steps.values():
        fn()                                            # warm up
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_layer(lin: nn.Linear, r: int, alpha: float, dora: bool):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=dora,
                     init_lora_weights=True)
    model = get_peft_model(_Holder(lin), cfg)
    return model


def make_step(layer, x, g):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        (layer(x).float() * g).sum().backward()
    return step


def randomize(layer, seed=0):
    """Move B (and m) off their init, as during training; same values for every variant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and ("lora_B" in name):
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))


def run_setting(title, base_dtype, quantized, n, m, r, repeats, use_peft, clock):
    torch.manual_seed(0)
    lin = nn.Linear(n, n, dtype=torch.float32)
    act_dtype = torch.float32 if base_dtype == torch.float32 else torch.bfloat16
    x = torch.randn(m, n, dtype=act_dtype, requires_grad=True)
    g = torch.randn(m, n)
    layers = {}
    if quantized:
        base = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
        layers["base"] = base
        layers["LoRA"] = LoRALinear(base, r=r, alpha=2 * r)
        layers["DoRA"] = DoRALinear(base, r=r, alpha=2 * r)
    else:
        base = lin.to(base_dtype).requires_grad_(False)
        layers["base"] = base
        layers["LoRA"] = LoRALinear(base, r=r, alpha=2 * r)
        layers["DoRA"] = DoRALinear(base, r=r, alpha=2 * r)
        if use_peft:
            for name, dora in (("PEFT LoRA", False), ("PEFT DoRA", True)):
                copy = nn.Linear(n, n, dtype=base_dtype)
                copy.load_state_dict(base.state_dict())
                layer = peft_layer(copy, r, 2 * r, dora)
                if layer is not None:
                    layers[name] = layer
    for layer in layers.values():
        randomize(layer)
    steps = {name: make_step(layer, x, g) for name, layer in layers.items()}
    steps["DoRA: W0 row norms alone"] = layers["DoRA"].w0_norm_sq     # part of every DoRA step
    times = measure(steps, repeats, clock)
    peaks = {name: min(peak_step_mib(fn) for _ in range(2)) for name, fn in steps.items()}
    print(f"\n{title}: W [{n}, {n}], x [{m}, {n}], r = {r}, one forward + backward")
    print("| variant | ms / step | vs LoRA | vs base | peak step memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name in steps:
        ref = "PEFT LoRA" if name.startswith("PEFT") else "LoRA"
        print(f"| {name} | {1e3 * times[name]:.1f} | {times[name] / times[ref]:.2f}x | "
              f"{times[name] / times['base']:.2f}x | {peaks[name]:.0f} |")
    return times, peaks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, M = 128")
    ap.add_argument("--n", type=int, default=None, help="in = out features (default 4096)")
    ap.add_argument("--m", type=int, default=None, help="rows of x (default 512)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--settings", default="f32,bf16,nf4",
                    help="comma list of f32, bf16, nf4")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: then CPU time of the process is the "
                         "clock, which other jobs on a shared machine barely disturb)")
    args = ap.parse_args()
    n = args.n or (1024 if args.quick else 4096)
    m = args.m or (128 if args.quick else 512)
    repeats = args.repeats or (5 if args.quick else 7)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"minidora {minidora.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), clock: {clock.__name__}, "
          f"compiled NF4 ops: {ops.extension_available()}")
    try:
        import peft
        print(f"peft {peft.__version__}")
    except ImportError:
        print("peft not importable: PEFT rows skipped")
    settings = {"f32": ("float32 (base, x and adapters)", torch.float32, False),
                "bf16": ("bfloat16 dense base and x, float32 adapters", torch.bfloat16, False),
                "nf4": ("NF4 base computing in bfloat16, float32 adapters (QLoRA / QDoRA)",
                        torch.bfloat16, True)}
    for key in args.settings.split(","):
        title, dtype, quantized = settings[key]
        run_setting(title, dtype, quantized, n, m, args.r, repeats, not args.no_peft, clock)


if __name__ == "__main__":
    main()
