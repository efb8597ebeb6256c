"""One fine-tuning run of a loaded model with one method: build, train, score, generate, save.

Every method gets the same seed, batches, steps and schedule (AdamW, 10% warm-up, cosine decay
to 10% of the peak). The adapters are float32; the base runs in ``compute_dtype``:

- ``lora`` / ``dora``: the dense base weights are cast to ``compute_dtype``;
- ``qlora`` / ``qdora``: the targets are quantized to NF4 (double quantization, blocks of 64)
  from the float32 weights, and their matmul runs in ``compute_dtype``; the rest of the model
  (embeddings, norms, head) is cast to ``compute_dtype``;
- ``full``: every weight trains in float32 (AdamW on bf16 weights loses small updates); with
  ``compute_dtype`` bfloat16 the forward and backward run under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import minidora
from minidora.analysis import effective_weight, weight_decomposition

from ..common import IGNORE, lr_at, peak_rss, reset_peak_rss
from ..demo.progress import Progress
from ..demo.train import METHODS
from .data import Dataset, Encoded, encode
from .models import LM, LLMError

__all__ = ["METHODS", "FinetuneConfig", "run_method", "check_full_memory", "score", "generate",
           "FULL_BYTES_PER_PARAM", "enable_checkpointing"]

# float32 weight + gradient + AdamW's two moments; activations and the allocator come on top.
FULL_BYTES_PER_PARAM = 16
FULL_MARGIN = 1.25


@dataclass
class FinetuneConfig:
    """Everything that decides the numbers of a run."""

    model: str = "builtin"
    methods: tuple[str, ...] = ("qlora",)
    targets: str | list[str] = "all-linear"
    rank: int = 8
    alpha: float = 16.0
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-2
    compute_dtype: str = "float32"
    threads: int = 2
    seed: int = 0
    eval_every: int = 20
    score_rows: int = 64            # training examples the "loss before / after" is taken on
    gradient_checkpointing: bool = False
    probes: list[str] = field(default_factory=list)
    max_new_tokens: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def check_full_memory(n_params: int, available: int | None) -> int:
    """Refuse full fine-tuning before it starts when its weights, gradients and AdamW moments
    (16 bytes per parameter, times 1.25 for activations) exceed ``available`` bytes.

    Returns:
        The estimate in bytes.
    """
    need = int(n_params * FULL_BYTES_PER_PARAM * FULL_MARGIN)
    if available is not None and need > available:
        raise LLMError(f"--method full: {n_params:,} parameters need about {need / 2**30:.2f} GiB "
                       f"({FULL_BYTES_PER_PARAM} bytes each for float32 weights, gradients and "
                       f"AdamW's two moments, +25% for activations) but only "
                       f"{available / 2**30:.2f} GiB is available; use --method qlora or lora")
    return need


def check_targets(model: nn.Module, targets: str | list[str]) -> None:
    """Every name in ``targets`` must end the name of a linear layer of ``model``; else an error
    listing the kinds of linear layer it has (``q_proj``, ...) and one full name."""
    if isinstance(targets, str):
        return                          # "all-linear" or a regex: minidora.wrap checks it
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kinds = list(dict.fromkeys(n.rpartition(".")[2] for n in linears))
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            raise LLMError(f"--targets: {t!r} matches no linear layer of the model; its linear "
                           f"layers are named {', '.join(kinds)} (e.g. {linears[0]!r}), or use "
                           "all-linear")


def build(lm: LM, method: str, cfg: FinetuneConfig) -> nn.Module:
    """A copy of ``lm.model`` prepared for ``method`` (adapters initialised from ``cfg.seed``)."""
    check_targets(lm.model, cfg.targets)
    model = copy.deepcopy(lm.model)
    dtype = getattr(torch, cfg.compute_dtype)
    if method == "full":
        # nn.Module's own float(): transformers refuses model.float() on a model it dequantized
        # from GGUF (it flags it is_quantized), which SmolLM2 from the wheel is.
        nn.Module.float(model).requires_grad_(True)
        return model
    torch.manual_seed(cfg.seed)
    if method.startswith("q"):
        minidora.wrap(model, method, target_modules=cfg.targets, r=cfg.rank, alpha=cfg.alpha,
                      compute_dtype=dtype)
        model.to(dtype)           # NF4 statistics and the adapters keep their own dtypes
    else:
        model.to(dtype)
        minidora.wrap(model, method, target_modules=cfg.targets, r=cfg.rank, alpha=cfg.alpha)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of a Hugging Face model, non-reentrant (the frozen
    embedding's output needs no gradient, which the reentrant variant would require).
    transformers 5 renamed ``gradient_checkpointing_enable`` (kept as a deprecated alias)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _autocast(method: str, cfg: FinetuneConfig):
    if method == "full" and cfg.compute_dtype != "float32":
        return torch.autocast("cpu", dtype=getattr(torch, cfg.compute_dtype))
    return contextlib.nullcontext()


def _loss(lm: LM, model: nn.Module, x, y, mask) -> torch.Tensor:
    logits = lm.logits(x, mask, model)                                 # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def score(lm: LM, model: nn.Module, enc: Encoded, batch: int = 32, autocast=None) -> tuple:
    """(answer loss, exact-answer accuracy) over every row of ``enc``: the mean cross-entropy
    of the answer tokens, and the share of rows whose argmax is right at every answer token
    (what greedy decoding gives, stop token included)."""
    was = model.training
    model.eval()
    total = n_tok = right = 0
    for i in range(0, len(enc.x), batch):
        rows = torch.arange(i, min(i + batch, len(enc.x)))
        x, y, mask = enc.batch(rows)
        with autocast or contextlib.nullcontext():
            logits = lm.logits(x, mask, model).float()    # [b, T, V]
        ans = y != IGNORE
        total += F.cross_entropy(logits[ans], y[ans], reduction="sum").item()
        n_tok += int(ans.sum())
        right += int(((logits.argmax(-1) == y) | ~ans).all(1).sum())
    model.train(was)
    return total / n_tok, right / len(enc.x)


@torch.no_grad()
def generate(lm: LM, model: nn.Module, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy answer to ``prompt`` (``generate()`` for a Hugging Face model)."""
    was = model.training
    model.eval()
    ids = lm.fmt.prompt_ids(prompt)
    if lm.hf:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=lm.fmt.stop_id,
                             pad_token_id=lm.fmt.stop_id)
        new = out[0, len(ids):].tolist()
    else:
        new = []
        for _ in range(max_new_tokens):
            ctx = (ids + new)[-(lm.fmt.max_len or len(ids + new)):]
            nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
            if nxt == lm.fmt.stop_id:
                break
            new.append(nxt)
    model.train(was)
    if lm.fmt.stop_id in new:
        new = new[:new.index(lm.fmt.stop_id)]
    return lm.fmt.decode(new).strip()


