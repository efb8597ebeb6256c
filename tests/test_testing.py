"""minidora.testing, the conformance kit: it passes minidora itself, and it can fail.

Every classic mistake is written here as a small independent implementation with that one
mistake; the kit must fail it on the right row and name the mistake. Then bad input (wrong
signatures, exceptions, wrong shapes and dtypes) and the ``verify`` command line.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minidora
from helpers import time_limit
from minidora import nf4
from minidora.__main__ import main
from minidora.testing import (
    Report,
    Row,
    adapter_cases,
    adapter_mistakes,
    check_dora,
    check_lora,
    check_nf4,
    nf4_cases,
    nf4_mistakes,
)

HERE = Path(__file__).resolve()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The cases are small: one thread is as fast, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- minidora itself, through thin factories ------------------------------------------------

class Minidora(nn.Module):
    """minidora.LoRALinear / DoRALinear behind the kit's factory convention."""

    def __init__(self, *, W0, bias, A, B, r, alpha, rslora, dropout, m=None, detach_norm=True):
        super().__init__()
        base = nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None, dtype=W0.dtype)
        with torch.no_grad():
            base.weight.copy_(W0)
            if bias is not None:
                base.bias.copy_(bias)
        kw = dict(r=r, alpha=alpha, rslora=rslora, dropout=dropout, adapter_dtype=W0.dtype)
        if m is None:
            self.layer = minidora.LoRALinear(base, **kw)
        else:
            self.layer = minidora.DoRALinear(base, detach_norm=detach_norm, **kw)
        with torch.no_grad():
            self.layer.lora_A.copy_(A)
            self.layer.lora_B.copy_(B)
            if m is not None:
                self.layer.magnitude.copy_(m)

    def forward(self, x):
        return self.layer(x)

    def merged_weight(self):
        merged = copy.deepcopy(self.layer)
        merged.merge()
        return merged.base.weight


def minidora_lora(**kw):
    return Minidora(**kw)


def test_minidora_passes_every_check():
    for report in (check_nf4(nf4.quantize, nf4.dequantize), check_lora(Minidora),
                   check_dora(Minidora)):
        report.assert_ok()
        assert all(row.ok for row in report.rows), report


# --- an independent NF4, with switches for the classic mistakes -----------------------------

DYN_MID = (nf4.DYNAMIC_CODE[:-1] + nf4.DYNAMIC_CODE[1:]) / 2
GRID = torch.bucketize(-1 + 2 * torch.arange(65536, dtype=torch.float32) / 65535, DYN_MID)


def my_quantize(w, blocksize, double_quant, swap=False, ties_up=False, divide=False,
                offset=True, clamp=True, codebook=nf4.NF4_CODEBOOK):
    x = w.reshape(-1).float()
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    div = absmax.clamp_min(1e-38) if clamp else absmax
    scaled = blocks / div[:, None] if divide else blocks * (1 / div)[:, None]
    mid = (codebook[:-1] + codebook[1:]) / 2
    q = torch.bucketize(scaled, mid, right=ties_up).view(-1)[: x.numel()]
    q = torch.cat([q, q.new_full((q.numel() % 2,), 7)])
    hi, lo = (q[1::2], q[0::2]) if swap else (q[0::2], q[1::2])
    out = {"packed": (hi << 4 | lo).to(torch.uint8), "absmax": absmax}
    if double_quant:
        mean = absmax.mean() if offset else torch.tensor(0.0)
        s = F.pad(absmax - mean, (0, -absmax.numel() % 256)).view(-1, 256)
        nested = s.abs().amax(1)
        v = (s * (1 / nested.clamp_min(1e-38))[:, None]).clamp(-1, 1)
        codes = GRID[((v + 1) * 0.5 * 65535 + 0.5).long()]
        codes[nested == 0] = 0
        out.update(absmax=codes.view(-1)[: absmax.numel()].to(torch.uint8),
                   nested_absmax=nested, offset=mean)
    return out


