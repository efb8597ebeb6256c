"""Peak tensor memory of a training step, counted at the PyTorch dispatcher.

Process RSS is no use at this scale (the model is a few MB, the allocator and the torch library
hundreds) and ``tracemalloc`` does not see torch allocations. Instead :class:`PeakTensorMemory`
watches every op that runs while it is active (forward, backward and optimizer step, through a
``TorchDispatchMode``), records each new storage an op returns, and drops it as soon as its
storage is freed (a weak reference to the C++ storage, checked before every op). The peak is
the largest total of live bytes seen at an op boundary, plus the bytes that were already live
when the meter started (the model's weights).

What it counts: weights, activations kept for backward, gradients, optimizer state, and every
temporary an op returns (a dequantized 4-bit weight included). What it cannot see: scratch memory
inside a single compiled kernel, and allocator overhead. Both are the same for every method here,
so the numbers compare methods fairly.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakTensorMemory", "tensor_bytes"]


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class PeakTensorMemory(TorchDispatchMode):
    """Context manager: ``with PeakTensorMemory(existing) as m: step()``; then ``m.peak_bytes``.

    Args:
        existing: tensors already alive when the step starts (parameters, buffers, 4-bit weights);
            their bytes form the baseline and are never counted twice.
    """

    def __init__(self, existing=()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in existing}
        self.baseline_bytes = tensor_bytes(existing)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_bytes = 0
        self.peak_bytes = self.baseline_bytes

    def _purge(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self._live_bytes -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key, n = s.data_ptr(), s.nbytes()
            if n == 0 or key in self._known or key in self._live:
                continue
            self._live[key] = (StorageWeakRef(s), n)
            self._live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.baseline_bytes + self._live_bytes)
        return out
