"""mkdocs hook: let the tutorials execute at build time without installing the package.

mkdocs-jupyter runs each tutorial in a Jupyter kernel started by this process; the kernel
inherits our environment. So we put the repository root on PYTHONPATH (``import minidora``
finds the checkout, with its compiled extension when built) and choose the tutorial size:
``MINIDORA_TUTORIAL_SIZE=small mkdocs build --strict`` renders the quick versions; the
default is the full size, as a reader running them would see them.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_config(config, **kwargs):
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("MINIDORA_TUTORIAL_SIZE", "default")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures inline
    return config
