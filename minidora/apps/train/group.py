"""Joining and leaving the process group: one process or many, the same code.

``torchrun`` (``torch.distributed.run``) starts one process per rank and gives each the
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. A plain
``python`` process has none of them and runs as a group of one (gloo over an in-memory store, so
FSDP2 and DDP take the same path at world size 1).

The backend follows the device: gloo on the CPU, NCCL when the process has a CUDA device
(``LOCAL_RANK`` picks it). Every collective, and the rendezvous itself, is bounded by
``timeout``: a missing process is an error that says so, not a hang. :func:`leave` ends every
run, good or bad: a barrier when all went well, then ``destroy_process_group``, so no process
exits with a live group (which ends in a SIGABRT with NCCL, and a warning with gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Group", "join", "leave", "from_env", "DistributedError", "ENV"]

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A problem with the group itself (rendezvous, environment): one line names it."""


@dataclass(frozen=True)
class Group:
    """Where this process stands: ``rank`` of ``world_size``, on ``device`` with ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def name(self) -> str:
        """``rank 1 of 2``: the prefix of every message a rank prints."""
        return f"rank {self.rank} of {self.world_size}"


def _env_int(name: str, lo: int) -> int:
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"${name}={text!r}; expected an integer >= {lo}") from None
    if value < lo:
        raise DistributedError(f"${name}={value}; expected an integer >= {lo}")
    return value


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) when none is set."""
    present = [k for k in ENV if k in os.environ]
    if not present:
        return 0, 1, 0
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise DistributedError(
            f"missing rendezvous: ${', $'.join(present)} set but ${', $'.join(missing)} not; "
            "start every process with torchrun, or set all of " + ", ".join(ENV))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if rank >= world:
        raise DistributedError(f"$RANK={rank}; expected 0..{world - 1} ($WORLD_SIZE={world})")
    local = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else 0
    return rank, world, local


def join(timeout: float = 600.0, device: str = "auto") -> Group:
    """Initialize the default process group (or check the one already there).

    Args:
        timeout: seconds the rendezvous and every collective may wait for the other ranks.
        device: ``"auto"`` (CUDA device ``LOCAL_RANK`` when CUDA is available, else the CPU),
            ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`Group` of this process.

    Raises:
        DistributedError: incomplete torchrun variables, or a rendezvous the other processes
            never joined within ``timeout`` (the message names the address and world size).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    rank, world, local = from_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError("device 'cuda' asked for, but this torch sees no CUDA device")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        wait = timedelta(seconds=timeout)
        try:
            if world == 1 and "MASTER_ADDR" not in os.environ:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=wait)
            else:
                dist.init_process_group(backend, rank=rank, world_size=world, timeout=wait)
        except (RuntimeError, ValueError) as e:       # torch's DistStoreError is a RuntimeError
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DistributedError(
                f"rendezvous: rank {rank} of {world} did not meet the other processes at "
                f"{where} within {timeout:g} s ({first}); are all {world} processes started "
                "with the same MASTER_ADDR and MASTER_PORT?") from None
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise DistributedError(f"a process group of {dist.get_world_size()} is already set up, "
                               f"but the environment says rank {rank} of {world}")
    return Group(rank, world, local, dev, backend)


def leave(ok: bool) -> None:
    """End the group: a barrier when this rank finished well (so no rank tears down while
    another still writes), then ``destroy_process_group``. Safe to call when no group exists."""
    if not dist.is_initialized():
        return
    try:
        if ok and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
