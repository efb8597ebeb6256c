"""A pip-installed minidora carries its golden vectors: build the wheel and the sdist from a copy
of the source tree (without compiling the extension: MINIDORA_NO_EXTENSION=1) and look inside."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from minidora.testing import golden

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "site", "*.egg-info", "*.so",
                              "__pycache__", ".pytest_cache", "minidora_out")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env = {**os.environ, "MINIDORA_NO_EXTENSION": "1"}
    for cmd in (["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],):
        subprocess.run([sys.executable, "-m", "pip", "-q", *cmd], check=True, env=env,
                       capture_output=True, timeout=300)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src,
                   check=True, env=env, capture_output=True, timeout=300)
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
                 "tools/make_golden.py", "setup.py"):
        assert want in names
