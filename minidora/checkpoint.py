"""Adapter and checkpoint files: minidora's adapter folder, PEFT's adapter folder, and
bitsandbytes' NF4 checkpoint keys.

Four rules hold for every function here:

- **Nothing is unpickled.** Tensors are safetensors, configs are JSON; a file that is neither
  is a ``ValueError`` naming it.
- **A load validates everything before it changes the model.** Keys, shapes, dtypes, finite
  values (after the cast to the adapters' dtype), config fields, the checksum of the tensors,
  and that every tensor in the file is used; a bad second layer never leaves the first one
  changed, and a PEFT import never leaves a half-wrapped model. A PEFT option that changes the
  computation and is not implemented is refused by name (:data:`PEFT_OPTIONS`).
- **A save is atomic and durable.** Each file is written to a temporary file of its own (pid,
  thread and a random part in its name) in the same folder, flushed to disk and renamed over the
  old one; writers of one folder take turns (a lock on the folder), and temporary files that a
  killed writer left behind are removed by the next save. The config is also embedded in the
  tensors' safetensors metadata, and a load refuses a JSON that disagrees with it (what an
  interrupted save would leave behind).
- **A file carries its checksum.** The sha256 of the tensors (names, dtypes, shapes, bytes) and
  of the other metadata is stored in the metadata (``minidora_sha256``) and checked on load;
  files written before the checksum existed still load.

A whole model's NF4 layers load from bitsandbytes' checkpoint keys with
:func:`load_bnb_nf4_linears` (one weight's keys: :mod:`minidora.bnb_checkpoint`).

minidora's layout is one folder per adapter: ``minidora_adapters.safetensors`` (tensors
``<module>.lora_A`` [r, in], ``<module>.lora_B`` [out, r], ``<module>.magnitude`` [out]) and
``minidora_adapters.json``. The older single-file layout (``NAME.safetensors`` beside
``NAME.json``) still loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .dora import DoRALinear
from .lora import LoRALinear
from .model import _is_conv1d, _set_module, adapter_layers, wrap
from .nf4 import FLOAT_DTYPES
from .nf4_linear import NF4Linear

__all__ = ["save_adapters", "load_adapters", "save_peft_adapter", "load_peft_adapter",
           "load_bnb_nf4_linears", "ADAPTER_FILE", "CONFIG_FILE", "PEFT_OPTIONS"]

ADAPTER_FILE = "minidora_adapters.safetensors"
CONFIG_FILE = "minidora_adapters.json"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
DIGEST_KEY = "minidora_sha256"
_PEFT_PREFIX = "base_model.model."
_OUR_FILES = (ADAPTER_FILE, CONFIG_FILE, PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE)
# A temporary file of a save: ".NAME.PID.tmp" (older saves) or ".NAME.PID.THREAD.RANDOM.tmp".
_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)(?:\.\d+\.[0-9a-f]+)?\.tmp")
STALE_TMP_SECONDS = 3600      # a temporary file this old is stale even if its pid is alive
_SAVE_LOCK = threading.RLock()


# --- files: atomic writes, safe reads ----------------------------------------------------------

def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path`` (a name no other call uses), flush
    it to disk, rename it over ``path``: a reader sees the old file or the new one, never a
    part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}."
                         f"{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":          # no signal 0 elsewhere: only the age rule applies
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files of saves that were killed (kill -9, power loss): those of a
    process that no longer runs, or older than :data:`STALE_TMP_SECONDS`. Called with the
    folder's lock held, so no writer that takes the lock is mid-write; a file of a live process
    (a writer that does not take the lock) is kept unless it is that old."""
    now = time.time()
    for p in folder.iterdir():
        m = _TMP.fullmatch(p.name)
        if m is None or m["name"] not in _OUR_FILES:
            continue
        try:
            old = now - p.lstat().st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:
            continue
        if old or not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Writers of one folder take turns: threads of this process through a lock, processes
    through ``flock`` on the folder itself (where the system has it); stale temporary files
    are removed first."""
    with _SAVE_LOCK:
        fd = None
        try:
            import fcntl
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):       # no flock here (Windows, some network disks)
            pass
        try:
            _remove_stale_tmp(folder)
            yield
        finally:
            if fd is not None:
                os.close(fd)                 # releases the flock


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes, in name order) and of the metadata
    other than the digest itself."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    rest = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _write_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    metadata = {**metadata, DIGEST_KEY: _digest(tensors, metadata)}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not a JSON file ({e})") from None
    except RecursionError:
        raise ValueError(f"{where} is not a JSON file this reader accepts: it is nested too "
                         "deeply") from None


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a JSON file ({e})") from None
    obj = _loads(text, repr(str(path)))
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file (never pickle)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def _check_digest(path: Path, tensors: dict, metadata: dict) -> None:
    """Refuse a file whose tensors or metadata do not match the checksum stored in it (checked
    last, so that a file with a clearer fault gets the clearer message); a file written before
    the checksum existed has none and passes."""
    want = metadata.get(DIGEST_KEY)
    if want is not None and _digest(tensors, metadata) != want:
        raise ValueError(f"{str(path)!r} is corrupt: its tensors do not match the sha256 stored "
                         f"in its metadata ({DIGEST_KEY}); save the adapters again")


def _check_tensor(where: str, key: str, t: torch.Tensor | None, shape: tuple,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The checked tensor ``key`` of the file ``where``, cast to ``dtype`` (the parameter's)
    where given: the finite check is made after the cast (1e300 is finite in float64, inf in
    float32)."""
    if t is None:
        raise ValueError(f"{where}: tensor {key} is missing from the file")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: tensor {key} must be floating point, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: tensor {key}: expected shape {tuple(shape)}, "
                         f"got {tuple(t.shape)}")
    cast = t if dtype is None or dtype == t.dtype else t.to(dtype)
    bad = ~torch.isfinite(cast)
    if bad.any():
        how = "" if cast is t else f" once cast from {t.dtype} to {dtype} (the adapters' dtype)"
        raise ValueError(f"{where}: tensor {key} holds {int(bad.sum())} NaN/Inf value(s){how}")
    return cast


