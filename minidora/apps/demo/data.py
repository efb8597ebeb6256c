"""The two shipped texts, character-level tokenization, and the train / held-out split.

Text A, ``minidora/data/tales.txt``, is the pretraining corpus: short village stories written by a
small seeded grammar (people, places, things, and numbers from zero to 999, in words in some
sentences and in figures in others, never both for one number). Text B,
``minidora/data/numbers.txt``, is the fine-tuning task: every number from zero to 999 written in
words, then in figures (``three hundred forty two is 342.``). The model has seen both spellings
in text A, but never side by side: the mapping between them is what fine-tuning must teach.
Both texts are synthetic, so they are free of copyright and exactly reproducible:
:func:`make_tales` and :func:`make_numbers` regenerate the files byte for byte
(``python -m minidora.apps.demo.data`` rewrites them; the tests check they agree).

Text B is split by problem: a fixed, seeded 15% of the lines (150 numbers) are held out. A held-out
number is a new combination of words whose parts the model saw in other lines (``three hundred``
in 342, ``forty`` in 45, ``two`` in 12), so getting it right takes the rule, not a memorised line.
Fine-tuning and scoring see one problem per row, :class:`Problems`: the loss is taken on the
answer characters only (``342.``), the prompt is context.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..common import HELD_OUT_FRACTION, IGNORE, SPLIT_SEED

__all__ = ["Corpus", "Problems", "load_corpora", "make_tales", "make_numbers", "number_word",
           "problems", "TEXT_A", "TEXT_B", "IGNORE"]

TEXT_A = "tales.txt"
TEXT_B = "numbers.txt"
ANSWER_SEP = " is "  # text B's lines are "<number in words> is <number in figures>."

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """0..999 in words: ``number_word(342) == "three hundred forty two"``."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_word: n={n} is out of range; expected 0 <= n < 1000")
    hundreds, rest = divmod(n, 100)
    if hundreds:
        return f"{_ONES[hundreds]} hundred" + (f" {number_word(rest)}" if rest else "")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")


def make_numbers() -> str:
    """Text B: ``"<n in words> is <n>."`` for every n in 0..999, in a seeded order."""
    lines = [f"{number_word(n)}{ANSWER_SEP}{n}." for n in range(1000)]
    random.Random(7).shuffle(lines)
    return "\n".join(lines) + "\n"


_PEOPLE = ["the miller", "the baker", "the old shepherd", "the young weaver", "the smith",
           "the fisherman", "the farmer", "the widow", "the little girl", "the boy", "the king",
           "the queen", "the priest", "the carpenter", "the potter", "the woodcutter"]
_PLACES = ["the mill", "the river", "the market", "the forest", "the church", "the bridge",
           "the castle", "the meadow", "the well", "the harbour", "the hill", "the village"]
_THINGS = ["sacks of grain", "loaves of bread", "sheep", "apples", "fish", "eggs", "candles",
           "nails", "baskets", "pots", "coins", "geese", "horses", "barrels of wine"]
_GOODS = ["a lamp", "a cloak", "a basket", "a knife", "a letter", "a ring", "a loaf", "a rope"]
_FEELINGS = ["glad", "tired", "angry", "afraid", "proud", "hungry", "sad", "merry"]
_WEATHER = ["it was raining", "the sun was warm", "the wind was cold", "snow lay on the roofs",
            "a mist hung over the fields", "the sky was clear"]
_TIMES = ["in the morning", "at noon", "in the evening", "at night", "on sunday", "in spring",
          "in autumn", "one winter"]


def _sentence(rng: random.Random) -> str:
    p, q = rng.sample(_PEOPLE, 2)
    place, thing, good = rng.choice(_PLACES), rng.choice(_THINGS), rng.choice(_GOODS)
    n, k, few = rng.randint(0, 999), rng.randint(0, 999), rng.randint(0, 20)
    forms = [
        f"{rng.choice(_TIMES)} {p} walked to {place}.",
        f"{p} had {number_word(n)} {thing}.",
        f"{p} sold {number_word(few)} {thing} to {q}.",
        f"{p} paid {k} pence for {good}.",
        f"{p} gave {good} to {q}.",
        f"{p} was {rng.choice(_FEELINGS)}, for {rng.choice(_WEATHER)}.",
        f"{q} counted {number_word(n)} {thing} at {place}.",
        f"{p} lived at number {k}, near {place}.",
        f"{p} and {q} met at {place} {rng.choice(_TIMES)}.",
        f"\"where is {good}?\" asked {p}.",
        f"{p} found {good} near {place}.",
        f"{rng.choice(_WEATHER)}, and {p} stayed at {place}.",
    ]
    return rng.choice(forms)  # all lower case: a small alphabet


def make_tales(n_stories: int = 400) -> str:
    """Text A: ``n_stories`` paragraphs of three to six grammar sentences each, seeded."""
    rng = random.Random(42)
    stories = [" ".join(_sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_stories)]
    return "\n".join(stories) + "\n"


def read_text(name: str) -> str:
    """The text of a file shipped in ``minidora/data``."""
    return resources.files("minidora").joinpath("data", name).read_text(encoding="utf-8")


