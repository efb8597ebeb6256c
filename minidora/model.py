"""Whole-model API: wrap linear layers with LoRA / DoRA / QLoRA / QDoRA, report, merge, save, load.

``wrap(model, "qdora", ["q_proj", "v_proj"])`` replaces the chosen linear layers in place by
:class:`~minidora.dora.DoRALinear` over an :class:`~minidora.nf4_linear.NF4Linear` (quantized
from their weights), freezes everything else, and returns the model.

**Choosing layers** (``target_modules``):

- a list (or tuple/set) of names: an entry matches a module whose full name equals it or ends
  with ``"." + entry`` (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``;
  ``"layers.0.mlp.up_proj"`` matches only that one);
- a single string: a regular expression that must match the full name (``re.fullmatch``),
  e.g. ``r".*\\.(q|v)_proj"``;
- ``"all-linear"`` (PEFT's shorthand): every linear layer except the output head (the module
  ``get_output_embeddings()`` returns in a Hugging Face model, else one named ``lm_head``).

Only linear layers are candidates: ``nn.Linear``, an existing ``NF4Linear``, and Hugging Face's
GPT-2 ``Conv1D`` (weight stored [in, out], "fan_in_fan_out"; it becomes an ``nn.Linear`` with
the transposed weight, which computes the same function). A list entry that matches nothing is
an error that lists the linear layers the model has.

Adapter files (minidora's folder, PEFT's folder, bitsandbytes' NF4 keys) are read and written
by :mod:`minidora.checkpoint` and :mod:`minidora.bnb_checkpoint` (also exported by ``minidora``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .dora import DoRALinear
from .lora import MERGE_WARN, LoRALinear
from .nf4 import check_float_dtype
from .nf4_linear import NF4Linear

__all__ = ["wrap", "report", "Report", "merge", "unmerge", "merge_and_unload", "cast_adapters",
           "adapter_layers", "METHODS"]

METHODS = ("lora", "dora", "qlora", "qdora")


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


def _output_head(model: nn.Module, linears: dict) -> set[str]:
    """The output layer "all-linear" leaves out: ``get_output_embeddings()`` of a Hugging Face
    model, else a module named ``lm_head``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in linears.items()
            if (head is not None and m is head) or n.rpartition(".")[2] == "lm_head"}


def _select(model: nn.Module, target_modules) -> list[str]:
    linears = _linear_modules(model)
    if target_modules == "all-linear":
        chosen = [n for n in linears if n not in _output_head(model, linears)]
        if not chosen:
            raise ValueError("target_modules='all-linear' matches no linear layer: the model has "
                             f"none besides its output head ({sorted(linears) or 'none'})")
        return chosen
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
        new_layers[name].train(model.get_submodule(name).training)  # eval stays eval (dropout)
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

def _tied_elsewhere(model: nn.Module, name: str, layer: LoRALinear) -> list[str]:
    """Names of parameters outside ``layer`` that are the very tensor of its dense base weight."""
    w = getattr(layer.base, "weight", None)
    if w is None:
        return []
    inside = {f"{name}.{n}" if name else n
              for n, _ in layer.named_parameters(remove_duplicate=False)}
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is w and n not in inside]


def _naming(e: Exception, name: str) -> Exception | None:
    """The same kind of error with the layer's name in front of its message (None if that kind
    cannot be built from a message alone)."""
    try:
        named = type(e)(f"layer {name!r}: {e}")
    except Exception:
        return None
    return named if str(named) == f"layer {name!r}: {e}" else None


def merge(model: nn.Module) -> dict[str, float]:
    """Merge every adapter into its base weight, all or none.

    Returns:
        {layer name: share of the adapter's update the stored weight lost} (see
        :meth:`LoRALinear.merge`): 0.0 for a float32/float64 dense base; for an NF4 base the
        re-quantization can lose most of a small update, and one warning then names the worst
        layers (:func:`merge_and_unload` keeps the update in dense layers instead).

    Raises:
        ValueError: a base weight is tied to another module (e.g. ``lm_head`` and the input
            embeddings): merging would change that module too. Untie it first.
        ValueError, RuntimeError: a layer cannot merge (on the meta device, a merged weight
            the base would store as inf or NaN, ...): the error names the layer, and every
            layer merged before it is unmerged again.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to merge; call minidora.wrap first")
    for n, layer in layers.items():
        tied = _tied_elsewhere(model, n, layer)
        if tied and not layer.merged:
            raise ValueError(f"layer {n!r}: its base weight is also {tied} (tied weights); merging "
                             "would change those too. Untie it first, e.g. "
                             f"model.{n}.base.weight = nn.Parameter(model.{n}.base.weight.clone())")
    errors, done = {}, []
    try:
        for n, layer in layers.items():
            errors[n] = layer.merge(warn=False)
            done.append(layer)
    except BaseException as e:
        for layer in done:                           # all or none
            layer.unmerge()
        named = _naming(e, n) if isinstance(e, Exception) else None
        if named is None:
            raise
        raise named from e
    lossy = sorted(((e, n) for n, e in errors.items() if e > MERGE_WARN), reverse=True)
    if lossy:
        worst = ", ".join(f"{n} {e:.0%}" for e, n in lossy[:3])
        warnings.warn(f"merging lost more than {MERGE_WARN:.0%} of the adapter's update in "
                      f"{len(lossy)} of {len(errors)} layers ({worst}): re-quantizing to NF4 "
                      "rounds a small update away; minidora.merge_and_unload(model) keeps it in "
                      "dense layers", stacklevel=2)
    return errors


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every merged adapter layer."""
    for layer in adapter_layers(model).values():
        if layer.merged:
            layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapter layer by a plain ``nn.Linear`` holding its exact merged weight
    (an NF4 base is dequantized first, so nothing is re-quantized): a model for export or
    inference with no minidora module left in it.

    Args:
        model: a wrapped model (unmerged layers).
        dtype: dtype of the new weights and biases; default: the dense base's dtype, or for an
            NF4 base the dtype its weight was quantized from.

    Returns:
        The model (or the new ``nn.Linear`` when the model itself was the adapter layer).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no minidora adapter layers to merge; call minidora.wrap first")
    new = {}
    for n, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {n!r} is already merged into its base; unmerge it first")
        base = layer.base
        want = dtype or (base.weight_dtype if isinstance(base, NF4Linear) else base.weight.dtype)
        w = layer.merged_weight()                                          # [out, in]
        lin = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                        device=w.device, dtype=want)
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        lin.requires_grad_(False)
        new[n] = lin
    if "" in new:
        return new[""]
    for n, lin in new.items():
        _set_module(model, n, lin)
    return model


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every adapter's trainable tensors (A, B, m) to ``dtype``. ``model.to(dtype)`` leaves
    them as they are on purpose (minidora trains float32 adapters over a bf16 base by default;
    the QLoRA paper trains bf16 ones: cast_adapters(model, torch.bfloat16) matches it)."""
    check_float_dtype(dtype, "dtype")
    for layer in adapter_layers(model).values():
        for p in layer._parameters.values():
            if p is not None:
                p.data = p.data.to(dtype)
    return model

