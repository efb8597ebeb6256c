"""Module plumbing shared by the adapter layers, kept out of the method files.

- ``merged`` travels with ``state_dict`` (key ``<layer>.merged``, a bool tensor): loading a merged
  model's state into a freshly wrapped one must not apply the adapter a second time, and a state
  without the key (older files) loads its base weights as unmerged.
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
        """The merged flag follows what is loaded: ``<prefix>merged``, or False when that key is
        absent (older files and adapter-only states hold unmerged layers). A merged base weight
        is meaningful only with the adapter that was merged into it: a state that would leave
        this layer merged, or make it merged, without holding the base's weights is refused
        (``load_state_dict`` raises; this layer is left as it was)."""
        mine = any(k.startswith(prefix) for k in state_dict)
        flag = state_dict.pop(prefix + "merged", None)    # absent in older state dicts
        if flag is not None and (not isinstance(flag, torch.Tensor) or flag.numel() != 1
                                 or flag.is_floating_point()):
            error_msgs.append(f"{prefix}merged must be a one-element bool tensor, got {flag!r}")
            return
        base = [prefix + "base." + k for k in self.base.state_dict()]
        has_base = all(k in state_dict for k in base)
        wants = flag is not None and bool(flag.item())
        if mine and (self.merged or wants) and not has_base:
            how = "unmerge it first (minidora.unmerge)" if self.merged else "load the whole state"
            error_msgs.append(f"layer {prefix[:-1]!r} {'is' if self.merged else 'would be'} "
                              f"merged but the state does not hold its base weights "
                              f"({', '.join(base)}): a merged weight belongs with the adapter "
                              f"merged into it; {how}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if flag is not None or has_base:
            self.merged, self._unmerge_state = wants, None

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
