"""The tutorials as course material: objectives and prerequisites at the top, questions mid-way,
exercises at the end, and one solutions file per tutorial that passes the same checks.

Each solutions file runs as a script in a subprocess, as a reader would run it (repository root
on PYTHONPATH, small size). It prints "exercise N: correct" for every exercise and shows that each
check rejects the classic mistake. The checks in a tutorial and in its solutions file must be the
same code, so a check fixed in one place cannot drift from the other. And the tutorial's own
exercise cells run twice: as shipped (every stub "not attempted yet") and with the solutions in
place of the stubs (every exercise "correct").
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from helpers import time_limit

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
SOLUTIONS = sorted((ROOT / "tutorials" / "solutions").glob("[0-9][0-9]_solutions.py"))
IDS = [p.stem for p in TUTORIALS]


def run(args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MINIDORA_TUTORIAL_SIZE="small", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=time_limit(600))


def solutions_of(tutorial: Path) -> Path:
    return ROOT / "tutorials" / "solutions" / f"{tutorial.name[:2]}_solutions.py"


def n_exercises(tutorial: Path) -> int:
    return len(re.findall(r"^# ### Exercise \d+:", tutorial.read_text(), re.M))


def checks(path: Path) -> dict[str, str]:
    """{name: ast dump} of the check_exercise_N functions of a file."""
    tree = ast.parse(path.read_text())
    return {node.name: ast.dump(node) for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("check_exercise_")}


def test_one_solutions_file_per_tutorial():
    assert [p.name[:2] for p in SOLUTIONS] == [p.name[:2] for p in TUTORIALS], SOLUTIONS


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=IDS)
def test_tutorial_states_objectives_and_prerequisites(tutorial):
    first = jupytext.read(tutorial).cells[0].source
    for phrase in ("**Learning objectives.** You will be able to:",
                   "**Prerequisites.** You should know:"):
        assert phrase in first, f"{tutorial.name}: the first cell lacks {phrase!r}"
    assert first.index("Learning objectives") < first.index("Prerequisites")


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=IDS)
def test_tutorial_has_questions_and_exercises(tutorial):
    text = tutorial.read_text()
    assert "\n# ## Exercises\n" in text, f"{tutorial.name} has no '## Exercises' section"
    exercises = text[text.index("\n# ## Exercises\n"):]
    assert "### Check your understanding" in text[:text.index("\n# ## Exercises\n")], tutorial.name
    link = f"(solutions/{tutorial.name[:2]}_solutions.py)"
    assert link in exercises, f"{tutorial.name}: the exercises do not link to {link}"
    n = n_exercises(tutorial)
    assert 2 <= n <= 3, f"{tutorial.name}: {n} exercises"
    assert exercises.count("raise NotImplementedError(") >= n       # a stub per exercise
    for i in range(1, n + 1):
        assert f'print("exercise {i}: not attempted yet")' in exercises, (tutorial.name, i)


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=IDS)
def test_solutions_run_the_tutorials_checks(tutorial):
    mine, theirs = checks(tutorial), checks(solutions_of(tutorial))
    assert sorted(mine) == [f"check_exercise_{i}" for i in range(1, n_exercises(tutorial) + 1)]
    assert sorted(theirs) == sorted(mine), f"{solutions_of(tutorial).name} lacks checks"
    for name in mine:
        assert theirs[name] == mine[name], f"{name} differs in {tutorial.name} and its solutions"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=IDS)
def test_solutions_pass(tutorial, tmp_path):
    path = solutions_of(tutorial)
    done = run([str(path)], tmp_path)
    assert done.returncode == 0, f"{path.name}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    for i in range(1, n_exercises(tutorial) + 1):
        assert f"exercise {i}: correct" in done.stdout, (path.name, i, done.stdout[-2000:])
    assert "a mistake caught" in done.stdout, f"{path.name} shows no mistake its checks catch"


def exercise_script(tutorial: Path, filled: bool) -> str:
    """The tutorial's first code cell (imports, setup) and the code cells of its exercises; with
    ``filled``, each stub is followed by the solutions file's function of the same name."""
    cells = jupytext.read(tutorial).cells
    start = next(i for i, c in enumerate(cells) if c.source.startswith("## Exercises"))
    code = [next(c.source for c in cells if c.cell_type == "code")]
    solutions = solutions_of(tutorial).read_text()
    answers = {node.name: ast.get_source_segment(solutions, node)
               for node in ast.parse(solutions).body if isinstance(node, ast.FunctionDef)}
    for cell in cells[start:]:
        if cell.cell_type != "code":
            continue
        code.append(cell.source)
        if filled:
            stubs = [node.name for node in ast.parse(cell.source).body
                     if isinstance(node, ast.FunctionDef) and "NotImplementedError" in
                     ast.get_source_segment(cell.source, node)]
            code += [answers[name] for name in stubs]
    return "\n\n".join(code) + "\n"


@pytest.mark.parametrize("filled", [False, True], ids=["stubs", "solutions"])
def test_exercise_sections_run(filled, tmp_path):
    """Every tutorial's exercise section, as shipped (each exercise "not attempted yet", nothing
    fails) and with the solutions in place of the stubs (each exercise "correct"); one process
    runs all eight."""
    scripts = []
    for tutorial in TUTORIALS:
        script = tmp_path / f"exercises_{tutorial.name}"
        script.write_text(exercise_script(tutorial, filled))
        scripts.append(str(script))
    driver = ("import runpy, sys\n"
              "for path in sys.argv[1:]:\n"
              "    print('==', path)\n"
              "    runpy.run_path(path, run_name='__main__')\n")
    done = run(["-c", driver, *scripts], tmp_path)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    verdict = "correct" if filled else "not attempted yet"
    for tutorial, script in zip(TUTORIALS, scripts, strict=True):
        out = done.stdout.split(f"== {script}\n", 1)[1].split("\n== ", 1)[0]
        for i in range(1, n_exercises(tutorial) + 1):
            assert f"exercise {i}: {verdict}" in out, (tutorial.name, i, out)
