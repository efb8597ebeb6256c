"""A synthetic Llama checkpoint: a real model's widths, a few layers, random weights.

``write(folder, "1b")`` writes what ``LlamaForCausalLM.save_pretrained`` would write for a Llama
of TinyLlama-1.1B's widths with 4 decoder blocks: ``config.json``, the weights split into
``model-0000X-of-0000N.safetensors`` files of at most ``max_shard_bytes`` each and
``model.safetensors.index.json`` (or one ``model.safetensors`` when they fit in one file). The
memory per rank of ``minidora train`` can then be measured on a layer of the real size without
downloading anything: what a layer costs does not depend on how many layers there are.

The weights are drawn, never trained: matrices from N(0, 0.02^2) (Llama's initializer range),
RMSNorm weights 1 + N(0, 0.02^2). Each tensor is drawn in flat chunks of :data:`CHUNK` elements,
each chunk from its own ``torch.Generator`` seeded by (seed, tensor name, chunk index), in float32,
then rounded to the checkpoint's dtype. So a value depends on (seed, name, position) alone: not
on the shard size, nor on which file holds it, nor on the number of layers (block 0 of a 2-layer
and of a 4-layer checkpoint are equal). The same torch version on the same kind of CPU draws the
same numbers.

The writer never holds the whole model: one file's tensors at a time (plus one float32 chunk),
written, then freed. Measured: "1b" (615 MB in 3 files of at most 256 MiB, 4 s) peaks at 300 MiB
above the 300 MiB of torch and transformers themselves, about its largest file.
``minidora_synthetic.json``, written last, records the settings and the files, so that a second
call with the same settings finds the checkpoint already there and skips the work.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["SIZES", "CHUNK", "STD", "MARKER", "DTYPES", "tensor_shapes", "is_quantized", "count",
           "save_order", "shards", "draw", "write"]

# Named widths. "1b" is TinyLlama-1.1B (22 blocks in the real model), "7b-width" Llama-2-7B
# (32 blocks); "tiny" has odd sizes for tests: rows of 72 or 184 make NF4 blocks of 64 straddle
# rows, and 301 embedding rows or 36 key/value rows shard unevenly over 2 ranks.
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, num_hidden_layers=4,
               max_position_embeddings=2048, rms_norm_eps=1e-5),
    "7b-width": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, num_hidden_layers=2,
                     max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=72, intermediate_size=184, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=301, num_hidden_layers=2,
                 max_position_embeddings=256, rms_norm_eps=1e-5),
}
CHUNK = 1 << 20          # elements drawn from one generator (4 MiB of float32)
STD = 0.02               # std of the matrices and of the norms' noise around 1
MARKER = "minidora_synthetic.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_SEED = 2**63 - 1


def _need(config: Mapping, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config[{key!r}] must be a positive integer, got {value!r}")
    return value


def tensor_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``LlamaForCausalLM(config).state_dict()``, in its order.

    Args:
        config: a Llama ``config.json`` as a dict (``LlamaConfig.to_dict()`` is one): hidden_size
            H, intermediate_size I, num_attention_heads, num_key_value_heads, vocab_size V,
            num_hidden_layers; head_dim (default H / heads), tie_word_embeddings (default False),
            attention_bias and mlp_bias (default False).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a Llama config.json), got {type(config).__name__}")
    h, inter, v = (_need(config, k) for k in ("hidden_size", "intermediate_size", "vocab_size"))
    heads, kv = _need(config, "num_attention_heads"), _need(config, "num_key_value_heads")
    layers = _need(config, "num_hidden_layers")
    hd = config.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd                       # rows of q_proj, of k_proj and v_proj
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, out, n_in, bias in (("self_attn.q_proj", q, h, attn_bias),
                                      ("self_attn.k_proj", k, h, attn_bias),
                                      ("self_attn.v_proj", k, h, attn_bias),
                                      ("self_attn.o_proj", h, q, attn_bias),
                                      ("mlp.gate_proj", inter, h, mlp_bias),
                                      ("mlp.up_proj", inter, h, mlp_bias),
                                      ("mlp.down_proj", h, inter, mlp_bias)):
            shapes[p + name + ".weight"] = (out, n_in)                       # [out, in]
            if bias:
                shapes[p + name + ".bias"] = (out,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)            # tied: the state dict has it too, see count
    return shapes


def is_quantized(name: str) -> bool:
    """A decoder block's linear weight: what ``minidora.wrap(model, ..., "all-linear")`` adapts
    and a 4-bit base stores in NF4 (the output head ``lm_head`` is left out, as
    ``minidora.model`` leaves out ``get_output_embeddings()``)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def count(config: Mapping) -> dict:
    """Parameters of a Llama by part.

    Args:
        config: as for :func:`tensor_shapes`.

    Returns:
        ``quantized`` (the decoder blocks' linear weights), ``embeddings`` (embed_tokens, plus
        lm_head unless tied), ``norms`` (the RMSNorm weights), ``biases`` (0 for Llama's
        defaults), ``total`` and ``shapes``: the quantized layers' (out, in), in order.
    """
    parts = {"quantized": 0, "embeddings": 0, "norms": 0, "biases": 0}
    shapes = []
    for name, shape in tensor_shapes(config).items():
        n = math.prod(shape)
        if is_quantized(name):
            parts["quantized"] += n
            shapes.append(shape)
        elif name.endswith("norm.weight"):
            parts["norms"] += n
        elif name.endswith(".bias"):
            parts["biases"] += n
        else:
            parts["embeddings"] += n                 # embed_tokens, lm_head
    return {**parts, "total": sum(parts.values()), "shapes": shapes}


def shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files the way ``save_pretrained`` groups them.

    The rule of ``huggingface_hub.split_torch_state_dict_into_shards``: in the order given, a
    tensor that would take the current file past ``max_shard_bytes`` starts a new one; a tensor
    larger than ``max_shard_bytes`` gets a file of its own, placed at once (before the file being
    filled).

    Args:
        sizes: name -> bytes, in the order of the files (``save_pretrained`` sorts the names
            by :func:`save_order`).
        max_shard_bytes: the most bytes of tensors per file.
    """
    files, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if nbytes > max_shard_bytes:
            files.append([name])
            continue
        if used + nbytes > max_shard_bytes:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        files.append(current)
    return files


def save_order(name: str) -> list[tuple]:
    """The sort key of the order ``save_pretrained`` (transformers 5) writes tensors in: split at
    the dots, numbers by value and before words (so ``lm_head`` comes first, layer 2 before 10)."""
    key = []
    for part in name.split("."):
        word = part.rstrip("0123456789")
        if not word:
            key.append((0, int(part)))
        else:
            key.append((1, word, int(part[len(word):])) if word != part else (1, word))
    return key


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"minidora-synthetic/{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MAX_SEED


def draw(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The synthetic value of one tensor: ``shape`` in ``dtype``, N(0, STD^2) for a matrix, 1 +
    N(0, STD^2) for a norm weight, zero for a bias; drawn chunk by chunk (see the module)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype)                                     # [n]
    if name.endswith(".bias"):
        return out.zero_().view(shape)
    center = 1.0 if name.endswith("norm.weight") else 0.0
    for c, start in enumerate(range(0, n, CHUNK)):
        g = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
        part = torch.empty(min(CHUNK, n - start), dtype=torch.float32)     # [<= CHUNK]
        out[start:start + part.numel()] = part.normal_(center, STD, generator=g)
    return out.view(shape)


def _settings(size: str, layers: int, seed: int, dtype: torch.dtype, max_shard_bytes: int):
    return {"size": size, "layers": layers, "seed": seed, "dtype": str(dtype).split(".")[-1],
            "max_shard_bytes": max_shard_bytes}


def _check(size, layers, seed, dtype, max_shard_bytes) -> int:
    if not isinstance(size, str) or size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    layers = SIZES[size]["num_hidden_layers"] if layers is None else layers
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be an integer >= 1 (or None: {size!r} has "
                         f"{SIZES[size]['num_hidden_layers']}), got {layers!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                        f"got {dtype!r}")
    if (not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool)
            or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be an integer >= 1, got {max_shard_bytes!r}")
    return layers


def _already_there(folder: Path, settings: dict) -> bool:
    """True if ``folder`` holds a complete synthetic checkpoint of ``settings``; False if it is
    missing or empty; else a ValueError (a folder of something else is never written into)."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise ValueError(f"folder must be a folder, got the file {str(folder)!r}")
    if not any(folder.iterdir()):
        return False
    marker = folder / MARKER
    if not marker.is_file():
        raise ValueError(f"folder {str(folder)!r} is not empty and holds no synthetic checkpoint "
                         f"({MARKER}); expected an empty or new folder")
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"folder {str(folder)!r}: {MARKER} is unreadable ({e}); expected an "
                         "empty or new folder") from e
    if not isinstance(found, dict) or found.get("settings") != settings:
        old = found.get("settings") if isinstance(found, dict) else found
        raise ValueError(f"folder {str(folder)!r} holds a synthetic checkpoint of other settings "
                         f"({old}), not {settings}; expected an empty or new folder")
    files = found.get("files")
    files = files if isinstance(files, dict) else {}
    wrong = sorted(str(f) for f, nbytes in files.items()
                   if not (folder / f).is_file() or (folder / f).stat().st_size != nbytes)
    if wrong or not files:
        raise ValueError(f"folder {str(folder)!r}: the synthetic checkpoint's files {wrong} are "
                         "missing or changed; expected an empty or new folder")
    return True


