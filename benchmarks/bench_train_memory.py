"""Benchmark: the memory per rank of ``minidora train`` on 1, 2 and 4 processes, measured beside
the prediction of :mod:`minidora.apps.train.memory`.

A synthetic Llama checkpoint (random weights at a real model's widths; default Llama-2-7B's
widths with 8 decoder blocks, 1.9 B parameters in bfloat16) is written once (or found), then
``minidora train`` runs on it under ``torch.distributed.run`` with N processes, one N after
another. Each rank's last line gives its peak RSS while loading and while training, its RSS
before the model and the bytes of parameters and buffers it holds; the table sets each beside
:func:`~minidora.apps.train.memory.predict_loading` and
:func:`~minidora.apps.train.memory.predict`, with the runtime term taken from that rank's own
"before the model".

Two checks, as ratios of numbers measured in this run:

(i) each rank's loading peak at N is at most (model bytes held at N = 1) / N + one layer +
    the RSS before the model at N = 1, within 10 % (ratio <= 1.10). "One layer" is the largest
    quantized layer's weight in the checkpoint's dtype (the most a loader that reads one whole
    layer at a time would hold beside its shards);
(ii) at N = 2 the largest loading peak of a rank is at most 0.6 times that of N = 1.

Then what the formula gives for Llama-2-7B and 70B on 8 ranks. The processes run with one
thread each; on a machine with fewer cores than processes they are oversubscribed, which
changes their speed, not their memory: no time is reported. Run it alone (it is the heavy job)::

    python benchmarks/bench_train_memory.py                      # 7b-width, 8 layers, N = 1,2,4
    python benchmarks/bench_train_memory.py --size 1b --layers 4 --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidora.apps.train import memory, synthetic  # noqa: E402

LINE = re.compile(r"minidora train: rank (\d+) of (\d+): peak RSS (\d+) MiB \(loading (\d+), "
                  r"training (\d+), before the model (\d+)\), model bytes held ([\d.]+) MiB")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
LLAMA2 = {"7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
          "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)}
MIB = 2**20
RANK = 8                  # the adapters' rank r


def machine() -> list[str]:
    """Lines naming the CPU, its ISA flags that matter here, caches, cores, load and torch."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", info, re.M) or [None, ""])[1].split())
    caches = []
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (idx / "level").read_text().strip(), (idx / "type").read_text().strip()
            if kind != "Instruction":
                caches.append(f"L{level} {(idx / 'size').read_text().strip()}")
        except OSError:
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return [f"CPU: {model[1] if model else platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores",
            "ISA: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS),
            "caches (per core / shared, as cpu0 sees them): " + (", ".join(caches) or "unknown"),
            f"load average: {' '.join(f'{x:.2f}' for x in load)}; torch {torch.__version__}, "
            f"Python {platform.python_version()}"]


def batch_tokens(folder: Path, vocab: int, batch: int, steps: int, seed: int) -> int:
    """The most tokens (rows x padded length) of a global batch over the run's steps: the
    batches train draws (loop.train's generator and rows)."""
    from minidora.apps.train.models import question_rows

    rows, _ = question_rows(folder, vocab)
    gen = torch.Generator().manual_seed(seed + 1)
    most = 0
    for _ in range(steps):
        x, _ = rows.batch(torch.randint(len(rows.lines), (batch,), generator=gen))
        most = max(most, x.numel())
    return most