def _refuse_leftovers(tensors: dict, used: set, where: str, why: str = "") -> None:
    left = sorted(set(tensors) - used)
    if left:
        shown = ", ".join(left[:6]) + (f", ... ({len(left) - 6} more)" if len(left) > 6 else "")
        raise ValueError(f"{where} holds {len(left)} tensor(s) that minidora would not use: "
                         f"{shown}{why}; refusing rather than dropping them")


def _refuse_meta(name: str, layer: nn.Module, what: str) -> None:
    if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):
        raise ValueError(f"layer {name!r} is on the meta device (built under "
                         f"torch.device('meta')): {what}")


_META_LOAD = ("nothing can be loaded into it; materialize the model first (model.to_empty("
              "device=...) and load its base weights), then load the adapters")


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, t in pairs:               # never a broadcast: every shape was checked before
        assert p.shape == t.shape and not p.is_meta, (p.shape, t.shape)
    with torch.no_grad():
        for p, t in pairs:
            p.copy_(t)


# --- minidora adapter folders ------------------------------------------------------------------

def _layer_config(layer: LoRALinear) -> dict:
    """What the file records of a layer. A quantized base adds its NF4 layout (blocksize,
    double_quant, compute_dtype): see :func:`load_adapters` for what is compared."""
    quantized = isinstance(layer.base, NF4Linear)
    config = {"kind": "dora" if isinstance(layer, DoRALinear) else "lora",
              "quantized": quantized, "r": layer.r, "alpha": layer.alpha,
              "rslora": layer.rslora, "in_features": layer.in_features,
              "out_features": layer.out_features}
    if quantized:
        config.update(blocksize=layer.base.blocksize, double_quant=layer.base.double_quant,
                      compute_dtype=str(layer.base.compute_dtype).removeprefix("torch."))
    return config


