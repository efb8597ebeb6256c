"""QLoRA and QDoRA past one process: FSDP2 or DDP, launched by ``torchrun``.

``torchrun --nproc_per_node N -m minidora train ...`` (or plain ``python -m minidora train``, a
group of one) trains the adapters of a model with PyTorch's own engines; docs/distributed.md
describes the memory per rank, several hosts and GPUs.

- :mod:`~minidora.apps.train.group`: join and leave the process group (gloo or NCCL by
  device).
- :mod:`~minidora.apps.train.shard`: FSDP2 (sharding the 4-bit base too) or DDP.
- :mod:`~minidora.apps.train.load`: a Hugging Face checkpoint read straight into each rank's
  shards, quantized there (no rank ever holds the whole model).
- :mod:`~minidora.apps.train.models`: ``--model smollm2-135m`` or a folder, and its rows.
- :mod:`~minidora.apps.train.synthetic`: synthetic Llama checkpoints of a real model's widths.
- :mod:`~minidora.apps.train.memory`: the memory per rank under FSDP2, term by term.
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
