"""minidora/backends.py: the extension is loaded, and the one switch (use / choose, the getters and
the shorthands) picks the path every call takes: per thread, restored on exit, capped by
MINIDORA_CPU_ISA, and cpu_native_bf16 following the forced kernel level.
"""

import contextlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import normal, quantized_weight, time_limit
from minidora import backends, nf4, ops


def test_extension_is_built():
    assert ops.extension_available(), (
        f"minidora._C failed to import ({backends._IMPORT_ERROR!r}); build it with `make build`")
    assert "cpu" in backends._DEVICES


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_called(fn):
    with _RecordOps() as rec:
        fn()
    return rec.names


def test_backend_selection():
    q = quantized_weight((16, 64), 32, True, "cpu", seed=10)
    x = normal(2, 64, dtype=torch.float32, device="cpu", seed=1)
    assert "minidora.nf4_linear.default" in _ops_called(lambda: ops.nf4_linear(x, q))
    ref_calls = _ops_called(lambda: ops.nf4_linear(x, q, backend="reference"))
    assert not any(n.startswith("minidora.") for n in ref_calls)
    with ops.use_reference():
        assert ops.get_backend() == "reference"
        assert not any(n.startswith("minidora.") for n in _ops_called(lambda: ops.nf4_linear(x, q)))
        y = ops.nf4_dequantize(q)
        assert "minidora.nf4_dequantize.default" in _ops_called(
            lambda: ops.nf4_dequantize(q, backend="compiled"))
    assert ops.get_backend() == "auto"
    assert torch.equal(y, nf4.dequantize(q))
    assert torch.equal(ops.nf4_linear(x, q, backend="reference"),
                       F.linear(x, nf4.dequantize(q, torch.float32)))


def test_compiled_backend_without_extension(monkeypatch):
    q = quantized_weight((16, 64), 32, True, "cpu", seed=10)
    x = normal(2, 64, dtype=torch.float32, device="cpu", seed=1)
    monkeypatch.setattr(backends, "_C", None)
    monkeypatch.setattr(backends, "_IMPORT_ERROR", ImportError("no module minidora._C"))
    monkeypatch.setattr(backends, "_DEVICES", frozenset())
    assert not ops.extension_available()
    with pytest.raises(RuntimeError, match="make build"):
        ops.nf4_linear(x, q, backend="compiled")
    # auto falls back to the reference
    assert torch.equal(ops.nf4_linear(x, q), F.linear(x, nf4.dequantize(q, torch.float32)))


def test_compiled_backend_unsupported_device():
    q = quantized_weight((16, 64), 32, True, "meta")
    with pytest.raises(RuntimeError, match="no kernel for device 'meta'"):
        ops.nf4_linear(torch.empty(2, 64, device="meta"), q, backend="compiled")


def test_default_backend_and_thread_choice():
    """A thread that chose nothing follows the process default; set_backend(None) returns to it."""
    seen = []
    worker = lambda: seen.append(ops.get_backend())  # noqa: E731
    try:
        ops.set_default_backend("reference")
        assert ops.get_backend() == "reference"
        ops.set_backend("compiled")                  # this thread only
        assert ops.get_backend() == "compiled"
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == ["reference"]
        ops.set_backend(None)
        assert ops.get_backend() == "reference"
    finally:
        ops.set_backend(None)
        ops.set_default_backend("auto")
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_default_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.use_backend("fast").__enter__()