def run_method(lm: LM, method: str, cfg: FinetuneConfig, data: Dataset, out: Path | None,
               log=print) -> dict:
    """Fine-tune a copy of ``lm.model`` with ``method``; save the adapters into ``out/method``.

    The losses before and after are the answer loss on the first ``cfg.score_rows`` training
    examples (the whole training set would cost as much as many steps on the real model) and on
    every held-out example.

    Returns:
        A JSON-ready dict: parameter counts, weight memory, peak RSS, time per step, losses and
        accuracies before and after, the curves, the probe answers before and after, the dM / dD
        points of the q_proj layers, and the folders written.
    """
    seq_len = min(cfg.seq_len, lm.fmt.max_len or cfg.seq_len)
    train = encode(data.train, lm.fmt, seq_len, f"{data.name} (train)")
    sample = encode(data.train[:cfg.score_rows], lm.fmt, seq_len, f"{data.name} (train)")
    held = encode(data.held_out, lm.fmt, seq_len, f"{data.name} (held out)")
    t_start = time.perf_counter()
    model = build(lm, method, cfg)
    if cfg.gradient_checkpointing:
        if not lm.hf:
            raise LLMError("--gradient-checkpointing: only Hugging Face models have it")
        enable_checkpointing(model)
    rep = minidora.report(model)
    ac = _autocast(method, cfg)
    probes_before = {p: generate(lm, model, p, cfg.max_new_tokens) for p in cfg.probes}
    (train0, _), held0 = score(lm, model, sample, autocast=ac), score(lm, model, held, autocast=ac)
    q = {n: m for n, m in model.named_modules() if re.search(r"(^|\.)q_proj$", n)}
    w0 = {n: effective_weight(m).float() for n, m in q.items()}
    res = {"method": method, "trainable_params": rep.trainable_params,
           "total_params": rep.total_params, "weight_bytes": rep.weight_bytes,
           "initial_train_loss": train0, "initial_held_out_loss": held0[0],
           "initial_accuracy": held0[1], "probes_before": probes_before}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)      # the same batches for every method
    model.train()
    curve, evals, step_time = [], [(0, *held0)], 0.0
    rss_reset = reset_peak_rss()
    bar = tqdm(range(cfg.steps), desc=f"{method:>5}", leave=False, disable=None)
    lines = Progress(cfg.steps, f"  {method}", log)       # where it is, when not on a terminal
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr)       # warm-up, cosine decay
        rows = torch.randint(len(train.x), (cfg.batch_size,), generator=gen)
        x, y, mask = train.batch(rows)
        t0 = time.perf_counter()
        with ac:
            loss = _loss(lm, model, x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:                      # the first step warms caches up and is not timed
            step_time += time.perf_counter() - t0
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            raise LLMError(f"{method}: the loss is {curve[-1]} at step {step + 1}; lower --lr "
                           f"(now {cfg.lr:g})")
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
        lines.update(step + 1, loss=curve[-1])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evals.append((step + 1, *score(lm, model, held, autocast=ac)))
    res["peak_rss_bytes"] = peak_rss()
    res["peak_rss_scope"] = "training" if rss_reset else "process"
    train_loss, train_acc = score(lm, model, sample, autocast=ac)
    res.update({"seconds_per_step": step_time / max(1, cfg.steps - 1),
                "final_train_loss": train_loss, "final_train_accuracy": train_acc,
                "final_held_out_loss": evals[-1][1], "final_accuracy": evals[-1][2],
                "train_curve": curve, "held_out_curve": evals,
                "probes_after": {p: generate(lm, model, p, cfg.max_new_tokens)
                                 for p in cfg.probes},
                "decomposition": [{"layer": n, **dict(zip(("dM", "dD"), weight_decomposition(
                    effective_weight(m).float(), w0[n]), strict=True))} for n, m in q.items()]})
    res["saved"] = _save(model, method, out) if out is not None else {}
    res["seconds"] = time.perf_counter() - t_start
    log(f"  {method:<5}: loss {train0:.3f} -> {train_loss:.3f}, held-out {held0[0]:.3f} -> "
        f"{evals[-1][1]:.3f} ({res['seconds']:.1f} s)")
    res["model"] = model
    return res


def _save(model: nn.Module, method: str, out: Path) -> dict:
    if method == "full":
        return {}
    folder = out / method
    mine = minidora.save_adapters(model, folder / "adapters")
    peft = minidora.save_peft_adapter(model, folder / "peft")
    return {"minidora": str(mine), "peft": str(peft)}
