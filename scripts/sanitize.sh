#!/usr/bin/env bash
# Build minidora._C with AddressSanitizer and UndefinedBehaviorSanitizer and run the tests of the
# compiled ops under them: tests/test_ops.py and tests/test_properties.py. `make sanitize` runs it.
# Exits non-zero on any sanitizer report, and on any test failure.
#
# The preload: python and torch are not built with ASan, only the extension is, and the ASan
# runtime must be the first library in the process to intercept malloc/free before anything
# allocates ("ASan runtime does not come first in initial library list" otherwise). So python
# runs with
#     LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
# (GCC's UBSan handlers live in their own libubsan, which the instrumented library also needs).
# ASAN_OPTIONS=detect_leaks=0: python and torch keep interned objects, caches and thread pools
# alive until exit and never free them, by design; a leak check would report thousands of those.
# UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1, and -fno-sanitize-recover=all, so that the
# first undefined behaviour stops the run with a stack trace.
#
# Nothing in the working tree changes: the instrumented library is built in a temporary folder,
# next to a copy of the minidora package, and python finds that copy first (PYTHONPATH, with the
# current directory, the repository root, taken off sys.path). The script checks that the tests
# really load the instrumented library.
#
# Time measured on the 2-core development machine, shared with other jobs: build 1 to 2 min,
# tests 1.5 to 3.5 min (2284 tests), 3 to 4.5 min in all.
# Environment: PY (default .venv/bin/python), CXX (default g++), KEEP_BUILD=1 keeps the temporary
# folder, SANITIZE_TESTS (default "tests/test_ops.py tests/test_cpu_kernels.py tests/test_properties.py").
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

PY="${PY:-.venv/bin/python}"
CXX="${CXX:-g++}"
TESTS="${SANITIZE_TESTS:-tests/test_ops.py tests/test_cpu_kernels.py tests/test_properties.py}"
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
    if [ ! -e "$lib" ]; then
        echo "sanitize: $CXX has no $(basename "$lib") (install the compiler's sanitizer runtimes)" >&2
        exit 1
    fi
done

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/minidora-sanitize.XXXXXX")
if [ "${KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$BUILD"' EXIT; fi
echo "sanitize: building minidora._C with -fsanitize=address,undefined into $BUILD"
t0=$SECONDS
# setup.py's CppExtension gets the sanitizer flags appended (after its -O3: the last -O wins).
# -fno-wrapv undoes the -fwrapv that python's own compile flags add: with it, a signed overflow
# (a size product gone wrong) is defined to wrap around and UBSan would not report it.
cat > "$BUILD/setup_sanitize.py" <<'PYEOF'
import runpy
import sys

import torch.utils.cpp_extension as ce

FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
         "-fno-wrapv", "-g", "-O1"]


def _sanitized(make_extension):
    def make(name, sources, *args, **kwargs):
        kwargs.setdefault("extra_compile_args", {}).setdefault("cxx", []).extend(FLAGS)
        kwargs["extra_link_args"] = list(kwargs.get("extra_link_args", [])) + FLAGS[:1]
        return make_extension(name, sources, *args, **kwargs)
    return make


ce.CppExtension = _sanitized(ce.CppExtension)
sys.argv = ["setup.py"] + sys.argv[1:]
runpy.run_path("setup.py", run_name="__main__")
PYEOF
if ! MINIDORA_NO_CUDA=1 "$PY" "$BUILD/setup_sanitize.py" -q build_ext --build-lib "$BUILD/lib" \
        --build-temp "$BUILD/temp" > "$BUILD/build.log" 2>&1; then
    grep -E -B2 -A6 "error" "$BUILD/build.log" | head -60 >&2 || tail -40 "$BUILD/build.log" >&2
    echo "sanitize: FAILED to build (log: $BUILD/build.log)" >&2
    trap - EXIT
    exit 1
fi
SO=$(find "$BUILD/lib" -name '_C*.so' | head -1)
nm -D "$SO" > "$BUILD/symbols.txt"   # (not piped into grep -q: that would break nm's pipe)
if [ -z "$SO" ] || ! grep -q __asan_report "$BUILD/symbols.txt" || ! grep -q __ubsan_handle "$BUILD/symbols.txt"; then
    echo "sanitize: FAILED: $BUILD/lib holds no instrumented _C*.so" >&2
    exit 1
fi
echo "sanitize: built in $((SECONDS - t0)) s"

# A copy of the package (without the normal library) holding the instrumented one.
mkdir -p "$BUILD/pkg"
cp -r minidora "$BUILD/pkg/"
find "$BUILD/pkg" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$SO" "$BUILD/pkg/minidora/"

export LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$BUILD/pkg${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_COMPILE_THREADS=1   # torch.compile's tests compile in-process
# OpenMP threads sleep rather than spin while they wait: on a shared 2-core machine spinning
# threads of the slower instrumented kernels took the cores from each other (twice as long).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
# python -c without the current directory at sys.path[0] (what -P does from python 3.11 on)
NO_CWD='import sys; del sys.path[0]'
# torch first: the extension links against torch's libraries (import minidora alone does not load
# torch: its names are imported on first use)
if ! "$PY" -c "$NO_CWD; import torch, minidora._C as c; sys.exit(not c.__file__.startswith('$BUILD/pkg/'))"; then
    echo "sanitize: FAILED: python does not load the instrumented minidora._C" >&2
    exit 1
fi

echo "sanitize: running $TESTS"
t0=$SECONDS
# --capture=sys: pytest captures python's sys.stdout/stderr only, so a report the sanitizers
# write to file descriptor 2 reaches the log even when it stops the process inside a test.
status=0
# shellcheck disable=SC2086  # TESTS is a list of paths
"$PY" -c "$NO_CWD; import pytest; sys.exit(pytest.main(sys.argv[1:]))" \
    -q -p no:cacheprovider --capture=sys $TESTS 2>&1 | tee "$BUILD/tests.log" \
    || status=$?   # pytest's status (pipefail; tee succeeds)
echo "sanitize: tests took $((SECONDS - t0)) s (exit status $status)"

if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: [A-Za-z]+Sanitizer" "$BUILD/tests.log"; then
    echo "sanitize: FAILED: the sanitizers reported errors (see above)" >&2
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "sanitize: FAILED: the tests failed (exit status $status)" >&2
    exit "$status"
fi
echo "sanitize: OK, no sanitizer report (total $((SECONDS - start)) s)"
