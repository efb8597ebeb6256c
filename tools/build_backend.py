"""minidora's build backend: setuptools, with torch in the build environment only when the
compiled extension is built.

pyproject.toml names this module (``backend-path = ["tools"]``); every hook not defined here is
setuptools' own. Building ``minidora._C`` (the default) compiles against torch, so the build
environment gets the torch the extension is pinned to and ninja. A pure-Python build
(``MINIDORA_NO_EXTENSION=1``, see setup.py) compiles nothing and needs neither: on a machine
that already has a torch (a notebook service), ``pip install`` then downloads no torch to build
with, and the wheel's metadata asks for a range of torch versions that the installed one
satisfies.
"""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the hooks not overridden below)

TORCH_PIN = "torch==2.13.0"  # keep equal to TORCH_TESTED in setup.py


def _extension_requires() -> list[str]:
    if os.environ.get("MINIDORA_NO_EXTENSION") == "1":
        return []
    return [TORCH_PIN, "ninja"]


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extension_requires()


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_editable(config_settings) + _extension_requires()
