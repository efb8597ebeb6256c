"""The tutorials (jupytext percent-format scripts) and the runnable examples of the docs.

Each one checks its own claims with asserts (codebook bit-exact, 4.127 bits, gradcheck...), so
running it to completion at the small size is the test. They run in a subprocess, as a reader
would run them, with the repository root on PYTHONPATH and an off-screen matplotlib backend.
"""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from helpers import skip_without_llm_extra, time_limit, tutorial_params

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
# Each tutorial takes at most a few minutes at the small size on a quiet 2-core machine (tutorial 7,
# the longest: 70 s on a Zen 4; 163 s at MINIDORA_CPU_ISA=avx2 in float32 with the machine at load
# 4); the limit scales with how busy the machine is (helpers.time_limit).
QUIET_LIMIT_S = 600


def run_script(path: Path, tmp_path: Path, size: str = "small") -> subprocess.CompletedProcess:
    env = dict(os.environ, MINIDORA_TUTORIAL_SIZE=size, MPLBACKEND="Agg",
               MINIDORA_TUTORIAL_FIGDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=time_limit(QUIET_LIMIT_S))


def test_all_eight_tutorials_are_there():
    names = [p.name for p in TUTORIALS]
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06", "07", "08"], names


@pytest.mark.parametrize("path", tutorial_params(TUTORIALS))  # 7, 8: llm
def test_tutorial_runs(path, tmp_path):
    skip_without_llm_extra(path)
    done = run_script(path, tmp_path)
    assert done.returncode == 0, (f"{path.name} failed:\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    # figures were drawn and saved (the docs show them inline)
    assert list(tmp_path.glob("*.png")), (f"{path.name} saved no figure into "
                                          "MINIDORA_TUTORIAL_FIGDIR")


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_is_a_percent_notebook(path):
    nb = jupytext.read(path)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and nb.cells[0].source.startswith("# "), path.name
    assert kinds.count("code") >= 4 and kinds.count("markdown") >= 4, (path.name, kinds)


def test_bad_size_is_a_clear_error(tmp_path):
    done = run_script(TUTORIALS[3], tmp_path, size="huge")
    assert done.returncode != 0
    assert "MINIDORA_TUTORIAL_SIZE must be 'default' or 'small', got 'huge'" in done.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_docs_example_runs(path, tmp_path):
    done = run_script(path, tmp_path)
    assert done.returncode == 0, (f"{path.name} failed:\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
