"""The training loop of ``minidora train``: the same on one process and on many.

Every rank draws the same global batch (``batch_size`` rows, one seeded generator) and keeps its
own contiguous slice of rows: rows ``[r B / W, (r + 1) B / W)``, so a batch that does not divide
by the world size W gives some ranks one row more. The loss is the sum of the cross-entropies of
the rank's target tokens divided by the number of target tokens in the *global* batch, times W:
DDP and FSDP2 average the gradients over the W ranks, which makes the update exactly that of one
process on the whole batch, whatever the split (the tests hold 2 processes to 1 in float64).

The model is built by one small function per model name (:data:`MODELS`): ``builtin``, the
demo's small GPT on the number-words task of :mod:`minidora.apps.demo`. A builder returns a
:class:`Task` (the wrapped model, its training rows and a function from the model and the input
rows to logits), so another model plugs in by adding an entry. Any other ``model`` is a Hugging
Face checkpoint (a folder, or ``smollm2-135m``): :func:`hf_task` loads it shard by shard
(:mod:`minidora.apps.train.load`) and trains it on the question set of ``finetune``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import minidora

from ..common import IGNORE, peak_rss, proc_bytes, reset_peak_rss
from ..demo import progress
from ..demo.data import Problems
from ..demo.model import GPT, GPTConfig
from ..demo.precision import bf16_note
from ..demo.train import DEMO_MODEL
from .group import Group
from .shard import local_bytes, nf4_digest, parallelize, unwrap
from .state import load_resume, load_sharded_adapters, save_adapters, save_resume

__all__ = ["TrainConfig", "Task", "MODELS", "builtin", "hf_task", "train", "split_rows",
           "DTYPES", "compute_line", "optimizer"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Everything that decides a run's numbers (the world size does not)."""

    model: str = "builtin"
    method: str = "qdora"
    strategy: str = "fsdp2"        # fsdp2 | ddp
    rank: int = 8                  # adapter rank r
    alpha: float = 16.0
    steps: int = 50
    batch_size: int = 16           # rows of the global batch
    lr: float = 1e-2
    seed: int = 0
    dtype: str = "float32"         # base compute, adapters and model: float32 | float64
    mixed_precision: str = "none"  # none | bf16 (FSDP2's MixedPrecisionPolicy)
    offload: bool = False          # FSDP2's CPUOffloadPolicy (+ paged AdamW on CUDA)
    gpt: GPTConfig = DEMO_MODEL    # the demo's GPT (frozen: a safe shared default)
    base: Path | None = None       # safetensors state dict of the GPT; None: initialized from seed

    def settings(self) -> dict:
        """What a resume point records (JSON-ready)."""
        d = asdict(self)
        d["gpt"], d["base"] = self.gpt.to_dict(), None if self.base is None else str(self.base)
        return d


@dataclass
class Task:
    """A model ready to train: ``model`` wrapped (and already parallelized when ``parallel``),
    ``data`` its training rows, ``logits(module, x)`` [B, T, V] for input rows x [B, T];
    ``note`` says where the model and rows came from, ``reads`` what this rank read of the
    checkpoint (``(tensor, first row, end row, bytes)``, see :class:`~.load.Checkpoint`)."""

    model: nn.Module
    data: Problems
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    parallel: bool = False
    note: str = ""
    reads: list = field(default_factory=list)
    runtime_rss: int | None = None     # bytes before the model's storage, measured by the builder


def builtin(cfg: TrainConfig) -> Task:
    """The demo's GPT (weights from ``cfg.base``, or drawn from ``cfg.seed``) wrapped with
    ``cfg.method`` on its six linear layers per block, and the number-words training rows."""
    from safetensors.torch import load_file

    from ..demo.data import load_corpora, problems

    tok, _, numbers = load_corpora()
    if len(tok.alphabet) != cfg.gpt.vocab_size:
        raise ValueError(f"the GPT has vocab_size={cfg.gpt.vocab_size}; the texts need "
                         f"{len(tok.alphabet)}")
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt)
    if cfg.base is not None:
        model.load_state_dict(load_file(str(cfg.base)))
    model.to(dtype)
    extra = {"compute_dtype": dtype} if cfg.method.startswith("q") else {}
    minidora.wrap(model, cfg.method, list(GPTConfig.TARGETS), r=cfg.rank, alpha=cfg.alpha,
                  adapter_dtype=dtype, **extra)
    return Task(model, problems(tok, numbers.train_lines), lambda m, x: m(x))


