"""The boundary between the core and the applications (minidora/apps), read from the source.

An application imports the core's public names only and shares code with another application
through public names (``minidora.apps.common`` or the module that owns it); the core imports no
application. The imports are read with ``ast``, so a name used in a function body counts as
much as one at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import minidora

PACKAGE = Path(minidora.__file__).resolve().parent
COMMANDS = ("demo", "finetune", "train", "verify", "reproduce")


def module_name(path: Path, root: Path) -> str:
    """minidora/apps/demo/cli.py -> minidora.apps.demo.cli (a package is its __init__)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, path: Path, target: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    package = module.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def is_module(name: str, root: Path) -> bool:
    """Whether ``name`` (minidora.x.y) is a module or package of the source tree at ``root``."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def imports(path: Path, root: Path):
    """(line, imported name) for every import of a minidora name in ``path``, with the dotted
    names of private attributes read off an imported minidora module (``ops._C``)."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, str] = {}                    # local name -> the minidora module it is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minidora":
                    found.append((node.lineno, alias.name))
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else "minidora"
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, path, node.module, node.level)
            if source.split(".")[0] != "minidora":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                found.append((node.lineno, full))
                if is_module(full, root):
                    bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                found.append((node.lineno, ".".join([bound[value.id], *reversed(chain)])))
    return found


def app_violations(root: Path, apps: list[Path]) -> list[str]:
    """Every import, in the application files ``apps``, of a private minidora name (a name or a
    module starting with ``_``, dunders aside), wherever it lives, the core or another app, and
    of ``minidora.__main__``, which imports the applications."""
    bad = []
    for path in apps:
        for line, name in imports(path, root):
            parts = name.split(".")
            if any(private(part) for part in parts) or parts[:2] == ["minidora", "__main__"]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name}")
    return bad


def core_violations(root: Path, core: list[Path], apps_package: str) -> list[str]:
    """Every import of an application (``apps_package`` or below) in the core files ``core``."""
    bad = []
    for path in core:
        for line, name in imports(path, root):
            if name == apps_package or name.startswith(apps_package + "."):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name}")
    return bad


def app_files() -> list[Path]:
    return sorted((PACKAGE / "apps").rglob("*.py"))


def core_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "apps" not in p.relative_to(PACKAGE).parts[:1] and p.name != "__main__.py")


def test_every_command_is_an_application():
    names = {module_name(p, PACKAGE) for p in app_files()}
    for want in ("minidora.apps.common", "minidora.apps.demo.cli", "minidora.apps.finetune.cli",
                 "minidora.apps.train.cli", "minidora.apps.verify",
                 "minidora.apps.reproduce.cli"):
        assert want in names
    for old in ("demo", "llm", "distributed", "_cli.py", "testing/cli.py"):
        assert not (PACKAGE / old).exists(), old


def test_applications_import_no_private_name():
    """No ``from minidora.<module> import _name``, no ``import minidora._module``, no
    ``ops._name`` on an imported minidora module: not of the core, not of another app; and no
    import of ``minidora.__main__``."""
    assert len(app_files()) > 20
    assert app_violations(PACKAGE, app_files()) == []


def test_the_core_imports_no_application():
    core = core_files()
    assert PACKAGE / "ops.py" in core and PACKAGE / "testing" / "__init__.py" in core
    assert core_violations(PACKAGE, core, "minidora.apps") == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """The two checks above on a small package that breaks each rule once per form."""
    root = tmp_path / "minidora"
    (root / "apps" / "one").mkdir(parents=True)
    for name in ("__init__.py", "ops.py", "apps/__init__.py", "apps/one/__init__.py",
                 "apps/other.py"):
        (root / name).write_text("")
    (root / "apps" / "one" / "run.py").write_text(
        "import minidora\n"
        "from minidora import ops\n"
        "from ... import ops as core_ops\n"
        "from ..other import _shared, shared\n"
        "from minidora._state import thing\n"
        "from minidora.__main__ import main\n"
        "def f():\n"
        "    from minidora.ops import _check\n"
        "    return ops._C, core_ops._DEVICES, minidora.ops._IMPORT_ERROR, ops.__file__\n")
    (root / "core.py").write_text("from .apps import other\nimport minidora.apps.one.run\n")
    (root / "fine.py").write_text("from . import ops\n")
    lines = app_violations(root, [root / "apps" / "one" / "run.py"])
    assert [ln.split(": ")[1] for ln in lines] == [
        "minidora.apps.other._shared", "minidora._state.thing", "minidora.__main__.main",
        "minidora.ops._check",
        "minidora.ops._C", "minidora.ops._DEVICES", "minidora.ops._IMPORT_ERROR"]
    assert [ln.split(": ")[1] for ln in core_violations(root, [root / "core.py", root / "fine.py"],
                                                        "minidora.apps")] == [
        "minidora.apps.other", "minidora.apps.one.run"]


def test_main_names_every_command_and_imports_no_application_before_parsing(capsys):
    from minidora.__main__ import SUBCOMMANDS, main

    assert all(name.startswith(".apps.") for name in SUBCOMMANDS)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert any(line.startswith(f"    {command}") and line.split()[0] == command
                   for line in out.splitlines()), command
        assert command in minidora.__main__.__doc__.splitlines()[0]
    code = ("import sys, minidora.__main__; print(sorted(m for m in sys.modules "
            "if m.startswith('minidora.apps') or m == 'torch'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert loaded.strip() == "[]"
