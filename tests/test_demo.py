"""The demo end to end in --quick mode (in-process and through ``python -m minidora``), its
pieces (data, memory meter, answer scoring, cache, the table over seeds and what it tells apart,
rank sweep) and its bad-input exits.

Every run writes to pytest's tmp_path and uses a cache folder there, never the user's home.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import minidora
from helpers import forced_isa, time_limit
from minidora.__main__ import main
from minidora.apps.demo import compare, data, report, sweep
from minidora.apps.demo.memory import PeakTensorMemory
from minidora.apps.demo.model import GPT, GPTConfig
from minidora.apps.demo.train import DEMO_MODEL, METHODS, score

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process quick run with every method and the quick rank sweep (cold cache)."""
    base = tmp_path_factory.mktemp("demo")
    out, cache = base / "out", base / "cache"
    threads = torch.get_num_threads()
    rc, stdout, stderr = _run_main(["demo", "--quick", "--out", str(out),
                                    "--cache-dir", str(cache)])
    assert rc == 0, stderr
    assert torch.get_num_threads() == threads   # the run restores the caller's thread count
    return {"out": out, "cache": cache, "stdout": stdout,
            "doc": json.loads((out / "results.json").read_text())}


# --- the end-to-end run --------------------------------------------------------------------------

def _printed_table(stdout: str) -> list[list[str]]:
    """The rows of the headline table as printed (header first), cells split at 2+ spaces."""
    lines = stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("method "))
    rows = [lines[header]]
    for ln in lines[header + 2:]:
        if not ln.strip():
            break
        rows.append(ln)
    return [re.split(r"  +", ln.strip()) for ln in rows]


def test_table_has_the_pretrained_row_and_every_method(quick_run):
    rows = _printed_table(quick_run["stdout"])
    assert rows[0] == report.COLUMNS
    assert [r[0] for r in rows[1:]] == [report.BASELINE, *METHODS]
    assert rows[1:] == quick_run["doc"]["table"]          # the JSON holds the table as printed
    for r in rows[2:]:
        # trainable, weights, peak memory, ms/step, train acc, acc mean [min, max], rank,
        # loss mean [min, max], rank
        nums = re.findall(r"\d[\d,]*\.?\d*", " ".join(r[1:]))
        assert len(nums) == 13 and all(math.isfinite(float(v.replace(",", ""))) for v in nums), r


def test_table_mean_and_range_are_those_of_the_seeds(quick_run):
    """Each method's cells are the mean and [min, max] of its per-seed runs in the JSON,
    recomputed here; the pretrained row is the one model's number."""
    doc = quick_run["doc"]
    assert doc["seeds"] == [0, 1]
    rows = {r[0]: r for r in _printed_table(quick_run["stdout"])[1:]}
    for name in METHODS:
        runs = doc["methods"][name]
        assert [r["seed"] for r in runs] == doc["seeds"]
        acc = [100 * r["final_accuracy"] for r in runs]
        loss = [r["final_held_out_loss"] for r in runs]
        assert rows[name][6] == (f"{sum(acc) / len(acc):.1f}% [{min(acc):.1f}%, "
                                 f"{max(acc):.1f}%]")
        assert rows[name][8] == f"{sum(loss) / len(loss):.3f} [{min(loss):.3f}, {max(loss):.3f}]"
        s = doc["summary"]["held_out_loss"][name]
        assert (s["min"], s["max"], s["n"]) == (min(loss), max(loss), 2)
        assert s["mean"] == pytest.approx(sum(loss) / 2, rel=1e-15)
        assert s["std"] == pytest.approx(abs(loss[0] - loss[1]) / 2 ** 0.5, rel=1e-12)
    base = doc["baseline"]
    assert rows["pretrained"][6] == f"{100 * base['accuracy']:.1f}%"
    assert rows["pretrained"][8] == f"{base['held_out_loss']:.3f}"


def test_table_says_what_the_seeds_tell_apart(quick_run):
    """The verdicts in the JSON agree with the per-seed numbers in the JSON (recomputed here);
    every fine-tuned seed's loss is below the pretrained model's, and the printed line says so."""
    doc, out = quick_run["doc"], quick_run["stdout"]
    for c in doc["comparisons"]:
        for metric, (key, _, higher) in compare.METRICS.items():
            a = [r[key] for r in doc["methods"][c["a"]]]
            b = ([doc["baseline"][metric]] if c["b"] == "pretrained"
                 else [r[key] for r in doc["methods"][c["b"]]])
            hi, lo = (a, b) if higher else (b, a)      # hi: the side where better is higher
            want = ("not distinguishable here" if min(hi) <= max(lo) and min(lo) <= max(hi)
                    else f"{c['a']} better" if (min(a) > max(b)) == higher else f"{c['b']} better")
            assert c[metric] == want, (c, metric)
    assert [(c["question"], c["a"], c["b"]) for c in doc["comparisons"]] == [
        *(("full vs adapters", "full", m) for m in METHODS[1:]),
        *(("fine-tuned vs pretrained", m, "pretrained") for m in METHODS),
        ("4-bit vs 16-bit", "qlora", "lora"), ("4-bit vs 16-bit", "qdora", "dora"),
        ("DoRA vs LoRA", "dora", "lora")]
    assert re.search(r"^  fine-tuned vs pretrained  full vs pretrained +acc: .*loss: full "
                     r"better$", out, re.M)
    assert "(2 / C(4, 2))" in out


def test_corr_column_is_gone_and_the_footnote_points_to_reproduce(quick_run):
    doc, out = quick_run["doc"], quick_run["stdout"]
    assert not any("corr" in c for c in report.COLUMNS)
    assert "corr" not in out and "corr" not in json.dumps(doc)
    assert "decomposition" not in json.dumps(doc)
    assert not (quick_run["out"] / "decomposition.png").exists()
    assert "`python -m minidora reproduce` measures it per layer" in out


