#!/usr/bin/env bash
# Compile the whole extension (CPU .cpp sources + the CUDA kernels in csrc/cuda/) against a CUDA
# build of torch, on a machine that has nvcc but needs no GPU. `make cuda-check` runs it; CI calls
# it wherever nvcc exists, so CUDA code that no test can run still never rots.
#
# What it does:
#   1. creates (or reuses) the venv .venv-cuda with torch==2.14.1 (CUDA 13.0 build, ~5.5 GB),
#      setuptools, ninja and numpy; the project's own .venv (torch 2.13.0 CPU) is left alone;
#   2. builds minidora._C with MINIDORA_FORCE_CUDA=1 into a temporary folder (never in place:
#      minidora/_C*.so belongs to the CPU build), as one fatbinary for every architecture of
#      TORCH_CUDA_ARCH_LIST; the default, "7.0;7.5;8.0;8.6;9.0" (V100, T4, A100, A10 / RTX 30xx,
#      H100 / H200), keeps the architectures this nvcc can compile: CUDA 13 dropped sm_70, so with
#      nvcc 13 the check covers 7.5;8.0;8.6;9.0 and says so (sm_70 needs a CUDA 12 toolkit; its
#      device code takes the same pre-sm_80 branch as sm_75). An explicit list is used as given,
#      and an architecture nvcc cannot compile is an error;
#   3. checks the build compiled device code for each architecture and the library holds every
#      CUDA kernel, then loads it into torch and checks that every op has a CUDA kernel
#      registered (this also checks the C++ signatures against the schemas).
#
# Cost measured on the 2-core development machine (see docs/bench-cuda.md): venv install about
# 1 min (from the local package cache); build with MAX_JOBS=2: 168 s of CPU for one architecture,
# 212 to 247 s for the default four (6 to 7 min wall while the shared machine was busy; about 3
# to 4 min estimated on idle cores); the sm_70 step about 10 s. Exits 0 with "skipped: nvcc not found" when there is no nvcc;
# non-zero on any compile or check error.
#   4. when this nvcc cannot compile sm_70 (CUDA 13): every kernel of nf4_kernels.cuh, compiled
#      by this nvcc to PTX for compute_75 and retargeted to sm_70, must assemble for sm_70 with
#      the ptxas of CUDA 12.9 (the guard, checked for V100). That ptxas is $PTXAS_SM70 if set,
#      else the one of the wheel nvidia-cuda-nvcc-cu12==12.9.86, installed once into
#      $CUDA_VENV/cuda12-ptxas (about 95 MB); where it cannot be had, the step says so and is
#      skipped.
# Environment: PYTHON (default python3), CUDA_VENV (default .venv-cuda), MAX_JOBS (default 2),
# TORCH_CUDA_ARCH_LIST (default above), KEEP_BUILD=1 keeps the temporary build folder,
# PTXAS_SM70 (step 4).
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

# The architectures: those asked for, checked against what this nvcc can compile.
DEFAULT_ARCHS="7.0;7.5;8.0;8.6;9.0"
NVCC_ARCHS=" $(nvcc --list-gpu-arch | sed -n 's/^compute_\([0-9]*\)$/\1/p' | tr '\n' ' ')"
NVCC_RELEASE=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
ARCHS=""
for arch in $(echo "${TORCH_CUDA_ARCH_LIST:-$DEFAULT_ARCHS}" | tr ';' ' '); do
    num="${arch%%+PTX}"; num="${num//./}"
    if [[ "$NVCC_ARCHS" != *" $num "* ]]; then
        if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
            echo "cuda-check: nvcc $NVCC_RELEASE cannot compile for $arch (sm_$num); it supports $(echo $NVCC_ARCHS | sed "s/\([0-9]*\)/sm_\1/g")" >&2
            exit 1
        fi
        echo "cuda-check: sm_$num left out: nvcc $NVCC_RELEASE does not support it (CUDA 13 dropped sm_70; a CUDA 12 toolkit compiles it)"
        continue
    fi
    ARCHS="${ARCHS:+$ARCHS;}$arch"
