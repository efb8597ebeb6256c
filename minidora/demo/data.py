"""The two shipped texts, character-level tokenization, and the train / held-out split.

Text A, ``minidora/data/tales.txt``, is the pretraining corpus: short village stories written by a
small seeded grammar (people, places, things, numbers in words). Text B,
``minidora/data/sums.txt``, is the fine-tuning task: every sum and difference of two numbers from
zero to twenty, in words (``seven plus five is twelve.``). Both are synthetic, so they are free of
copyright and exactly reproducible: :func:`make_tales` and :func:`make_sums` regenerate the files
byte for byte (``python -m minidora.demo.data`` rewrites them; the tests check they agree).

Text B is split by problem, not by position: a fixed, seeded 15% of the lines are held out, so the
held-out loss measures how well a method generalises to sums it never saw, and the held-out
accuracy counts the problems whose answer greedy decoding gets exactly right.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpora", "make_tales", "make_sums", "number_word", "TEXT_A", "TEXT_B"]

TEXT_A = "tales.txt"
TEXT_B = "sums.txt"
HELD_OUT_FRACTION = 0.15
SPLIT_SEED = 1234

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = {20: "twenty", 30: "thirty", 40: "forty"}


def number_word(n: int) -> str:
    """0..49 in words: ``number_word(37) == "thirty seven"``."""
    if not 0 <= n < 50:
        raise ValueError(f"number_word: n={n} is out of range; expected 0 <= n < 50")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[10 * tens] + ("" if ones == 0 else " " + _ONES[ones])


def make_sums() -> str:
    """Text B: every ``a plus b`` and ``a minus b`` (b <= a) for a, b in 0..20, seeded shuffle."""
    lines = [f"{number_word(a)} plus {number_word(b)} is {number_word(a + b)}."
             for a in range(21) for b in range(21)]
    lines += [f"{number_word(a)} minus {number_word(b)} is {number_word(a - b)}."
              for a in range(21) for b in range(a + 1)]
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
    n, k = rng.randint(0, 40), rng.randint(1, 20)
    forms = [
        f"{rng.choice(_TIMES)} {p} walked to {place}.",
        f"{p} had {number_word(n)} {thing}.",
        f"{p} sold {number_word(k)} {thing} to {q}.",
        f"{p} gave {good} to {q}.",
        f"{p} was {rng.choice(_FEELINGS)}, for {rng.choice(_WEATHER)}.",
        f"{q} counted {number_word(n)} {thing} at {place}.",
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
        name: file name, e.g. ``"sums.txt"``.
        train: [n_train] int64 token ids.
        held_out: [n_held_out] int64 token ids.
        held_out_lines: the held-out lines as strings (text B: the unseen problems).
        sha256: hash of the text, part of the pretraining cache key.
    """

    name: str
    train: torch.Tensor
    held_out: torch.Tensor
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
                              held_out=tok.encode("\n".join(held) + "\n"), held_out_lines=held,
                              sha256=hashlib.sha256(text.encode()).hexdigest()))
    return tok, corpora[0], corpora[1]


def random_batch(data: torch.Tensor, batch_size: int, block_size: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a token stream, nanoGPT style.

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
    out = Path(__file__).resolve().parents[1] / "data"
    out.mkdir(exist_ok=True)
    (out / TEXT_A).write_text(make_tales(), encoding="utf-8")
    (out / TEXT_B).write_text(make_sums(), encoding="utf-8")
    print(f"wrote {out / TEXT_A} and {out / TEXT_B}")