def _method_of(layers: dict[str, LoRALinear]) -> str:
    kinds = {("q" if c["quantized"] else "") + c["kind"]
             for c in map(_layer_config, layers.values())}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _adapter_tensors(layer: LoRALinear) -> dict[str, torch.Tensor]:
    t = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if isinstance(layer, DoRALinear):
        t["magnitude"] = layer.magnitude
    return t


def _folder(path, what: str) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        raise ValueError(f"path names a folder to write the {what} into, got a file name "
                         f"{str(path)!r}: pass a folder such as {str(path.with_suffix(''))!r}")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"path {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which "
                         f"does not exist; create that folder or pass another path for the {what}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; the {what} are written into a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _given(layers: dict[str, LoRALinear], tensors: dict | None) -> dict[str, torch.Tensor]:
    """The adapter tensors to write, by ``<module>.lora_A`` / ``.lora_B`` / ``.magnitude``: the
    layers' own, or ``tensors`` (checked: the same names and shapes), on the CPU."""
    own = {f"{n}.{k}": t for n, layer in layers.items() for k, t in _adapter_tensors(layer).items()}
    if tensors is not None:
        if set(tensors) != set(own):
            raise ValueError(f"tensors must hold exactly the adapter tensors {sorted(own)[:4]}...; "
                             f"missing {sorted(set(own) - set(tensors))[:4]}, "
                             f"unknown {sorted(set(tensors) - set(own))[:4]}")
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(own[k].shape):
                got = getattr(t, "shape", type(t).__name__)
                raise ValueError(f"tensors[{k!r}] must be a tensor of shape "
                                 f"{tuple(own[k].shape)}, got {got}")
        own = tensors
    for k, t in own.items():
        if t.is_meta:
            raise ValueError(f"layer {k.rsplit('.', 1)[0]!r}: its {k.rsplit('.', 1)[1]} is on the "
                             "meta device (a model built under torch.device('meta')) and holds no "
                             "values; materialize and load the model before saving its adapters")
    return {k: t.detach().contiguous().cpu() for k, t in own.items()}


