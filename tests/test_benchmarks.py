"""The benchmarks run, say which statistic they print, and refuse to time a wrong kernel."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CPU_LEVELS, time_limit
from minidora import ops

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="minidora._C not built")


def _benchmark(name):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_ext
@pytest.mark.parametrize("stat", ["median", "min"])
def test_bench_nf4_runs_and_names_its_statistic(stat):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_nf4.py"), "--shapes", "64x96",
         "--rows", "1,3", "--repeats", "1", "--skip-bnb", "--threads", "1", "--stat", stat],
        capture_output=True, text=True, timeout=time_limit(300), check=True).stdout
    assert f"milliseconds per call ({stat})" in out and f"ms ({stat})" in out
    other = {"median", "min"} - {stat}
    assert f"({other.pop()})" not in out


def test_bench_check_refuses_a_result_off_by_more_than_rounding():
    check = _benchmark("bench_nf4").check
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(3, 40, generator=g), torch.randn(7, 40, generator=g)
    want = a @ w.T
    check(want + 1e-7 * want.abs(), want, a, w, "fine")          # within float32 rounding
    bad = want.clone()
    bad[1, 2] += 1e-3
    with pytest.raises(SystemExit, match="bad: the compiled result differs"):
        check(bad, want, a, w, "bad")


@needs_ext
@pytest.mark.parametrize("isa, asked, want", [
    ("avx2", None, "float32"), ("avx2", "bfloat16", "bfloat16"),
    ("avx512bf16", None, "bfloat16"), ("avx512bf16", "float32", "float32")])
def test_bench_llm_compute_dtype_follows_the_cpu_unless_given(isa, asked, want):
    """bench_llm.py --compute-dtype (the options only: the real model is not loaded)."""
    best = ops.cpu_isa_best()
    if CPU_LEVELS.index(isa) > CPU_LEVELS.index(best):
        pytest.skip(f"this CPU lacks the kernel level {isa} (its best is {best})")
    bench = _benchmark("bench_llm")
    with ops.use_cpu_isa(isa):
        a = bench.parse_args([] if asked is None else ["--compute-dtype", asked])
    assert a.compute_dtype == want
    assert a.compute_line.startswith(f"compute dtype {want} (")
    with pytest.raises(SystemExit):
        bench.parse_args(["--compute-dtype", "float16"])
    with ops.use_cpu_isa(best):  # --isa forces the level, and with it the default
        a = bench.parse_args(["--isa", isa] + ([] if asked is None else ["--compute-dtype", asked]))
        assert ops.cpu_isa() == isa
    assert a.compute_dtype == want
