"""Build the compiled extension ``minidora._C``, or none (a pure-Python install).

C++ CPU kernels always build. CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit is found (``CUDA_HOME`` or ``nvcc`` on PATH), unless ``MINIDORA_NO_CUDA=1``.
Set ``MINIDORA_FORCE_CUDA=1`` to require them (fails loudly instead of skipping).
``MINIDORA_NATIVE=1`` adds ``-march=native`` (only for a binary that runs where it was built).

``MINIDORA_NO_EXTENSION=1`` builds no extension at all: a pure-Python install that runs every
method on the plain PyTorch reference path (asking for the compiled ops then says how to build).
It never imports torch, and its metadata asks for any torch from ``TORCH_PURE`` on, so it keeps
the torch an environment already has. A compiled install is pinned to the torch it was compiled
against (the build environment's, ``TORCH_TESTED`` through tools/build_backend.py).
"""

import glob
import os
import sys

from setuptools import setup

TORCH_TESTED = "2.13.0"  # the torch of the compiled extension; keep tools/build_backend.py equal
# The oldest torch the pure-Python path supports: the newest torch API it uses is
# torch.compiler.is_compiling (minidora/dora.py, torch 2.3). CI tests it with 2.13.0 and 2.14.1.
TORCH_PURE = "torch>=2.4"
REQUIRES = ["numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60", "matplotlib>=3.7"]
NO_EXTENSION = os.environ.get("MINIDORA_NO_EXTENSION") == "1"
# Commands that only describe the package (metadata, source distribution): no torch needed.
METADATA_ONLY = ("egg_info", "dist_info", "sdist")


def _metadata_only() -> bool:
    commands = [a for a in sys.argv[1:] if not a.startswith("-")]
    return not commands or commands[0] in METADATA_ONLY


def _import_torch():
    """torch, or None when it is missing and only metadata is asked for."""
    try:
        import torch
    except ImportError:
        if _metadata_only():
            return None
        sys.exit("setup.py: building minidora._C needs torch in the build environment (pip "
                 f"install torch=={TORCH_TESTED} setuptools wheel ninja; then pip install "
                 "--no-build-isolation ...); or set MINIDORA_NO_EXTENSION=1 for a pure-Python "
                 "install that compiles nothing")
    return torch


def _want_cuda(torch) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("MINIDORA_NO_CUDA") == "1":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MINIDORA_FORCE_CUDA") == "1" and not have:
        raise RuntimeError("MINIDORA_FORCE_CUDA=1 but torch is not a CUDA build or no CUDA toolkit "
                           f"was found (torch.version.cuda={torch.version.cuda}, "
                           f"CUDA_HOME={CUDA_HOME})")
    return have


def extensions(torch) -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension picks the C++ standard its headers need
    if os.environ.get("MINIDORA_NATIVE") == "1":
        cxx.append("-march=native")
    args = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"])
    if _want_cuda(torch):
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        args["nvcc"] = ["-O3"]
        return [CUDAExtension("minidora._C", sources, extra_compile_args=args, **kwargs)]
    return [CppExtension("minidora._C", sources, extra_compile_args=args, **kwargs)]


def main() -> None:
    if NO_EXTENSION:
        setup(install_requires=[TORCH_PURE, *REQUIRES])
        return
    torch = _import_torch()
    if torch is None:
        setup(install_requires=[f"torch=={TORCH_TESTED}", *REQUIRES])
        return
    from torch.utils.cpp_extension import BuildExtension

    version = torch.__version__.split("+")[0]  # the public version: 2.13.0+cpu is 2.13.0
    if version != TORCH_TESTED:
        print(f"setup.py: warning: compiling minidora._C against torch {version}; minidora is "
              f"tested with torch {TORCH_TESTED}. The install will require torch=={version}.",
              file=sys.stderr)
    setup(install_requires=[f"torch=={version}", *REQUIRES], ext_modules=extensions(torch),
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


main()
