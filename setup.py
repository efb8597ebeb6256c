"""Build the compiled extension ``minidora._C``.

C++ CPU kernels always build. CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit is found (``CUDA_HOME`` or ``nvcc`` on PATH), unless ``MINIDORA_NO_CUDA=1``.
Set ``MINIDORA_FORCE_CUDA=1`` to require them (fails loudly instead of skipping).
``MINIDORA_NO_EXTENSION=1`` builds no extension at all: a pure-Python install that runs every
method on the plain PyTorch reference path (asking for the compiled ops then says how to build).
``MINIDORA_NATIVE=1`` adds ``-march=native`` (only for a binary that runs where it was built).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("MINIDORA_NO_CUDA") == "1":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MINIDORA_FORCE_CUDA") == "1" and not have:
        raise RuntimeError("MINIDORA_FORCE_CUDA=1 but torch is not a CUDA build or no CUDA toolkit "
                           f"was found (torch.version.cuda={torch.version.cuda}, "
                           f"CUDA_HOME={CUDA_HOME})")
    return have


def extensions():
    if os.environ.get("MINIDORA_NO_EXTENSION") == "1":
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension picks the C++ standard its headers need
    if os.environ.get("MINIDORA_NATIVE") == "1":
        cxx.append("-march=native")
    args = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"])
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        args["nvcc"] = ["-O3"]
        return [CUDAExtension("minidora._C", sources, extra_compile_args=args, **kwargs)]
    return [CppExtension("minidora._C", sources, extra_compile_args=args, **kwargs)]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
