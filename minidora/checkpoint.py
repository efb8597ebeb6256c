"""Adapter and checkpoint files: minidora's adapter folder, PEFT's adapter folder, and
bitsandbytes' NF4 checkpoint keys.

Three rules hold for every function here:

- **Nothing is unpickled.** Tensors are safetensors, configs are JSON; a file that is neither
  is a ``ValueError`` naming it.
- **A load validates everything before it changes the model.** Keys, shapes, dtypes, finite
  values, config fields, and that every tensor in the file is used; a bad second layer never
  leaves the first one changed, and a PEFT import never leaves a half-wrapped model.
- **A save is atomic.** Each file is written to a temporary file in the same folder and renamed
  over the old one; the config is also embedded in the tensors' safetensors metadata, and a load
  refuses a JSON that disagrees with it (what an interrupted save would leave behind).

(bitsandbytes' NF4 checkpoint keys are in :mod:`minidora.bnb_checkpoint`;
:func:`load_bnb_nf4_linears` is re-exported here.)

minidora's layout is one folder per adapter: ``minidora_adapters.safetensors`` (tensors
``<module>.lora_A`` [r, in], ``<module>.lora_B`` [out, r], ``<module>.magnitude`` [out]) and
``minidora_adapters.json``. The older single-file layout (``NAME.safetensors`` beside
``NAME.json``) still loads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .bnb_checkpoint import load_bnb_nf4_linears
from .dora import DoRALinear
from .lora import LoRALinear
from .model import _is_conv1d, adapter_layers, wrap
from .nf4_linear import NF4Linear

__all__ = ["save_adapters", "load_adapters", "save_peft_adapter", "load_peft_adapter",
           "load_bnb_nf4_linears", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "minidora_adapters.safetensors"
CONFIG_FILE = "minidora_adapters.json"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --- files: atomic writes, safe reads ----------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, rename it over
    ``path``: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _write_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a JSON file ({e})") from None
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


def _check_tensor(key: str, t: torch.Tensor | None, shape: tuple) -> torch.Tensor:
    if t is None:
        raise ValueError(f"tensor {key} is missing from the file")
    if t.dtype not in _FLOATS:
        raise ValueError(f"tensor {key} must be floating point, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"tensor {key} holds {int(bad.sum())} NaN/Inf value(s)")
    return t


def _refuse_leftovers(tensors: dict, used: set, where: str, why: str = "") -> None:
    left = sorted(set(tensors) - used)
    if left:
        shown = ", ".join(left[:6]) + (f", ... ({len(left) - 6} more)" if len(left) > 6 else "")
        raise ValueError(f"{where} holds {len(left)} tensor(s) that minidora would not use: "
                         f"{shown}{why}; refusing rather than dropping them")


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, t in pairs:
            p.copy_(t)


# --- minidora adapter folders ------------------------------------------------------------------

def _layer_config(layer: LoRALinear) -> dict:
    return {"kind": "dora" if isinstance(layer, DoRALinear) else "lora",
            "quantized": isinstance(layer.base, NF4Linear), "r": layer.r, "alpha": layer.alpha,
            "rslora": layer.rslora, "in_features": layer.in_features,
            "out_features": layer.out_features}


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
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; the {what} are written into a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _given(layers: dict[str, LoRALinear], tensors: dict | None) -> dict[str, torch.Tensor]:
    """The adapter tensors to write, by ``<module>.lora_A`` / ``.lora_B`` / ``.magnitude``: the
    layers' own, or ``tensors`` (checked: the same names and shapes)."""
    own = {f"{n}.{k}": t for n, layer in layers.items() for k, t in _adapter_tensors(layer).items()}
    if tensors is None:
        return own
    if set(tensors) != set(own):
        raise ValueError(f"tensors must hold exactly the adapter tensors {sorted(own)[:4]}...; "
                         f"missing {sorted(set(own) - set(tensors))[:4]}, "
                         f"unknown {sorted(set(tensors) - set(own))[:4]}")
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"tensors[{k!r}] must be a tensor of shape {tuple(own[k].shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    return tensors


def save_adapters(model: nn.Module, path, tensors: dict | None = None) -> Path:
    """Write only the adapters into the folder ``path`` (created): ``minidora_adapters.safetensors``
    (the config embedded in its metadata) and ``minidora_adapters.json``, each written atomically.

    Args:
        model: the wrapped model.
        path: the folder.
        tensors: the adapter tensors to write in place of the model's own, by the names the file
            uses (``<module>.lora_A`` [r, in], ``.lora_B`` [out, r], ``.magnitude`` [out]): the
            full tensors gathered from a sharded model (:mod:`minidora.distributed`).

    Returns:
        The folder.
    """
    import minidora

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to save; call minidora.wrap first")
    tensors = {k: t.detach().contiguous().cpu() for k, t in _given(layers, tensors).items()}
    folder = _folder(path, "adapters")
    config = {"format": "minidora-adapters", "minidora_version": minidora.__version__,
              "method": _method_of(layers),
              "layers": {n: _layer_config(layer) for n, layer in layers.items()}}
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
    try:
        embedded = json.loads(embedded) if embedded is not None else None
    except json.JSONDecodeError:
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


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into a model wrapped the same way.

    ``path`` is the folder (or an older ``NAME.safetensors`` with ``NAME.json`` beside it).
    Method, layer names, ranks, scalings and shapes must all agree, every tensor must be finite
    floating point, and every tensor in the file must be used; any mismatch raises a ValueError
    naming it, before the model is touched.
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
        for key in ("kind", "r", "alpha", "rslora", "in_features", "out_features"):
            if not isinstance(want, dict) or want.get(key) != got[key]:
                have = want.get(key) if isinstance(want, dict) else want
                raise ValueError(f"layer {n!r}: the file has {key}={have!r}, "
                                 f"the model has {key}={got[key]!r}")
        if layer.merged:
            raise ValueError(f"layer {n!r} is merged; unmerge before loading adapters")
        for k, p in _adapter_tensors(layer).items():
            pairs.append((p, _check_tensor(f"{n}.{k}", tensors.get(f"{n}.{k}"), p.shape)))
    _refuse_leftovers(tensors, {f"{n}.{k}" for n, layer in layers.items()
                                for k in _adapter_tensors(layer)}, repr(str(st_path)))
    _copy_all(pairs)
    return model


