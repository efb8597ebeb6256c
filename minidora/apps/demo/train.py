"""Pretraining (cached) and fine-tuning with one method, under a shared budget.

:func:`pretrain` trains the small GPT on text A, or loads the weights from the cache
(:func:`~minidora.apps.common.default_cache_dir`: ``$MINIDORA_CACHE``, default
``~/.cache/minidora``; safetensors + JSON, keyed by a hash of the model and training config and
of text A). :func:`finetune` starts from those weights and trains on
text B's problems with one method: ``full`` (every parameter), or ``lora`` / ``dora`` / ``qlora`` /
``qdora`` through :func:`minidora.wrap` on the six linear layers of every block. For one seed,
every method gets the same batches, steps and schedule; only the learning rate differs (see
:data:`LEARNING_RATES`). The loss is the cross-entropy of the answer characters (``342.``);
:func:`score` gives it with the exact-answer accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import minidora

from ..common import IGNORE, lr_at
from .data import Corpus, Problems, eval_windows, random_batch
from .memory import PeakTensorMemory
from .model import GPT, GPTConfig
from .progress import Progress

__all__ = ["METHODS", "ADAPTERS", "LEARNING_RATES", "RunConfig", "DemoError", "pretrain",
           "finetune", "evaluate", "score", "max_rank", "DEMO_MODEL"]

ADAPTERS = minidora.METHODS                # the adapter methods of minidora.wrap
METHODS = ("full", *ADAPTERS)
# Peak learning rates (AdamW, 10% warm-up, cosine decay to 10%), from short trials over four seeds
# (docs/demo.md). Full fine-tuning moves every weight and wants a smaller step than the adapters,
# which start at B = 0. At 1e-2 DoRA either finds the mapping within the budget or stays at 0%,
# depending on the seed; at 5e-3 every seed tried found it.
LEARNING_RATES = {"full": 3e-3, "lora": 1e-2, "dora": 5e-3, "qlora": 1e-2, "qdora": 5e-3}
CACHE_FORMAT = 2
# The demo's GPT: 2 blocks, 4 heads, width 64, context 64, 41 characters; about 0.1 M parameters.
DEMO_MODEL = GPTConfig(vocab_size=41, block_size=64, n_layer=2, n_head=4, n_embd=64)


class DemoError(RuntimeError):
    """A problem with the request (e.g. a backend that is not built): one line, no traceback."""


@dataclass
class RunConfig:
    """Everything that decides the numbers of a run (``--quick`` shrinks the model and the step
    counts). Fine-tuning runs once per seed ``seed``, ``seed + 1``, ... ``seed + seeds - 1``;
    pretraining uses ``seed``."""

    seed: int = 0                  # pretraining; the first fine-tuning seed (adapter init, batches)
    model: GPTConfig = DEMO_MODEL
    batch_size: int = 32           # pretraining: windows of block_size characters of text A
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    steps: int = 300
    finetune_batch_size: int = 32  # fine-tuning: problems (lines of text B) per step
    rank: int = 8
    alpha: float = 16.0
    eval_every: int = 20
    backend: str = "auto"          # NF4 matmul: auto | reference | compiled
    compute_dtype: str = "float32"  # dtype of the dequantized 4-bit base in the q-methods
    threads: int = 1               # torch CPU threads; the summation order (the bits) depends on it
    sweep_methods: tuple[str, ...] = ("lora", "dora")  # the rank sweep; () for none
    sweep_ranks: tuple[int, ...] = (2, 8)
    seeds: int = 4                 # fine-tuning seeds per method and sweep point

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor],
             batch: int = 256) -> float:
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
    lines = Progress(cfg.pretrain_steps, "pretraining", log)  # when not on a terminal
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr)
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.model.block_size, gen)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        lines.update(step + 1, loss=loss.item())
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


def _backend(name: str):
    """The requested NF4 path for a ``with`` block (``minidora.ops.use``), checked first."""
    from minidora import ops

    if name == "compiled" and not ops.extension_available():
        raise DemoError("--backend compiled needs the compiled extension minidora._C; build it "
                        "with `python setup.py build_ext --inplace` or use --backend reference")
    return ops.use(backend=name)


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
def score(model: nn.Module, probs: Problems) -> tuple[float, float]:
    """(answer loss, exact-answer accuracy) over every problem of ``probs``.

    The loss is the mean cross-entropy over all answer characters. A problem counts as right when
    the argmax at every answer position is the true character: that is exactly greedy decoding,
    which is right if and only if every next-character argmax along the true answer is right (the
    final ``.`` included, so ``34.`` for 342 is wrong).
    """
    was_training = model.training
    model.eval()
    logits = model(probs.x)                                            # [n, T, V]
    model.train(was_training)
    answer = probs.y != IGNORE                                         # [n, T]
    loss = F.cross_entropy(logits[answer], probs.y[answer]).item()
    right = (logits.argmax(-1) == probs.y) | ~answer                   # [n, T]
    return loss, right.all(dim=1).float().mean().item()


def finetune(method: str, state: dict[str, torch.Tensor], cfg: RunConfig, train: Problems,
             held_out: Problems, position: int = 0, log=print) -> dict:
    """Fine-tune the pretrained weights on text B's problems with one method.

    ``cfg.rank``, ``cfg.alpha`` and ``cfg.seed`` set the adapters and the batches (the table's
    seeds and the rank sweep call this with copies of ``cfg`` that differ in them). Every step draws
    ``cfg.finetune_batch_size`` training problems with a generator seeded ``cfg.seed + 1``: for
    one seed, every method sees the same batches. A run of more than a few seconds sends
    progress lines to ``log`` when stdout is not a terminal (:class:`.progress.Progress`).

    Returns:
        A JSON-ready dict: parameter counts, weight and peak memory, timings, answer loss and
        accuracy before and after, and the curves.
    """
    t_start = time.perf_counter()
    with _backend(cfg.backend):
        model = build_model(method, state, cfg)
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        rep = minidora.report(model)
        lr = LEARNING_RATES[method]
        held0 = score(model, held_out)
        res = {"method": method, "seed": cfg.seed, "lr": lr,
               **({} if method == "full" else {"rank": cfg.rank, "alpha": cfg.alpha}),
               "trainable_params": rep.trainable_params, "total_params": rep.total_params,
               "weight_bytes": rep.weight_bytes,
               "initial_held_out_loss": held0[0], "initial_accuracy": held0[1]}
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every method
        curve, evals, step_time = [], [(0, *held0)], 0.0
        bar = tqdm(range(cfg.steps), desc=f"{method:>5}", leave=False, disable=None,
                   position=position)
        lines = Progress(cfg.steps, f"  {method}", log)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.steps, lr)
            rows = torch.randint(len(train.lines), (cfg.finetune_batch_size,), generator=gen)
            x, y = train.batch(rows)                                  # [B, T'] each
            meter = contextlib.nullcontext() if step else PeakTensorMemory(_model_tensors(model))
            t0 = time.perf_counter()
            with meter:
                loss = model.loss(x, y)                               # answer characters only
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if step == 0:
                res["peak_bytes"] = meter.peak_bytes
            else:  # the first step is metered (slow) and not timed
                step_time += time.perf_counter() - t0
            curve.append(loss.item())
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
            lines.update(step + 1, loss=curve[-1])
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                evals.append((step + 1, *score(model, held_out)))
        train_loss, train_acc = score(model, train)
        res.update({"seconds_per_step": step_time / max(1, cfg.steps - 1),
                    "final_train_loss": train_loss, "final_train_accuracy": train_acc,
                    "final_held_out_loss": evals[-1][1], "final_accuracy": evals[-1][2],
                    "train_curve": curve, "held_out_curve": evals})
    res["seconds"] = time.perf_counter() - t_start
    return res