def save_adapters(model: nn.Module, path, tensors: dict | None = None) -> Path:
    """Write only the adapters into the folder ``path`` (created): ``minidora_adapters.safetensors``
    (the config and the checksum embedded in its metadata) and ``minidora_adapters.json``, each
    written atomically; concurrent saves into one folder take turns.

    Args:
        model: the wrapped model.
        path: the folder.
        tensors: the adapter tensors to write in place of the model's own, by the names the file
            uses (``<module>.lora_A`` [r, in], ``.lora_B`` [out, r], ``.magnitude`` [out]): the
            full tensors gathered from a sharded model (``python -m minidora train``).

    Returns:
        The folder.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to save; call minidora.wrap first")
    tensors = _given(layers, tensors)
    folder = _folder(path, "adapters")
    config = {"format": "minidora-adapters", "minidora_version": __version__,
              "method": _method_of(layers),
              "layers": {n: _layer_config(layer) for n, layer in layers.items()}}
    with _folder_lock(folder):
        _write_tensors(folder / ADAPTER_FILE, tensors, {"minidora_config": json.dumps(config)})
        _write_json(folder / CONFIG_FILE, config)
    return folder


def _adapter_files(path: Path) -> tuple[Path, Path]:
    """(tensors, JSON) of a folder, or of the older single-file layout."""
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"adapter folder {str(path)!r} has no {ADAPTER_FILE}")
        return path / ADAPTER_FILE, path / CONFIG_FILE
    if path.is_file():
        return path, path.with_suffix(".json")
    raise FileNotFoundError(f"no adapter folder or file at {str(path)!r}")


def _read_adapter_config(st_path: Path, json_path: Path, metadata: dict) -> dict:
    embedded = metadata.get("minidora_config")
    if embedded is not None:
        try:
            embedded = _loads(embedded, "")
        except ValueError:
            raise ValueError(f"{str(st_path)!r} has corrupt minidora_config metadata") from None
    config = _read_json(json_path) if json_path.is_file() else embedded
    if embedded is not None and config != embedded:
        raise ValueError(f"{str(json_path)!r} disagrees with the config stored in "
                         f"{str(st_path)!r} (an interrupted save?); save the adapters again")
    if (not isinstance(config, dict) or config.get("format") != "minidora-adapters"
            or not isinstance(config.get("layers"), dict) or "method" not in config):
        raise ValueError(f"{str(json_path)!r} is not a minidora adapter config (expected the JSON "
                         "that save_adapters writes, with 'format', 'method' and 'layers')")
    return config


_MUST_AGREE = ("kind", "quantized", "r", "alpha", "rslora", "in_features", "out_features")
_NF4_LAYOUT = ("blocksize", "double_quant")


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into a model wrapped the same way.

    ``path`` is the folder (or an older ``NAME.safetensors`` with ``NAME.json`` beside it).
    Method, layer names, ranks, scalings, shapes and, per layer, whether the base is quantized
    must all agree; every tensor must be floating point and finite in the adapters' dtype, every
    tensor in the file must be used, and the checksum must match; any mismatch raises a
    ValueError naming it, before the model is touched.

    The NF4 layout of a quantized base (blocksize, double quantization) must agree for DoRA
    layers: QDoRA's magnitude is trained against the row norms of the quantized weight, so
    another layout gives another result. A QLoRA adapter's math does not depend on the layout
    (y = base(x) + s B A x for any base), so a QLoRA layer loads over any NF4 layout, as over
    any base weights. The compute dtype is recorded but not compared: it is the precision the
    model runs in, as for a dense base. Files written before the layout was recorded load
    without that comparison.
    """
    st_path, json_path = _adapter_files(Path(path))
    tensors, metadata = _read_tensors(st_path)
    config = _read_adapter_config(st_path, json_path, metadata)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"model has no adapter layers: call minidora.wrap(model, "
                         f"{config['method']!r}, ...) with the saved targets first")
    if _method_of(layers) != config["method"]:
        raise ValueError(f"adapter file holds method {config['method']!r} but the model is "
                         f"wrapped with {_method_of(layers)!r}")
    saved, have = set(config["layers"]), set(layers)
    if saved != have:
        raise ValueError(f"adapter layer names differ: in the file only {sorted(saved - have)}, "
                         f"in the model only {sorted(have - saved)}")
    pairs = []
    for n, layer in layers.items():
        want, got = config["layers"][n], _layer_config(layer)
        if not isinstance(want, dict):
            raise ValueError(f"layer {n!r}: the file's entry must be a JSON object, got {want!r}")
        keys = [k for k in _MUST_AGREE if k != "quantized" or k in want]   # older files
        if got["kind"] == "dora" and got["quantized"] and want.get("quantized"):
            keys += [k for k in _NF4_LAYOUT if k in want]
        for key in keys:
            if want.get(key) != got[key]:
                raise ValueError(f"layer {n!r}: the file has {key}={want.get(key)!r}, "
                                 f"the model has {key}={got[key]!r}")
        if layer.merged:
            raise ValueError(f"layer {n!r} is merged; unmerge before loading adapters")
        _refuse_meta(n, layer, _META_LOAD)
        for k, p in _adapter_tensors(layer).items():
            pairs.append((p, _check_tensor(repr(str(st_path)), f"{n}.{k}",
                                           tensors.get(f"{n}.{k}"), p.shape, p.dtype)))
    _refuse_leftovers(tensors, {f"{n}.{k}" for n, layer in layers.items()
                                for k in _adapter_tensors(layer)}, repr(str(st_path)))
    _check_digest(st_path, tensors, metadata)
    _copy_all(pairs)
    return model


# --- PEFT adapter folders ----------------------------------------------------------------------

def _unset(v) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, str)) and not v)


_INITS = ("gaussian", "orthogonal", "eva")     # inits that leave the base weights as they are

