"""Module plumbing shared by the adapter layers, kept out of the method files.

- ``merged`` travels with ``state_dict`` (key ``<layer>.merged``, a bool tensor): loading a merged
  model's state into a freshly wrapped one must not apply the adapter a second time.
- The trainable adapter tensors keep their dtype under ``module.to(dtype)`` / ``.half()``:
  minidora trains float32 adapters over a bf16 base by default, and a cast of the whole model
  must not silently turn them into bf16 (:func:`minidora.cast_adapters` changes them on purpose).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AdapterModule(nn.Module):
    """Base class of :class:`~minidora.LoRALinear`: state-dict and dtype handling only."""

    merged: bool
    _unmerge_state: dict | None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "merged"] = torch.tensor(self.merged)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        flag = state_dict.pop(prefix + "merged", None)    # absent in older state dicts
        if flag is not None:
            if not isinstance(flag, torch.Tensor) or flag.numel() != 1 or flag.is_floating_point():
                error_msgs.append(f"{prefix}merged must be a one-element bool tensor, got {flag!r}")
            else:
                self.merged, self._unmerge_state = bool(flag.item()), None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not turn trainable adapters into bf16 behind the user's
        # back: they keep their dtype (minidora.cast_adapters changes it on purpose).
        own = {id(t) for p in self._parameters.values() if p is not None
               for t in (p, p.grad) if t is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) not in own or out.dtype == t.dtype:
                return out
            return t.to(device=out.device)          # a cast: follow the device only

        return super()._apply(keep_dtype, recurse)