def run(n: int, folder: Path, args, out: Path) -> dict[int, dict]:
    """One ``train`` run on ``n`` processes; every rank's numbers, by rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "minidora", "train", "--model", str(folder), "--method", args.method,
           "--rank", str(RANK), "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--threads", "1",
           "--out", str(out)]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ranks = {}
    for m in LINE.finditer(res.stdout + res.stderr):    # ranks' lines may run into each other
        ranks[int(m[1])] = {"peak": int(m[3]), "load": int(m[4]), "train": int(m[5]),
                            "before": int(m[6]), "held": float(m[7])}
    if res.returncode != 0 or len(ranks) != n:
        sys.exit(f"the run on {n} process(es) failed (exit {res.returncode}):\n"
                 + "\n".join((res.stdout + res.stderr).splitlines()[-20:]))
    return ranks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(synthetic.SIZES), default="7b-width")
    ap.add_argument("--layers", type=int, default=8, help="decoder blocks (default 8)")
    ap.add_argument("--folder", type=Path, default=None,
                    help="where the checkpoint is (written if missing; default "
                         "$TMPDIR/minidora_mem_SIZE_LAYERS)")
    ap.add_argument("--ranks", default="1,2,4", help="process counts, comma-separated")
    ap.add_argument("--method", choices=memory.METHODS, default="qlora")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc's MALLOC_MMAP_THRESHOLD_ for the train processes: a fixed "
                         "threshold, so that a freed block above it goes back to the system at "
                         "once (by default glibc raises it as blocks are freed, up to 32 MiB, "
                         "and keeps freed blocks below it resident)")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    if 1 not in ranks:
        ap.error("--ranks must include 1: the checks compare against one process")
    folder = args.folder or Path(tempfile.gettempdir()) / f"minidora_mem_{args.size}_{args.layers}"

    print("\n".join(machine()))
    print("glibc malloc: " + (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (fixed)"
                              if args.malloc_mmap_threshold is not None else
                              "default (dynamic mmap threshold)"))
    subprocess.run([sys.executable, "-m", "minidora", "train", "--write-synthetic", str(folder),
                    "--synthetic-size", args.size, "--synthetic-layers", str(args.layers)],
                   check=True)
    config = json.loads((folder / "config.json").read_text())
    ckpt_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    n = synthetic.count(config)
    layer = max(o * i for o, i in n["shapes"]) * ckpt_dtype.itemsize
    tokens = batch_tokens(folder, config["vocab_size"], args.batch_size, args.steps, 0)
    print(f"checkpoint: {folder} ({args.size}, {args.layers} layers, {n['total'] / 1e9:.2f} B "
          f"parameters, {n['quantized'] / 1e9:.2f} B of them quantized, {ckpt_dtype}); largest "
          f"quantized layer {layer / MIB:.1f} MiB in {ckpt_dtype} (\"one layer\"); global batch "
          f"at most {tokens} tokens")

    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in ranks:
            measured[world] = run(world, folder, args, Path(tmp) / f"out{world}")

    def mib(b):
        return f"{b / MIB:,.0f}"

    print("\n| N | rank | loading peak: measured / predicted MiB | training peak: measured / "
          "predicted MiB | model bytes held: measured / predicted MiB | RSS before the model "
          "MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    one = measured[1][0]
    bound = {}
    for world, by_rank in measured.items():
        for rank, m in sorted(by_rank.items()):
            rt = m["before"] * MIB
            load = memory.predict_loading(config, args.method, RANK, world,
                                          checkpoint_dtype=ckpt_dtype, runtime=rt)
            step = memory.predict(config, args.method, RANK, world, batch_tokens=tokens,
                                  runtime=rt)
            held = sum(load[k] for k in memory.LOAD_PARTS[:5])     # storage: no grads yet
            print(f"| {world} | {rank} | {m['load']:,} / {mib(load['total'])} "
                  f"({m['load'] * MIB / load['total']:.3f}) | {m['train']:,} / "
                  f"{mib(step['total'])} ({m['train'] * MIB / step['total']:.3f}) | "
                  f"{m['held']:,.1f} / {held / MIB:,.1f} | {m['before']} |")
        bound[world] = one["held"] / world + layer / MIB + one["before"]
    print("\n(measured / predicted in parentheses; predicted for rank 0, the rank FSDP2 gives "
          "the most rows, with each rank's own RSS before the model as its runtime)")

    print("\nCheck (i): loading peak per rank <= (model bytes held at N=1) / N + one layer + RSS "
          f"before the model at N=1 = {one['held']:.1f} / N + {layer / MIB:.1f} + "
          f"{one['before']} MiB, within 10 % (ratio <= 1.10):")
    for world, by_rank in measured.items():
        worst = max(m["load"] for m in by_rank.values())
        ratio = worst / bound[world]
        print(f"  N={world}: largest loading peak {worst:,} MiB / bound {bound[world]:,.0f} MiB "
              f"= {ratio:.3f} ({'met' if ratio <= 1.10 else 'MISSED'})")
    if 2 in measured:
        ratio = max(m["load"] for m in measured[2].values()) / one["load"]
        print(f"Check (ii): largest loading peak at N=2 / at N=1 = "
              f"{max(m['load'] for m in measured[2].values()):,} / {one['load']:,} = "
              f"{ratio:.3f} ({'met' if ratio <= 0.6 else 'MISSED'}: target <= 0.600)")

    print("\nLlama-2 on 8 ranks, QLoRA r=8 with double quantization, bfloat16 checkpoint, the "
          "unquantized parameters and the compute in bfloat16, float32 adapters, a global batch "
          "of 8 rows x 4096 tokens; per rank, without the runtime (measured here at N=1: "
          f"{one['before']} MiB on this CPU; a GPU's CUDA context is another number):")
    print("| model | NF4 base (extrapolate) | held (storage) | loading peak | training peak | "
          "of which activations + loss gradients | of which gathered |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in LLAMA2.items():
        base = memory.extrapolate(synthetic.count(cfg)["quantized"], 8)
        load = memory.predict_loading(cfg, "qlora", RANK, 8, dtype=torch.bfloat16)
        step = memory.predict(cfg, "qlora", RANK, 8, dtype=torch.bfloat16,
                              batch_tokens=8 * 4096)
        held = sum(load[k] for k in memory.LOAD_PARTS[:5])
        gathered = sum(step[k] for k in memory.PARTS[5:10])
        gib = 2**30
        print(f"| Llama-2-{name} | {base / gib:.2f} GiB | {held / gib:.2f} GiB | "
              f"{load['total'] / gib:.2f} GiB | {step['total'] / gib:.2f} GiB | "
              f"{(step['activations'] + step['loss_gradients']) / gib:.2f} GiB | "
              f"{gathered / gib:.2f} GiB |")
    print("Measured here: the runtime; checked by the tests against FSDP2 and autograd: the "
          "storage, the gathered root, outer units and all-gather buffer, the activations per "
          "token; modelled from the code: the gathered and prefetched layer, the loss's "
          "gradients, the loading transient. The sum is meant as an upper bound of the tensors' "
          "bytes (the gathered terms and the buffers are not all alive at once); what the "
          "allocator keeps of freed blocks is not in it (see --malloc-mmap-threshold).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