# How import handles each field of PEFT 0.21.2's LoraConfig: field -> (how, accepts, note).
# "exact": implemented, the same computation as PEFT; "harmless": bookkeeping or initialization
# (the tensors in the file compute the same whatever its value); "refused": a value that
# ``accepts`` rejects changes the computation in a way minidora does not implement, and is a
# ValueError naming the field. A field that is not in the table is refused when it is set.
PEFT_OPTIONS: dict[str, tuple[str, object, str]] = {
    "peft_type": ("exact", lambda v: v == "LORA", "'LORA' only"),
    "task_type": ("harmless", None, "the PeftModel class around the model"),
    "auto_mapping": ("harmless", None, "bookkeeping"),
    "peft_version": ("harmless", None, "bookkeeping"),
    "base_model_name_or_path": ("harmless", None, "bookkeeping"),
    "revision": ("harmless", None, "bookkeeping"),
    "inference_mode": ("harmless", None, "whether the adapters are trainable"),
    "r": ("exact", None, "the rank; the tensors' shapes are checked against it"),
    "target_modules": ("exact", None, "the adapted layers are those the file holds tensors for; "
                       "each must be one the option selects"),
    "exclude_modules": ("exact", None, "no layer in the file may be excluded"),
    "layers_to_transform": ("exact", None, "each layer in the file must be in it"),
    "layers_pattern": ("exact", None, "as PEFT, with layers_to_transform"),
    "lora_alpha": ("exact", None, "s = alpha / r"),
    "lora_dropout": ("exact", None, "dropout on the adapters' input (training only)"),
    "fan_in_fan_out": ("exact", None, "GPT-2's Conv1D"),
    "use_rslora": ("exact", None, "s = alpha / sqrt(r)"),
    "use_dora": ("exact", None, "DoRA"),
    "bias": ("refused", lambda v: v == "none", "'all' and 'lora_only' train the base biases"),
    "lora_bias": ("refused", _unset, "True: a trained bias on lora_B"),
    "modules_to_save": ("refused", _unset, "fully trained modules"),
    "init_lora_weights": ("refused", lambda v: v is True or v is False or v in _INITS,
                          "True, False, 'gaussian', 'orthogonal', 'eva' are initializations "
                          "only (harmless); 'pissa*', 'olora', 'corda', 'loftq', 'lora_ga' "
                          "changed the base weights (save with PEFT's "
                          "path_initial_model_for_weight_conversion to get a plain LoRA file); "
                          "'mica' is a variant with a frozen B; other values are unknown"),
    "rank_pattern": ("refused", _unset, "per-layer ranks"),
    "alpha_pattern": ("refused", _unset, "per-layer alphas"),
    "megatron_config": ("refused", _unset, "Megatron's parallel layers"),
    "megatron_core": ("harmless", None, "used only with megatron_config"),
    "trainable_token_indices": ("refused", _unset, "trained embedding rows"),
    "loftq_config": ("harmless", None, "used only with init_lora_weights='loftq'"),
    "eva_config": ("harmless", None, "initialization only"),
    "corda_config": ("harmless", None, "used only with init_lora_weights='corda'"),
    "lora_ga_config": ("harmless", None, "used only with init_lora_weights='lora_ga'"),
    "velora_config": ("refused", _unset, "VeLoRA, a LoRA variant"),
    "alora_invocation_tokens": ("refused", _unset, "aLoRA: the adapter acts only from the "
                                "invocation tokens on"),
    "use_qalora": ("refused", _unset, "QA-LoRA's pooled input"),
    "qalora_group_size": ("harmless", None, "used only with use_qalora"),
    "monteclora_config": ("refused", _unset, "MonteCLoRA, a LoRA variant"),
    "layer_replication": ("refused", _unset, "repeated base layers"),
    "runtime_config": ("harmless", None, "not saved by PEFT; runtime settings"),
    "target_parameters": ("refused", _unset, "LoRA on nn.Parameter targets"),
    "use_bdlora": ("refused", _unset, "BD-LoRA, block-diagonal factors"),
    "arrow_config": ("refused", _unset, "Arrow routing between adapters"),
    "kasa_config": ("refused", _unset, "KaSA, a LoRA variant"),
    "ensure_weight_tying": ("refused", _unset, "adapters tied across tied weights"),
}


