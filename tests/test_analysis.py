"""minidora.analysis: DoRA paper eqs. 3-4 on constructed weights, effective weights by probing,
and the correlation helper against numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from minidora import DoRALinear, LoRALinear, NF4Linear, analysis


def test_pure_magnitude_change_has_no_direction_change():
    torch.manual_seed(0)
    w0 = torch.randn(13, 29, dtype=torch.float64)
    scale = 0.5 + torch.rand(13, dtype=torch.float64)          # positive: directions kept
    dm, dd = analysis.weight_decomposition(scale[:, None] * w0, w0)
    want_dm = ((scale - 1).abs() * w0.norm(dim=1)).mean().item()
    assert abs(dm - want_dm) <= 1e-14 * want_dm
    assert abs(dd) <= 1e-15


def test_pure_rotation_has_no_magnitude_change():
    torch.manual_seed(1)
    w0 = torch.randn(11, 2, dtype=torch.float64)
    theta = torch.rand(11, dtype=torch.float64)                # rotate each row by its angle
    rot = torch.stack([w0[:, 0] * theta.cos() - w0[:, 1] * theta.sin(),
                       w0[:, 0] * theta.sin() + w0[:, 1] * theta.cos()], dim=1)
    dm, dd = analysis.weight_decomposition(rot, w0)
    assert abs(dm) <= 1e-14
    want_dd = (1 - theta.cos()).mean().item()
    assert abs(dd - want_dd) <= 1e-13 * want_dd


def test_weight_decomposition_bad_shapes():
    with pytest.raises(ValueError, match=r"same shape, got \(3, 4\) and \(4, 3\)"):
        analysis.weight_decomposition(torch.zeros(3, 4), torch.zeros(4, 3))


def _probe(layer, n_in):
    """The matrix a bias-free layer applies, read off as layer(I)^T."""
    with torch.no_grad():
        return layer(torch.eye(n_in, dtype=torch.float64)).T


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("quantized", [False, True])
def test_effective_weight_equals_probed_matrix(cls, quantized):
    torch.manual_seed(2)
    base = nn.Linear(21, 10, bias=False, dtype=torch.float64)
    if quantized:
        base = NF4Linear.from_linear(base.float(), compute_dtype=torch.float64)
    layer = cls(base, r=3, alpha=6, adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        if cls is DoRALinear:
            layer.magnitude.mul_(1.5)
    w = analysis.effective_weight(layer)
    assert w.dtype == torch.float32 and w.shape == (10, 21)
    probed = _probe(layer, 21)
    assert ((w.double() - probed).abs() <= 1e-6 * probed.abs() + 1e-7).all()  # float32 result
    w0 = layer.base.dequantize_weight(torch.float64) if quantized else base.weight.detach()
    err = layer.merge(warn=False)      # after merging: the stored (re-quantized) weight
    merged = analysis.effective_weight(layer).double()
    if quantized:      # merge() reports the loss relative to the update W - W0
        rel = ((merged - probed).norm() / (probed - w0).norm()).item()
        assert err > 0 and abs(rel - err) <= 1e-5 * rel
    else:
        assert ((merged - probed).abs() <= 1e-6 * probed.abs() + 1e-7).all()


def test_decompose_model_and_correlation_over_checkpoints():
    torch.manual_seed(3)
    w0 = {"a": torch.randn(8, 6), "b": torch.randn(5, 6)}
    steps = [{n: w * (1 + 0.1 * t) + 0.05 * t * torch.randn_like(w) for n, w in w0.items()}
             for t in range(1, 5)]
    points = [analysis.decompose_model(s, w0) for s in steps]
    assert set(points[0]) == {"a", "b"}
    dms = [p["a"][0] for p in points]
    dds = [p["a"][1] for p in points]
    assert dms == sorted(dms)                         # the magnitude grows step by step
    corr = analysis.correlation(dms, dds)
    assert abs(corr - np.corrcoef(dms, dds)[0, 1]) < 1e-12
    with pytest.raises(ValueError, match="lacks the pre-trained weights of \\['c'\\]"):
        analysis.decompose_model({"c": torch.zeros(2, 2)}, w0)


def test_correlation_values_and_errors():
    x = [0.1, 0.4, 0.2, 0.9, 0.5]
    assert abs(analysis.correlation(x, [2 * v + 1 for v in x]) - 1) < 1e-14
    assert abs(analysis.correlation(x, [-v for v in x]) + 1) < 1e-14
    y = [0.3, 0.1, 0.8, 0.2, 0.6]
    assert math.isclose(analysis.correlation(x, y), np.corrcoef(x, y)[0, 1], rel_tol=1e-12)
    with pytest.raises(ValueError, match="same number"):
        analysis.correlation([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="constant"):
        analysis.correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_effective_weights_of_a_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    model[1] = LoRALinear(model[1], r=2, alpha=2)
    ws = analysis.effective_weights(model)
    assert list(ws) == ["1"] and torch.equal(ws["1"], model[1].base.weight)
    assert torch.equal(analysis.effective_weights(model, ["0"])["0"], model[0].weight)
