"""Checkpoints of a sharded run: the adapters alone, and a resume point.

- :func:`save_adapters` gathers the full adapter tensors from the shards (PyTorch's
  ``get_model_state_dict`` with ``full_state_dict=True, cpu_offload=True,
  ignore_frozen_params=True``: the frozen NF4 base is never gathered) and rank 0 writes exactly the
  folder :func:`minidora.save_adapters` writes, plus the PEFT layout in ``peft/``. Any world size
  loads it back with :func:`minidora.load_adapters` before sharding.
- :func:`save_resume` / :func:`load_resume` keep the adapters and the optimizer state with
  ``torch.distributed.checkpoint`` (each rank writes its own shards; a load reshards to the
  current world size) in ``step-NNNNNN/``, and a small JSON, written last and atomically, that
  names the step and the run's settings. A resumed run continues the loss curve exactly.

Every function here is a collective: every rank calls it. An error on rank 0 (a folder it cannot
write) is sent to every rank, so all of them raise it rather than wait.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from minidora import adapter_layers, checkpoint

from .shard import unwrap

__all__ = ["save_adapters", "load_sharded_adapters", "save_resume", "load_resume", "resume_info",
           "RESUME_FILE", "ResumeError"]

RESUME_FILE = "minidora_resume.json"
# What a resume point must share with the run that loads it (the rest may change: the world size,
# FSDP2 or DDP, the number of steps, the learning rate).
MUST_MATCH = ("model", "gpt", "method", "rank", "alpha", "dtype", "seed", "batch_size")


class ResumeError(ValueError):
    """A resume point that does not fit the run: names the field, both values."""


def _adapter_keys(model: nn.Module) -> list[str]:
    return [f"{n}.{k}" for n, layer in adapter_layers(unwrap(model)).items()
            for k in ("lora_A", "lora_B", "magnitude") if getattr(layer, k, None) is not None]


def _on_rank0(fn):
    """Run ``fn`` on rank 0, then raise its error (one line) on every rank, or return None."""
    err = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:        # sent to the other ranks, raised everywhere below
            err = f"{type(e).__name__}: {e}"
    box = [err]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RuntimeError(f"rank 0 could not write the checkpoint: {box[0]}")


def save_adapters(module: nn.Module, folder: Path, peft: bool = True) -> Path:
    """Gather the adapters and write ``folder`` (minidora's layout) and ``folder/peft``.

    Args:
        module: the parallelized model (FSDP2 or DDP) or a plain one.
        folder: the adapter folder, as for :func:`minidora.save_adapters`.
        peft: also write the PEFT layout into ``folder/peft``.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    sd = get_model_state_dict(module, options=opts)       # full tensors on rank 0 only
    keys = _adapter_keys(module)

    def write():
        tensors = {k: sd[k] for k in keys}
        checkpoint.save_adapters(unwrap(module), folder, tensors=tensors)
        if peft:
            checkpoint.save_peft_adapter(unwrap(module), Path(folder) / "peft", tensors=tensors)

    _on_rank0(write)
    return Path(folder)


def load_sharded_adapters(module: nn.Module, folder: Path) -> None:
    """Load an adapter folder (:func:`save_adapters` or :func:`minidora.save_adapters` wrote it,
    at any world size) into a model that is already sharded or replicated: every rank reads the
    small adapter file whole and keeps its shards (``set_model_state_dict`` with
    ``full_state_dict=True``). The layer names and shapes must be the model's (ValueError naming
    the first that is not)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / checkpoint.ADAPTER_FILE
    if not path.is_file():
        raise ValueError(f"--init-adapters: {str(folder)!r} has no {checkpoint.ADAPTER_FILE}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--init-adapters: {str(path)!r} is not readable ({e})") from None
    own = {k: p for k, p in unwrap(module).named_parameters() if k in set(_adapter_keys(module))}
    if set(tensors) != set(own):
        extra, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        raise ValueError(f"--init-adapters: {str(path)!r} does not fit the model: only in the "
                         f"file {extra[:3]}, only in the model {missing[:3]} (another method or "
                         "model?)")
    for k, p in own.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"--init-adapters: {k} has shape {list(tensors[k].shape)} in the "
                             f"file, {list(p.shape)} in the model (another --rank?)")
    set_model_state_dict(module, {k: t.to(own[k].dtype) for k, t in tensors.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def _state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    opts = StateDictOptions(ignore_frozen_params=True)
    msd, osd = get_state_dict(module, opt, options=opts)
    keys = set(_adapter_keys(module))
    return {"model": {k: v for k, v in msd.items() if k in keys}, "optim": osd}


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder, deepest first: after this a crash
    cannot lose any part of it."""
    dirs = [folder]
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        else:
            checkpoint.fsync_path(p)
    for d in reversed(dirs):
        checkpoint.fsync_path(d)


def _write_json(path: Path, obj: dict) -> None:
    """Write ``path`` atomically and durably: a temporary file of this process, flushed, renamed
    over it, and the folder flushed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        checkpoint.fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    checkpoint.fsync_path(path.parent)


def save_resume(module: nn.Module, opt: torch.optim.Optimizer, folder: Path, step: int,
                settings: dict) -> Path:
    """Write the resume point after ``step`` optimizer steps into ``folder``.

    ``settings`` (JSON-ready) is stored beside it; :func:`load_resume` checks the fields of
    :data:`MUST_MATCH` against the run that loads it. The order makes every moment of the save
    a loadable resume point, as durable as the adapters: the new step folder is written and
    flushed to disk (every file, then the folders), then the JSON that names it is replaced
    atomically and flushed, and only then are the older step folders removed.
    """
    folder = Path(folder)
    _on_rank0(lambda: folder.mkdir(parents=True, exist_ok=True))
    name = f"step-{step:06d}"
    dcp.save(_state(module, opt), checkpoint_id=str(folder / name))

    def publish():
        _fsync_tree(folder / name)         # every rank's files (a shared folder), on disk
        checkpoint.fsync_path(folder)
        _write_json(folder / RESUME_FILE, {"format": "minidora-resume", "step": step,
                                           "state": name, "world_size": dist.get_world_size(),
                                           **settings})
        for old in folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        checkpoint.fsync_path(folder)

    _on_rank0(publish)
    return folder / name


def resume_info(folder: Path, settings: dict) -> dict:
    """The resume point's JSON, checked against this run's ``settings`` (every rank reads it).

    Raises:
        ResumeError: no resume point in ``folder``, an unreadable one, or one of another model,
            method, adapter rank, alpha, dtype, seed or batch size (the message names the field).
    """
    path = Path(folder) / RESUME_FILE
    if not path.is_file():
        raise ResumeError(f"--resume: no resume point in {str(folder)!r} (no {RESUME_FILE}; "
                          "runs write one with --save-every)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"--resume: {str(path)!r} is not a JSON file ({e})") from None
    if not isinstance(info, dict) or info.get("format") != "minidora-resume" or not isinstance(
            info.get("step"), int) or not isinstance(info.get("state"), str):
        raise ResumeError(f"--resume: {str(path)!r} is not a minidora resume point")
    for key in MUST_MATCH:
        if info.get(key) != settings.get(key):
            raise ResumeError(f"--resume: the resume point in {str(folder)!r} has "
                              f"{key}={info.get(key)!r}, this run {key}={settings.get(key)!r}")
    if not (Path(folder) / info["state"]).is_dir():
        raise ResumeError(f"--resume: {str(path)!r} names {info['state']!r}, which is missing")
    return info


def load_resume(module: nn.Module, opt: torch.optim.Optimizer, folder: Path,
                settings: dict) -> int:
    """Load the adapters and the optimizer state of the resume point in ``folder`` into the
    parallelized ``module`` and ``opt`` (any world size); returns the step it was written at."""
    info = resume_info(folder, settings)
    state = _state(module, opt)
    dcp.load(state, checkpoint_id=str(Path(folder) / info["state"]))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return info["step"]
