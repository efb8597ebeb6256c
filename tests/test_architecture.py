"""The layers of docs/architecture.md, checked on the source: the core's modules import each other
in reading order (no forward reference, so no circle), every module of the package is free of
import circles, and each core module imports on its own in a fresh interpreter.

Imports are read with ``ast`` from every line of a file, those inside functions included: an
import made late to dodge a circle is still a circle for the reader.
"""

import ast
import subprocess
import sys
from pathlib import Path

import minidora
from helpers import time_limit

PACKAGE = Path(minidora.__file__).parent

# The reading order of the core. Each module may import only modules before it; the package
# itself (``__version__``) and the compiled extension ``_C`` are always allowed. ``testing`` is
# the conformance kit, a subpackage read after the core it checks.
CORE_ORDER = [
    "_tables",          # bitsandbytes' 8-bit dynamic map, the double quantization's code
    "nf4",              # the NF4 format: quantize, dequantize, double quantization
    "bnb_checkpoint",   # bitsandbytes' keys for one NF4 weight
    "fp4",              # bitsandbytes' FP4 and a symmetric Int4 (QLoRA's Table 2)
    "backends",         # loading minidora._C; the one switch of the path the ops take
    "_register",        # fake kernels and autograd formulas of torch.ops.minidora.*
    "ops",              # the NF4 linear op: reference, checks, dispatch
    "nf4_linear",       # the frozen 4-bit base layer
    "base",             # what an adapter needs of its base layer
    "_state",           # the adapters' state-dict rules
    "lora",             # LoRA / QLoRA
    "dora",             # DoRA / QDoRA
    "model",            # wrap, report, merge over a whole model
    "checkpoint",       # adapter files: minidora's, PEFT's; bitsandbytes' into a model
    "analysis",         # magnitude and direction of a weight update
    "tutorial",         # set-up of the tutorials
    "testing",          # the conformance kit
]
APPS = "apps"           # the applications: import the core's public names only


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The minidora modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import nf4` imports the module minidora.nf4; `from .nf4 import X`, nf4
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "minidora" or t.startswith("minidora."))
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _unit(module: str) -> str:
    """The entry of CORE_ORDER (or APPS, __main__) a module belongs to."""
    return module.split(".")[1] if module.count(".") else ""


def test_every_core_module_has_its_place_in_the_reading_order():
    units = {_unit(m) for m in _modules()} - {"", APPS, "__main__"}
    assert units <= set(CORE_ORDER), (f"{sorted(units - set(CORE_ORDER))}: give each new core "
                                      "module its place in CORE_ORDER and docs/architecture.md")


def test_the_core_imports_in_reading_order():
    late = []
    for module, deps in _graph().items():
        unit = _unit(module)
        if unit not in CORE_ORDER:
            continue
        for dep in deps:
            dep_unit = _unit(dep)
            if dep in ("minidora", "minidora._C") or dep_unit == unit == "testing":
                continue            # the package's version, the extension, the kit's own files
            if dep_unit not in CORE_ORDER or CORE_ORDER.index(dep_unit) >= CORE_ORDER.index(unit):
                late.append(f"{module} imports {dep}")
    assert not late, "imports against the reading order:\n" + "\n".join(sorted(late))


def test_no_import_circle_anywhere_in_the_package():
    graph = _graph()
    circles, state = [], {}         # state: 1 while on the path, 2 when done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep == "minidora" or dep not in graph:
                continue            # the package's lazy __init__ imports nothing eagerly
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_each_core_module_imports_on_its_own():
    """In a fresh interpreter, each core module imported first (what a reader's `import` does)."""
    core = sorted(f"minidora.{unit}" for unit in CORE_ORDER)
    limit = time_limit(60)
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for m in core}
    failed = []
    for module, proc in procs.items():
        out, _ = proc.communicate(timeout=limit)
        if proc.returncode != 0:
            failed.append(f"import {module}:\n{out[-2000:]}")
    assert not failed, "\n".join(failed)


def test_no_test_file_imports_another():
    """What test files share lives in tests/helpers.py; a test file imported by another would
    run its tests' module-level set-up twice and tie two files' fixtures together."""
    shared = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            shared += [f"{path.name} imports {n}" for n in names if n.startswith("test_")]
    assert not shared, "\n".join(shared)
