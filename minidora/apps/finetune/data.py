"""Instruction data: a JSON-lines file of questions and answers, split, encoded, batched.

The shipped set, ``minidora/data/auren_qa.jsonl``, is made up (public domain, written for
minidora): 50 facts about Auren, a fictional country, and its six provinces ("What is the
capital of Auren?" -> "Maren."), each asked in six phrasings, 300 lines. For every fact one
phrasing is held out (a different one from fact to fact), so the held-out loss measures whether
a fact learnt under five phrasings is recalled under a sixth. The questions and answers fit the
built-in character model (its 41 characters, at most 64 of them per line).

Each line of a data file is one JSON object: ``{"prompt": str, "response": str}`` and optionally
``"split": "train" | "held_out"``. A file without any ``split`` holds out a seeded 15% of its
lines. The loss is taken on the answer tokens only (and the stop token that ends them).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..common import HELD_OUT_FRACTION, IGNORE, SPLIT_SEED
from .models import Format, LLMError

__all__ = ["DEFAULT_DATA", "Example", "Dataset", "read_examples", "load_dataset", "Encoded",
           "encode", "IGNORE"]

DEFAULT_DATA = "auren_qa.jsonl"
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass
class Dataset:
    name: str
    train: list[Example]
    held_out: list[Example]


def _parse(lines: list[str], where: str) -> tuple[list[Example], list[str | None]]:
    examples, splits = [], []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMError(f"{where}, line {no}: not JSON ({e.msg}); expected an object such as "
                           '{"prompt": "...", "response": "..."}') from None
        if not isinstance(obj, dict):
            raise LLMError(f"{where}, line {no}: got a JSON {type(obj).__name__}; expected an "
                           'object with "prompt" and "response"')
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise LLMError(f"{where}, line {no}: {key!r} is missing or not a non-empty "
                               f"string (got {obj.get(key)!r})")
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise LLMError(f"{where}, line {no}: 'split' is {split!r}; expected 'train' or "
                           "'held_out'")
        examples.append(Example(obj["prompt"], obj["response"]))
        splits.append(split)
    return examples, splits


def read_examples(text: str, where: str) -> Dataset:
    """Parse a data file's text into a :class:`Dataset` (``where`` names it in errors)."""
    examples, splits = _parse(text.splitlines(), where)
    if not examples:
        raise LLMError(f"{where}: empty; expected JSON lines such as "
                       '{"prompt": "...", "response": "..."}')
    if any(s is not None for s in splits):
        if any(s is None for s in splits):
            no = splits.index(None) + 1
            raise LLMError(f"{where}: example {no} has no 'split' while others have one; give "
                           "every line a split or none")
        train = [e for e, s in zip(examples, splits, strict=True) if s == "train"]
        held = [e for e, s in zip(examples, splits, strict=True) if s == "held_out"]
    else:
        order = list(range(len(examples)))
        random.Random(SPLIT_SEED).shuffle(order)
        n_held = round(HELD_OUT_FRACTION * len(examples))
        held_rows = set(order[:n_held])
        train = [e for i, e in enumerate(examples) if i not in held_rows]
        held = [e for i, e in enumerate(examples) if i in held_rows]
    if not train or not held:
        raise LLMError(f"{where}: {len(train)} training and {len(held)} held-out examples; "
                       "expected at least one of each")
    return Dataset(where, train, held)


def load_dataset(path: Path | None = None) -> Dataset:
    """The shipped set (``path`` None) or a JSON-lines file."""
    if path is None:
        text = resources.files("minidora").joinpath("data", DEFAULT_DATA).read_text("utf-8")
        return read_examples(text, DEFAULT_DATA)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LLMError(f"--data: cannot read {str(path)!r} ({getattr(e, 'strerror', None) or e})"
                       ) from None
    return read_examples(text, str(path))


@dataclass
class Encoded:
    """Examples as padded rows: ``x``, ``y``: [n, T] int64 (y: next token, IGNORE outside the
    answers), ``mask``: [n, T] 1 on real tokens; ``prompts``: the prompt ids of each row."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    prompts: list[list[int]]

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows given, cut to their longest real length: x, y, mask [B, T']."""
        x, y, mask = self.x[rows], self.y[rows], self.mask[rows]
        t = int(mask.sum(1).max())
        return x[:, :t], y[:, :t], mask[:, :t]


def encode(examples: list[Example], fmt: Format, seq_len: int, where: str = "data") -> Encoded:
    """Token rows of at most ``seq_len`` inputs, right-padded with the stop token.

    Raises:
        LLMError: a prompt leaves no room for its answer within ``seq_len`` tokens (the answer
            alone may be cut at the end: its first tokens still count), or a character the
            model cannot encode.
    """
    rows, prompts = [], []
    for i, ex in enumerate(examples, 1):
        try:
            p, a = fmt.prompt_ids(ex.prompt), fmt.answer_ids(ex.response)
        except ValueError as e:
            raise LLMError(f"{where}, example {i}: {e}") from None
        if len(p) >= seq_len:
            raise LLMError(f"{where}, example {i}: its prompt is {len(p)} tokens, which leaves "
                           f"no room for the answer in --seq-len {seq_len}; raise --seq-len")
        ids = (p + a)[:seq_len + 1]
        rows.append((ids, len(p)))
        prompts.append(p)
    t = max(len(ids) for ids, _ in rows) - 1
    n = len(rows)
    x = torch.full((n, t), fmt.stop_id, dtype=torch.long)
    y = torch.full((n, t), IGNORE, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(rows):
        seq = torch.tensor(ids)
        x[r, :len(ids) - 1] = seq[:-1]
        mask[r, :len(ids) - 1] = 1
        y[r, n_prompt - 1:len(ids) - 1] = seq[n_prompt:]       # answer tokens only
    return Encoded(x, y, mask, prompts)
