#!/usr/bin/env bash
# One-shot GPU check of the CUDA NF4 kernels: build, test, validate, benchmark.
#
# For a machine with one NVIDIA GPU (written for an H200: 16 cores, no network). It installs
# nothing from the internet. Python: $PYTHON if set, else the first of .venv-cuda/bin/python,
# .venv/bin/python, python3 whose torch is a CUDA build that sees a GPU. If none has one, it tries
# once to create .venv-cuda with `pip install torch==2.14.1 setuptools ninja numpy pytest
# expecttest` from whatever package index or local wheel cache pip is configured with, and stops
# with a clear message if that fails. minidora itself is used from the repository (no install needed).
#
# Steps (each stops the script on failure):
#   1. build minidora._C in place with CUDA (MINIDORA_FORCE_CUDA=1) for this GPU's architecture
#      (--quick: kept as it is when the in-place build already loads with CUDA kernels for it),
#      then print which linear kernel each dtype takes on this GPU (tensor cores from sm_80 on,
#      CUDA cores on sm_70 / sm_75) and check it against that rule;
#   2. pytest tests/test_ops.py tests/test_cuda_select.py -q (the op tests run on every device,
#      cuda included; --quick: only the cuda cases, -k cuda);
#   3. benchmarks/bench_nf4_cuda.py: bit-exact dequantize, exact one-hot and error-bounded random
#      linear / grad-input checks (of the tensor-core kernel only where the GPU has it), then the
#      timing table against dense bf16 F.linear and the measured device copy bandwidth (see
#      docs/bench-cuda.md; --quick: one weight shape).
# Output goes to stdout; with $OUT set, also $OUT/bench_nf4_cuda.json, bench_nf4_cuda.txt,
# pytest.txt and build.log. Usage: bash scripts/gpu_validate.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        *) echo "gpu-validate: unknown argument '$arg' (usage: bash scripts/gpu_validate.sh [--quick])" >&2; exit 2 ;;
    esac
done
OUT_DIR="${OUT:-}"
log() { echo "gpu-validate: $*"; }

has_cuda_torch() {
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

PY=""
for cand in ${PYTHON:-} .venv-cuda/bin/python .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    log "no python with a CUDA torch that sees a GPU; trying to create .venv-cuda from the configured package index"
    python3 -m venv .venv-cuda && .venv-cuda/bin/python -m pip install -q --retries 1 --timeout 20 \
        torch==2.14.1 setuptools ninja numpy pytest expecttest && has_cuda_torch .venv-cuda/bin/python \
        && PY=.venv-cuda/bin/python
fi
if [ -z "$PY" ]; then
    log "FAILED: no usable python (needs torch with CUDA and a visible GPU; set PYTHON=...)"
    nvidia-smi 2>/dev/null | head -15
    exit 2
fi
"$PY" -c "import setuptools, ninja" 2>/dev/null || "$PY" -m pip install -q setuptools ninja 2>/dev/null || true
"$PY" -c "import numpy" 2>/dev/null || "$PY" -m pip install -q numpy 2>/dev/null || true

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
log "python $PY: torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'), GPU $("$PY" -c 'import torch; print(torch.cuda.get_device_name())') (sm $ARCH)"
log "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# --- 1. build in place with CUDA ------------------------------------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SM="${ARCH//./}"
if command -v nvcc >/dev/null 2>&1 && ! nvcc --list-gpu-arch 2>/dev/null | grep -qx "compute_$SM"; then
    log "FAILED: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') cannot compile for this GPU (sm_$SM); CUDA 13 dropped sm_70 (V100): use a CUDA 12 toolkit with a CUDA 12 build of torch"
    exit 1
fi
prebuilt() {  # the in-place minidora._C loads, has CUDA kernels and runs on this GPU
    "$PY" -c "
import torch, minidora.ops as ops
from minidora import nf4
assert ops.cuda_available()
q = nf4.quantize(torch.randn(8, 64), 64, True)
ops.nf4_dequantize(nf4.NF4Weight(q.packed.cuda(), q.absmax.cuda(), q.shape, q.dtype, 64,
                                 q.nested_absmax.cuda(), q.offset.cuda()), backend='compiled')
torch.cuda.synchronize()" >/dev/null 2>&1
}
export MINIDORA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset MINIDORA_NO_CUDA MINIDORA_NATIVE
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for inc in "$SITE"/nvidia/cu*/include "$SITE"/nvidia/cublas/include "$SITE"/nvidia/cusparse/include; do
    [ -d "$inc" ] && export CPLUS_INCLUDE_PATH="$inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
done
export PATH="$(dirname "$PY"):$PATH"   # ninja from the same environment
BUILD_LOG="${OUT_DIR:-/tmp}/build.log"
if [ "$QUICK" = 1 ] && prebuilt; then
    log "--quick: minidora._C is already built in place with CUDA kernels that run on this GPU; not rebuilt"
else
    log "building minidora._C in place (CUDA arch $ARCH, MAX_JOBS=$MAX_JOBS)"
    t0=$SECONDS
    if ! "$PY" setup.py -q build_ext --inplace > "$BUILD_LOG" 2>&1; then
        grep -E -B2 -A6 "error" "$BUILD_LOG" | head -60
        log "FAILED: build (log: $BUILD_LOG)"
        exit 1
    fi
    log "built in $((SECONDS - t0)) s"
fi
"$PY" -c "
import torch, minidora.ops as ops
has = torch._C._dispatch_has_kernel_for_dispatch_key
assert ops.extension_available(), 'minidora._C did not load'
assert has('minidora::nf4_linear', 'CUDA'), 'minidora._C has no CUDA kernels'
print('gpu-validate: minidora._C loaded with CUDA kernels')
cap = torch.cuda.get_device_capability()
paths = {str(dt)[6:]: ops.cuda_linear_path(dt) for dt in
         (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
print(f'gpu-validate: nf4_linear kernels on sm_{cap[0]}{cap[1]}:', paths)
half = 'mma' if cap >= (8, 0) else 'simt'
assert paths == {'bfloat16': half, 'float16': half, 'float32': 'simt', 'float64': 'cublas'}, \
    f'unexpected kernel choice {paths} for compute capability {cap}'" \
    || { log "FAILED: extension check"; exit 1; }

# --- 2. op tests ------------------------------------------------------------------------------
status=0
if "$PY" -c "import pytest, expecttest" 2>/dev/null; then
    SELECT=()
    [ "$QUICK" = 1 ] && SELECT=(-k cuda)
    log "pytest tests/test_ops.py tests/test_cuda_select.py -q ${SELECT[*]}"
    t0=$SECONDS
    "$PY" -m pytest tests/test_ops.py tests/test_cuda_select.py -q -p no:cacheprovider "${SELECT[@]}" 2>&1 \
        | tee "${OUT_DIR:-/tmp}/pytest.txt" | tail -25
    rc=${PIPESTATUS[0]}
    log "pytest exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
else
    log "pytest or expecttest is not installed in $PY: op tests NOT run (validation below still runs)"
    status=1
fi

# --- 3. validation and benchmark ----------------------------------------------------------------
log "benchmarks/bench_nf4_cuda.py"
"$PY" benchmarks/bench_nf4_cuda.py ${OUT_DIR:+--json "$OUT_DIR/bench_nf4_cuda.json"} "$@" 2>&1 \
    | tee "${OUT_DIR:-/tmp}/bench_nf4_cuda.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
log "done in $((SECONDS - start)) s, status $status"
exit $status
