"""Pretraining (cached) and fine-tuning with one method, under a shared budget.

:func:`pretrain` trains the small GPT on text A, or loads the weights from the cache
(``$MINIDORA_CACHE``, default ``~/.cache/minidora``; safetensors + JSON, keyed by a hash of the
model and training config and of text A). :func:`finetune` starts from those weights and trains on
text B with one method: ``full`` (every parameter), or ``lora`` / ``dora`` / ``qlora`` / ``qdora``
through :func:`minidora.wrap` on the six linear layers of every block. Every method gets the same
seed, batches, steps and schedule; only the learning rate differs (see :data:`LEARNING_RATES`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import minidora

from ..analysis import effective_weight, weight_decomposition
from .data import Corpus, eval_windows, random_batch
from .memory import PeakTensorMemory
from .model import GPT, GPTConfig

__all__ = ["METHODS", "LEARNING_RATES", "RunConfig", "DemoError", "pretrain", "finetune",
           "evaluate", "default_cache_dir", "max_rank"]

METHODS = ("full", "lora", "dora", "qlora", "qdora")
# Peak learning rates (AdamW, 10% warm-up, cosine decay to 10%), each the best held-out loss of a
# small sweep (docs/demo.md). Full fine-tuning moves every weight and wants a smaller step than
# the adapters, which start at B = 0.
LEARNING_RATES = {"full": 3e-3, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2, "qdora": 1e-2}
CACHE_FORMAT = 1


class DemoError(RuntimeError):
    """A problem with the request (e.g. a backend that is not built): one line, no traceback."""


@dataclass
class RunConfig:
    """Everything that decides the numbers of a run (``--quick`` shrinks the step counts)."""

    seed: int = 0
    model: GPTConfig = field(default_factory=GPTConfig)
    batch_size: int = 32
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    steps: int = 300
    finetune_batch_size: int = 16  # text B's lines are short: 16 x 64 characters hold ~30 problems
    rank: int = 8
    alpha: float = 16.0
    n_checkpoints: int = 10        # weight snapshots for the dM / dD analysis
    eval_every: int = 20
    backend: str = "auto"          # NF4 matmul: auto | reference | compiled
    compute_dtype: str = "float32"  # dtype of the dequantized 4-bit base in the q-methods
    threads: int = 1               # torch CPU threads; the summation order (the bits) depends on it

    def to_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    env = os.environ.get("MINIDORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minidora"


def _lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor],
             batch: int = 64) -> float:
    """Mean cross-entropy over evaluation windows x, y: [n, T]."""
    was_training = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, len(x), batch):
        total += model.loss(x[i:i + batch], y[i:i + batch]).item() * len(x[i:i + batch])
    model.train(was_training)
    return total / len(x)


def _cache_key(cfg: RunConfig, corpus: Corpus, alphabet: str) -> str:
    spec = {"format": CACHE_FORMAT, "model": cfg.model.to_dict(), "seed": cfg.seed,
            "batch_size": cfg.batch_size, "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr,
            "threads": cfg.threads,
            "text": corpus.sha256, "alphabet": alphabet, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(cfg: RunConfig, corpus: Corpus, alphabet: str, cache_dir: Path | None,
             log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Pretrain on text A, or load the result from ``cache_dir`` (None: no cache).

    Returns:
        (state_dict, info); info has the losses, the wall time and ``"cached"``.
    """
    key = _cache_key(cfg, corpus, alphabet)
    if cache_dir is not None:
        weights = cache_dir / f"pretrained-{key}.safetensors"
        meta = cache_dir / f"pretrained-{key}.json"
        if weights.is_file() and meta.is_file():
            try:
                info, state = json.loads(meta.read_text()), load_file(weights)
                if not isinstance(info, dict):
                    raise ValueError(f"{meta} holds no JSON object")
                GPT(cfg.model).load_state_dict(state)  # names and shapes must fit
            except (OSError, ValueError, RuntimeError, SafetensorError) as e:
                log(f"pretraining: ignoring the unreadable cache entry {weights} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            else:
                log(f"pretraining: cached weights found in {weights} (key {key}); "
                    "skipping pretraining")
                return state, {**info, "cached": True}
    log(f"pretraining on {corpus.name}: {cfg.pretrain_steps} steps "
        f"(no usable cached weights for key {key})")
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    held = eval_windows(corpus.held_out, cfg.model.block_size)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", leave=False, disable=None)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr)
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.model.block_size, gen)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    info = {"key": key, "steps": cfg.pretrain_steps, "seconds": time.perf_counter() - t0,
            "final_train_loss": loss.item(), "held_out_loss": evaluate(model, held),
            "cached": False}
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file(state, tmp, metadata={"key": key})
        os.replace(tmp, weights)
        meta.write_text(json.dumps({k: v for k, v in info.items() if k != "cached"}, indent=1))
        log(f"pretraining: {info['seconds']:.1f} s, held-out loss {info['held_out_loss']:.3f}; "
            f"weights cached in {weights}")
    return state, info


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a model holds: parameters and buffers (an NF4Linear keeps its packed codes and
    scales as frozen parameters and buffers, so they are included)."""
    return [*model.parameters(), *model.buffers()]


@contextlib.contextmanager
def _backend(name: str):
    """Run the block with the requested NF4 path (``minidora.ops.set_backend``)."""
    from .. import ops

    if name == "compiled" and not ops.extension_available():
        raise DemoError("--backend compiled needs the compiled extension minidora._C; build it "
                        "with `python setup.py build_ext --inplace` or use --backend reference")
    previous = ops.get_backend()
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(previous)


def build_model(method: str, state: dict[str, torch.Tensor], cfg: RunConfig) -> nn.Module:
    """The pretrained GPT, prepared for ``method`` (adapters initialised with ``cfg.seed``)."""
    model = GPT(cfg.model)
    model.load_state_dict(state)
    if method == "full":
        return model
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.compute_dtype)
    kwargs = {"compute_dtype": dtype} if method.startswith("q") else {}
    wrapped = minidora.wrap(model, method, target_modules=list(GPTConfig.TARGETS), r=cfg.rank,
                            alpha=cfg.alpha, **kwargs)
    return model if wrapped is None else wrapped


def target_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in GPTConfig.TARGETS}


def max_rank(cfg: GPTConfig) -> int:
    """The largest useful adapter rank: min(in_features, out_features) over the adapted layers.

    B @ A has rank at most min(out, in) whatever r is, so a larger r only adds parameters.
    """
    with torch.device("meta"):          # shapes only: no memory, no initialisation work
        model = GPT(cfg)
    return min(min(m.weight.shape) for m in target_modules(model).values())


@torch.no_grad()
def answer_accuracy(model: nn.Module, tok, lines: list[str]) -> float:
    """Fraction of problems ``"a plus b is c."`` whose answer greedy decoding gets right.

    Teacher forcing with an argmax check at every answer position is exactly greedy decoding: the
    decoded answer is right if and only if every next-token argmax along the true answer is right.
    """
    was_training = model.training
    model.eval()
    seqs = [tok.encode("\n" + ln + "\n") for ln in lines]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.int64)                  # [n, T]
    y = torch.zeros(len(seqs), T, dtype=torch.int64)                  # [n, T]
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)                # [n, T] answer positions
    for i, (ln, s) in enumerate(zip(lines, seqs, strict=True)):
        x[i, :len(s) - 1], y[i, :len(s) - 1] = s[:-1], s[1:]
        start = ln.index(" is ") + 4    # the answer begins at ln[start], s[start + 1], y[i, start]
        mask[i, start:len(s) - 1] = True
    pred = model(x).argmax(-1)                                        # [n, T]
    model.train(was_training)
    return ((pred == y) | ~mask).all(dim=1).float().mean().item()


def finetune(method: str, state: dict[str, torch.Tensor], cfg: RunConfig, tok, corpus: Corpus,
             position: int = 0) -> dict:
    """Fine-tune the pretrained weights on ``corpus`` (text B) with one method.

    Returns:
        A JSON-ready dict: parameter counts, weight and peak memory, seconds per step, losses and
        accuracy before and after, the loss curves, and the dM / dD points of every target layer.
    """
    with _backend(cfg.backend):
        model = build_model(method, state, cfg)
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        rep = minidora.report(model)
        targets = target_modules(model)
        w0 = {n: effective_weight(m) for n, m in targets.items()}
        train_w = eval_windows(corpus.train, cfg.model.block_size)
        held_w = eval_windows(corpus.held_out, cfg.model.block_size)
        res = {"method": method, "lr": LEARNING_RATES[method],
               "trainable_params": rep.trainable_params, "total_params": rep.total_params,
               "weight_bytes": rep.weight_bytes,
               "initial_train_loss": evaluate(model, train_w),
               "initial_held_out_loss": evaluate(model, held_w),
               "initial_accuracy": answer_accuracy(model, tok, corpus.held_out_lines)}
        opt = torch.optim.AdamW(params, lr=LEARNING_RATES[method], weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every method
        every = max(1, cfg.steps // cfg.n_checkpoints)
        curve, evals, points, step_time = [], [(0, res["initial_held_out_loss"])], [], 0.0
        bar = tqdm(range(cfg.steps), desc=f"{method:>5}", leave=False, disable=None,
                   position=position)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg.steps, LEARNING_RATES[method])
            x, y = random_batch(corpus.train, cfg.finetune_batch_size, cfg.model.block_size, gen)
            meter = contextlib.nullcontext() if step else PeakTensorMemory(_model_tensors(model))
            t0 = time.perf_counter()
            with meter:
                loss = model.loss(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if step == 0:
                res["peak_bytes"] = meter.peak_bytes
            else:  # the first step is metered (slow) and not timed
                step_time += time.perf_counter() - t0
            curve.append(loss.item())
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                evals.append((step + 1, evaluate(model, held_w)))
            if (step + 1) % every == 0:
                for n, m in targets.items():
                    dm, dd = weight_decomposition(effective_weight(m), w0[n])
                    points.append({"step": step + 1, "layer": n, "dM": dm, "dD": dd})
        res.update({"seconds_per_step": step_time / max(1, cfg.steps - 1),
                    "final_train_loss": evaluate(model, train_w),
                    "final_held_out_loss": evals[-1][1],
                    "final_accuracy": answer_accuracy(model, tok, corpus.held_out_lines),
                    "train_curve": curve, "held_out_curve": evals, "decomposition": points})
    return res
