"""A pip-installed minidora carries its golden vectors: build the wheel and the sdist from a copy
of the source tree (without compiling the extension: MINIDORA_NO_EXTENSION=1) and look inside.

The pure-Python build must not need torch (a notebook keeps the torch it has): it runs here with
an importable ``torch`` that raises, and its wheel must ask for a range of torch versions, not
the pin of the compiled extension. The compiled build keeps that pin."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import time_limit
from minidora.testing import golden

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "site", "*.egg-info", "*.so",
                              "__pycache__", ".pytest_cache", "minidora_out")


TORCH_PIN = "torch==2.13.0"   # the compiled extension's torch (setup.py, tools/build_backend.py)
TORCH_PURE = "torch>=2.4"     # a pure-Python install's (setup.py)


def no_torch_env(tmp, **extra) -> dict:
    """The environment with a `torch` first on the path whose import fails."""
    fake = tmp / "no_torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('this build must not import torch')\n")
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    src = tmp_path_factory.mktemp("tree") / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    return src


@pytest.fixture(scope="module")
def built(tmp_path_factory, src):
    tmp = tmp_path_factory.mktemp("pkg")
    env = no_torch_env(tmp, MINIDORA_NO_EXTENSION="1")
    for cmd in (["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],):
        subprocess.run([sys.executable, "-m", "pip", "-q", *cmd], check=True, env=env,
                       capture_output=True, timeout=time_limit(300))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src,
                   check=True, env=env, capture_output=True, timeout=time_limit(300))
    return tmp / "dist"


def shipped_files():
    return sorted(str(p.relative_to(golden.ROOT)) for p in golden.ROOT.rglob("*") if p.is_file())


def test_golden_tree_is_complete():
    names = shipped_files()
    for want in ("nf4_bitsandbytes.npz", "adapters_peft.npz", "VERSIONS.json",
                 "peft/expected_logits.safetensors", "peft/llama_base_nf4/model.safetensors"):
        assert want in names
    assert len(names) == 26


def test_wheel_holds_every_golden_file_and_no_extension(built):
    (wheel,) = built.glob("minidora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for rel in shipped_files():
        assert f"minidora/testing/golden/{rel}" in names, rel
    assert not any(n.endswith(".so") for n in names)


def test_sdist_holds_golden_files_sources_and_generator(built):
    (sdist,) = built.glob("minidora-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for rel in shipped_files():
        assert f"minidora/testing/golden/{rel}" in names, rel
    for want in ("csrc/ops.cpp", "csrc/nf4_common.h", "csrc/cuda/nf4_cuda.cu",
                 "csrc/cuda/nf4_select.h", "tools/make_golden.py", "tools/build_backend.py",
                 "setup.py", "pyproject.toml"):
        assert want in names


def requires_dist(metadata: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def test_pure_wheel_asks_for_a_torch_range_not_the_pin(built):
    (wheel,) = built.glob("minidora-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = requires_dist(z.read(meta).decode())
    torch_reqs = [r for r in requires if r.split(">")[0].split("=")[0].strip() == "torch"]
    assert torch_reqs == [TORCH_PURE]
    assert {"numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60", "matplotlib>=3.7"} <= set(requires)


def build_requires(src, tmp, no_extension: bool) -> dict:
    """What the in-tree backend asks pip to install before building, with torch unimportable."""
    env = no_torch_env(tmp, MINIDORA_NO_EXTENSION="1" if no_extension else "0")
    env["PYTHONPATH"] = os.pathsep.join([str(src / "tools"), env["PYTHONPATH"]])
    code = ("import json, build_backend as b; print(json.dumps({'wheel': "
            "b.get_requires_for_build_wheel(), 'editable': b.get_requires_for_build_editable(), "
            "'sdist': b.get_requires_for_build_sdist()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, check=True,
                         capture_output=True, text=True, timeout=time_limit(120)).stdout
    return json.loads(out.splitlines()[-1])


def test_pure_build_needs_no_torch(src, tmp_path):
    reqs = build_requires(src, tmp_path, no_extension=True)
    for hook, names in reqs.items():
        assert not any(n.startswith(("torch", "ninja")) for n in names), (hook, names)


def test_compiled_build_gets_the_pinned_torch(src, tmp_path):
    reqs = build_requires(src, tmp_path, no_extension=False)
    for hook in ("wheel", "editable"):
        assert TORCH_PIN in reqs[hook] and "ninja" in reqs[hook], reqs
    assert not any(n.startswith("torch") for n in reqs["sdist"]), reqs


def test_compiled_metadata_pins_the_torch_it_builds_against(src, tmp_path):
    """With torch importable (this environment's, 2.13.0), the metadata of a compiled build pins
    exactly that version."""
    import torch

    env = {**os.environ}
    env.pop("MINIDORA_NO_EXTENSION", None)
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=src, env=env, check=True, capture_output=True, timeout=time_limit(120))
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    first_section = requires.read_text().split("[", 1)[0].split()
    assert f"torch=={torch.__version__.split('+')[0]}" in first_section
    assert TORCH_PIN in first_section


def test_compiled_ops_say_how_to_get_them(monkeypatch):
    """In a pure-Python install (no minidora._C), asking for the compiled path names the torch
    to install and how to rebuild with the extension."""
    import torch

    from minidora import backends, nf4, ops

    monkeypatch.setattr(backends, "_C", None)
    monkeypatch.setattr(backends, "_IMPORT_ERROR", ImportError("No module named 'minidora._C'"))
    monkeypatch.setattr(backends, "_DEVICES", frozenset())
    q = nf4.quantize(torch.randn(8, 64), 64, True)
    for call in (lambda: ops.nf4_linear(torch.randn(2, 64), q, backend="compiled"),
                 lambda: ops.use(cuda_kernel="simt").__enter__(),
                 lambda: ops.cuda_linear_path(torch.bfloat16, (7, 5))):
        with pytest.raises(RuntimeError) as err:
            call()
        msg = str(err.value)
        for want in ("No module named 'minidora._C'", "pip install torch==2.13.0",
                     "without MINIDORA_NO_EXTENSION", "make build", "backend='reference'"):
            assert want in msg, (want, msg)


CUDA_VENV = ROOT / ".venv-cuda"


@pytest.mark.skipif(not (CUDA_VENV / "bin" / "python").exists(),
                    reason="needs .venv-cuda (torch 2.14.1, made by make cuda-check)")
def test_pure_wheel_installs_beside_another_torch(built, tmp_path):
    """The pure wheel installs, with no package index, into an environment whose only torch is
    .venv-cuda's 2.14.1 (other requirements from this environment), keeps that torch and runs."""
    def site(python):
        return subprocess.run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True).stdout.strip()

    venv = tmp_path / "venv"  # without pip and its setuptools, which would shadow torch's
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=time_limit(120))
    py = venv / "bin" / "python"
    # .venv-cuda's packages first: its torch is the one found.
    (Path(site(py)) / "others.pth").write_text(f"{site(CUDA_VENV / 'bin' / 'python')}\n"
                                               f"{site(sys.executable)}\n")
    (wheel,) = built.glob("minidora-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=time_limit(300))
    code = ("import torch, minidora; from minidora import nf4, ops; "
            "q = nf4.quantize(torch.randn(24, 64), 64, True); x = torch.randn(3, 64); "
            "y = ops.nf4_linear(x, q); "
            "assert torch.equal(y, torch.nn.functional.linear(x, nf4.dequantize(q, x.dtype))); "
            "print(torch.__version__, ops.extension_available(), minidora.__file__)\n"
            "try:\n    ops.nf4_linear(x, q, backend='compiled')\n"
            "except RuntimeError as e:\n    print(e)")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, check=True, capture_output=True,
                         text=True, timeout=time_limit(300)).stdout.split()
    assert out[0].startswith("2.14.1") and out[1] == "False"
    assert out[2].startswith(str(venv))
    error = " ".join(out[3:])
    for want in ("this install has no minidora._C", "pip install torch==2.13.0",
                 "without MINIDORA_NO_EXTENSION"):
        assert want in error, (want, error)


def test_wheel_and_sdist_hold_the_instruction_data(built):
    """minidora finetune's data set ships in both (minidora/data/, package data)."""
    (wheel,) = built.glob("minidora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("minidora/data/auren_qa.jsonl") == (ROOT / "minidora" / "data" /
                                                          "auren_qa.jsonl").read_bytes()
    (sdist,) = built.glob("minidora-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert "minidora/data/auren_qa.jsonl" in names
