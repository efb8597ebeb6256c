"""minidora.nf4 against a live bitsandbytes on fresh random weights (beyond the golden file).

bitsandbytes is a test dependency (pinned in pyproject's `test` extra); its CPU build runs here.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import case_seed
from minidora import bnb_checkpoint, nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF


SHAPES = [(40, 96), (33, 77), (7, 2048), (129, 130), (300, 64), (1, 4099)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_matches_bitsandbytes(shape, dtype, blocksize):
    gen = torch.Generator().manual_seed(case_seed(shape, str(dtype), blocksize))
    w = (torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)).to(dtype)
    for double_quant in (False, True):
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type="nf4")
        q = nf4.quantize(w, blocksize, double_quant=double_quant)
        assert torch.equal(q.packed, packed.view(-1))
        assert torch.equal(q.absmax, state.absmax)
        if double_quant:
            assert torch.equal(q.offset, state.offset)
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            # the scales bitsandbytes itself reconstructs from its codes
            bnb_scales = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
            assert torch.equal(q.scales(), bnb_scales)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_is_byte_identical_to_linear4bit(double_quant):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40)
    layer = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    theirs = layer.state_dict()
    mine = bnb_checkpoint.to_bnb_state_dict(nf4.quantize(dense.weight.data, 64, double_quant))
    assert set(theirs) - {"bias"} == set(mine)
    for key, value in mine.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    # and what bitsandbytes wrote loads back into the same weight
    back = bnb_checkpoint.from_bnb_state_dict(theirs)
    want = nf4.dequantize(nf4.quantize(dense.weight.data, 64, double_quant))
    assert torch.equal(nf4.dequantize(back), want)


def test_case_seeds_are_the_same_in_every_process():
    code = "from helpers import case_seed; print(case_seed((64, 96), 'torch.float32', 64))"
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent,
                            env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(seeds) == 1


def subnormal_weights():
    """Weights whose scales are subnormal: the nested absmax of double quantization is then
    subnormal too, and its float32 reciprocal is inf (bitsandbytes does not clamp it). Whole
    blocks only: bitsandbytes' CPU code treats a partial last block apart (it stores that
    block's absmax clamped to 1e-38)."""
    gen = torch.Generator().manual_seed(case_seed("subnormal"))
    tiny = 2.0 ** -149                                      # the smallest float32 subnormal
    # block absmaxes 1, 2, 3 (x tiny) repeated: the offset is exactly 2 tiny, so a third of the
    # scales equal it (0 * inf = NaN in bitsandbytes' normalization)
    exact = torch.tensor([1.0, 2.0, 3.0]).repeat(100)[:, None] * tiny * torch.ones(300, 32)
    exact[:, 1:] *= torch.rand(300, 31, generator=gen)
    return [
        ("randn * 1e-40, 270 blocks", torch.randn(135, 128, generator=gen) * 1e-40, 64),
        ("bfloat16 randn * 1e-39", (torch.randn(37, 64, generator=gen) * 1e-39).bfloat16(), 32),
        ("scales equal to the offset", exact, 32),
        ("subnormal and normal blocks", torch.cat([torch.randn(10, 64, generator=gen) * 3e-39,
                                                   torch.randn(2, 64, generator=gen)]), 64),
    ]


@pytest.mark.parametrize("name, w, blocksize", subnormal_weights(),
                         ids=[case[0] for case in subnormal_weights()])
def test_subnormal_scales_match_bitsandbytes(name, w, blocksize):
    for double_quant in (False, True):
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type="nf4")
        q = nf4.quantize(w, blocksize, double_quant=double_quant)
        assert torch.equal(q.packed, packed.view(-1)), name
        assert torch.equal(q.absmax, state.absmax), (name, double_quant)
        if double_quant:
            assert torch.equal(q.offset, state.offset) and q.offset > 0
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            bnb_scales = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
            assert torch.equal(q.scales(), bnb_scales)
