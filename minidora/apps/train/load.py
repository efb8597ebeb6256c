"""Low-memory loading: a Hugging Face checkpoint read straight into each rank's shards.

The usual way to shard a model (build it whole, then ``fully_shard``) needs every rank to hold
the whole model once. Here no rank ever does:

1. The model is built on the **meta device** (shapes, no storage), wrapped with
   :func:`minidora.wrap` and, under FSDP2, sharded there. ``to_empty`` then allocates only this
   rank's shard of every parameter (FSDP2 cuts dim 0 into ``ceil(rows / W)``-row pieces).
2. Each shard is filled from the checkpoint's safetensors files by reading **only the rows it
   needs** (:class:`Checkpoint` seeks in the file; nothing is mapped or unpickled).
3. A quantized weight is read in the rows that cover this rank's bytes of packed codes, widened
   to whole blocks of 64, and quantized 2 Mi weights at a time. Each block's absmax depends on
   its 64 weights only, so each rank's codes are those of quantizing the whole weight. Double
   quantization needs the mean of *all* scales: the scales (1 / 64 of the weights, in float32)
   are combined over the ranks (``all_reduce`` with MAX of each rank's blocks, zeros
   elsewhere), after which every rank runs :func:`minidora.nf4.double_quantize` on the same
   vector and keeps its shard of the 8-bit scale codes. The bytes equal those of a one-process
   :func:`minidora.nf4.quantize` (the tests compare them).
4. DoRA's magnitude starts at the row norms ``||W0[i, :]||`` of the dequantized base: each rank
   sums the squares of the weights it owns, per row, and an ``all_reduce`` (SUM) of the [out]
   vector completes them; no rank gathers a weight.

The adapters start the same at every world size: ``lora_A`` is drawn from a generator seeded by
the run's seed and the layer's name, ``lora_B`` is zero. Rotary embeddings' tables, which are
not in the checkpoint, are recomputed. :class:`Checkpoint` records every read, so the tests can
check that no rank read a whole weight.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import minidora
from minidora import NF4Linear, nf4

__all__ = ["Checkpoint", "CheckpointError", "LoadMemoryError", "Entry", "SAFETENSORS_DTYPES",
           "build", "shard_range", "nf4_shard", "adapter_init"]

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64}
MAX_HEADER = 100 * 2**20          # bytes of a safetensors JSON header we agree to read
INDEX = "model.safetensors.index.json"
CHUNK_ELEMS = 1 << 21             # weights read and quantized at a time (~40 MiB of temporaries)
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as one: names the file, the tensor and the fault."""


class LoadMemoryError(MemoryError):
    """This rank ran out of memory while loading: names the tensor, the rank and its memory."""


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and first byte in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (dim 0) of the tensor; a 1-D tensor's rows are its elements."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, from its header alone (8-byte size, then JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header size {n}, file size "
                                  f"{size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: "
                                  f"{e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            lo, hi = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has dtype "
                                  f"{info.get('dtype') if isinstance(info, dict) else info!r}; "
                                  f"expected one of {', '.join(SAFETENSORS_DTYPES)} with a shape "
                                  "and data_offsets") from None
        if min(shape, default=1) < 0 or hi - lo != math.prod(shape) * dtype.itemsize or lo < 0 \
                or 8 + n + hi > size:
            raise CheckpointError(f"{path}: tensor {key!r} (shape {list(shape)}, {dtype}) has "
                                  f"data_offsets [{lo}, {hi}], which do not fit its size or the "
                                  f"file's {size} bytes (a truncated file?)")
        entries[key] = Entry(path, dtype, shape, 8 + n + lo)
    return entries