def my_dequantize(q, per_row_scales=False):
    """Dequantize my_quantize's dict (plain NF4) to float32 of q["shape"]."""
    codes = torch.stack([q["packed"] >> 4, q["packed"] & 15], 1).view(-1).long()
    shape, bs = q["shape"], q["blocksize"]
    n, cols = shape.numel(), shape[-1]
    block = torch.arange(n) // bs
    if per_row_scales:          # bitsandbytes' AVX-512 CPU kernel: assumes rows of whole blocks
        block = torch.arange(n // cols)[:, None] * (cols // bs) + torch.arange(cols) // bs
        block = block.view(-1)
    scales = q["absmax"][block.clamp_max(q["absmax"].numel() - 1)]
    return (nf4.NF4_CODEBOOK[codes[:n]] * scales).view(shape)


def test_the_independent_nf4_passes():
    check_nf4(my_quantize).assert_ok()


@pytest.mark.parametrize("mistake, row, message", [
    (dict(swap=True), "golden: packed codes", "nibble order swapped"),
    (dict(ties_up=True), "random: packed codes", "ties rounded to the upper code"),
    (dict(divide=True), "random: packed codes", "division instead of the reciprocal"),
    (dict(offset=False), "golden: DQ scale codes", "offset (mean of the scales) not subtracted"),
    (dict(clamp=False), "golden: packed codes", "an all-zero block must store code 7"),
    (dict(codebook=nf4.nf4_codebook(((1 - 1 / 30) + (1 - 1 / 32)) / 2)), "random: packed codes",
     "codebook from the unrounded offset"),
])
def test_nf4_mistake_is_caught_and_named(mistake, row, message):
    report = check_nf4(lambda w, bs, dq: my_quantize(w, bs, dq, **mistake))
    failed = {r.name: r.note for r in report.failures}
    assert row in failed, report
    assert message in failed[row], failed[row]
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        report.assert_ok()


def test_dequantize_with_scales_indexed_per_row_is_caught():
    def quantize(w, bs, dq):
        return my_quantize(w, bs, dq) | {"shape": w.shape, "blocksize": bs}

    check_nf4(quantize, my_dequantize, double_quant=False).assert_ok()
    report = check_nf4(quantize, lambda q: my_dequantize(q, per_row_scales=True),
                       double_quant=False)
    row = next(r for r in report.failures if r.name == "golden: dequantize")
    assert "scales indexed per row" in row.note


def test_the_docs_example_needs_only_the_package():
    source = (HERE.parents[1] / "docs" / "examples" / "verify_your_implementation.py").read_text()
    assert "shared" not in source and "MINIDORA_GOLDEN" not in source and "np.load" not in source


def test_mistake_tables_without_a_mistake_are_the_reference():
    for case in nf4_cases.random_cases(seed=3)[:4]:
        for dq in (False, True):
            ref = nf4.quantize(case.weight, case.blocksize, dq)
            got = nf4_mistakes.quantize(case.weight, case.blocksize, dq)
            assert torch.equal(got["packed"], ref.packed) and torch.equal(got["absmax"], ref.absmax)
            if dq:
                assert torch.equal(got["nested_absmax"], ref.nested_absmax)
                assert torch.equal(got["offset"], ref.offset)
            out = nf4_mistakes.dequantize(got, tuple(case.weight.shape), case.blocksize,
                                          case.weight.dtype)
            assert torch.equal(out, nf4.dequantize(ref))
    for case in adapter_cases.golden_cases(dora=True):
        got = adapter_mistakes.expected(case)
        for q, want in case.golden.items():
            assert torch.allclose(got[q], want, rtol=1e-10, atol=1e-13), q


@pytest.mark.parametrize("key", nf4_mistakes.QUANTIZE_MISTAKES)
def test_every_quantize_mistake_fails_the_kit_and_is_named(key):
    report = check_nf4(lambda w, bs, dq: nf4_mistakes.quantize(w, bs, dq, key))
    assert any(nf4_mistakes.MISTAKES[key][0] in row.note for row in report.failures), report


@pytest.mark.parametrize("key", nf4_mistakes.DEQUANTIZE_MISTAKES)
def test_every_dequantize_mistake_fails_the_kit_and_is_named(key):
    def dequantize(q):
        fields = {"packed": q.packed, "absmax": q.absmax, "nested_absmax": q.nested_absmax,
                  "offset": q.offset}
        return nf4_mistakes.dequantize(fields, q.shape, q.blocksize, q.dtype, key)

    report = check_nf4(nf4.quantize, dequantize)
    assert {row.name for row in report.failures} == {"golden: dequantize", "random: dequantize"}
    assert all(nf4_mistakes.MISTAKES[key][0] in row.note for row in report.failures), report


# --- an independent LoRA and DoRA, with switches for the classic mistakes ------------------

class MyAdapter:
    """A functional layer that uses the tensors it is given (no nn.Module)."""

    def __init__(self, *, W0, bias, A, B, r, alpha, rslora, dropout, m=None, detach_norm=True,
                 mistake=None):
        self.W0, self.bias, self.A, self.B, self.m = W0, bias, A, B, m
        self.s = alpha / (r ** 0.5 if rslora else r)
        if mistake == "alpha":
            self.s = alpha
        self.p, self.detach, self.mistake = dropout, detach_norm, mistake

    def weight(self):
        V = self.W0 + self.s * self.B @ self.A
        if self.m is None:
            return V
        c = V.norm(dim=0, keepdim=True) if self.mistake == "dim0" else V.norm(dim=1, keepdim=True)
        c = c.clamp_min(1e-12)
        return self.m[:, None] * V / (c.detach() if self.detach else c)

    def __call__(self, x):
        xd = F.dropout(x, self.p, training=True)                # the adapter's input
        if self.mistake == "dropout_base":
            return F.linear(xd, self.weight(), self.bias)
        if self.mistake == "bias_scaled":
            V = self.W0 + self.s * self.B @ self.A
            return self.m / V.norm(dim=1).detach() * F.linear(x, V, self.bias)
        # x W0^T + b + x~ (W' - W0)^T: LoRA's and DoRA's forward with dropout on x~ only
        return F.linear(x, self.W0, self.bias) + F.linear(xd, self.weight() - self.W0)

    def merged_weight(self):
        return self.weight()


def factory(mistake=None):
    return lambda **kw: MyAdapter(**kw, mistake=mistake)


def test_the_independent_adapters_pass():
    check_lora(factory()).assert_ok()
    check_dora(factory()).assert_ok()


@pytest.mark.parametrize("check, mistake, row, message", [
    (check_lora, "alpha", "golden: output y", "scaling alpha instead of alpha/r"),
    (check_lora, "dropout_base", "dropout only on the adapter path", "dropout on the base path"),
    (check_dora, "dim0", "golden: output y", "norm over dim=0"),
    (check_dora, "dim0", "golden: merged_weight()", "norm over dim=0"),
    (check_dora, "bias_scaled", "golden: output y", "bias scaled by the magnitude"),
    (check_dora, "alpha", "random: grad m", "scaling alpha instead of alpha/r"),
])
def test_adapter_mistake_is_caught_and_named(check, mistake, row, message):
    report = check(factory(mistake))
    failed = {r.name: r.note for r in report.failures}
    assert row in failed, report
    assert message in failed[row], failed[row]


def test_dora_that_ignores_detach_norm_is_caught():
    report = check_dora(lambda **kw: MyAdapter(**{**kw, "detach_norm": False}))
    failed = {r.name: r.note for r in report.failures}
    assert "exact gradient with detach_norm=True" in failed["golden: grad A"]
    report = check_dora(lambda **kw: MyAdapter(**{**kw, "detach_norm": True}))
    failed = {r.name: r.note for r in report.failures}
    assert "detached gradient with detach_norm=False" in failed["gradcheck (float64)"]


def test_wrong_backward_fails_the_gradient_rows_and_gradcheck():
    class WrongBackward(MyAdapter):
        def __call__(self, x):
            h = self.s * (x @ self.A.T) @ self.B.T
            return F.linear(x, self.W0, self.bias) + h + 0.5 * (h - h.detach())  # grads x1.5

    report = check_lora(lambda **kw: WrongBackward(**kw))
    names = {r.name for r in report.failures}
    assert {"golden: grad A", "gradcheck (float64)"} <= names and "golden: output y" not in names


def test_zero_row_without_a_clamp_is_a_robustness_warning_unless_strict():
    report = check_dora(no_clamp_dora)
    assert report.ok and not report.failures, report
    row = report.rows[-1]
    assert row.name == "robustness: zero row of W0 + s B A" and row.status == "WARN"
    assert report.warnings == [row] and "1 WARN" in report.summary()
    assert "zero row 2" in row.note and "clamp c at a small eps" in row.note
    assert all(r.ok for r in report.rows[:-1] if r.ok is not None), report
    strict = check_dora(no_clamp_dora, strict=True)
    assert [r.name for r in strict.failures] == [row.name] and strict.rows[-1].status == "FAIL"
    with pytest.raises(TypeError, match="strict must be True or False, got 'yes'"):
        check_dora(Minidora, strict="yes")


def test_cli_strict_counts_the_robustness_row(capsys):
    assert main(["verify", f"{HERE}:no_clamp_dora", "--kind", "dora"]) == 0
    assert "WARN" in capsys.readouterr().out
    assert main(["verify", f"{HERE}:no_clamp_dora", "--kind", "dora", "--strict"]) == 1
    assert "1 FAILED" in capsys.readouterr().out


class NoClamp(MyAdapter):
    def weight(self):
        V = self.W0 + self.s * self.B @ self.A
        c = V.norm(dim=1, keepdim=True)                     # 0 on a zero row: 0 / 0 = NaN
        return self.m[:, None] * V / (c.detach() if self.detach else c)


def no_clamp_dora(**kw):
    return NoClamp(**kw)


# --- the report -----------------------------------------------------------------------------

def test_a_failed_row_that_does_not_count_is_a_warning():
    report = Report("check_x(f)", [Row("a", True, 0.0, "exact", "fine"),
                                   Row("edge", False, 1.0, "exact", "NaN at row 2", counts=False)])
    assert report.ok and report.failures == [] and report.warnings == [report.rows[1]]
    assert str(report).splitlines()[0] == "check_x(f): 2 checks, all passed, 1 WARN"
    assert str(report).splitlines()[4].split()[:2] == ["edge", "WARN"]
    report.assert_ok()


def test_report_prints_a_table_and_assert_ok_lists_the_failures():
    report = Report("check_x(f)", [Row("a", True, 0.0, "exact", "fine"),
                                   Row("b", False, 2.5, "exact", "first at block 3"),
                                   Row("c", None, None, "", "no merged_weight()")])
    text = str(report).splitlines()
    assert text[0] == "check_x(f): 3 checks, 1 FAILED, 1 skipped"
    assert text[1].split() == ["check", "result", "worst", "tolerance", "note"]
    assert text[4].split()[:4] == ["b", "FAIL", "2.5", "exact"]
    assert not report.ok and report.failures == [report.rows[1]]
    with pytest.raises(AssertionError) as e:
        report.assert_ok()
    assert "first at block 3" in str(e.value) and "fine" not in str(e.value)


# --- bad input: one-line messages, never a traceback from inside the kit -------------------

def test_nf4_bad_functions_are_type_errors_naming_the_convention():
    with pytest.raises(TypeError, match="quantize_fn must be callable"):
        check_nf4(42)
    with pytest.raises(TypeError, match=r"expected quantize_fn\(weight, blocksize, double_quant\)"):
        check_nf4(lambda w: w)
    with pytest.raises(TypeError, match="returned tuple; expected quantize_fn"):
        check_nf4(lambda w, bs, dq: (1, 2))
    with pytest.raises(TypeError, match="double_quant must be None, True or False"):
        check_nf4(nf4.quantize, double_quant="yes")


@pytest.mark.parametrize("quantize, message", [
    (lambda w, bs, dq: 1 / 0, "quantize_fn raised ZeroDivisionError: division by zero"),
    (lambda w, bs, dq: my_quantize(w, bs, dq) | {"packed": my_quantize(w, bs, dq)["packed"].long()},
     "packed has dtype torch.int64, expected torch.uint8"),
    (lambda w, bs, dq: my_quantize(w, bs, dq)
        | {"packed": torch.zeros(w.numel(), dtype=torch.uint8)},
     "one code per byte"),
    (lambda w, bs, dq: {"packed": my_quantize(w, bs, False)["packed"], "absmax": None},
     "absmax is missing"),
])
def test_nf4_bad_output_is_a_failed_row(quantize, message):
    report = check_nf4(quantize, double_quant=False)
    assert not report.ok and message in str(report), str(report)


def test_dequantize_of_the_wrong_shape_is_a_failed_row():
    report = check_nf4(nf4.quantize, lambda q: nf4.dequantize(q).reshape(-1), double_quant=True)
    row = next(r for r in report.failures if r.name == "golden: dequantize")
    assert "dequantize_fn returned shape" in row.note and "expected the weight's shape" in row.note


def test_adapter_factory_with_the_wrong_signature_is_a_type_error():
    with pytest.raises(TypeError, match=r"layer_factory\(\*, W0, bias, A, B, r, alpha, rslora, "
                                        r"dropout, m, detach_norm\)"):
        check_dora(lambda W0, A, B: None)
    with pytest.raises(TypeError, match="layer_factory must be callable"):
        check_lora("not a function")


@pytest.mark.parametrize("make, message", [
    (lambda **kw: 1 / 0, "layer_factory raised ZeroDivisionError"),
    (lambda **kw: 3, "layer_factory returned int; expected a layer"),
    (lambda **kw: (lambda x: x), "layer(x) returned shape (9, 24); expected (9, 20)"),
    (lambda **kw: (lambda x: F.linear(x, kw["W0"]).float()), "expected torch.float64"),
    (lambda **kw: (lambda x: F.linear(x, kw["W0"]).tolist()), "layer(x) returned list"),
    (lambda **kw: (lambda x: F.linear(x, kw["W0"], kw["bias"])), "no gradient reached A"),
])
def test_adapter_bad_layers_are_failed_rows(make, message):
    report = check_lora(make)
    assert not report.ok and message in str(report), str(report)
    assert "Traceback" not in str(report)


def test_a_layer_without_merged_weight_skips_that_row():
    class NoMerge(MyAdapter):
        merged_weight = None

    report = check_lora(lambda **kw: NoMerge(**kw))
    assert report.ok
    assert {r.name for r in report.rows if r.ok is None} == {"golden: merged_weight()",
                                                            "random: merged_weight()"}


# --- the command line ----------------------------------------------------------------------

def broken_nibbles(w, blocksize, double_quant):
    return my_quantize(w, blocksize, double_quant, swap=True)


def test_cli_passes_and_fails_with_exit_codes(capsys):
    assert main(["verify", "minidora.nf4:quantize", "--kind", "nf4",
                 "--dequantize", "minidora.nf4:dequantize"]) == 0
    assert "all passed" in capsys.readouterr().out
    assert main(["verify", f"{HERE}:minidora_lora", "--kind", "dora"]) == 0
    assert main(["verify", f"{HERE}:broken_nibbles", "--kind", "nf4", "--double-quant", "off"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "nibble order swapped" in out


@pytest.mark.parametrize("argv, message", [
    (["no_such_module_xyz:f", "--kind", "nf4"],
     "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    (["minidora.nf4:nope", "--kind", "nf4"], "'minidora.nf4' has no attribute 'nope'"),
    (["minidora.nf4", "--kind", "nf4"], "expected MODULE:FUNCTION"),
    (["minidora.nf4:NF4_CODEBOOK", "--kind", "nf4"], "is a Tensor, expected a function"),
    (["minidora.nf4:dequantize", "--kind", "nf4"], "quantize_fn has the signature (q, dtype=None)"),
    (["minidora.nf4:quantize", "--kind", "lora"], "layer_factory has the signature"),
    (["minidora.nf4:quantize", "--kind", "lora", "--dequantize", "x:y"], "go with --kind nf4 only"),
    (["missing/file.py:f", "--kind", "nf4"], "no such file"),
    (["minidora.nf4:quantize", "--kind", "nf4", "--strict"], "--strict goes with --kind lora"),
])
def test_cli_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(["verify", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("minidora verify: error:")


def test_python_m_minidora_verify_usage_error_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "minidora", "verify", "no_such_module_xyz:f",
                           "--kind", "lora"], capture_output=True, text=True,
                          timeout=time_limit(120), cwd=HERE.parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("minidora verify: error: cannot import 'no_such_module_xyz'")


def test_dora_without_an_exact_gradient_skips_gradcheck_and_keeps_the_callers_state():
    def make(**kw):
        if not kw["detach_norm"]:
            raise NotImplementedError("only the detached norm")
        return MyAdapter(**kw)

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():                 # the kit turns gradients on for itself
        report = check_dora(make)
    assert torch.equal(torch.rand(3), expected_next)          # the caller's RNG is untouched
    assert report.ok
    row = next(r for r in report.rows if r.name == "gradcheck (float64)")
    assert row.ok is None
    assert "NotImplementedError: only the detached norm" in row.note


# --- exits and interrupts: a sys.exit() in the code under test is a failed row; Ctrl-C is 130 -

def exits_in_quantize(w, blocksize, double_quant):
    sys.exit(0)


def exits_in_factory(**kw):
    raise SystemExit(3)


def interrupts_in_quantize(w, blocksize, double_quant):
    raise KeyboardInterrupt


@pytest.mark.parametrize("target, kind, message", [
    ("exits_in_quantize", "nf4", "quantize_fn raised SystemExit(0)"),
    ("exits_in_factory", "dora", "layer_factory raised SystemExit(3)"),
])
def test_cli_a_sys_exit_in_the_code_under_test_is_a_failed_row(target, kind, message, capsys):
    assert main(["verify", f"{HERE}:{target}", "--kind", kind]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and message in out and "all passed" not in out


def test_check_functions_turn_a_sys_exit_into_failed_rows():
    report = check_nf4(exits_in_quantize, double_quant=False)
    assert report.failures and all("SystemExit(0)" in r.note for r in report.failures)
    report = check_lora(lambda **kw: sys.exit() if kw["W0"].shape == (7, 11) else MyAdapter(**kw))
    failed = {r.name: r.note for r in report.failures}
    assert "layer_factory raised SystemExit(None)" in failed["random: output y"]
    assert "golden: output y" not in failed


def test_cli_ctrl_c_in_the_code_under_test_exits_130(capsys):
    assert main(["verify", f"{HERE}:interrupts_in_quantize", "--kind", "nf4"]) == 130
    assert capsys.readouterr().err == "minidora verify: interrupted\n"


def test_cli_module_that_exits_on_import_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "leaves.py").write_text("import sys\nsys.exit(0)\n")
    assert main(["verify", f"{tmp_path / 'leaves.py'}:f", "--kind", "nf4"]) == 2
    assert "cannot import" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["minidora.nf4:quantize", "--kind", "nf4", "--seed", str(10**23)],
     "--seed: got 100000000000000000000000; expected an integer in 0..2**63 - 1"),
    (["minidora.nf4:quantize", "--kind", "lora", "--seed", "-1"],
     "--seed: got -1; expected an integer in 0..2**63 - 1"),
])
def test_cli_seed_out_of_range_is_a_usage_error(argv, message, capsys):
    assert main(["verify", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"minidora verify: error: {message}\n"


def test_check_seed_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"seed must be an integer in 0..2\*\*63 - 1, got -1"):
        check_nf4(nf4.quantize, seed=-1)
    with pytest.raises(ValueError, match=rf"in 0..2\*\*63 - 1, got {2**70}"):
        check_dora(Minidora, seed=2**70)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        check_lora(Minidora, seed=1.5)


def test_cli_a_file_that_is_not_python_source_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("def f(): pass\n")
    assert main(["verify", f"{tmp_path / 'notes.txt'}:f", "--kind", "nf4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Python source file; expected a path to a .py" in err


# A sitecustomize that sends SIGINT the moment a given module starts to import: Ctrl-C during
# start-up, at a fixed point, however slow the machine.
SIGINT_AT_IMPORT = '''
import importlib.abc, os, signal, sys
class _Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["SIGINT_AT_IMPORT"]:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, _Interrupt())
'''


@pytest.mark.parametrize("at", ["torch", "minidora.apps.finetune.cli"])
@pytest.mark.parametrize("argv", [["verify", "minidora.nf4:quantize", "--kind", "nf4"],
                                  ["demo", "--quick"], ["finetune", "--help"]])
def test_ctrl_c_while_the_subcommands_import_is_one_line_and_130(argv, at, tmp_path):
    """At torch's import (the package itself imports nothing heavy: minidora/__init__.py loads
    its names on first use) and at a subcommand's."""
    (tmp_path / "sitecustomize.py").write_text(SIGINT_AT_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SIGINT_AT_IMPORT": at}
    env.pop("MINIDORA_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "minidora", *argv], capture_output=True,
                          text=True, timeout=time_limit(300), cwd=tmp_path, env=env)
    assert done.returncode == 130, done.stderr
    assert done.stderr == f"minidora {argv[0]}: interrupted\n"


# --- the reference libraries themselves pass the kit ----------------------------------------

def bnb_nf4():
    """bitsandbytes' quantize_4bit / dequantize_4bit behind check_nf4's convention. Dequantize
    goes through bitsandbytes' 1-D call: its 2-D AVX-512 CPU kernel indexes scales per row
    (see docs/format.md), which the kit rightly names as a mistake, and only on such CPUs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbF

    def quantize(weight, blocksize, double_quant):
        packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                           compress_statistics=double_quant)
        return {"packed": packed, "absmax": state.absmax, "state": state,
                "nested_absmax": state.state2.absmax if double_quant else None,
                "offset": state.offset if double_quant else None}

    def dequantize(q):
        state = copy.copy(q["state"])
        shape, state.shape = state.shape, torch.Size([state.shape.numel()])
        return bnbF.dequantize_4bit(q["packed"], state).reshape(shape)

    return quantize, dequantize


class Peft(nn.Module):
    """A float64 nn.Linear wrapped by peft.get_peft_model, behind the kit's factory convention."""

    def __init__(self, *, W0, bias, A, B, r, alpha, rslora, dropout, m=None, detach_norm=True):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        if not detach_norm:
            raise NotImplementedError("PEFT always detaches DoRA's norm")
        lin = nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None, dtype=W0.dtype)
        with torch.no_grad():
            lin.weight.copy_(W0)
            if bias is not None:
                lin.bias.copy_(bias)
        config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=m is not None,
                            lora_dropout=dropout, target_modules=["0"])
        self.model = get_peft_model(nn.Sequential(lin), config).double()
        layer = self.model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
            if m is not None:
                layer.lora_magnitude_vector["default"].weight.copy_(m)

    def forward(self, x):
        return self.model(x)

    def merged_weight(self):
        return copy.deepcopy(self.model).merge_and_unload()[0].weight


def test_bitsandbytes_passes_check_nf4():
    report = check_nf4(*bnb_nf4(), seed=5)
    assert all(row.ok for row in report.rows), report


def test_peft_lora_passes_check_lora():
    report = check_lora(Peft, seed=6)
    assert all(row.ok for row in report.rows), report


def test_peft_dora_passes_check_dora_but_for_the_zero_row():
    report = check_dora(Peft, seed=7)
    assert report.ok, report
    statuses = {row.name: row.status for row in report.rows}
    assert statuses.pop("gradcheck (float64)") == "skip"       # PEFT has no exact-gradient mode
    assert statuses.pop("robustness: zero row of W0 + s B A") == "WARN"   # NaN where c = 0
    assert set(statuses.values()) == {"ok"}, report
    assert not check_dora(Peft, seed=7, strict=True).ok