MODELS: dict[str, Callable[[TrainConfig], Task]] = {"builtin": builtin}


def hf_task(cfg: TrainConfig, group: Group) -> Task:
    """A Hugging Face checkpoint (``cfg.model``: a folder or ``smollm2-135m``) wrapped with
    ``cfg.method`` on every linear layer of its blocks, loaded into this rank's shards and
    parallelized, with the question set's training rows (a collective)."""
    from .load import build
    from .models import folder_of, question_rows

    folder = folder_of(cfg.model, log=print if group.rank == 0 else (lambda *a, **k: None))
    runtime = []

    def skeleton():                    # transformers imported, the model on the meta device
        runtime.append(proc_bytes("/proc/self/status", "VmRSS") or 0)
        reset_peak_rss()

    module, model, ckpt = build(folder, cfg.method, cfg.rank, cfg.alpha, cfg.seed,
                                DTYPES[cfg.dtype], cfg.strategy, group.device,
                                cfg.mixed_precision, cfg.offload, on_skeleton=skeleton)
    rows, how = question_rows(folder, model.config.vocab_size)
    read = sum(n for *_, n in ckpt.reads)
    n_params = sum(math.prod(e.shape) for e in ckpt.entries.values())
    note = (f"{folder} ({n_params / 1e6:.1f} M parameters, "
            f"this rank read {read / 2**20:.1f} MiB of it), {how}")
    return Task(module, rows, lambda m, x: m(input_ids=x).logits, parallel=True, note=note,
                reads=ckpt.reads, runtime_rss=runtime[0])


def optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device):
    """AdamW over ``params``; with ``cfg.offload`` on CUDA, bitsandbytes' paged AdamW when it is
    installed (its state pages out to CPU memory under pressure), as QLoRA does."""
    if cfg.offload and device.type == "cuda":
        try:
            import bitsandbytes as bnb
            return bnb.optim.PagedAdamW(params, lr=cfg.lr, weight_decay=0.0)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def split_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of an ``n``-row batch: contiguous, sizes differing by at most one."""
    return slice(rank * n // world, (rank + 1) * n // world)


def compute_line(cfg: TrainConfig, device: torch.device) -> str:
    """Which dtype the model computes in on ``device``, and why (part of the run's first line):
    ``cfg.dtype``, or bfloat16 with FSDP2's mixed precision, said to be emulated on a CPU
    without native bfloat16 arithmetic (:func:`minidora.ops.cpu_native_bf16`)."""
    if cfg.mixed_precision == "bf16":
        note = bf16_note() if device.type == "cpu" else ""
        return "compute dtype bfloat16 (--mixed-precision bf16" + (f"; {note})" if note else ")")
    return f"compute dtype {cfg.dtype} (--dtype; bfloat16 only with --mixed-precision bf16)"


def train(cfg: TrainConfig, group: Group, out: Path | None = None, save_every: int = 0,
          resume: bool = False, init_adapters: Path | None = None, task: Task | None = None,
          on_step=None, log=print) -> dict:
    """Train ``cfg.steps`` optimizer steps on this rank; a collective (every rank calls it).

    Args:
        cfg: the run.
        group: this process's place (:func:`minidora.apps.train.join`).
        out: folder for the final adapters (``adapters/``, with ``adapters/peft/``) and the resume
            points (``resume/``); None writes nothing.
        save_every: write a resume point every this many steps (0: never).
        resume: continue from the resume point in ``out/resume``.
        init_adapters: an adapter folder (any world size wrote it) loaded before sharding.
        task: the model and data (default: ``MODELS[cfg.model](cfg)``).
        on_step: ``on_step(step, module, loss)`` after each backward, before the optimizer step
            (every rank calls it: it may run collectives).
        log: where rank 0 prints.

    Returns:
        ``losses`` (the global batch's mean loss per step run here), ``start`` (the first step),
        ``local_bytes`` (this rank's parameter and buffer bytes), ``peak_rss_mib`` and
        ``nf4_sha256`` (the full NF4 bytes after training, identical on every rank), and the
        trained ``module`` (parallelized) and ``optimizer``.
    """
    runtime = proc_bytes("/proc/self/status", "VmRSS") or 0      # before the model
    reset_peak_rss()
    if task is None:
        task = MODELS[cfg.model](cfg) if cfg.model in MODELS else hf_task(cfg, group)
    if task.parallel:
        module = task.model
        if init_adapters is not None:
            load_sharded_adapters(module, init_adapters)
    else:
        if init_adapters is not None:
            minidora.load_adapters(task.model, init_adapters)
        module = parallelize(task.model.to(group.device), cfg.strategy, cfg.mixed_precision,
                             offload=cfg.offload)
    load_peak = peak_rss()
    reset_peak_rss()
    runtime = task.runtime_rss if task.runtime_rss is not None else runtime
    params = [p for p in module.parameters() if p.requires_grad]
    opt = optimizer(params, cfg, group.device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_rows, mine = len(task.data.lines), split_rows(cfg.batch_size, group.rank, group.world_size)
    start = 0
    if resume:
        start = load_resume(module, opt, out / "resume", cfg.settings())
        if start >= cfg.steps:
            raise ValueError(f"--resume: the resume point is at step {start}; --steps {cfg.steps} "
                             "leaves nothing to do")
        for _ in range(start):                     # the batches of the steps already done
            torch.randint(n_rows, (cfg.batch_size,), generator=gen)
    say = log if group.rank == 0 else (lambda *a, **k: None)
    say(f"train: {cfg.model} {cfg.method} r={cfg.rank}, {cfg.strategy} on {group.world_size} "
        f"process(es) ({group.backend}), global batch {cfg.batch_size} rows, steps "
        f"{start}..{cfg.steps - 1}, {compute_line(cfg, group.device)}"
        + (", optimizer state offloaded to the CPU" if cfg.offload else "")
        + (f"; model {task.note}" if task.note else ""))
    t0 = time.monotonic()
    losses = []
    for step in range(start, cfg.steps):
        rows = torch.randint(n_rows, (cfg.batch_size,), generator=gen)       # [B], every rank
        x, y = task.data.batch(rows)                                         # [B, T'] global
        count = int((y != IGNORE).sum())       # global targets (a Python int: no float32 2/n)
        if count == 0:
            raise ValueError(f"step {step}: the global batch has no target token (every target "
                             f"is {IGNORE}); the task's rows need some")
        x, y = x[mine].to(group.device), y[mine].to(group.device)            # this rank's rows
        logits = task.logits(module, x)                                      # [b, T', V]
        wide = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        total = F.cross_entropy(wide, y.flatten(), reduction="sum")         # this rank's sum
        (total * (group.world_size / count)).backward()
        if on_step is not None:
            on_step(step, module, total)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = total.detach() / count                                        # this rank's part
        if group.world_size > 1:
            dist.all_reduce(mean)
        losses.append(mean.item())
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            elapsed = time.monotonic() - t0               # a run of seconds: no times
            say(f"train: step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}" + (
                f" ({progress.timing(elapsed, step + 1 - start, cfg.steps - step - 1)})"
                if elapsed >= progress.QUIET_S else ""))
        if out is not None and save_every and (step + 1) % save_every == 0:
            save_resume(module, opt, out / "resume", step + 1, cfg.settings())
    if out is not None:
        save_adapters(module, out / "adapters")
        say(f"train: adapters written to {out / 'adapters'} (PEFT layout in "
            f"{out / 'adapters' / 'peft'})")
    train_peak = peak_rss()
    return {"losses": losses, "start": start, "local_bytes": local_bytes(unwrap(module)),
            "runtime_rss_mib": runtime / 2**20, "load_peak_rss_mib": load_peak / 2**20,
            "train_peak_rss_mib": train_peak / 2**20,
            "peak_rss_mib": max(load_peak, train_peak) / 2**20, "reads": task.reads,
            "nf4_sha256": nf4_digest(module), "module": module, "optimizer": opt}