def _peft_options(cfg: dict, where: str) -> dict:
    """The wrap options of a PEFT config, after every field of it is checked against
    :data:`PEFT_OPTIONS`."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key, value in cfg.items():
        how, accepts, note = PEFT_OPTIONS.get(key, ("unknown", _unset, "an option minidora does "
                                                    "not know"))
        if accepts is not None and not accepts(value):
            raise ValueError(f"{where}: PEFT option {key} {value!r} ({note}) is not supported; "
                             "refusing rather than loading the adapter as plain LoRA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise ValueError(f"{where}: 'r' must be an integer >= 1, got {r!r}")
    if type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise ValueError(f"{where}: 'lora_alpha' must be a finite number > 0, got {alpha!r}")
    dropout = cfg.get("lora_dropout") or 0.0
    return dict(r=r, alpha=alpha, rslora=bool(cfg.get("use_rslora")), dropout=float(dropout))


def _names(v) -> list[str] | None:
    return [v] if isinstance(v, str) else v if isinstance(v, list) else None


def _peft_unselected(cfg: dict, name: str) -> str | None:
    """The option (target_modules, exclude_modules, layers_to_transform) by which PEFT would
    not adapt the module ``name``, or None: PEFT's own matching rules."""
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return "exclude_modules"
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return "exclude_modules"
    target = cfg.get("target_modules")
    if isinstance(target, str):
        return None if target == "all-linear" or re.fullmatch(target, name) else "target_modules"
    if not isinstance(target, list):
        return None
    if not any(name == t or name.endswith("." + t) for t in target):
        return "target_modules"
    wanted = cfg.get("layers_to_transform")
    if wanted is None or wanted == [] or name in target:
        return None
    patterns = _names(cfg.get("layers_pattern"))
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
                               for p in patterns)), None)
    index = int(m["idx"]) if m else None
    ok = index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)
    return None if ok else "layers_to_transform"


def _peft_target_shape(model: nn.Module, name: str, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in, out) of the module a PEFT file adapts, checked before the model is wrapped."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the PEFT file adapts {name!r}, which the model does not have") from None
    if isinstance(m, LoRALinear):
        m = m.base
    conv = _is_conv1d(m) or getattr(m, "fan_in_fan_out", False)
    if not (isinstance(m, (nn.Linear, NF4Linear)) or _is_conv1d(m)):
        raise ValueError(f"the PEFT file adapts {name!r}, a {type(m).__name__}; only linear "
                         "layers are supported")
    if conv != fan_in_fan_out:
        raise ValueError(f"layer {name!r}: fan_in_fan_out={fan_in_fan_out} in the file does not "
                         "fit the model's layer (Conv1D <-> Linear)")
    _refuse_meta(name, m, _META_LOAD)
    if _is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    return m.in_features, m.out_features


# wrap's keyword -> the PEFT field that fixes it
_FROM_FILE = {"r": "r", "alpha": "lora_alpha", "rslora": "use_rslora", "dropout": "lora_dropout"}
_PARAMS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
           "lora_magnitude_vector": "magnitude"}