def write(folder: str | Path, size: str = "1b", layers: int | None = None, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 1 << 28,
          log: Callable[[str], None] | None = None) -> Path:
    """Write a synthetic Llama checkpoint folder (see the module).

    Args:
        folder: where to write; created if missing. It must be empty, or hold a checkpoint this
            function wrote with the same settings (then nothing is written again).
        size: a key of :data:`SIZES` ("1b", "7b-width", "tiny").
        layers: decoder blocks (default: the size's own, 4 for "1b").
        seed: the draw's seed, 0..2**63-1.
        dtype: of the weights and of config.json's ``dtype``: float32, bfloat16 or float16.
        max_shard_bytes: the most bytes of tensors per safetensors file (256 MiB by default).
        log: called with one line per file written, or with "already there".

    Returns:
        The folder, as a Path. Needs ``transformers`` (for the config).
    """
    layers = _check(size, layers, seed, dtype, max_shard_bytes)
    folder = Path(folder)
    settings = _settings(size, layers, seed, dtype, max_shard_bytes)
    say = log or (lambda line: None)
    if _already_there(folder, settings):
        say(f"synthetic {size} checkpoint ({layers} layers, seed {seed}): already there in "
            f"{folder}")
        return folder
    try:
        from transformers import LlamaConfig
    except ImportError as e:
        raise ImportError("writing a synthetic checkpoint needs transformers "
                          "(pip install transformers==5.24.0)") from e
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**SIZES[size], "num_hidden_layers": layers},
                         architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                         dtype=dtype)
    config.save_pretrained(folder)                                 # config.json
    shapes = tensor_shapes(config.to_dict())
    elt = torch.empty(0, dtype=dtype).element_size()
    sizes = {name: math.prod(shapes[name]) * elt for name in sorted(shapes, key=save_order)}
    groups = shards(sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    files = dict(zip(names, groups, strict=True))                  # file -> its tensors' names
    for file, group in files.items():
        tensors = {name: draw(name, shapes[name], seed, dtype) for name in group}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        say(f"wrote {file}: {len(group)} tensors, {sum(sizes[n] for n in group):,} bytes")
        del tensors                                                # one file in memory at a time
    if len(groups) > 1:                                            # save_pretrained's index
        index = {"metadata": {"total_parameters": sum(math.prod(s) for s in shapes.values()),
                              "total_size": sum(sizes.values())},
                 "weight_map": {n: f for f, group in files.items() for n in group}}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = {f: (folder / f).stat().st_size for f in sorted(p.name for p in folder.iterdir())}
    (folder / MARKER).write_text(json.dumps({"settings": settings, "files": written}, indent=2)
                                 + "\n", encoding="utf-8")         # last: the folder is complete
    return folder
