"""Whole-model API: wrap linear layers with LoRA / DoRA / QLoRA / QDoRA, report, merge, save, load.

``wrap(model, "qdora", ["q_proj", "v_proj"])`` replaces the chosen linear layers in place by
:class:`~minidora.dora.DoRALinear` over an :class:`~minidora.nf4_linear.NF4Linear` (quantized
from their weights), freezes everything else, and returns the model.

**Choosing layers** (``target_modules``):

- a list (or tuple/set) of names: an entry matches a module whose full name equals it or ends
  with ``"." + entry`` (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``;
  ``"layers.0.mlp.up_proj"`` matches only that one);
- a single string: a regular expression that must match the full name (``re.fullmatch``),
  e.g. ``r".*\\.(q|v)_proj"``.

Only linear layers are candidates: ``nn.Linear``, an existing ``NF4Linear``, and Hugging Face's
GPT-2 ``Conv1D`` (weight stored [in, out], "fan_in_fan_out"; it becomes an ``nn.Linear`` with
the transposed weight, which computes the same function). A list entry that matches nothing is
an error that lists the linear layers the model has.

Adapter files are safetensors (never pickle) plus a JSON config next to them; PEFT's
``adapter_model.safetensors`` + ``adapter_config.json`` can be imported and exported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .dora import DoRALinear
from .lora import LoRALinear
from .nf4_linear import NF4Linear

__all__ = ["wrap", "report", "Report", "merge", "unmerge", "adapter_layers", "save_adapters",
           "load_adapters", "load_peft_adapter", "save_peft_adapter", "load_bnb_nf4_linears",
           "METHODS"]

METHODS = ("lora", "dora", "qlora", "qdora")
_PEFT_PREFIX = "base_model.model."


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's transformers.pytorch_utils.Conv1D (GPT-2), without importing transformers."""
    return (type(m).__name__ == "Conv1D" and hasattr(m, "nf")
            and getattr(m, "weight", None) is not None)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear)) or _is_conv1d(m)}


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA/DoRA layer of the model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _select(model: nn.Module, target_modules) -> list[str]:
    linears = _linear_modules(model)
    if isinstance(target_modules, str):
        chosen = [n for n in linears if re.fullmatch(target_modules, n)]
        entries_missing = [] if chosen else [target_modules]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules and all(
            isinstance(t, str) and t for t in target_modules):
        hit = {t: [n for n in linears if n == t or n.endswith("." + t)] for t in target_modules}
        entries_missing = [t for t, ns in hit.items() if not ns]
        chosen = [n for n in linears if any(n in ns for ns in hit.values())]
    else:
        raise TypeError("target_modules must be a regex string or a non-empty list of module "
                        f"names, got {target_modules!r}")
    if entries_missing:
        names = list(linears)
        shown = ", ".join(names[:60])
        if len(names) > 60:
            shown += f", ... ({len(names) - 60} more)"
        raise ValueError(f"target_modules entr{'y' if len(entries_missing) == 1 else 'ies'} "
                         f"{entries_missing} match no linear layer; the model's linear layers "
                         f"are: [{shown or 'none'}]")
    return chosen