def load_peft_adapter(model: nn.Module, path, **wrap_kwargs) -> nn.Module:
    """Import a PEFT LoRA/DoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    An unwrapped model is wrapped first (targets: exactly the modules named in the file; method
    lora or dora, over whatever base each target is: an ``NF4Linear`` gives QLoRA/QDoRA); each
    new layer keeps the training mode of the layer it replaces. ``wrap_kwargs`` go to
    :func:`~minidora.wrap` (e.g. ``compute_dtype``, ``adapter_dtype``); r, alpha, rslora and
    dropout come from the file, and giving another value for one of them is an error. A model
    already wrapped must have the file's layers, kind, r, alpha and rsLoRA. Keys are
    ``base_model.model.<module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r] and for DoRA
    ``.lora_magnitude_vector`` [out]. GPT-2's Conv1D ("fan_in_fan_out") is handled. Every config
    field is checked against :data:`PEFT_OPTIONS` (an option that changes the computation and is
    not implemented is refused by name). Everything is checked before the model is wrapped or
    changed; a key the import would not use (embedding LoRA, ``modules_to_save``, a magnitude in
    a non-DoRA file) is an error that names it.

    Returns:
        The model (the same object, or the adapter layer when the model is itself the target).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"PEFT adapter folder {str(path)!r} does not exist")
    cfg_path, st_path = path / PEFT_CONFIG_FILE, path / PEFT_ADAPTER_FILE
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(f"PEFT adapter file {str(p)!r} does not exist")
    cfg = _read_json(cfg_path)
    where = repr(str(cfg_path))
    opts = _peft_options(cfg, where)
    for key, field in _FROM_FILE.items():
        if key in wrap_kwargs and wrap_kwargs[key] != opts[key]:
            raise ValueError(f"load_peft_adapter: {key}={wrap_kwargs[key]!r} was given, but "
                             f"{where} has {field}={cfg.get(field)!r}; leave {key} out (the file "
                             "fixes it)")
    dora, fan = bool(cfg.get("use_dora")), bool(cfg.get("fan_in_fan_out"))
    tensors, metadata = _read_tensors(st_path)
    if "minidora_peft_config" in metadata:
        try:
            embedded = _loads(metadata["minidora_peft_config"], "")
        except ValueError:
            raise ValueError(f"{str(st_path)!r} has corrupt minidora_peft_config metadata") \
                from None
        if embedded != cfg:
            raise ValueError(f"{str(cfg_path)!r} disagrees with the config stored in "
                             f"{str(st_path)!r} (an interrupted save?)")
    names = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_A.weight", 1)[0]
                    for k in tensors if k.startswith(_PEFT_PREFIX)
                    and k.endswith(".lora_A.weight")})
    if not names:
        raise ValueError(f"{str(st_path)!r} holds no '{_PEFT_PREFIX}<module>.lora_A.weight' "
                         "tensors")
    for n in names:
        option = _peft_unselected(cfg, n)
        if option is not None:
            raise ValueError(f"{where}: the file holds tensors for {n!r}, which PEFT would not "
                             f"adapt ({option}={cfg[option]!r}); refusing rather than loading "
                             "them")
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    used = {f"{_PEFT_PREFIX}{n}.{s}" for n in names for s in suffixes}
    _refuse_leftovers(tensors, used, repr(str(st_path)),
                      "" if dora else " (magnitudes belong to a file with use_dora: true)")
    layers = adapter_layers(model)
    if layers:
        if sorted(layers) != names:
            raise ValueError(f"the model's adapter layers {sorted(layers)} differ from the "
                             f"file's {names}")
        for n, layer in layers.items():
            if isinstance(layer, DoRALinear) != dora:
                raise ValueError(f"layer {n!r} is {type(layer).__name__} but the file is "
                                 f"{'dora' if dora else 'lora'}")
            if layer.merged:
                raise ValueError(f"layer {n!r} is merged; unmerge before loading an adapter")
            for key, field in _FROM_FILE.items():
                if key != "dropout" and getattr(layer, key) != opts[key]:
                    raise ValueError(f"layer {n!r} has {key}={getattr(layer, key)!r}, but "
                                     f"{where} has {field}={cfg.get(field)!r}")
    dtype = wrap_kwargs.get("adapter_dtype", torch.float32)
    checked = {}
    r = opts["r"]
    for n in names:
        n_in, n_out = _peft_target_shape(model, n, fan)
        shapes = {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r),
                  "lora_magnitude_vector": (n_out,)}
        for s in suffixes:
            key = f"{_PEFT_PREFIX}{n}.{s}"
            want = getattr(layers[n], _PARAMS[s]).dtype if layers else dtype
            checked[(n, s)] = _check_tensor(repr(str(st_path)), key, tensors[key], shapes[s],
                                            want if isinstance(want, torch.dtype) else None)
    _check_digest(st_path, tensors, metadata)
    if not layers:
        modes = {n: model.get_submodule(n).training for n in names}
        model = wrap(model, "dora" if dora else "lora", names, **{**opts, **wrap_kwargs})
        layers = adapter_layers(model)
        for n, training in modes.items():
            layers[n].train(training)
    _copy_all([(getattr(layers[n], _PARAMS[s]), t) for (n, s), t in checked.items()])
    return model


def save_peft_adapter(model: nn.Module, path, tensors: dict | None = None) -> Path:
    """Export the adapters as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    All layers must share method, r, alpha and rsLoRA (PEFT's per-layer patterns are not
    written). Tensors keep the adapters' dtype; both files are written atomically, with the
    checksum in the tensors' metadata. ``tensors`` as in :func:`save_adapters`.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to export; call minidora.wrap first")
    confs = {n: _layer_config(layer) for n, layer in layers.items()}
    shared = {(c["kind"], c["r"], c["alpha"], c["rslora"]) for c in confs.values()}
    fan = {bool(getattr(layer.base, "fan_in_fan_out", False)) for layer in layers.values()}
    if len(shared) != 1 or len(fan) != 1:
        raise ValueError("PEFT export needs one kind, r, alpha, rslora and fan_in_fan_out for all "
                         f"layers, got {sorted(shared)} and fan_in_fan_out {sorted(fan)}")
    kind, r, alpha, rslora = shared.pop()
    given = _given(layers, tensors)
    tensors = {}
    for n in layers:
        tensors[f"{_PEFT_PREFIX}{n}.lora_A.weight"] = given[f"{n}.lora_A"]
        tensors[f"{_PEFT_PREFIX}{n}.lora_B.weight"] = given[f"{n}.lora_B"]
        if kind == "dora":
            tensors[f"{_PEFT_PREFIX}{n}.lora_magnitude_vector"] = given[f"{n}.magnitude"]
    dropout = {layer.dropout_p for layer in layers.values()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": kind == "dora",
              "lora_dropout": max(dropout), "target_modules": sorted(layers),
              "fan_in_fan_out": fan.pop(), "bias": "none", "init_lora_weights": True,
              "inference_mode": True}
    folder = _folder(path, "PEFT adapter")
    with _folder_lock(folder):
        _write_tensors(folder / PEFT_ADAPTER_FILE, tensors,
                       {"format": "pt", "minidora_peft_config": json.dumps(config)})
        _write_json(folder / PEFT_CONFIG_FILE, config)
    return folder