@dataclass
class Corpus:
    """One text, encoded, with a train / held-out split.

    Attributes:
        name: file name, e.g. ``"numbers.txt"``.
        train: [n_train] int64 token ids of the training lines, newline-joined.
        held_out: [n_held_out] int64 token ids of the held-out lines.
        train_lines, held_out_lines: the same lines as strings (text B: the problems).
        sha256: hash of the text, part of the pretraining cache key.
    """

    name: str
    train: torch.Tensor
    held_out: torch.Tensor
    train_lines: list[str]
    held_out_lines: list[str]
    sha256: str


class CharTokenizer:
    """Characters to ids over a fixed alphabet (the sorted characters of both texts)."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.stoi = {c: i for i, c in enumerate(alphabet)}

    def encode(self, text: str) -> torch.Tensor:
        """str of length T -> [T] int64."""
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.int64)
        except KeyError as e:
            raise ValueError(f"encode: character {e.args[0]!r} is not in the alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


def _split_lines(text: str, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    lines = [ln for ln in text.split("\n") if ln]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(lines)))])
    return ([ln for i, ln in enumerate(lines) if i not in held],
            [ln for i, ln in enumerate(lines) if i in held])


def load_corpora() -> tuple[CharTokenizer, Corpus, Corpus]:
    """Load texts A and B, build the shared tokenizer and split each into train / held-out lines.

    Returns:
        (tokenizer, corpus A, corpus B). Lines are joined with ``"\\n"`` in each split, and every
        split ends with a newline, so windows never run from one split into the other.
    """
    texts = {name: read_text(name) for name in (TEXT_A, TEXT_B)}
    tok = CharTokenizer("".join(sorted(set(texts[TEXT_A]) | set(texts[TEXT_B]))))
    corpora = []
    for name, text in texts.items():
        train, held = _split_lines(text, HELD_OUT_FRACTION, SPLIT_SEED)
        corpora.append(Corpus(name=name, train=tok.encode("\n".join(train) + "\n"),
                              held_out=tok.encode("\n".join(held) + "\n"), train_lines=train,
                              held_out_lines=held,
                              sha256=hashlib.sha256(text.encode()).hexdigest()))
    return tok, corpora[0], corpora[1]


@dataclass
class Problems:
    """Question-answer lines, one per row, left-aligned and padded.

    Row i holds ``"\\n" + line`` as input and the line itself as targets, so the target at
    position t is the character after input t. Targets are :data:`IGNORE` except on the answer
    (``342.``, everything after :data:`ANSWER_SEP`): a loss over them is the answer loss.

    Attributes:
        x: [n, T] int64 inputs (padding repeats the newline id).
        y: [n, T] int64 targets, IGNORE outside the answers and in the padding.
        lengths: [n] int64 characters per line (row i is padding from lengths[i] on).
        lines: the n lines.
    """

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor
    lines: list[str]

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: [B] row indices -> (x, y), both [B, T'], T' the longest of those rows."""
        t = int(self.lengths[rows].max())
        return self.x[rows, :t], self.y[rows, :t]


def problems(tok: CharTokenizer, lines: list[str]) -> Problems:
    """Encode ``"<question> is <answer>."`` lines as :class:`Problems`."""
    T = max(len(ln) for ln in lines)
    x = torch.full((len(lines), T), tok.stoi["\n"], dtype=torch.int64)    # [n, T]
    y = torch.full((len(lines), T), IGNORE, dtype=torch.int64)            # [n, T]
    for i, ln in enumerate(lines):
        start = ln.find(ANSWER_SEP)
        if start < 0:
            raise ValueError(f"problems: line {ln!r} has no {ANSWER_SEP!r}")
        s = tok.encode("\n" + ln)                                         # [len + 1]
        x[i, :len(ln)] = s[:-1]
        start += len(ANSWER_SEP)
        y[i, start:len(ln)] = s[start + 1:]
    lengths = torch.tensor([len(ln) for ln in lines], dtype=torch.int64)  # [n]
    return Problems(x=x, y=y, lengths=lengths, lines=list(lines))


def random_batch(data: torch.Tensor, batch_size: int, block_size: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a token stream, nanoGPT style (pretraining on text A).

    Args:
        data: [N] int64 token ids, N > block_size.
    Returns:
        (x, y), both [batch_size, block_size]; y is x shifted left by one token.
    """
    start = torch.randint(len(data) - block_size, (batch_size,), generator=gen)  # [B]
    idx = start[:, None] + torch.arange(block_size)                              # [B, T]
    return data[idx], data[idx + 1]


def eval_windows(data: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of a token stream (the deterministic evaluation set).

    Returns:
        (x, y), both [n_windows, block_size].
    """
    n = (len(data) - 1) // block_size
    idx = torch.arange(n)[:, None] * block_size + torch.arange(block_size)      # [n, T]
    return data[idx], data[idx + 1]


if __name__ == "__main__":  # regenerate the shipped texts
    out = Path(__file__).resolve().parents[2] / "data"   # minidora/data
    out.mkdir(exist_ok=True)
    (out / TEXT_A).write_text(make_tales(), encoding="utf-8")
    (out / TEXT_B).write_text(make_numbers(), encoding="utf-8")
    print(f"wrote {out / TEXT_A} and {out / TEXT_B}")
