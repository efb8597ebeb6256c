"""The shipped golden vectors are what bitsandbytes and PEFT compute: tools/make_golden.py
recomputes every output from the shipped inputs into a temporary folder, and each key must equal
the shipped one. Needs the test extra (bitsandbytes, peft, transformers at the pinned versions)."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import time_limit
from minidora.testing import golden

for _name in ("bitsandbytes", "peft", "transformers"):
    pytest.importorskip(_name, reason=f"{_name} (test extra) is needed to regenerate golden files")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    pinned = json.loads(golden.path("VERSIONS.json").read_text())["generated_with"]
    for lib in ("bitsandbytes", "peft"):
        assert version(lib) == pinned[lib], (
            f"{lib} {version(lib)} is installed; the golden files come from {pinned[lib]}")
    out = tmp_path_factory.mktemp("golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_golden.py"), str(out)],
                   check=True, capture_output=True, timeout=time_limit(300))
    return out


@pytest.mark.parametrize("name", ["nf4_bitsandbytes.npz", "adapters_peft.npz"])
def test_npz_files_are_what_the_libraries_compute(regenerated, name):
    shipped = dict(np.load(golden.path(name), allow_pickle=False))
    made = dict(np.load(regenerated / name, allow_pickle=False))
    assert sorted(made) == sorted(shipped)
    for key, want in shipped.items():
        got = made[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if want.dtype.kind == "f" and name == "adapters_peft.npz":
            # float64 through PEFT: another BLAS may sum in another order (~1e-16 relative)
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15, err_msg=key)
        else:   # NF4 bytes, scales and dequantized values are exact by format
            assert np.array_equal(got, want), key


def test_nf4_checkpoint_is_bitsandbytes_quantization(regenerated):
    shipped = load_file(str(golden.path("peft", "llama_base_nf4", "model.safetensors")))
    made = load_file(str(regenerated / "peft" / "llama_base_nf4" / "model.safetensors"))
    assert sorted(made) == sorted(shipped)
    for key, want in shipped.items():
        assert made[key].dtype == want.dtype and torch.equal(made[key], want), key


def test_expected_logits_are_peft_logits(regenerated):
    shipped = load_file(str(golden.path("peft", "expected_logits.safetensors")))
    made = load_file(str(regenerated / "peft" / "expected_logits.safetensors"))
    assert sorted(made) == sorted(shipped) and len(shipped) == 11
    for case, want in shipped.items():
        # float32 logits of |value| < 1; another kernel order moves them by ~1e-7
        torch.testing.assert_close(made[case], want, rtol=0, atol=1e-5, msg=case)


def test_bitsandbytes_2d_dequantize_is_the_format_or_its_avx512_defect():
    """bitsandbytes' 2-D CPU dequantize depends on the CPU, so it is checked live, not stored:
    its AVX2/scalar fallback follows the format; its AVX-512 kernel reads the scale of element
    (row, col) as absmax[row * (in // blocksize) + col // blocksize], as if every row started a
    new block, which is wrong for w64x96 with blocksize 64. Either output passes here, exactly;
    anything else fails. The stored golden value is the 1-D call's, which is the format's."""
    import bitsandbytes.functional as bnbf

    from minidora import nf4

    g = golden.nf4_bitsandbytes()
    w = torch.from_numpy(g["w64x96_f32.input"])
    bs = int(g["w64x96_f32.blocksize"])
    packed, state = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=False,
                                      quant_type="nf4")
    got = bnbf.dequantize_4bit(packed, state)
    q = nf4.quantize(w, blocksize=bs, double_quant=False)
    assert torch.equal(nf4.dequantize(q), torch.from_numpy(g["w64x96_f32.dequantized"]))
    rows, cols = w.shape
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(rows, cols).long()
    row_blocks = torch.arange(rows)[:, None] * (cols // bs) + torch.arange(cols)[None, :] // bs
    defect = nf4.NF4_CODEBOOK[codes] * q.absmax[row_blocks]
    assert not torch.equal(defect, nf4.dequantize(q))   # the case does tell the two apart
    assert torch.equal(got, nf4.dequantize(q)) or torch.equal(got, defect)
