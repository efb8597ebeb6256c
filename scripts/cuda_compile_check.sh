#!/usr/bin/env bash
# Compile the whole extension (CPU .cpp sources + the CUDA kernels in csrc/cuda/) against a CUDA
# build of torch, on a machine that has nvcc but needs no GPU. `make cuda-check` runs it; CI calls
# it wherever nvcc exists, so CUDA code that no test can run still never rots.
#
# What it does:
#   1. creates (or reuses) the venv .venv-cuda with torch==2.14.1 (CUDA 13.0 build, ~5.5 GB),
#      setuptools, ninja and numpy; the project's own .venv (torch 2.13.0 CPU) is left alone;
#   2. builds minidora._C with MINIDORA_FORCE_CUDA=1 for TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
#      into a temporary folder (never in place: minidora/_C*.so belongs to the CPU build);
#   3. checks the library holds the CUDA kernels, then loads it into torch and checks that every
#      op has a CUDA kernel registered (this also checks the C++ signatures against the schemas).
#
# Cost measured on the 2-core development machine: venv install about 1 min (from the local
# package cache), build about 2.5 min with MAX_JOBS=2 (see docs/bench-cuda.md). Exits 0 with
# "skipped: nvcc not found" when there is no nvcc; non-zero on any compile or check error.
# Environment: PYTHON (default python3), CUDA_VENV (default .venv-cuda), MAX_JOBS (default 2),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), KEEP_BUILD=1 keeps the temporary build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

if ! command -v nvcc >/dev/null 2>&1; then
    echo "cuda-check: skipped: nvcc not found"
    exit 0
fi

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -d "$CUDA_HOME" ]; then
    echo "cuda-check: CUDA_HOME=$CUDA_HOME does not exist (set CUDA_HOME to the CUDA toolkit)" >&2
    exit 1
fi

PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-.venv-cuda}"
TORCH_VERSION=2.14.1
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
    echo "cuda-check: installing torch==$TORCH_VERSION (CUDA build) into $VENV"
    t0=$SECONDS
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" setuptools ninja numpy
    echo "cuda-check: venv ready in $((SECONDS - t0)) s"
fi
"$PY" -c "import setuptools, ninja, numpy" 2>/dev/null || "$PY" -m pip install -q setuptools ninja numpy

SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NV_INCLUDE="$SITE/nvidia/cu13/include"   # cublas / cusparse headers of the torch wheel
if [ ! -d "$NV_INCLUDE" ]; then
    echo "cuda-check: $NV_INCLUDE is missing (expected from torch==$TORCH_VERSION's nvidia packages)" >&2
    exit 1
fi
export CPLUS_INCLUDE_PATH="$NV_INCLUDE${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"   # ninja from the venv
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export MINIDORA_FORCE_CUDA=1
unset MINIDORA_NO_CUDA MINIDORA_NATIVE

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/minidora-cuda-check.XXXXXX")
if [ "${KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$BUILD"' EXIT; fi
echo "cuda-check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $("$PY" -c 'import torch; print(torch.__version__)'), arch list $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
echo "cuda-check: building into $BUILD"
t0=$SECONDS
if ! "$PY" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" > "$BUILD/build.log" 2>&1; then
    grep -E -B2 -A6 "error|Error" "$BUILD/build.log" | head -80 >&2 || tail -60 "$BUILD/build.log" >&2
    echo "cuda-check: FAILED to compile (full log: $BUILD/build.log)" >&2
    trap - EXIT
    exit 1
fi
echo "cuda-check: built in $((SECONDS - t0)) s"

SO=$(find "$BUILD/lib" -name '_C*.so' | head -1)
if [ -z "$SO" ]; then
    echo "cuda-check: FAILED: no _C*.so under $BUILD/lib" >&2
    exit 1
fi
nm "$SO" > "$BUILD/symbols.txt"   # (not piped into grep -q: that would break nm's pipe)
for kernel in dequant_vec_kernel dequant_elem_kernel linear_rows_kernel linear_mma_kernel \
        grad_input_kernel sum_splits_kernel; do
    if ! grep -q "minidora4cuda[0-9]*${kernel}I" "$BUILD/symbols.txt"; then
        echo "cuda-check: FAILED: $SO has no CUDA kernel $kernel" >&2
        exit 1
    fi
done

# Load the library into the CUDA torch (no GPU needed) and check the registrations.
"$PY" - "$SO" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
for op in ("nf4_dequantize", "nf4_linear", "nf4_linear_grad_input"):
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"minidora::{op}", key):
            sys.exit(f"cuda-check: FAILED: minidora::{op} has no {key} kernel")
print("cuda-check: minidora::{nf4_dequantize, nf4_linear, nf4_linear_grad_input} have CPU and CUDA kernels")
EOF
echo "cuda-check: OK ($(du -h "$SO" | cut -f1) library, total $((SECONDS - start)) s)"
