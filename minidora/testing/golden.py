"""The golden vectors that ship with minidora, loaded lazily from one place.

They were produced by the libraries everyone compares with (bitsandbytes 0.50.2 for NF4, PEFT
0.21.2 for the adapters, on torch 2.13.0; see ``golden/VERSIONS.json``) and are package data, so
a clone or a ``pip install`` can test without anything beside it. ``tools/make_golden.py``
recomputes every output in them from their inputs with those libraries, and
``tests/test_golden.py`` compares the two, so anyone can see where each number came from
(docs/verify.md, "Where the numbers come from").

Files are read on first use (never at import) with ``allow_pickle=False``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

__all__ = ["ROOT", "path", "nf4_bitsandbytes", "adapters_peft", "nf4_cases", "peft_cases",
           "peft_dir"]

ROOT = Path(__file__).resolve().parent / "golden"


def path(*parts: str) -> Path:
    """The path of a shipped golden file, e.g. ``path("peft", "llama_base")``."""
    p = ROOT.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(
            f"golden file {str(p)!r} is missing: minidora's package data is incomplete "
            "(reinstall minidora, or check out the whole repository)")
    return p


def _load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(path(name), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@cache
def nf4_bitsandbytes() -> dict[str, np.ndarray]:
    """``nf4_bitsandbytes.npz`` as a dict: ``nf4_codebook``, ``dynamic_map`` and per case
    ``NAME.input``, ``NAME.dtype``, ``NAME.blocksize``, ``NAME.packed``, ``NAME.absmax``,
    ``NAME.dequantized`` and ``NAME.dq.{absmax_codes, nested_absmax, offset, dequantized}``."""
    return _load_npz("nf4_bitsandbytes.npz")


@cache
def adapters_peft() -> dict[str, np.ndarray]:
    """``adapters_peft.npz`` as a dict: float64 cases ``lora``, ``lora_rslora``, ``dora``,
    ``dora_rslora`` with ``KEY.W0``, ``KEY.x``, ``KEY.y``, ``KEY.grad_*``, ``KEY.merged_*``..."""
    return _load_npz("adapters_peft.npz")


def nf4_cases() -> list[str]:
    """Names of the NF4 cases, e.g. ``["w256x512_bf16", "w33x77_f32_odd", ...]``."""
    return sorted({k.split(".")[0] for k in nf4_bitsandbytes() if "." in k})


def peft_cases() -> list[str]:
    """Names of the adapter cases: ``["dora", "dora_rslora", "lora", "lora_rslora"]``."""
    return sorted({k.split(".")[0] for k in adapters_peft()})


def peft_dir() -> Path:
    """The folder of PEFT adapter files and tiny Hugging Face models (``peft/README.md``)."""
    return path("peft")
