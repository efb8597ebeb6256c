"""FSDP2 or DDP around a wrapped model: PyTorch's own engines, nothing else.

- **FSDP2** (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim 0, the 4-bit
  base included: the packed NF4 codes (and double quantization's uint8 scale codes) are frozen
  uint8 parameters, so each rank keeps 1 / world_size of them and the all-gather before a layer's
  forward moves bytes, bit for bit. The float32 scales, nested scales and offset are buffers:
  FSDP2 leaves buffers alone, on every rank whole, and a ``MixedPrecisionPolicy(param_dtype=
  torch.bfloat16)`` never casts them (it casts floating-point parameters only; integer ones are
  never cast either). A size that does not divide by the world size is padded by FSDP2.
- **DDP** (``DistributedDataParallel``) replicates the whole model on every rank (parameters and
  buffers broadcast from rank 0 once, at the start) and averages the adapters' gradients.

Each adapter layer is one FSDP2 unit (its base and its adapter are gathered together just
before it runs); by default the root unit holds the rest (embeddings, norms). A Hugging Face
checkpoint loaded by :mod:`~minidora.apps.train.load` also makes its embeddings and its output
head units of their own.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn

from minidora import NF4Linear, adapter_layers

__all__ = ["STRATEGIES", "parallelize", "local_bytes", "nf4_digest", "unwrap"]

STRATEGIES = ("fsdp2", "ddp")


def parallelize(model: nn.Module, strategy: str, mixed_precision: str = "none",
                units: list[nn.Module] | None = None, offload: bool = False) -> nn.Module:
    """Shard (FSDP2) or replicate (DDP) a model wrapped by :func:`minidora.wrap`.

    Args:
        model: the wrapped model, the same on every rank (same base, same adapters).
        strategy: ``"fsdp2"`` or ``"ddp"``.
        mixed_precision: ``"none"`` or ``"bf16"`` (FSDP2 only): compute with bfloat16 copies of
            the floating-point parameters, reduce gradients in float32; the NF4 codes and scales
            are left as they are.
        units: modules (or lists of modules sharing parameters) to shard as FSDP2 units before
            the root (default: every adapter layer).
        offload: FSDP2's ``CPUOffloadPolicy``: the shards, their gradients and so the optimizer
            state live in CPU memory; each unit's parameters are copied to the device just before
            it runs (pinned memory when CUDA is there). FSDP2 only.

    Returns:
        The module to call: the model itself under FSDP2 (sharded in place), the DDP wrapper
        under DDP (:func:`unwrap` gives the model back).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if mixed_precision not in ("none", "bf16"):
        raise ValueError(f"mixed_precision must be 'none' or 'bf16', got {mixed_precision!r}")
    if not adapter_layers(model):
        raise ValueError("model has no minidora adapter layers; call minidora.wrap first")
    if strategy == "ddp":
        if offload:
            raise ValueError("offload is FSDP2's CPUOffloadPolicy; DDP keeps every rank's model "
                             "on its device (use strategy 'fsdp2')")
        if mixed_precision != "none":
            raise ValueError("mixed_precision 'bf16' is FSDP2's MixedPrecisionPolicy; DDP runs "
                             "the model in its own dtype (use strategy 'fsdp2')")
        # The buffers (NF4 scales) are synced once, here; broadcasting them before every forward
        # (DDP's default) would move the frozen scales again at each step.
        return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # pin_memory needs an accelerator; on a CPU-only machine the policy still runs its path.
    place = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for unit in (units if units is not None else adapter_layers(model).values()):
        fully_shard(unit, mp_policy=policy, offload_policy=place)
    return fully_shard(model, mp_policy=policy, offload_policy=place)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (an FSDP2 model is its own)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its FSDP2 shards, or everything)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            local = _local(t)
            total += local.numel() * local.element_size()
    return total


@torch.no_grad()
def nf4_digest(model: nn.Module) -> str:
    """SHA-256 of every NF4 layer's full bytes (codes, scale codes, scales, offset), gathered from
    the shards under FSDP2: equal on every rank exactly when the frozen base is. A collective
    under FSDP2: every rank must call it."""
    h = hashlib.sha256()
    for name, m in unwrap(model).named_modules():
        if isinstance(m, NF4Linear):
            for key in ("packed", "absmax", "nested_absmax", "offset"):
                t = getattr(m, key)
                if t is None:
                    continue
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                h.update(f"{name}.{key}:{full.dtype}:{tuple(full.shape)}".encode())
                h.update(full.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_on_every_rank(text: str) -> bool:
    """True when ``text`` is the same string on every rank (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    texts = [None] * dist.get_world_size()
    dist.all_gather_object(texts, text)
    return len(set(texts)) == 1