def load_bnb_nf4_linears(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace each ``nn.Linear`` that ``state_dict`` stores in bitsandbytes' NF4 layout
    (``<name>.weight`` + ``<name>.weight.absmax`` + ``.quant_state.bitsandbytes__nf4``...)
    by an :class:`~minidora.NF4Linear` holding those exact bytes. The checkpoint must hold a bias
    exactly where the model's layer has one. Every layer is built and checked before any is
    replaced. Returns the names replaced."""
    new = {}
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear)
                and f"{name}.weight.quant_state.bitsandbytes__nf4" in state_dict):
            has_bias = f"{name}.bias" in state_dict
            if has_bias != (m.bias is not None):
                raise ValueError(f"{name}: the checkpoint {'has' if has_bias else 'has no'} "
                                 f"{name}.bias but the model's layer has "
                                 f"{'one' if m.bias is not None else 'none'}")
            layer = NF4Linear.from_bnb_state_dict(state_dict, f"{name}.",
                                                  compute_dtype=compute_dtype)
            if (layer.in_features, layer.out_features) != (m.in_features, m.out_features):
                raise ValueError(f"{name}: the checkpoint holds a {layer.out_features}x"
                                 f"{layer.in_features} weight, the model a {m.out_features}x"
                                 f"{m.in_features} one")
            if layer.bias is not None and not torch.isfinite(layer.bias).all():
                raise ValueError(f"{name}.bias holds NaN/Inf values")
            new[name] = layer.to(m.weight.device)
    for name, layer in new.items():
        _set_module(model, name, layer)
    return list(new)