def test_backend_and_cpu_isa_are_per_thread():
    """Threads enter use_reference / use_cpu_isa one after another and leave in the same order
    (with a process-wide setting, each would save the previous thread's choice and the last
    one to leave would restore it for good): inside, each thread sees its own backend and CPU
    kernels, checked by which ops run and by the bits of the result (the float32 fused kernels
    of each level sum in their own order); afterwards every thread and the process are back on
    the defaults."""
    levels = ["scalar", "avx2", "avx512", "avx512bf16"]
    isas = levels[: levels.index(ops.cpu_isa_best()) + 1]
    q = quantized_weight((64, 512), 64, True, "cpu", seed=41)
    x = normal(3, 512, dtype=torch.float32, device="cpu", seed=42)     # fused kernels (M <= 16)
    expected = {}
    for isa in isas:
        with ops.use_cpu_isa(isa):
            expected[isa] = ops.nf4_linear(x, q, backend="compiled")
    if len(isas) > 1:
        assert not torch.equal(expected["scalar"], expected[isas[-1]])
    n_threads = 2 * len(isas)
    barrier = threading.Barrier(n_threads, timeout=60)
    errors = []

    def worker(i):
        backend, isa = ("reference" if i % 2 else "auto"), isas[i // 2]
        try:
            with contextlib.ExitStack() as stack:
                for turn in range(n_threads):                    # enter one after another
                    if turn == i:
                        if backend == "reference":
                            stack.enter_context(ops.use_reference())
                        stack.enter_context(ops.use_cpu_isa(isa))
                    barrier.wait()
                for _ in range(3):                               # all inside at once
                    assert (ops.get_backend(), ops.cpu_isa()) == (backend, isa)
                    names = _ops_called(lambda: ops.nf4_linear(x, q))
                    assert ("minidora.nf4_linear.default" in names) == (backend == "auto")
                    assert torch.equal(ops.nf4_linear(x, q, backend="compiled"), expected[isa])
                    barrier.wait()
                for turn in range(n_threads):                    # leave in the same order
                    if turn == i:
                        stack.close()
                    barrier.wait()
            assert (ops.get_backend(), ops.cpu_isa()) == ("auto", isas[-1])
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(f"thread {i} ({backend}, {isa}): {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (ops.get_backend(), ops.cpu_isa()) == ("auto", isas[-1])


def test_cpu_isa_selection():
    with pytest.raises(ValueError, match="cpu isa must be 'auto', 'scalar'"):
        backends._C.set_cpu_isa("sse9")
    with ops.use_cpu_isa("scalar"):
        assert ops.cpu_isa() == "scalar"
    assert ops.cpu_isa() == ops.cpu_isa_best()


def test_one_switch_sets_and_restores_every_choice():
    before = (ops.get_backend(), ops.cpu_isa(), ops.cuda_kernel())
    assert before[2] == "auto"
    with ops.use(backend="reference", cpu_isa="scalar", cuda_kernel="simt"):
        assert (ops.get_backend(), ops.cpu_isa(), ops.cuda_kernel()) == (
            "reference", "scalar", "simt")
        with ops.use(backend="compiled"):                    # nested: only what it names
            assert (ops.get_backend(), ops.cpu_isa()) == ("compiled", "scalar")
        assert ops.get_backend() == "reference"
    assert (ops.get_backend(), ops.cpu_isa(), ops.cuda_kernel()) == before
    with pytest.raises(ValueError, match=r"cuda_kernel must be one of \('auto', 'mma', 'simt'\)"):
        with ops.use(backend="reference", cuda_kernel="tensor"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.choose(backend="fast")
    assert (ops.get_backend(), ops.cpu_isa(), ops.cuda_kernel()) == before
    ops.choose(cuda_kernel="mma")
    try:
        assert ops.cuda_kernel() == "mma"
    finally:
        ops.choose(cuda_kernel="auto")


def test_one_switch_picks_the_path():
    q = nf4.quantize(torch.randn(24, 96), 64, True)
    x = torch.randn(3, 96)
    want = F.linear(x, nf4.dequantize(q, torch.float32))
    with ops.use(backend="reference"):
        assert torch.equal(ops.nf4_linear(x, q), want)              # the reference, exactly
    with ops.use(cpu_isa="scalar"):
        assert torch.allclose(ops.nf4_linear(x, q), want, rtol=1e-5, atol=1e-5)


# --- cpu_native_bf16: the applications' default compute dtype follows it ----------------------

def test_cpu_native_bf16_follows_the_forced_kernel_level():
    levels = ["scalar", "avx2", "avx512", "avx512bf16"]
    best = ops.cpu_isa_best()
    assert ops.cpu_native_bf16() is (best == "avx512bf16")
    for isa in levels[: levels.index(best) + 1]:
        with ops.use_cpu_isa(isa):
            assert ops.cpu_native_bf16() is (isa == "avx512bf16"), isa
    assert ops.cpu_native_bf16() is (best == "avx512bf16")          # back with the level


def test_cpu_native_bf16_without_the_extension_asks_torch(monkeypatch):
    monkeypatch.setattr(backends, "_C", None)
    for bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert ops.cpu_native_bf16() is (bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")     # an older torch: no answer
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert ops.cpu_native_bf16() is False


@pytest.mark.skipif(not ops.extension_available(), reason="minidora._C not built")
@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512", "avx512bf16", "sse9"])
def test_minidora_cpu_isa_caps_the_levels_of_the_process(cap):
    """MINIDORA_CPU_ISA runs a whole process as on a CPU whose best level is the cap (never above
    what this CPU has); a name that is not a level is ignored with a line on stderr."""
    import os
    import subprocess
    import sys

    levels = ["scalar", "avx2", "avx512", "avx512bf16"]
    code = ("from minidora import ops; print(ops.cpu_isa_best(), ops.cpu_isa(), "
            "ops.cpu_native_bf16())")

    def run(**env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=time_limit(120), check=True)

    uncapped = {k: v for k, v in os.environ.items() if k != "MINIDORA_CPU_ISA"}
    have = run(**uncapped).stdout.split()[0]          # what this CPU has, whatever the suite's cap
    done = run(**uncapped, MINIDORA_CPU_ISA=cap)
    if cap in levels:
        want = levels[min(levels.index(cap), levels.index(have))]
        assert done.stderr == ""
    else:
        want = have
        assert "MINIDORA_CPU_ISA=sse9 is not a level" in done.stderr
    assert done.stdout.split() == [want, want, str(want == "avx512bf16")]
