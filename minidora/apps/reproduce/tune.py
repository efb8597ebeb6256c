"""Short fine-tunes of SmolLM2-135M that claims 2, 3 and 4 share.

One run: a copy of the model prepared for a method by :func:`minidora.apps.finetune.train.build`
(adapters float32, the base in the compute dtype, NF4 + DQ for ``qlora``; for ``full`` a
float32 copy, its matmuls under autocast when the compute dtype is bfloat16), the adapters (or,
for ``full``, the weights) of ``q_proj`` and ``v_proj`` in all 30 layers trained with AdamW on
the shipped question set's training lines (finetune's warm-up and cosine schedule, the batches
drawn from ``seed + 1`` as ``finetune`` draws them, so every method sees the same batches), then
the held-out exact answers and answer loss by finetune's
:func:`~minidora.apps.finetune.train.score`.

The difference from ``finetune``'s :func:`~minidora.apps.finetune.train.run_method`: the loss
projects only the answer positions through the 49152-word head (a fifth of the model's work per
token, and about 5 of the 43 tokens of a line are answer tokens), a callback sees the model at
chosen steps (claim 2's checkpoints), and nothing is scored before training. Full fine-tuning
trains only the targets' weights (the rest of the model frozen), so its cost per step is that of
an adapter and its dD / dM are those of the layers measured.

Results of the adapter runs are kept for the process (:data:`CACHE`, keyed by every setting
that decides them and the model), so claims 3 and 4 train LoRA at one rank and seed once.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from ..common import IGNORE, lr_at
from ..demo.precision import bf16_note, compute_dtype, cpu_level
from ..demo.progress import Progress
from ..finetune.data import Encoded, encode, load_dataset
from ..finetune.models import LLMError
from ..finetune.train import FinetuneConfig, build, score

__all__ = ["TARGETS", "SEQ_LEN", "Setup", "CACHE", "compute", "shipped_data", "answer_loss",
           "finetune", "held_out_run"]

TARGETS = ("q_proj", "v_proj")
SEQ_LEN = 64
CACHE: dict = {}


@dataclass(frozen=True)
class Setup:
    """What decides one run's numbers (alpha is ``2 * rank``: the scale s = alpha / r stays 2)."""

    method: str
    rank: int
    steps: int
    batch: int
    lr: float
    seed: int
    dtype: str


def compute() -> tuple[str, str]:
    """The compute dtype of the base (bfloat16 where the CPU has it natively, else float32;
    ``reproduce`` has no option to choose it) and a line saying which and why."""
    dtype, _ = compute_dtype(None)
    why = bf16_note() or f"native bfloat16 arithmetic here: {cpu_level()}"
    return dtype, f"compute dtype {dtype} ({why})"


def shipped_data(lm) -> tuple[Encoded, Encoded]:
    """The shipped question set encoded for ``lm``: (train [250 rows], held out [50 rows])."""
    ds = load_dataset()
    return (encode(ds.train, lm.fmt, SEQ_LEN, f"{ds.name} (train)"),
            encode(ds.held_out, lm.fmt, SEQ_LEN, f"{ds.name} (held out)"))


def answer_loss(lm, model, x, y, mask) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (x, y, mask [B, T]); a Hugging Face
    model's head is applied to the answer positions only (the same value as over all)."""
    ans = y != IGNORE                                                    # [B, T]
    if lm.hf:
        h = model.model(input_ids=x, attention_mask=mask).last_hidden_state   # [B, T, d]
        logits = model.lm_head(h[ans])                                   # [n_answer, vocab]
    else:
        logits = lm.logits(x, mask, model)[ans]
    return F.cross_entropy(logits.float(), y[ans])


def _autocast(method: str, dtype: str):
    if method == "full" and dtype != "float32":     # full: float32 weights, bf16 matmuls
        return torch.autocast("cpu", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def finetune(lm, setup: Setup, train: Encoded, checkpoints=(), on_checkpoint=None,
             log=print) -> torch.nn.Module:
    """Train a copy of ``lm.model`` as ``setup`` says; return it (train mode off).

    Args:
        checkpoints: steps (1-based) after which ``on_checkpoint(step, model)`` is called; 0
            calls it before the first step.
    """
    cfg = FinetuneConfig(model=lm.name, methods=(setup.method,), targets=list(TARGETS),
                         rank=setup.rank, alpha=2.0 * setup.rank, compute_dtype=setup.dtype,
                         seed=setup.seed)
    if setup.method == "full":                      # only the measured weights train
        # build() calls model.float(), which transformers refuses for a model it loaded from
        # GGUF (it counts as "quantized"); nn.Module's own float() does the same without the check
        model = torch.nn.Module.float(copy.deepcopy(lm.model))
        model.requires_grad_(False)
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                m.weight.requires_grad_(True)
    else:
        model = build(lm, setup.method, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(setup.seed + 1)        # finetune's batches
    ac = _autocast(setup.method, setup.dtype)
    bar = Progress(setup.steps, f"    {setup.method} r{setup.rank} seed {setup.seed}", log)
    if 0 in checkpoints:
        on_checkpoint(0, model)
    model.train()
    for step in range(setup.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, setup.steps, setup.lr)
        rows = torch.randint(len(train.x), (setup.batch,), generator=gen)
        with ac:
            loss = answer_loss(lm, model, *train.batch(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise LLMError(f"{setup.method} r{setup.rank} seed {setup.seed}: the loss is "
                           f"{loss.item()} at step {step + 1} (lr {setup.lr:g}); the budget's "
                           "learning rate is too high for this model")
        bar.update(step + 1, loss=loss.item())
        if step + 1 in checkpoints:
            on_checkpoint(step + 1, model)
    model.eval()
    return model


def held_out_run(lm, setup: Setup, data: tuple[Encoded, Encoded], log=print) -> dict:
    """One run of ``setup`` and its held-out score: ``{"accuracy": share of the held-out
    answers exact, "loss": mean held-out answer loss}``, from :data:`CACHE` when it was run
    before in this process."""
    key = (id(lm.model), *astuple(setup))
    if key not in CACHE:
        train, held = data
        model = finetune(lm, setup, train, log=log)
        loss, acc = score(lm, model, held, autocast=_autocast(setup.method, setup.dtype))
        CACHE[key] = {"accuracy": acc, "loss": loss}
        log(f"    {setup.method} r{setup.rank} seed {setup.seed}: held-out exact {acc:.0%}, "
            f"answer loss {loss:.3f}")
    return dict(CACHE[key])