def test_losses_fall_from_the_pretrained_baseline(quick_run):
    doc = quick_run["doc"]
    base = doc["baseline"]
    for name, r in ((n, r) for n, rs in doc["methods"].items() for r in rs):
        assert r["final_train_loss"] < base["train_loss"] - 0.05, name
        assert r["final_held_out_loss"] < base["held_out_loss"] - 0.05, name
        # The unquantized methods start from exactly the pretrained model (B = 0, m = ||W0||).
        if not name.startswith("q"):
            assert r["initial_held_out_loss"] == pytest.approx(base["held_out_loss"],
                                                               rel=1e-6, abs=1e-6)


def test_full_fine_tuning_learns_the_task(tmp_path):
    """The demo's claim, at its default model, pretraining and budget (about half a minute of
    pretraining and a few seconds of fine-tuning on one thread): the pretrained model gets no
    held-out number right, full fine-tuning gets most of them exactly right."""
    rc, stdout, stderr = _run_main(["demo", "--methods", "full", "--no-sweep", "--seeds", "1",
                                    "--out", str(tmp_path / "o"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert rc == 0, stderr
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    base, (full,) = doc["baseline"], doc["methods"]["full"]
    assert doc["config"]["model"] == DEMO_MODEL.to_dict()
    assert base["accuracy"] == 0.0 and full["initial_accuracy"] == 0.0
    assert full["final_accuracy"] >= 0.5, stdout
    assert full["final_held_out_loss"] < 0.1 * base["held_out_loss"]


def test_parameter_counts_and_weight_memory(quick_run):
    doc = quick_run["doc"]
    cfg = GPTConfig(**doc["config"]["model"])
    r, m = doc["config"]["rank"], {name: rs[0] for name, rs in doc["methods"].items()}
    model = GPT(cfg)
    n_total = sum(p.numel() for p in model.parameters())
    shapes = [mod.weight.shape for n, mod in model.named_modules()
              if n.split(".")[-1] in cfg.TARGETS]
    lora = sum(r * (o + i) for o, i in shapes)            # A [r, in] + B [out, r] per target
    assert m["full"]["trainable_params"] == n_total
    assert m["lora"]["trainable_params"] == m["qlora"]["trainable_params"] == lora
    dora = lora + sum(o for o, _ in shapes)               # and m [out] per target
    assert m["dora"]["trainable_params"] == m["qdora"]["trainable_params"] == dora
    assert m["lora"]["trainable_params"] < m["full"]["trainable_params"]
    assert m["full"]["weight_bytes"] == 4 * n_total
    # 4-bit targets: well under half the float32 weights of the same model with adapters.
    assert m["qlora"]["weight_bytes"] < 0.6 * m["lora"]["weight_bytes"]
    for name, res in m.items():
        assert res["peak_bytes"] > res["weight_bytes"], name
    # Full fine-tuning keeps a gradient and two AdamW moments per weight on top of the weights.
    assert m["full"]["peak_bytes"] >= 4 * m["full"]["weight_bytes"]


def test_json_schema(quick_run):
    doc = quick_run["doc"]
    assert doc["schema_version"] == report.SCHEMA_VERSION
    assert set(doc) >= {"config", "pretrain", "baseline", "seeds", "methods", "summary", "ranks",
                        "comparisons", "sweep", "total_seconds", "columns", "table"}
    assert set(doc["baseline"]) == {"train_loss", "held_out_loss", "train_accuracy", "accuracy"}
    assert list(doc["methods"]) == list(METHODS)
    assert set(doc["summary"]) == set(doc["ranks"]) == {"accuracy", "held_out_loss"}
    assert list(doc["summary"]["accuracy"]) == ["pretrained", *METHODS]
    steps = doc["config"]["steps"]
    for name, r in ((n, r) for n, rs in doc["methods"].items() for r in rs):
        for key in ("trainable_params", "total_params", "weight_bytes", "peak_bytes", "seed"):
            assert isinstance(r[key], int) and r[key] >= (key != "seed"), (name, key)
        for key in ("seconds_per_step", "seconds", "final_train_loss", "final_held_out_loss",
                    "initial_held_out_loss", "lr"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key)
        for key in ("initial_accuracy", "final_accuracy", "final_train_accuracy"):
            assert 0 <= r[key] <= 1, (name, key)
        assert ("rank" in r) == ("alpha" in r) == (name != "full")
        assert len(r["train_curve"]) == steps
        curve = r["held_out_curve"]              # [step, held-out loss, held-out accuracy]
        assert curve[0][0] == 0 and curve[-1][0] == steps and all(len(p) == 3 for p in curve)
        assert curve[-1][1:] == [r["final_held_out_loss"], r["final_accuracy"]]
    assert [row[0] for row in doc["table"]] == ["pretrained", *METHODS]


def test_sweep_in_json(quick_run):
    """Every (method, rank, seed) of the sweep once, alpha = s r, the table's runs reused, and a
    summary whose stats are those of the runs."""
    doc = quick_run["doc"]
    cfg, sw = doc["config"], doc["sweep"]
    assert sw["methods"] == list(cfg["sweep_methods"]) == ["lora", "dora"]
    assert sw["ranks"] == list(cfg["sweep_ranks"]) and sw["seeds"] == [0, 1]
    s = cfg["alpha"] / cfg["rank"]
    assert sw["alpha_over_rank"] == s
    keys = [(r["method"], r["rank"], r["seed"]) for r in sw["runs"]]
    assert keys == [(m, r, k) for m in sw["methods"] for r in sw["ranks"] for k in sw["seeds"]]
    for run in sw["runs"]:
        assert run["alpha"] == s * run["rank"]
        assert 0 <= run["final_accuracy"] <= 1 and math.isfinite(run["final_held_out_loss"])
        if run["rank"] == cfg["rank"]:                     # the table's run, reused
            main = doc["methods"][run["method"]][doc["seeds"].index(run["seed"])]
            assert run["final_held_out_loss"] == main["final_held_out_loss"]
            assert run["seconds"] == main["seconds"]
    assert len(sw["summary"]) == len(sw["methods"]) * len(sw["ranks"])
    for row in sw["summary"]:
        runs = [r for r in sw["runs"] if (r["method"], r["rank"]) == (row["method"], row["rank"])]
        acc = [r["final_accuracy"] for r in runs]
        assert row["accuracy"]["n"] == len(sw["seeds"])
        assert row["accuracy"]["min"] == min(acc) and row["accuracy"]["max"] == max(acc)
        assert row["accuracy"]["mean"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
        assert row["trainable_params"] == runs[0]["trainable_params"]
    lora = {row["rank"]: row["trainable_params"] for row in sw["summary"]
            if row["method"] == "lora"}
    r0 = min(lora)
    assert all(lora[r] == lora[r0] * r // r0 for r in lora)   # r (in + out) per adapted layer
    out = quick_run["stdout"]
    assert "rank sweep: held-out accuracy and loss, mean [min, max] over 2 seed(s)" in out


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_png_plots(quick_run):
    for name in ("losses.png", "rank_sweep.png"):
        path = quick_run["out"] / name
        assert 10_000 < path.stat().st_size < 200_000, name
        w, h = _png_size(path)
        assert w >= 600 and h >= 250, (name, w, h)


def test_second_run_uses_the_cache_and_gives_the_same_numbers(quick_run, tmp_path):
    rc, stdout, stderr = _run_main(["demo", "--quick", "--methods", "full", "--no-sweep",
                                    "--out", str(tmp_path), "--cache-dir", str(quick_run["cache"])])
    assert rc == 0, stderr
    assert "skipping pretraining" in stdout
    assert "skipping pretraining" not in quick_run["stdout"]
    doc = json.loads((tmp_path / "results.json").read_text())
    first, again = quick_run["doc"]["methods"]["full"], doc["methods"]["full"]
    assert [r["final_held_out_loss"] for r in again] == [r["final_held_out_loss"] for r in first]
    assert [r["train_curve"] for r in again] == [r["train_curve"] for r in first]
    assert len(list(quick_run["cache"].glob("pretrained-*.safetensors"))) == 1
    assert doc["sweep"] is None and not (tmp_path / "rank_sweep.png").exists()


def test_corrupt_cache_entry_is_ignored_and_replaced(quick_run, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in quick_run["cache"].iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    weights = next(cache.glob("pretrained-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])           # truncated
    rc, stdout, stderr = _run_main(["demo", "--quick", "--methods", "full", "--no-sweep",
                                    "--out", str(tmp_path / "o"), "--cache-dir", str(cache)])
    assert rc == 0, stderr
    assert "ignoring the unreadable cache entry" in stdout and "skipping pretraining" not in stdout
    first = next(quick_run["cache"].glob("pretrained-*.safetensors"))
    assert weights.read_bytes() == first.read_bytes()


def test_entry_point_subprocess(tmp_path):
    env = {**os.environ, "MINIDORA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "minidora", "demo", "--quick", "--methods", "lora,qdora",
           "--sweep-methods", "qdora", "--sweep-ranks", "2,1", "--seeds", "1",
           "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=time_limit(300))
    assert p.returncode == 0, p.stderr
    assert re.search(r"^lora\s", p.stdout, re.M) and re.search(r"^qdora\s", p.stdout, re.M)
    assert not re.search(r"^dora\s", p.stdout, re.M)
    assert list((tmp_path / "cache").glob("pretrained-*.json"))   # the env var chose the cache
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["backend"] == "auto"
    assert [(r["method"], r["rank"], r["seed"]) for r in doc["sweep"]["runs"]] == [
        ("qdora", 1, 0), ("qdora", 2, 0)]
    assert "rank sweep: qdora at r = 1, 2, 1 seed each" in p.stdout


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the demo gets as far as running: bad input must be rejected before any work
    (some of it used to crash the process or train for minutes once the run had started)."""
    monkeypatch.delenv("MINIDORA_DEBUG", raising=False)

    def run(*args, **kwargs):
        pytest.fail("the run started")    # a BaseException: main() cannot swallow it

    monkeypatch.setattr("minidora.apps.demo.main.run", run)


@pytest.mark.parametrize("args, needle", [
    (["--methods", "lora,bogus"], "--methods"),
    (["--methods", ",,"], "--methods: no method given"),
    (["--rank", "0"], "--rank"),
    (["--rank", "33"], "--rank: got 33; expected an integer in 1..32"),   # --quick: 32 wide
    (["--rank", "100000"], "min(in_features, out_features)"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "100001"], "--steps: got 100001; expected an integer in 1..100000"),
    (["--pretrain-steps", "100001"], "--pretrain-steps: got 100001"),
    (["--alpha", "-1"], "--alpha"),
    (["--alpha", "nan"], "--alpha: got nan"),
    (["--alpha", "inf"], "--alpha: got inf"),
    (["--alpha", "1e308"], "--alpha: got 1e+308; expected a finite number > 0 and <= 1000000"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads: got 100000; expected an integer in 1..256"),
    (["--seed", "-1"], "--seed: got -1; expected an integer in 0..9223372036854775807"),
    (["--seed", str(2**63)], "--seed"),
    (["--seed", str(2**70)], "--seed: got 1180591620717411303424"),
    (["--seeds", "0"], "--seeds: got 0; expected an integer in 1..20"),
    (["--seeds", "21"], "--seeds: got 21"),
    (["--sweep-methods", "full"], "--sweep-methods: unknown method 'full'; expected some of "
                                  "lora, dora, qlora, qdora"),
    (["--sweep-methods", "lora", "bogus"], "--sweep-methods: unknown method 'bogus'"),
    (["--sweep-methods", ","], "--sweep-methods: no method given"),
    (["--sweep-ranks", "0"], "--sweep-ranks: got 0; expected an integer in 1..32"),
    (["--sweep-ranks", "1,2,33"], "--sweep-ranks: got 33"),
    (["--sweep-ranks", "two"], "--sweep-ranks: got 'two'; expected an integer"),
    (["--sweep-ranks", " , "], "--sweep-ranks: no rank given"),
    (["--no-sweep", "--sweep-methods", "lora"], "--no-sweep: --sweep-methods and --sweep-ranks "
                                                "set the sweep"),
    (["--no-sweep", "--sweep-ranks", "1"], "--no-sweep"),
])
def test_bad_input_exits_with_one_line(no_run, tmp_path, args, needle):
    rc, stdout, stderr = _run_main(["demo", "--quick", "--out", str(tmp_path / "o"),
                                    "--cache-dir", str(tmp_path / "c"), *args])
    assert rc == 1, stderr
    assert stderr.startswith("minidora demo: error: ") and stderr.count("\n") == 1, stderr
    assert needle in stderr and "Traceback" not in stderr
    assert not (tmp_path / "c").exists()   # rejected before any work


def test_bounds_are_inclusive(tmp_path):
    """The largest seed, rank, alpha and seed count and the smallest step counts all run."""
    rc, _, stderr = _run_main(["demo", "--quick", "--methods", "lora", "--seed", str(2**63 - 1),
                               "--rank", "32", "--alpha", "1e6", "--steps", "1",
                               "--pretrain-steps", "1", "--sweep-methods", "lora",
                               "--sweep-ranks", "32", "--seeds", "20",
                               "--out", str(tmp_path), "--no-cache"])
    assert rc == 0, stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    cfg = doc["config"]
    assert (cfg["seed"], cfg["rank"], cfg["alpha"], cfg["steps"]) == (2**63 - 1, 32, 1e6, 1)
    assert cfg["sweep_ranks"] == [32] and cfg["seeds"] == 20
    assert doc["sweep"]["seeds"] == [2**63 - 1 + k for k in range(20)]


def test_output_and_cache_paths_in_the_way(no_run, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "o" / "results.json").mkdir(parents=True)
    (tmp_path / "s" / "rank_sweep.png").mkdir(parents=True)
    cases = [(["--out", str(a_file)], f"--out: {str(a_file)!r} exists and is not a folder"),
             (["--out", str(a_file / "o")], "--out: cannot write to"),
             (["--out", str(tmp_path / "o")], "results.json' is in the way"),
             (["--out", str(tmp_path / "s")], "rank_sweep.png' is in the way"),
             (["--cache-dir", str(a_file)], "--cache-dir: "),
             ([], "$MINIDORA_CACHE: ")]
    monkeypatch.setenv("MINIDORA_CACHE", str(a_file))
    for args, needle in cases:
        rc, _, stderr = _run_main(["demo", "--quick", "--out", str(tmp_path / "p"), *args])
        assert rc == 1 and stderr.count("\n") == 1 and needle in stderr, (args, stderr)


def test_unwritable_output_folder_subprocess(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = {**os.environ, "MINIDORA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "minidora", "demo", "--quick", "--out", str(blocker / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=time_limit(120))
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "--out" in p.stderr, p.stderr


@pytest.mark.parametrize("args, needle", [
    (["--backend", "fast"], "--backend"),
    (["--rank", "1.5"], "--rank"),
    (["--out", ""], "argument --out: empty path"),          # Path("") would be the current folder
    (["--cache-dir", " "], "argument --cache-dir: empty path"),
])
def test_argparse_errors_exit_2(no_run, args, needle):
    rc, _, stderr = _run_main(["demo", "--quick", *args])
    assert rc == 2 and needle in stderr, stderr


@pytest.mark.parametrize("error", [RuntimeError("disk on fire\nsecond line"), KeyboardInterrupt()])
def test_unexpected_error_and_interrupt_in_process(tmp_path, monkeypatch, error):
    def run(*args, **kwargs):
        raise error

    monkeypatch.setattr("minidora.apps.demo.main.run", run)
    monkeypatch.delenv("MINIDORA_DEBUG", raising=False)
    argv = ["demo", "--quick", "--out", str(tmp_path / "o"), "--no-cache"]
    try:
        rc, _, stderr = _run_main(argv)
    except KeyboardInterrupt:    # would end the whole test session
        pytest.fail("KeyboardInterrupt escaped main()")
    if isinstance(error, KeyboardInterrupt):
        assert (rc, stderr) == (130, "minidora demo: interrupted\n")
    else:
        assert (rc, stderr) == (1, "minidora demo: error: RuntimeError: disk on fire "
                                   "(run with MINIDORA_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("MINIDORA_DEBUG", "1")
    with pytest.raises(type(error)):
        main(argv)


def _interrupt_after_first_line(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait for its first line on stdout (it is under way), send SIGINT, collect."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("MINIDORA_DEBUG", None)
    # A shell that starts the tests in the background ignores SIGINT; the child would inherit that.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=cwd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, p.kill)
    watchdog.start()
    try:
        first = p.stdout.readline()
        assert first, p.communicate()[1]           # it printed nothing and exited
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate()
    finally:
        watchdog.cancel()
    return subprocess.CompletedProcess(cmd, p.returncode, first + stdout, stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_demo_subprocess(tmp_path):
    p = _interrupt_after_first_line(
        [sys.executable, "-m", "minidora", "demo", "--quick", "--pretrain-steps", "100000",
         "--no-cache", "--out", str(tmp_path / "o")], tmp_path)
    assert p.stdout.startswith("pretraining on")
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1] == "minidora demo: interrupted"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_verify_subprocess(tmp_path):
    (tmp_path / "slow.py").write_text("import time\n"
                                      "print('importing', flush=True)\n"
                                      "time.sleep(300)\n")
    p = _interrupt_after_first_line([sys.executable, "-m", "minidora", "verify", "slow.py:quantize",
                                     "--kind", "nf4"], tmp_path)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1] == "minidora verify: interrupted"


def test_compiled_backend(tmp_path):
    rc, stdout, stderr = _run_main(["demo", "--quick", "--methods", "qlora", "--no-sweep",
                                    "--backend", "compiled", "--out", str(tmp_path / "o"),
                                    "--cache-dir", str(tmp_path / "c")])
    if minidora.ops.extension_available():
        assert rc == 0, stderr
        assert minidora.ops.get_backend() == "auto"   # restored after the run
    else:
        assert rc == 1 and len(stderr.strip().splitlines()) == 1 and "--backend" in stderr


def test_reference_and_compiled_nf4_paths_agree(quick_run, tmp_path):
    """--backend reference runs the plain PyTorch NF4 path; it must train to the same numbers as
    the default run (the compiled op when built) up to float32 summation order over 16 steps
    (a few float32 ulps, 1e-6 relative). The reference dequantizes each whole weight, a tensor the
    dispatcher sees; the compiled op does not, so its peak memory is lower: proof the switch
    acts."""
    rc, _, stderr = _run_main(["demo", "--quick", "--methods", "qlora", "qdora", "--no-sweep",
                               "--backend", "reference", "--out", str(tmp_path),
                               "--cache-dir", str(quick_run["cache"])])
    assert rc == 0, stderr
    assert minidora.ops.get_backend() == "auto"   # restored after the run
    ref = json.loads((tmp_path / "results.json").read_text())["methods"]
    for name, k in (("qlora", 0), ("qlora", 1), ("qdora", 0), ("qdora", 1)):
        a, b = ref[name][k], quick_run["doc"]["methods"][name][k]
        assert a["weight_bytes"] == b["weight_bytes"]
        for key in ("initial_held_out_loss", "final_train_loss", "final_held_out_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), (name, key)
        if minidora.ops.extension_available():
            assert a["peak_bytes"] > b["peak_bytes"], name
        else:
            assert a["peak_bytes"] == b["peak_bytes"], name


# --- pieces --------------------------------------------------------------------------------------

def test_shipped_texts_are_the_generators_output():
    assert data.read_text(data.TEXT_A) == data.make_tales()
    assert data.read_text(data.TEXT_B) == data.make_numbers()
    sizes = [(ROOT / "minidora" / "data" / n).stat().st_size for n in (data.TEXT_A, data.TEXT_B)]
    assert sum(sizes) < 300_000
    assert set(data.make_numbers()) <= set(data.make_tales())  # text B needs no new characters
    tok, _, _ = data.load_corpora()
    assert len(tok.alphabet) == DEMO_MODEL.vocab_size


def test_number_words():
    assert [data.number_word(n) for n in (0, 13, 40, 42, 100, 110, 342, 999)] == [
        "zero", "thirteen", "forty", "forty two", "one hundred", "one hundred ten",
        "three hundred forty two", "nine hundred ninety nine"]
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match=f"n={bad} is out of range"):
            data.number_word(bad)


def test_numbers_are_right_and_split_by_problem():
    tok, a, b = data.load_corpora()
    lines = data.make_numbers().splitlines()
    assert len(lines) == len(set(lines)) == 1000
    words = {data.number_word(n): n for n in range(1000)}
    assert len(words) == 1000
    for ln in lines:
        m = re.fullmatch(r"([a-z ]+) is (\d+)\.", ln)
        assert words[m[1]] == int(m[2]), ln
    held = set(b.held_out_lines)
    assert len(held) == 150 and set(b.train_lines) | held == set(lines)
    train_lines = set(tok.decode(b.train).splitlines())
    assert not held & train_lines and train_lines == set(b.train_lines)
    # Text A has the numbers in words and in figures, never the two side by side.
    tales = data.make_tales()
    assert re.search(r"\d", tales) and "hundred" in tales
    assert not re.search(r"[a-z] is \d", tales)


def test_problems_mask_everything_but_the_answer():
    tok, _, _ = data.load_corpora()
    lines = ["forty two is 42.", "three hundred is 300."]
    p = data.problems(tok, lines)
    assert p.x.shape == p.y.shape == (2, len(lines[1])) and p.lengths.tolist() == [16, 21]
    assert tok.decode(p.x[0, :16]) == "\n" + lines[0][:-1]    # input: newline, then the line
    answer = p.y[0] != data.IGNORE
    assert tok.decode(p.y[0][answer]) == "42."
    assert answer.nonzero().flatten().tolist() == [13, 14, 15]
    assert (p.y[0, 16:] == data.IGNORE).all()                  # padding
    x, y = p.batch(torch.tensor([0, 0]))
    assert x.shape == y.shape == (2, 16)                       # cut to the longest row drawn
    with pytest.raises(ValueError, match="has no ' is '"):
        data.problems(tok, ["forty two"])


def test_peak_memory_meter_counts_live_tensors():
    a = torch.randn(1000, 1000)                        # 4 MB, alive before: the baseline
    with PeakTensorMemory([a]) as meter:
        b = a * 2                                      # +4 MB
        c = b + 1                                      # +4 MB: peak 12 MB
        del b
        d = c * 3                                      # b was freed first: still 12 MB
        del c, d
        e = torch.empty(100)                           # 400 B
    assert meter.baseline_bytes == 4_000_000
    assert meter.peak_bytes == 12_000_000
    w = torch.randn(300, 100, requires_grad=True)
    with PeakTensorMemory([w]) as meter:
        (w * 2).exp().sum().backward()
    # forward: exp's output (saved for backward) and the scalar sum; backward: the grad of exp
    # and w.grad; w * 2 is freed once exp has run (a multiplication by a constant saves nothing).
    assert meter.peak_bytes - meter.baseline_bytes == 120_000 * 2 + 4 + 4
    assert w.grad is not None and e.numel() == 100


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the true next character, except at the final ``.`` of the
    answers of the ``wrong`` rows (there it goes to the next id: one wrong character)."""

    def __init__(self, probs, wrong, v):
        super().__init__()
        self.probs, self.wrong, self.v = probs, wrong, v

    def forward(self, x):
        assert torch.equal(x, self.probs.x)
        target = self.probs.y.clamp(min=0).clone()                     # [n, T]
        for i in self.wrong:
            target[i, self.probs.lengths[i] - 1] += 1
        return torch.nn.functional.one_hot(target, self.v).float() * 30.0


def test_score_is_greedy_exact_match():
    tok, _, b = data.load_corpora()
    probs = data.problems(tok, b.held_out_lines[:10])
    v = len(tok.alphabet)
    loss, acc = score(_Oracle(probs, set(), v), probs)
    assert acc == 1.0 and loss < 1e-10
    loss, acc = score(_Oracle(probs, {1, 4, 7}, v), probs)
    assert acc == pytest.approx(0.7)
    n_answer = int((probs.y != data.IGNORE).sum())
    assert loss == pytest.approx(3 * 30.0 / n_answer, rel=1e-5)   # 3 characters cost 30 nats


def test_sweep_summary_and_table():
    runs = [{"method": m, "rank": r, "seed": k, "trainable_params": 10 * r,
             "final_accuracy": acc, "final_held_out_loss": 1 - acc}
            for m, r, k, acc in [("lora", 1, 0, 0.1), ("lora", 1, 1, 0.3), ("lora", 4, 0, 0.5),
                                 ("lora", 4, 1, 0.9), ("dora", 1, 0, 0.2)]]
    rows = sweep.summarize(runs)
    assert [(r["method"], r["rank"]) for r in rows] == [("lora", 1), ("lora", 4), ("dora", 1)]
    assert rows[0]["accuracy"] == pytest.approx({"mean": 0.2, "min": 0.1, "max": 0.3,
                                                 "std": 0.02 ** 0.5, "n": 2, "non_finite": 0})
    assert rows[2]["accuracy"]["std"] == 0.0 and rows[2]["trainable_params"] == 10
    assert set(rows[0]) == {"method", "rank", "trainable_params", "accuracy", "held_out_loss"}
    text = sweep.format_sweep(rows).splitlines()
    assert text[1].split() == ["method", "metric", "r=1", "r=4"]
    assert text[3].split() == ["lora", "acc", "20%", "[10%,", "30%]", "70%", "[50%,", "90%]"]
    assert text[5].split() == ["dora", "acc", "20%", "[20%,", "20%]"]   # no r=4 run: empty
    assert text[7:] == ["what the seeds tell apart:",
                        "  lora r=4 vs lora r=1: acc: lora r=4 better; loss: lora r=4 better",
                        "  dora r=1 vs lora r=1: acc: not distinguishable here; loss: not "
                        "distinguishable here"]
    runs[1]["final_accuracy"] = 0.5                    # lora r=1 now touches lora r=4: a tie
    assert "  lora r=4 vs lora r=1: acc: not distinguishable here; loss: lora r=4 better" in (
        sweep.format_sweep(sweep.summarize(runs)).splitlines())


# --- the table over seeds: mean, range, ranks, words ---------------------------------------------

def _fake_runs(acc: dict[str, list[float]], loss: dict[str, list[float]]) -> dict[str, list]:
    """Per-seed results with the keys the table reads, from {method: [value per seed]}."""
    return {m: [{"trainable_params": 1000, "weight_bytes": 4000, "peak_bytes": 9000 + k,
                 "seconds_per_step": 0.01, "final_train_accuracy": a, "final_accuracy": a,
                 "final_held_out_loss": lo}
                for k, (a, lo) in enumerate(zip(acc[m], loss[m], strict=True))]
            for m in acc}


BASE = {"train_loss": 4.5, "held_out_loss": 4.4, "train_accuracy": 0.0, "accuracy": 0.0}


def _said(acc: dict, loss: dict) -> dict[str, str]:
    """{"a vs b": its verdicts} from the comparison lines of the table of these numbers."""
    text = report.format_table(_fake_runs(acc, loss), BASE, list(range(5)))
    return {m[1]: re.sub(r"  +", "  ", m[2]) for m in
            re.finditer(r"^  (?:[\w -]+?  +)?(\w+ vs \w+) +(acc: .*)$", text, re.M)}


def test_overlapping_ranges_are_not_ordered_and_disjoint_ones_are():
    """Random per-seed numbers; the words and ranks follow the ranges: move qlora's seeds clear
    of lora's and the verdict changes from a tie to an order; one seed back, a tie again."""
    g = torch.Generator().manual_seed(7)

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(5, generator=g, dtype=torch.float64)).tolist()

    acc = {"full": u(0.90, 0.97), "lora": u(0.40, 0.80), "dora": u(0.55, 0.75),
           "qlora": u(0.45, 0.85), "qdora": u(0.20, 0.30)}
    loss = {"full": u(0.05, 0.2), "lora": u(0.8, 1.1), "dora": u(0.85, 1.0),
            "qlora": u(0.9, 1.2), "qdora": u(1.3, 1.5)}
    assert min(acc["qlora"]) < max(acc["lora"]) and min(loss["qlora"]) < max(loss["lora"])
    said = _said(acc, loss)
    assert said["full vs lora"] == "acc: full better  loss: full better"
    assert said["qlora vs lora"] == "acc: not distinguishable here  loss: not distinguishable here"
    assert said["qdora vs dora"] == "acc: dora better  loss: dora better"
    assert said["dora vs lora"] == "acc: not distinguishable here  loss: not distinguishable here"
    assert said["qdora vs pretrained"] == "acc: qdora better  loss: qdora better"
    runs = _fake_runs(acc, loss)
    rows = {r[0]: r for r in report.table_rows(runs, BASE, report.summarize(runs, BASE))}
    for m in acc:                                   # five seeds: the mean is not the median
        pct = [100 * a for a in acc[m]]
        assert rows[m][6] == f"{sum(pct) / 5:.1f}% [{min(pct):.1f}%, {max(pct):.1f}%]"
        assert rows[m][8] == f"{sum(loss[m]) / 5:.3f} [{min(loss[m]):.3f}, {max(loss[m]):.3f}]"
    rank = {m: (r[7], r[9]) for m, r in rows.items()}
    assert rank == {"pretrained": ("4", "4"), "full": ("1", "1"), "lora": ("2=", "2="),
                    "dora": ("2=", "2="), "qlora": ("2=", "2="), "qdora": ("3", "3")}
    text = report.format_table(runs, BASE, list(range(5)))
    assert "disjoint ranges by chance 0.8% of the time (2 / C(10, 5))" in text
    # qlora's seeds all above lora's best, and its losses all below lora's lowest: now ordered.
    acc["qlora"] = [max(acc["lora"]) + 0.01 + 0.001 * k for k in range(5)]
    loss["qlora"] = [min(loss["lora"]) - 0.01 - 0.001 * k for k in range(5)]
    assert _said(acc, loss)["qlora vs lora"] == "acc: qlora better  loss: qlora better"
    # One seed of qlora back on lora's best (touching counts as overlap): a tie on that metric.
    acc["qlora"][2] = max(acc["lora"])
    assert _said(acc, loss)["qlora vs lora"] == "acc: not distinguishable here  loss: qlora better"


def _connected(a: str, b: str, ivs: dict[str, tuple[float, float]]) -> bool:
    """Whether a and b are joined by a chain of overlapping (or touching) intervals."""
    seen, todo = {a}, [a]
    while todo:
        x = todo.pop()
        for y, (lo, hi) in ivs.items():
            if y not in seen and lo <= ivs[x][1] and ivs[x][0] <= hi:
                seen.add(y)
                todo.append(y)
    return b in seen


@pytest.mark.parametrize("higher", [True, False])
def test_ranks_never_order_overlapping_ranges(higher):
    """Random ranges, checked by brute force: names with different ranks are apart, the better
    rank on the better side; names with the same rank are chained by overlaps; a tie is marked."""
    g = torch.Generator().manual_seed(11 + higher)
    for _ in range(200):
        n = int(torch.randint(1, 8, (1,), generator=g))
        lo = torch.randint(0, 20, (n,), generator=g).tolist()
        width = torch.randint(0, 6, (n,), generator=g).tolist()
        ivs = {f"m{i}": (float(lo[i]), float(lo[i] + width[i])) for i in range(n)}
        summary = {k: {"mean": (a + b) / 2, "min": a, "max": b, "n": 3}
                   for k, (a, b) in ivs.items()}
        rank = compare.ranks(summary, higher)
        num = {k: int(v.rstrip("=")) for k, v in rank.items()}
        assert sorted(set(num.values())) == list(range(1, max(num.values()) + 1))
        for a in ivs:
            assert rank[a].endswith("=") == (list(num.values()).count(num[a]) > 1)
            for b in ivs:
                if num[a] < num[b]:
                    assert compare.apart(summary[a], summary[b], higher) == 1, (ivs, rank)
                elif num[a] == num[b]:
                    assert _connected(a, b, ivs), (ivs, rank)


def test_ranks_of_a_wide_range_that_reaches_the_top():
    """A method with a low mean whose range reaches the best one's ties with everything it
    touches: ordering by mean alone would put it below the best."""
    s = {"a": {"mean": 0.9, "min": 0.85, "max": 0.95},
         "b": {"mean": 0.5, "min": 0.45, "max": 0.55},
         "c": {"mean": 0.4, "min": 0.0, "max": 0.9}}
    assert compare.ranks(s, True) == {"a": "1=", "b": "1=", "c": "1="}
    s["c"]["max"] = 0.5
    assert compare.ranks(s, True) == {"a": "1", "b": "2=", "c": "2="}
    assert compare.ranks(s, False) == {"a": "2", "b": "1=", "c": "1="}


@pytest.mark.parametrize("n, m", [(1, 1), (2, 3), (3, 3), (4, 4), (5, 5)])
def test_chance_apart_by_enumeration(n, m):
    """2 / C(n + m, n): the share of the ways to split n + m distinct values into groups of n
    and m where one group lies entirely above the other (counted here by enumeration)."""
    import itertools

    values = set(range(n + m))
    splits = list(itertools.combinations(sorted(values), n))
    apart = sum(1 for a in splits
                if min(a) > max(values - set(a)) or max(a) < min(values - set(a)))
    assert compare.chance_apart(n, m) == pytest.approx(apart / len(splits), rel=1e-15)


def test_stats_of_no_values_is_an_error():
    with pytest.raises(ValueError, match=r"values: got \[\]; expected one or more numbers"):
        compare.stats([])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_seed_is_neither_ranked_nor_compared(tmp_path, bad):
    """A seed whose loss is NaN or infinite: the cell says so, the row gets no rank on that
    metric, its comparisons say they cannot tell, the other metric is unaffected, and the JSON
    stays strict (null)."""
    acc = {"lora": [0.5, 0.6, 0.7], "qlora": [0.8, 0.85, 0.9]}
    loss = {"lora": [1.0, 1.1, 1.2], "qlora": [0.5, bad, 0.7]}
    runs = _fake_runs(acc, loss)
    rows = {r[0]: r for r in report.table_rows(runs, BASE, report.summarize(runs, BASE))}
    assert rows["qlora"][8:] == ["non-finite: 1 of 3", "-"]
    assert rows["qlora"][6:8] == ["85.0% [80.0%, 90.0%]", "1"]
    assert rows["lora"][9] == "1" and rows["pretrained"][9] == "2"
    said = {m[1]: m[2] for m in re.finditer(r"^  (?:[\w -]+?  +)?(\w+ vs \w+) +(acc: .*)$",
                                            report.format_table(runs, BASE, [0, 1, 2]), re.M)}
    assert re.sub(r"  +", "  ", said["qlora vs lora"]) == (
        "acc: qlora better  loss: cannot tell: a seed of qlora diverged")
    doc = report.document({}, {}, BASE, runs, [0, 1, 2], None, 1.0)
    report.write_json(tmp_path / "r.json", doc)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["summary"]["held_out_loss"]["qlora"]["mean"] is None
    assert back["summary"]["held_out_loss"]["qlora"]["non_finite"] == 1
    assert back["ranks"]["held_out_loss"]["qlora"] == "-"


# --- the compute dtype line and the progress lines ----------------------------------------------



def test_quick_run_says_its_compute_dtype(quick_run):
    """float32 by default on every CPU; the line says whether bfloat16 would be native here."""
    here = "native" if minidora.ops.cpu_native_bf16() else "emulated"
    assert (f"compute dtype float32 (the default; --compute-dtype bfloat16 asks for bfloat16, "
            f"{here} on this CPU)") in quick_run["stdout"].splitlines()


@pytest.mark.parametrize("isa, emulated", [("avx2", True), ("avx512bf16", False)])
def test_bfloat16_asked_for_is_said_to_be_emulated_where_it_is(quick_run, tmp_path, monkeypatch,
                                                               isa, emulated):
    """--compute-dtype bfloat16 wins on every CPU; on one without native bfloat16 the line says
    it is emulated. With stdout not a terminal and the quiet first seconds set to none, every
    fine-tuning step of the quick run says where the run is."""
    from minidora.apps.demo import progress

    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    with forced_isa(isa):
        rc, stdout, stderr = _run_main(["demo", "--quick", "--methods", "qlora", "--no-sweep",
                                        "--seeds", "1", "--compute-dtype", "bfloat16", "--out",
                                        str(tmp_path / "o"), "--cache-dir",
                                        str(quick_run["cache"])])
    assert rc == 0, stderr
    line = "compute dtype bfloat16 (asked for with --compute-dtype)" + (
        "; this CPU has no native bfloat16 arithmetic (CPU kernels avx2), so bfloat16 is "
        "emulated, several times slower than float32" if emulated else "")
    assert line in stdout.splitlines()
    steps = json.loads((tmp_path / "o" / "results.json").read_text())["config"]["steps"]
    done = [int(m[1]) for m in re.finditer(r"^  qlora: step (\d+)/(\d+), loss \d+\.\d{3}, \d+ s "
                                           r"elapsed, (about \d+ s left|done)$", stdout, re.M)]
    assert done == list(range(1, steps + 1))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("per_step, total, want", [
    (1.0, 40, [12, 16, 20, 24, 28, 32, 36, 40]),   # a tenth of the steps, after 10 quiet s
    (50.0, 40, list(range(1, 41))),                # every 30 s at least: every step
    (0.1, 40, []),                                 # done in 4 s: no line
    (1.0, 7, []),                                  # 7 s
    (4.0, 7, [3, 4, 5, 6, 7]),                     # every step (a tenth of 7 is less than 1)
])
def test_progress_lines_come_every_tenth_or_every_30_seconds(per_step, total, want):
    from minidora.apps.demo.progress import Progress

    clock, lines = FakeClock(), []
    p = Progress(total, "  lora", lines.append, enabled=True, clock=clock)
    for step in range(total):
        clock.t += per_step
        p.update(step + 1, loss=2.0)
    assert [int(re.match(r"  lora: step (\d+)/", ln)[1]) for ln in lines] == want


def test_progress_line_says_elapsed_and_left():
    from minidora.apps.demo.progress import Progress, duration

    clock, lines = FakeClock(), []
    p = Progress(40, "  qlora", lines.append, enabled=True, clock=clock)
    clock.t = 400.0
    p.update(8, loss=1.9137)
    clock.t = 2000.0
    p.update(40, loss=1.0)
    assert lines == ["  qlora: step 8/40, loss 1.914, 6m40s elapsed, about 26m40s left",
                     "  qlora: step 40/40, loss 1.000, 33m20s elapsed, done"]
    assert [duration(s) for s in (0.4, 59.4, 60, 3599, 3600, 7530)] == [
        "0 s", "59 s", "1m00s", "59m59s", "1h00m", "2h05m"]


def test_progress_lines_only_when_stdout_is_not_a_terminal(monkeypatch):
    from minidora.apps.demo.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not Progress(10, "x").enabled                # the tqdm bar shows where it is
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert Progress(10, "x").enabled


def test_compute_dtype_rejects_an_unknown_preferred_dtype():
    from minidora.apps.demo.precision import compute_dtype

    with pytest.raises(ValueError, match=r"preferred must be one of \('float32', 'bfloat16'\), "
                                         r"got 'float16'"):
        compute_dtype(None, preferred="float16")