done
export TORCH_CUDA_ARCH_LIST="$ARCHS"
export MAX_JOBS="${MAX_JOBS:-2}"
export MINIDORA_FORCE_CUDA=1
unset MINIDORA_NO_CUDA MINIDORA_NATIVE

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/minidora-cuda-check.XXXXXX")
if [ "${KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$BUILD"' EXIT; fi
echo "cuda-check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $("$PY" -c 'import torch; print(torch.__version__)'), arch list $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
echo "cuda-check: building into $BUILD"
t0=$SECONDS
if ! "$PY" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" > "$BUILD/build.log" 2>&1; then
    { grep -E "error( |:)" "$BUILD/build.log" | sed "s/, line [0-9]*;/:/" | grep -v "^RuntimeError\|CalledProcessError" | sort | uniq -c | sort -rn | head -30; } >&2 || true
    tail -5 "$BUILD/build.log" >&2
    echo "cuda-check: FAILED to compile (full log: $BUILD/build.log)" >&2
    trap - EXIT
    exit 1
fi
echo "cuda-check: built in $((SECONDS - t0)) s"

# Device code for every architecture: the nvcc flags torch wrote into the ninja file.
for arch in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
    num="${arch%%+PTX}"; num="${num//./}"
    if ! grep -q "code=sm_$num" "$BUILD/temp/build.ninja"; then
        echo "cuda-check: FAILED: no device code for sm_$num in the build (see $BUILD/temp/build.ninja)" >&2
        exit 1
    fi
done

SO=$(find "$BUILD/lib" -name '_C*.so' | head -1)
if [ -z "$SO" ]; then
    echo "cuda-check: FAILED: no _C*.so under $BUILD/lib" >&2
    exit 1
fi
nm "$SO" > "$BUILD/symbols.txt"   # (not piped into grep -q: that would break nm's pipe)
for kernel in dequant_vec_kernel dequant_elem_kernel linear_ref_kernel linear_rows_kernel \
        linear_mma_kernel grad_input_ref_kernel grad_input_kernel sum_splits_kernel; do
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

PTXAS12_DIR="$VENV/cuda12-ptxas"
if [ -z "${PTXAS_SM70:-}" ] && [[ "$NVCC_ARCHS" != *" 70 "* ]]; then
    PTXAS_SM70="$PTXAS12_DIR/nvidia/cuda_nvcc/bin/ptxas"
    if [ ! -x "$PTXAS_SM70" ]; then
        "$PY" -m pip install -q --no-deps --target "$PTXAS12_DIR" nvidia-cuda-nvcc-cu12==12.9.86 \
            > "$BUILD/ptxas12-install.log" 2>&1 || true
    fi
    if [ ! -x "$PTXAS_SM70" ]; then
        tail -3 "$BUILD/ptxas12-install.log"
        echo "cuda-check: sm_70 assembly check SKIPPED: no CUDA 12 ptxas (pip install nvidia-cuda-nvcc-cu12==12.9.86 failed)"
        PTXAS_SM70=""
    fi
fi
if [ -n "${PTXAS_SM70:-}" ]; then
    cat > "$BUILD/kernels_sm70.cu" <<'CU'
// Every kernel of nf4_kernels.cuh, with template arguments as nf4_cuda.cu launches them.
#include "nf4_kernels.cuh"
namespace minidora::cuda {
#define LINEAR(K, T, DQ, N) \
  template __global__ void K<T, DQ, N>(const T*, const uint4*, Scales, int, const T*, T*, int, \
                                       int64_t, int64_t);
LINEAR(linear_mma_kernel, __nv_bfloat16, true, 1)
LINEAR(linear_mma_kernel, __half, false, 4)
LINEAR(linear_rows_kernel, __nv_bfloat16, true, 16)
LINEAR(linear_rows_kernel, __half, false, 1)
LINEAR(linear_rows_kernel, float, true, 8)
template __global__ void linear_ref_kernel<__half, true>(const __half*, const uint8_t*, Scales, int,
                                                         const __half*, __half*, int, int64_t,
                                                         int64_t);
template __global__ void grad_input_ref_kernel<__nv_bfloat16, false>(
    const __nv_bfloat16*, const uint8_t*, Scales, int, __nv_bfloat16*, int, int64_t, int64_t);
template __global__ void grad_input_kernel<__nv_bfloat16, true, 8>(
    const __nv_bfloat16*, const uint32_t*, Scales, int, float*, int, int64_t, int64_t, int64_t);
template __global__ void dequant_vec_kernel<__nv_bfloat16, true>(const uint4*, Scales, int,
                                                                 int64_t, __nv_bfloat16*);
template __global__ void dequant_elem_kernel<__half, false>(const uint8_t*, Scales, int, int64_t,
                                                            int64_t, __half*);
template __global__ void sum_splits_kernel<__nv_bfloat16>(const float*, int64_t, int64_t,
                                                          __nv_bfloat16*);
}  // namespace minidora::cuda
CU
    nvcc -std=c++17 -arch=compute_75 --ptx -I csrc/cuda "$BUILD/kernels_sm70.cu" -o "$BUILD/k75.ptx"
    sed -e 's/^\.target sm_75/.target sm_70/' -e 's/^\.version .*/.version 8.8/' "$BUILD/k75.ptx" \
        > "$BUILD/k70.ptx"
    if ! "$PTXAS_SM70" -arch=sm_70 "$BUILD/k70.ptx" -o "$BUILD/k70.cubin" 2> "$BUILD/ptxas70.log"; then
        sed 's/line [0-9]*; //' "$BUILD/ptxas70.log" | sort | uniq -c | head -10 >&2
        echo "cuda-check: FAILED: the kernels do not assemble for sm_70 ($PTXAS_SM70)" >&2
        exit 1
    fi
    echo "cuda-check: sm_70: every kernel assembles ($("$PTXAS_SM70" --version | tail -1))"
fi
echo "cuda-check: OK ($(du -h "$SO" | cut -f1) library, total $((SECONDS - start)) s)"