class Checkpoint:
    """A Hugging Face checkpoint folder, read tensor by tensor and row range by row range.

    The folder holds ``config.json`` and either ``model.safetensors`` or the files named by
    ``model.safetensors.index.json`` (a sharded checkpoint, as ``save_pretrained`` writes it).
    Only the headers are read here; :meth:`rows` reads the bytes of a row range with one seek.

    Attributes:
        folder: the folder.
        entries: tensor name -> :class:`Entry`.
        reads: every :meth:`rows` call so far, as ``(name, first row, end row, bytes)``.

    Raises:
        CheckpointError: no config.json, no weights, a shard the index names but the folder lacks,
            an index that puts a tensor in a file that does not hold it, or a file that is not
            safetensors.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{str(self.folder)!r} has no config.json; expected a Hugging "
                                  "Face checkpoint folder (config.json + *.safetensors)")
        weight_map = None
        if (self.folder / INDEX).is_file():
            weight_map = self._index()
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise CheckpointError(f"{str(self.folder)!r} has neither {SINGLE} nor {INDEX}; "
                                  "expected the weights as safetensors (never pickled .bin files)")
        self.entries: dict[str, Entry] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{self.folder / INDEX}: names the shard {name!r}, which is "
                                      f"missing from {str(self.folder)!r}")
            for key, entry in _header(path).items():
                if key in self.entries:
                    raise CheckpointError(f"{key!r} is in both {self.entries[key].file.name} and "
                                          f"{name}")
                self.entries[key] = entry
        for key, name in (weight_map or {}).items():
            entry = self.entries.get(key)
            if entry is None or entry.file.name != name:
                where = "no file" if entry is None else entry.file.name
                raise CheckpointError(f"{self.folder / INDEX}: puts {key!r} in {name}, but {where} "
                                      "holds it (an index from another checkpoint?)")
        self.reads: list[tuple[str, int, int, int]] = []

    def _index(self) -> dict[str, str]:
        path = self.folder / INDEX
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not JSON ({e})") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v == Path(v).name and v.endswith(
                    ".safetensors") for k, v in wm.items()):
            raise CheckpointError(f"{path}: expected {{\"weight_map\": {{tensor: file}}}} with "
                                  "plain .safetensors file names in the folder")
        return wm

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def config(self) -> dict:
        """config.json as a dict."""
        try:
            return json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.folder / 'config.json'}: not JSON ({e})") from None

    def entry(self, key: str, shape: tuple[int, ...]) -> Entry:
        """The entry of ``key``, checked to have ``shape`` (the model's)."""
        entry = self.entries.get(key)
        if entry is None:
            raise CheckpointError(f"{str(self.folder)!r}: the model needs {key!r}, which no "
                                  "safetensors file of the checkpoint holds")
        if entry.shape != tuple(shape):
            raise CheckpointError(f"{entry.file}: {key!r} has shape {list(entry.shape)}, the "
                                  f"model (config.json) expects {list(shape)}")
        return entry

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of tensor ``key`` in its stored dtype: [r1 - r0, *shape[1:]]."""
        entry = self.entries[key]
        if not 0 <= r0 <= r1 <= (entry.shape[0] if entry.shape else 1):
            raise ValueError(f"rows [{r0}, {r1}) of {key!r} (shape {list(entry.shape)})")
        n = (r1 - r0) * entry.row_bytes
        buf = torch.empty(n, dtype=torch.uint8)
        with open(entry.file, "rb") as f:
            f.seek(entry.start + r0 * entry.row_bytes)
            got = f.readinto(memoryview(buf.numpy()))
        if got != n:
            raise CheckpointError(f"{entry.file}: {key!r} ends early (a truncated file?)")
        self.reads.append((key, r0, r1, n))
        return buf.view(entry.dtype).view(r1 - r0, *entry.shape[1:])


def shard_range(t: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """``(start, stop, local)``: the dim-0 rows ``[start, stop)`` of parameter or buffer ``t``
    that this rank holds, and the tensor that holds them (FSDP2's shard, or ``t`` itself)."""
    if not hasattr(t, "to_local"):
        return 0, (t.shape[0] if t.dim() else 1), t
    local = t.to_local()
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-t.shape[0] // world)
    start = min(rank * chunk, t.shape[0])
    stop = min(start + chunk, t.shape[0])
    if local.shape[0] != stop - start:
        raise RuntimeError(f"FSDP2 gave rank {rank} {local.shape[0]} rows of {t.shape[0]}; "
                           f"expected [{start}, {stop})")
    return start, stop, local


def _all_reduce(t: torch.Tensor, op, sharded: bool = True) -> torch.Tensor:
    """``t`` combined over the ranks where the data is ``sharded`` (each rank holds a part);
    unchanged where every rank holds all of it (DDP, one process)."""
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def nf4_shard(ckpt: Checkpoint, key: str, shape: tuple[int, int], lo: int, hi: int,
              blocksize: int = 64, double_quant: bool = True, sharded: bool = True,
              chunk: int = CHUNK_ELEMS, out: torch.Tensor | None = None) -> dict:
    """Quantize bytes ``[lo, hi)`` of weight ``key``'s packed NF4 codes (a collective).

    Reads the rows that cover those bytes, widened to whole blocks, ``chunk`` weights at a
    time (whole blocks): never the whole weight unless this rank owns all of it, and never more
    than a chunk's temporaries at once.

    Args:
        ckpt: the checkpoint.
        key: the weight's name, shape ``(out, in)``.
        lo, hi: this rank's bytes of the packed codes (FSDP2's shard of ``packed``).
        blocksize: elements per absmax block.
        double_quant: also quantize the scales.
        sharded: other ranks hold the other bytes (False: this rank holds them all, as under
            DDP, and nothing is combined).
        chunk: weights quantized at a time (rounded down to whole blocks, at least one).
        out: where to write the packed bytes ([hi - lo] uint8; default: a new tensor).

    Returns:
        ``packed`` [hi - lo] uint8; ``absmax`` [n_blocks] float32 (all blocks, from every rank);
        with double quantization ``codes8`` [n_blocks] uint8, ``nested`` and ``offset``;
        ``owned``: the (first, end) weights of this rank's bytes; ``dtype``: the stored dtype.
    """
    out_f, in_f = shape
    entry = ckpt.entry(key, shape)
    n = out_f * in_f
    nb = -(-n // blocksize)
    e_lo, e_hi = min(2 * lo, n), min(2 * hi, n)                 # the weights of my bytes
    absmax = torch.zeros(nb, dtype=torch.float32)               # [nb]: mine, zeros elsewhere
    packed = torch.empty(hi - lo, dtype=torch.uint8) if out is None else out
    step = max(1, chunk // blocksize)                           # blocks per chunk
    for b0 in range(e_lo // blocksize, -(-e_hi // blocksize), step):
        b1 = min(b0 + step, -(-e_hi // blocksize))
        E0, E1 = b0 * blocksize, min(b1 * blocksize, n)         # whole blocks (the last: to n)
        r0, r1 = E0 // in_f, -(-E1 // in_f)                     # the rows that hold them
        w = ckpt.rows(key, r0, r1).reshape(-1)[E0 - r0 * in_f:E1 - r0 * in_f]     # [E1 - E0]
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(f"{entry.file}: {key!r} has {bad} NaN/Inf value(s) in rows "
                                  f"{r0}..{r1 - 1}; quantizing them would poison their blocks")
        blocks, am = nf4.blockwise_absmax(nf4.to_float32(w), blocksize)   # [b, bs], [b]
        codes = nf4.nearest_code(nf4.normalize(blocks, am)).view(-1)[:E1 - E0]     # [E1 - E0]
        first, last = max(lo, E0 // 2), min(hi, -(-E1 // 2))    # my bytes among these
        packed[first - lo:last - lo] = nf4.pack(codes)[first - E0 // 2:last - E0 // 2]
        absmax[b0:b1] = am
        del w, blocks, codes
    _all_reduce(absmax, dist.ReduceOp.MAX, sharded)   # a block's absmax is the same on each rank
    res = {"packed": packed, "absmax": absmax, "owned": (e_lo, e_hi), "dtype": entry.dtype,
           "sharded": sharded, "lo": lo}
    if double_quant:
        res["codes8"], res["nested"], res["offset"] = nf4.double_quantize(absmax)
    return res


def _row_norms_sq(q: dict, shape: tuple[int, int], blocksize: int, compute: torch.dtype,
                  acc: torch.dtype, chunk: int = CHUNK_ELEMS) -> torch.Tensor:
    """||W0[i, :]||^2 per row [out] in ``acc`` of the dequantized weight (as the layer computes
    it, in ``compute``), from the weights each rank owns, decoded from its packed bytes a chunk
    at a time (a collective: SUM over ranks)."""
    out_f, in_f = shape
    scales = nf4.decode_scales(q["codes8"], q["nested"], q["offset"]) if "codes8" in q \
        else q["absmax"]                                                    # [nb] float32
    e_lo, e_hi = q["owned"]
    sums = torch.zeros(out_f, dtype=acc)
    for c0 in range(e_lo, e_hi, 2 * max(1, chunk // 2)):                # even: whole bytes
        c1 = min(c0 + 2 * max(1, chunk // 2), e_hi)
        b = (c0 - e_lo) // 2
        codes = nf4.unpack(q["packed"][b:b + -(-(c1 - c0) // 2)], c1 - c0)          # [c1 - c0]
        idx = torch.arange(c0, c1)
        w = nf4.NF4_CODEBOOK[codes] * scales[idx // blocksize]          # float32, as dequantize
        sums.index_add_(0, idx // in_f, w.to(compute).to(acc).square())
        del codes, idx, w                    # before the next chunk's are made
    return _all_reduce(sums, dist.ReduceOp.SUM, q["sharded"])


def adapter_init(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """``lora_A`` [r, in] of layer ``name``: U(-1/sqrt(in), 1/sqrt(in)) (``kaiming_uniform_``
    with a = sqrt(5), as :class:`minidora.LoRALinear` draws it) from a generator seeded by
    ``seed`` and the name, so every rank and every world size draws the same."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)


def _copy_rows(dst: torch.Tensor, full_rows, chunk: int = CHUNK_ELEMS) -> None:
    """Copy this rank's rows into parameter or buffer ``dst``, about ``chunk`` elements at a
    time; ``full_rows(start, stop)`` gives them."""
    start, stop, local = shard_range(dst)
    if dst.dim() == 0:
        local.copy_(full_rows(0, 1))
        return
    step = max(1, chunk // max(1, math.prod(dst.shape[1:])))
    for r in range(start, stop, step):
        local[r - start:min(r + step, stop) - start].copy_(full_rows(r, min(r + step, stop)))


def _fill_adapter(name: str, layer, ckpt: Checkpoint, seed: int) -> None:
    """Fill adapter layer ``name`` (its base and its adapter) from ``ckpt``."""
    base, key = layer.base, f"{name}.weight"
    shape = (layer.out_features, layer.in_features)
    if getattr(base, "bias", None) is not None:
        ckpt.entry(f"{name}.bias", (shape[0],))
        _copy_rows(base.bias, lambda a, b: ckpt.rows(f"{name}.bias", a, b))
    if isinstance(base, NF4Linear):
        lo, hi, local = shard_range(base.packed)
        q = nf4_shard(ckpt, key, shape, lo, hi, base.blocksize, base.double_quant,
                      sharded=hasattr(base.packed, "to_local"), out=local)
        base.weight_dtype = q["dtype"]
        if base.double_quant:
            _copy_rows(base.absmax, lambda a, b: q["codes8"][a:b])
            base.nested_absmax.copy_(q["nested"])
            base.offset.copy_(q["offset"])
        else:
            base.absmax.copy_(q["absmax"])
    else:
        ckpt.entry(key, shape)
        _copy_rows(base.weight, lambda a, b: ckpt.rows(key, a, b))
    _copy_rows(layer.lora_A, lambda a, b: adapter_init(name, tuple(layer.lora_A.shape), seed)[a:b])
    _copy_rows(layer.lora_B, lambda a, b: torch.zeros(b - a, layer.lora_B.shape[1]))
    if getattr(layer, "magnitude", None) is not None:
        acc = layer.acc_dtype
        if isinstance(base, NF4Linear):
            sq = _row_norms_sq(q, shape, base.blocksize, base.compute_dtype, acc)
        else:
            lo, hi, local = shard_range(base.weight)
            sq = torch.zeros(shape[0], dtype=acc)
            sq[lo:hi] = local.to(acc).square().sum(1)
            _all_reduce(sq, dist.ReduceOp.SUM, sharded=hasattr(base.weight, "to_local"))
        _copy_rows(layer.magnitude, lambda a, b: sq[a:b].clamp_min(0).sqrt())


def _check_all(model: nn.Module, layers: dict, ckpt: Checkpoint) -> None:
    """Every tensor the model needs is in the checkpoint with the model's shape: checked on the
    meta model, before anything is allocated or read (CheckpointError naming the first not)."""
    for name, layer in layers.items():
        ckpt.entry(f"{name}.weight", (layer.out_features, layer.in_features))
        if getattr(layer.base, "bias", None) is not None:
            ckpt.entry(f"{name}.bias", (layer.out_features,))
    for key, p in model.named_parameters():
        if not any(key.startswith(s + ".") for s in layers):
            ckpt.entry(key, tuple(p.shape))


def _fill_rest(model: nn.Module, ckpt: Checkpoint, skip: set[str]) -> None:
    """Every parameter outside the adapter layers from the checkpoint; non-persistent buffers
    (rotary tables) recomputed by building their module again on the CPU."""
    for key, p in model.named_parameters():
        if any(key.startswith(s + ".") for s in skip):
            continue
        ckpt.entry(key, tuple(p.shape))
        _copy_rows(p, lambda a, b, key=key: ckpt.rows(key, a, b))
    for mname, mod in model.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        own = {k: b for k, b in mod._buffers.items() if b is not None}
        if not own:
            continue
        if f"{mname}.{next(iter(own))}" in ckpt:
            for k, b in own.items():
                _copy_rows(b, lambda a, c, key=f"{mname}.{k}": ckpt.rows(key, a, c))
            continue
        if not hasattr(mod, "config"):
            raise CheckpointError(f"buffer {mname}.{next(iter(own))} is neither in the checkpoint "
                                  "nor recomputable (its module has no config)")
        with torch.device("cpu"):
            fresh = type(mod)(mod.config)
        for k, b in own.items():
            b.copy_(getattr(fresh, k))


def _outer_units(model: nn.Module) -> list:
    """The embeddings and the output head as FSDP2 units of their own (both in one unit when
    they share their weight): FSDP2 never reshards the root unit between forward and backward,
    so left in the root they would stay whole on every rank for the whole step."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head is emb:
        return [emb]
    if head.weight is emb.weight:
        return [[emb, head]]
    return [emb, head]


def _memory_message(name: str, e: BaseException) -> str:
    import re

    from ..common import available_memory, proc_bytes

    rss, free = proc_bytes("/proc/self/status", "VmRSS"), available_memory()
    mib = lambda b: "unknown" if b is None else f"{b / 2**20:.0f} MiB"   # noqa: E731
    size = re.search(r"tried to allocate (\d+)", str(e))
    what = f"an allocation of {mib(int(size[1]))} failed; " if size else ""
    return (f"ran out of memory while loading {name} ({what}this process holds {mib(rss)}, the "
            f"machine has {mib(free)} available): use more ranks (FSDP2 divides the model by "
            "their number) or a machine with more memory")


def build(folder, method: str, r: int, alpha: float, seed: int, dtype: torch.dtype,
          strategy: str, device: torch.device, mixed_precision: str = "none",
          offload: bool = False, on_skeleton=None):
    """A Hugging Face causal LM from ``folder``, wrapped with ``method`` and parallelized, each
    rank holding and reading only its shards under FSDP2 (a collective; every rank calls it).

    Args:
        folder: the checkpoint folder (config.json + safetensors).
        method: ``qlora``, ``qdora``, ``lora`` or ``dora``, on every linear layer of the blocks
            (``"all-linear"``: not the output head).
        r, alpha: the adapters' rank and alpha.
        seed: seeds ``lora_A`` (with each layer's name).
        dtype: dtype of the unquantized parameters, the adapters and the 4-bit base's compute.
        strategy: ``fsdp2`` (sharded loading) or ``ddp`` (every rank loads everything).
        device: where the model runs.
        mixed_precision, offload: as for :func:`~minidora.apps.train.shard.parallelize`.
        on_skeleton: called with no argument once the model exists on the meta device, before
            any of its storage (where the runtime's own memory is measured).

    Returns:
        ``(module, model, checkpoint)``: the module to call (parallelized), the model inside it,
        and the :class:`Checkpoint` (its ``reads`` list what this rank read).
    """
    from .shard import parallelize

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Checkpoint(folder)
    config = AutoConfig.from_pretrained(ckpt.folder, local_files_only=True)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    extra = {"compute_dtype": dtype} if method.startswith("q") else {}
    minidora.wrap(model, method, "all-linear", r=r, alpha=alpha, adapter_dtype=dtype, **extra)
    layers = minidora.adapter_layers(model)
    _check_all(model, layers, ckpt)
    if on_skeleton is not None:
        on_skeleton()
    if strategy == "fsdp2":
        module = parallelize(model, strategy, mixed_precision, offload=offload,
                             units=[*layers.values(), *_outer_units(model)])
        model.to_empty(device="cpu" if offload else device)
    else:
        model.to_empty(device=device)
    parts = [(name, lambda n=name, la=layer: _fill_adapter(n, la, ckpt, seed))
             for name, layer in layers.items()]
    parts.append(("the embeddings, norms and output head", lambda: _fill_rest(model, ckpt,
                                                                                set(layers))))
    with torch.no_grad():
        for name, fill in parts:
            try:
                fill()
            except Exception as e:
                if not _out_of_memory(e):
                    raise
                raise LoadMemoryError(_memory_message(name, e)) from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if strategy != "fsdp2":
        module = parallelize(model, strategy, mixed_precision, offload=offload)
    return module, model, ckpt