# --- PEFT adapter folders ----------------------------------------------------------------------

def _peft_options(cfg: dict, where: str) -> dict:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise ValueError(f"{where}: 'r' must be an integer >= 1, got {r!r}")
    if type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise ValueError(f"{where}: 'lora_alpha' must be a finite number > 0, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"PEFT {key} (per-layer ranks/alphas) is not supported, "
                             f"got {cfg[key]}")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise ValueError("PEFT adapters with trained biases (bias / lora_bias) are not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(f"PEFT modules_to_save {cfg['modules_to_save']} (fully trained modules) "
                         "are not supported")
    dropout = cfg.get("lora_dropout") or 0.0
    return dict(r=r, alpha=alpha, rslora=bool(cfg.get("use_rslora")), dropout=float(dropout))


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
    if _is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    return m.in_features, m.out_features


def load_peft_adapter(model: nn.Module, path, **wrap_kwargs) -> nn.Module:
    """Import a PEFT LoRA/DoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    An unwrapped model is wrapped first (targets: exactly the modules named in the file; method
    lora or dora, over whatever base each target is: an ``NF4Linear`` gives QLoRA/QDoRA);
    ``wrap_kwargs`` go to :func:`~minidora.wrap` (e.g. ``compute_dtype``). Keys are
    ``base_model.model.<module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r] and for DoRA
    ``.lora_magnitude_vector`` [out]. GPT-2's Conv1D ("fan_in_fan_out") is handled. Everything
    is checked before the model is wrapped or changed; a key the import would not use (embedding
    LoRA, ``modules_to_save``, a magnitude in a non-DoRA file) is an error that names it.

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
    opts = _peft_options(cfg, repr(str(cfg_path)))
    dora, fan = bool(cfg.get("use_dora")), bool(cfg.get("fan_in_fan_out"))
    tensors, metadata = _read_tensors(st_path)
    if "minidora_peft_config" in metadata and json.loads(metadata["minidora_peft_config"]) != cfg:
        raise ValueError(f"{str(cfg_path)!r} disagrees with the config stored in "
                         f"{str(st_path)!r} (an interrupted save?)")
    names = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_A.weight", 1)[0]
                    for k in tensors if k.startswith(_PEFT_PREFIX)
                    and k.endswith(".lora_A.weight")})
    if not names:
        raise ValueError(f"{str(st_path)!r} holds no '{_PEFT_PREFIX}<module>.lora_A.weight' "
                         "tensors")
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    used = {f"{_PEFT_PREFIX}{n}.{s}" for n in names for s in suffixes}
    _refuse_leftovers(tensors, used, repr(str(st_path)),
                      "" if dora else " (magnitudes belong to a file with use_dora: true)")
    checked = {}
    r = opts["r"]
    for n in names:
        n_in, n_out = _peft_target_shape(model, n, fan)
        shapes = {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r),
                  "lora_magnitude_vector": (n_out,)}
        for s in suffixes:
            key = f"{_PEFT_PREFIX}{n}.{s}"
            checked[(n, s)] = _check_tensor(key, tensors[key], shapes[s])
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
            if (layer.alpha, layer.rslora) != (opts["alpha"], opts["rslora"]):
                raise ValueError(f"layer {n!r} has alpha={layer.alpha}, rslora={layer.rslora}; "
                                 f"the file alpha={opts['alpha']}, rslora={opts['rslora']}")
    else:
        model = wrap(model, "dora" if dora else "lora", names, **{**opts, **wrap_kwargs})
        layers = adapter_layers(model)
    params = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
              "lora_magnitude_vector": "magnitude"}
    _copy_all([(getattr(layers[n], params[s]), t) for (n, s), t in checked.items()])
    return model


def save_peft_adapter(model: nn.Module, path, tensors: dict | None = None) -> Path:
    """Export the adapters as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    All layers must share method, r, alpha and rsLoRA (PEFT's per-layer patterns are not
    written). Tensors keep the adapters' dtype; both files are written atomically. ``tensors``
    as in :func:`save_adapters`.
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
    given = {k: t.detach().contiguous().cpu() for k, t in _given(layers, tensors).items()}
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
    _write_tensors(folder / PEFT_ADAPTER_FILE, tensors,
                   {"format": "pt", "minidora_peft_config": json.dumps(config)})
    _write_json(folder / PEFT_CONFIG_FILE, config)
    return folder