def _as_linear(m: nn.Module) -> nn.Module:
    if not _is_conv1d(m):
        return m
    w = m.weight.detach()                                              # [in, out]
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.T)                                          # [out, in]
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    lin.fan_in_fan_out = True   # remembered for PEFT export
    return lin


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap(model: nn.Module, method: str, target_modules: str | list[str] | tuple[str, ...],
         r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
         init: str = "kaiming",
         detach_norm: bool = True, blocksize: int = 64, double_quant: bool = True,
         compute_dtype: torch.dtype = torch.bfloat16,
         adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Adapt the chosen linear layers of ``model`` in place and freeze everything else.

    Args:
        model: any module holding the target linear layers.
        method: ``"lora"``, ``"dora"``, ``"qlora"`` or ``"qdora"`` (the q-methods quantize the
            targets' weights to NF4 with ``blocksize``, ``double_quant``, ``compute_dtype``;
            lora/dora over a layer that is already an ``NF4Linear`` also give QLoRA/QDoRA).
        target_modules: names, suffixes or a regex (see the module docstring).
        r: rank (>= 1).
        alpha: scale numerator (> 0); s = alpha / r, or alpha / sqrt(r) with ``rslora``.
        dropout: dropout probability on the adapters' input, in [0, 1).
        rslora: use s = alpha / sqrt(r).
        init: ``"kaiming"`` or ``"gaussian"`` initialisation of A (B starts at zero).
        detach_norm: DoRA's norm treated as a constant in backward (paper sec. 4.3).
        blocksize: NF4 block size for the q-methods (power of two, 32..4096).
        double_quant: quantize the NF4 scales too (QLoRA's DQ).
        compute_dtype: dtype of the NF4 base's matmul (bfloat16, float16, float32, float64).
        adapter_dtype: dtype of A, B and m (float32; float64 for checks).

    Returns:
        The same model (or the new layer when ``model`` itself is the one linear target).
        :func:`report` describes it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    existing = adapter_layers(model)
    if existing:
        raise ValueError(f"model is already wrapped ({len(existing)} adapter layers, e.g. "
                         f"{next(iter(existing))!r}); wrap a fresh model")
    cls = DoRALinear if method.endswith("dora") else LoRALinear
    extra = {"detach_norm": detach_norm} if cls is DoRALinear else {}
    chosen = _select(model, target_modules)
    new_layers = {}
    for name in chosen:       # build every layer first, so bad options leave the model untouched
        base = _as_linear(model.get_submodule(name))
        if method.startswith("q") and not isinstance(base, NF4Linear):
            base = NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant,
                                         compute_dtype=compute_dtype)
        new_layers[name] = cls(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                               adapter_dtype=adapter_dtype, **extra)
    if "" in new_layers:
        model = new_layers.pop("")
    for name, layer in new_layers.items():
        _set_module(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for p in (layer.lora_A, layer.lora_B, getattr(layer, "magnitude", None)):
            if p is not None:
                p.requires_grad_(True)
    model.minidora_method = method
    return model


# --- report ------------------------------------------------------------------------------

@dataclass
class Report:
    """Parameter counts and weight memory of a (wrapped) model.

    ``total_params`` counts an NF4 weight as its out x in logical parameters; ``weight_bytes``
    is the real storage of every parameter and buffer (packed 4-bit codes, scales, caches).
    """

    method: str | None
    adapted_layers: int
    trainable_params: int
    total_params: int
    weight_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)

    def __str__(self) -> str:
        return (f"method: {self.method or 'none'} | adapted layers: {self.adapted_layers} | "
                f"trainable params: {self.trainable_params:,} / {self.total_params:,} "
                f"({self.trainable_percent:.3f}%) | weight memory: "
                f"{self.weight_bytes / 2**20:,.2f} MiB")


def report(model: nn.Module) -> Report:
    """Count trainable and total parameters and the bytes that hold the weights (a tensor shared
    by several modules, such as tied embeddings, counts once)."""
    trainable = total = nbytes = 0
    seen = set()
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        bufs = [b for b in m.buffers(recurse=False) if id(b) not in seen]
        seen.update(map(id, own + bufs))
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        else:
            total += sum(p.numel() for p in own)
        trainable += sum(p.numel() for p in own if p.requires_grad)
        nbytes += sum(t.numel() * t.element_size() for t in own + bufs)
    return Report(getattr(model, "minidora_method", None), len(adapter_layers(model)),
                  trainable, total, nbytes)


# --- merge -------------------------------------------------------------------------------------

def merge(model: nn.Module) -> dict[str, float]:
    """Merge every adapter into its base weight. Returns {layer name: relative weight error}
    (0.0 for a float32/float64 dense base; the re-quantization error for an NF4 base)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to merge; call minidora.wrap first")
    return {n: layer.merge() for n, layer in layers.items()}


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every merged adapter layer."""
    for layer in adapter_layers(model).values():
        if layer.merged:
            layer.unmerge()


# --- minidora adapter files --------------------------------------------------------------

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


def save_adapters(model: nn.Module, path) -> Path:
    """Write only the adapters: ``path`` (safetensors) and ``path`` with suffix ``.json``.

    Returns:
        The path of the JSON config.
    """
    import minidora

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to save; call minidora.wrap first")
    path = Path(path)
    tensors = {f"{n}.{k}": t.detach().contiguous().cpu()
               for n, layer in layers.items() for k, t in _adapter_tensors(layer).items()}
    config = {"format": "minidora-adapters", "minidora_version": minidora.__version__,
              "method": _method_of(layers),
              "layers": {n: _layer_config(layer) for n, layer in layers.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"minidora_config": json.dumps(config)})
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(config, indent=2) + "\n")
    return json_path


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into a model wrapped the same way.

    Method, layer names, ranks, scalings and shapes must all agree; any mismatch raises a
    ValueError naming it. Reads safetensors and JSON only (nothing is unpickled).
    """
    path = Path(path)
    json_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    if json_path.is_file():
        config = json.loads(json_path.read_text())
    else:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("minidora_config", "null"))
    if (not isinstance(config, dict) or config.get("format") != "minidora-adapters"
            or not isinstance(config.get("layers"), dict) or "method" not in config):
        raise ValueError(f"{str(json_path)!r} is not a minidora adapter config (expected the JSON "
                         "that save_adapters writes, with 'format', 'method' and 'layers')")
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
    for n, layer in layers.items():
        want, got = config["layers"][n], _layer_config(layer)
        for key in ("kind", "r", "alpha", "rslora", "in_features", "out_features"):
            if not isinstance(want, dict) or want.get(key) != got[key]:
                have = want.get(key) if isinstance(want, dict) else want
                raise ValueError(f"layer {n!r}: the file has {key}={have!r}, "
                                 f"the model has {key}={got[key]!r}")
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, layer in layers.items():
            if layer.merged:
                raise ValueError(f"layer {n!r} is merged; unmerge before loading adapters")
            for k, p in _adapter_tensors(layer).items():
                t = tensors.get(f"{n}.{k}")
                if t is None or tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"tensor {n}.{k}: expected shape {tuple(p.shape)}, got "
                                     f"{None if t is None else tuple(t.shape)}")
                p.copy_(t)
    return model


# --- PEFT adapter files ------------------------------------------------------------------------

def load_peft_adapter(model: nn.Module, path, **wrap_kwargs) -> nn.Module:
    """Import a PEFT LoRA/DoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    An unwrapped model is wrapped first (targets: exactly the modules named in the file; method
    lora or dora, over whatever base each target is: an ``NF4Linear`` gives QLoRA/QDoRA);
    ``wrap_kwargs`` go to :func:`wrap` (e.g. ``compute_dtype``). Keys are
    ``base_model.model.<module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r] and for DoRA
    ``.lora_magnitude_vector`` [out]. GPT-2's Conv1D ("fan_in_fan_out") is handled.

    Returns:
        The model (the same object) with the adapter weights loaded.
    """
    path = Path(path)
    cfg_path, st_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(f"PEFT adapter file {str(p)!r} does not exist")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"PEFT {key} (per-layer ranks/alphas) is not supported, "
                             f"got {cfg[key]}")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise ValueError("PEFT adapters with trained biases (bias / lora_bias) are not supported")
    method = "dora" if cfg.get("use_dora") else "lora"
    tensors = load_file(str(st_path))
    bad = [k for k in tensors if not k.startswith(_PEFT_PREFIX)]
    if bad:
        raise ValueError(f"keys must start with {_PEFT_PREFIX!r} (PEFT ignores others), "
                         f"got {bad[:3]}")
    names = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_A.weight", 1)[0]
                    for k in tensors if k.endswith(".lora_A.weight")})
    if not names:
        raise ValueError(f"{str(st_path)!r} holds no '.lora_A.weight' tensors")
    if not adapter_layers(model):
        opts = dict(r=cfg["r"], alpha=cfg["lora_alpha"], rslora=bool(cfg.get("use_rslora")),
                    dropout=float(cfg.get("lora_dropout") or 0.0))
        model = wrap(model, method, names, **{**opts, **wrap_kwargs})
    layers = adapter_layers(model)
    if sorted(layers) != names:
        raise ValueError(f"the model's adapter layers {sorted(layers)} differ from the file's "
                         f"{names}")
    with torch.no_grad():
        for n, layer in layers.items():
            if isinstance(layer, DoRALinear) != (method == "dora"):
                raise ValueError(f"layer {n!r} is {type(layer).__name__} but the file is {method}")
            if layer.r != cfg["r"]:
                raise ValueError(f"layer {n!r} has r={layer.r}, the file r={cfg['r']}")
            if bool(cfg.get("fan_in_fan_out")) != getattr(layer.base, "fan_in_fan_out", False):
                raise ValueError(f"layer {n!r}: fan_in_fan_out={cfg.get('fan_in_fan_out')} in the "
                                 "file does not fit the model's layer (Conv1D <-> Linear)")
            pairs = {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}
            if method == "dora":
                pairs["lora_magnitude_vector"] = layer.magnitude
            for suffix, p in pairs.items():
                t = tensors.get(f"{_PEFT_PREFIX}{n}.{suffix}")
                if t is None or tuple(t.shape) != tuple(p.shape):
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"{_PEFT_PREFIX}{n}.{suffix}: expected shape "
                                     f"{tuple(p.shape)}, got {got}")
                p.copy_(t)
    return model


def save_peft_adapter(model: nn.Module, path) -> Path:
    """Export the adapters as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    All layers must share method, r, alpha and rsLoRA (PEFT's per-layer patterns are not written).
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
    tensors = {}
    for n, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{n}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
        tensors[f"{_PEFT_PREFIX}{n}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
        if kind == "dora":
            tensors[f"{_PEFT_PREFIX}{n}.lora_magnitude_vector"] = (
                layer.magnitude.detach().float().contiguous())
    dropout = {layer.dropout_p for layer in layers.values()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": kind == "dora",
              "lora_dropout": max(dropout), "target_modules": sorted(layers),
              "fan_in_fan_out": fan.pop(), "bias": "none", "init_lora_weights": True,
              "inference_mode": True}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_bnb_nf4_linears(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace each ``nn.Linear`` that ``state_dict`` stores in bitsandbytes' NF4 layout
    (``<name>.weight`` + ``<name>.weight.absmax`` + ``.quant_state.bitsandbytes__nf4``...)
    by an :class:`NF4Linear` holding those exact bytes. Returns the names replaced."""
    done = []
    for name, m in list(model.named_modules()):
        if (isinstance(m, nn.Linear)
                and f"{name}.weight.quant_state.bitsandbytes__nf4" in state_dict):
            layer = NF4Linear.from_bnb_state_dict(state_dict, f"{name}.",
                                                  compute_dtype=compute_dtype)
            if (layer.in_features, layer.out_features) != (m.in_features, m.out_features):
                raise ValueError(f"{name}: the checkpoint holds a {layer.out_features}x"
                                 f"{layer.in_features} weight, the model a {m.out_features}x"
                                 f"{m.in_features} one")
            _set_module(model, name, layer.to(m.weight.device))
            done.append(name)
    return done
