"""QLoRA and QDoRA past one process: FSDP2 or DDP, launched by ``torchrun``.

``torchrun --nproc_per_node N -m minidora train ...`` (or plain ``python -m minidora train``, a
group of one) trains the adapters of a model with PyTorch's own engines; docs/distributed.md
describes the memory per rank, several hosts and GPUs.

- :mod:`~minidora.apps.train.group`: join and leave the process group (gloo or NCCL by
  device).
- :mod:`~minidora.apps.train.shard`: FSDP2 (sharding the 4-bit base too) or DDP.
- :mod:`~minidora.apps.train.state`: adapter folders from a sharded model, resume points.
- :mod:`~minidora.apps.train.loop`: the loop, equal to one process on the same global batch.
- :mod:`~minidora.apps.train.cli`: the ``train`` subcommand.
"""

from .group import DistributedError, Group, join, leave
from .loop import MODELS, Task, TrainConfig, builtin, split_rows, train
from .shard import STRATEGIES, local_bytes, nf4_digest, parallelize, unwrap
from .state import ResumeError, load_resume, save_adapters, save_resume

__all__ = ["DistributedError", "Group", "join", "leave", "STRATEGIES", "local_bytes",
           "nf4_digest", "parallelize", "unwrap", "ResumeError", "load_resume", "save_adapters",
           "save_resume", "MODELS", "Task", "TrainConfig", "builtin", "split_rows", "train"]
