"""The notebooks the docs site offers for download, executed as a reader's Jupyter would run them.

docs/hooks.py makes each one from its tutorial with jupytext and puts a cell that installs
minidora first among the code cells. Here each notebook is made the same way and executed in a
fresh Jupyter kernel at the small size, without its install cell (the kernel already imports the
checkout): every cell must run without an error and the figures must show inline.
"""

import importlib.util
import os
from pathlib import Path

import pytest

from helpers import skip_without_llm_extra, time_limit, tutorial_params

nbclient = pytest.importorskip("nbclient", reason="needs nbclient and ipykernel (the test extra)")
pytest.importorskip("ipykernel", reason="needs nbclient and ipykernel (the test extra)")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
# The longest cell is tutorial 7's fine-tune: its whole notebook runs in 63 s at the small size on
# a quiet 2-core Zen 4; the limit scales with how busy the machine is (helpers.time_limit).
QUIET_CELL_LIMIT_S = 300


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


hooks = load_hooks()


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_has_the_install_cell_first(path):
    nb = hooks.tutorial_notebook(path)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].metadata["tags"] == ["install"]
    assert code[0].source.splitlines()[-1] == "%pip install minidora"
    assert "# %env MINIDORA_NO_EXTENSION=1" in code[0].source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "jupytext" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", tutorial_params(TUTORIALS))  # 7, 8: llm
def test_notebook_executes(path, tmp_path, monkeypatch):
    skip_without_llm_extra(path)
    nb = hooks.tutorial_notebook(path)
    nb.cells = [cell for cell in nb.cells if "install" not in cell.metadata.get("tags", [])]
    # the kernel inherits this environment
    monkeypatch.setenv("MINIDORA_TUTORIAL_SIZE", "small")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    monkeypatch.delenv("MINIDORA_TUTORIAL_FIGDIR", raising=False)
    client = nbclient.NotebookClient(nb, timeout=int(time_limit(QUIET_CELL_LIMIT_S)),
                                     startup_timeout=int(time_limit(120)),
                                     kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), \
        f"{path.name}: no figure shown inline"
