"""The few lines every tutorial needs before its idea starts.

    from minidora.tutorial import setup
    SMALL, show = setup()

- ``SMALL``: True when ``MINIDORA_TUTORIAL_SIZE=small`` (the quick size the tests run);
  ``default`` is the size the docs show. Any other value is an error.
- ``show(fig, name)``: shows a figure inline in a notebook, also saves it as ``name`` into
  ``MINIDORA_TUTORIAL_FIGDIR`` when that is set, and frees it. Run as a script, nothing opens a
  window.
- one CPU thread and seed 0: these small problems run fastest on one thread, and the numbers in
  the text are the ones a reader gets on the same machine.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["setup"]

SIZES = ("default", "small")


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def show(fig, name: str) -> None:
    """Show ``fig`` inline in a notebook, save it when MINIDORA_TUTORIAL_FIGDIR is set, free it."""
    import matplotlib.pyplot as plt

    folder = os.environ.get("MINIDORA_TUTORIAL_FIGDIR")
    if folder:
        fig.savefig(os.path.join(folder, name), dpi=110, bbox_inches="tight")
    if _in_notebook():
        plt.show()
    plt.close(fig)


def setup(seed: int = 0, threads: int = 1):
    """Read the size switch, pick an off-screen figure backend outside notebooks, fix the thread
    count and the seed. Returns ``(small, show)``."""
    size = os.environ.get("MINIDORA_TUTORIAL_SIZE", "default")
    if size not in SIZES:
        raise ValueError(f"MINIDORA_TUTORIAL_SIZE must be 'default' or 'small', got {size!r}")
    if not _in_notebook():
        import matplotlib

        matplotlib.use("Agg")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return size == "small", show
