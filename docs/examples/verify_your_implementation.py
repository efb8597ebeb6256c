"""Check an independent LoRA / DoRA / NF4 implementation against minidora's golden values.

The three functions under "YOUR IMPLEMENTATION" are a small, independent implementation written
for this page; replace their bodies with calls into your own code and run

    python docs/examples/verify_your_implementation.py

The golden values come from bitsandbytes 0.50.2 and PEFT 0.21.2 (see ../shared/golden/README.md);
set MINIDORA_GOLDEN to their folder if it is not ../shared/golden next to the repository.
Every check raises AssertionError with the case and the size of the difference.
"""

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

GOLDEN = Path(os.environ.get("MINIDORA_GOLDEN",
                             Path(__file__).resolve().parents[2].parent / "shared" / "golden"))
torch.set_num_threads(1)


# --- YOUR IMPLEMENTATION ----------------------------------------------------------------------

def my_nf4_quantize(w: torch.Tensor, blocksize: int):
    """w: any float tensor -> (packed uint8 [ceil(n/2)], absmax float32 [n_blocks])."""
    p = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
    q = lambda t: torch.special.ndtri(t.double())
    v = torch.cat([q(torch.linspace(p, 0.5, 9)[:-1]), torch.zeros(1, dtype=torch.float64),
                   -q(torch.linspace(p, 0.5, 8)[:-1])]).float().sort().values
    code = v / v.max()                                                   # [16]
    x = w.reshape(-1).float()
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)  # [n_blocks, bs]
    absmax = blocks.abs().amax(1)
    scaled = blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).view(-1)[: x.numel()]
    idx = torch.cat([idx, idx.new_full((idx.numel() % 2,), 7)])
    return ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8), absmax


def my_lora(x, W0, bias, A, B, s):
    """y = x W0^T + b + s x A^T B^T."""
    return F.linear(x, W0, bias) + s * (x @ A.T) @ B.T


def my_dora(x, W0, bias, A, B, m, s, detach_norm=True):
    """y = x ((m / ||W0 + sBA||_row) (W0 + sBA))^T + b, one magnitude per output row."""
    V = W0 + s * B @ A
    c = V.norm(dim=1).clamp_min(1e-12)
    if detach_norm:
        c = c.detach()
    return F.linear(x, (m / c)[:, None] * V, bias)


# --- the checks -----------------------------------------------------------------------------------

def close(name, got, want, atol, rtol):
    """|got - want| <= atol + rtol |want| everywhere."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bad.any(), f"{name}: {int(bad.sum())} values off, max |diff| {err.max():.3g}"


def check_nf4():
    g = np.load(GOLDEN / "nf4_bitsandbytes.npz")
    cases = sorted({k.split(".")[0] for k in g.files if "." in k})
    for case in cases:
        dtype = getattr(torch, str(g[f"{case}.dtype"]))
        w = torch.from_numpy(g[f"{case}.input"]).to(dtype)
        packed, absmax = my_nf4_quantize(w, int(g[f"{case}.blocksize"]))
        # bit-exact: the same bytes and the same float32 scales as bitsandbytes
        assert torch.equal(packed, torch.from_numpy(g[f"{case}.packed"]).view(-1)), case
        assert torch.equal(absmax, torch.from_numpy(g[f"{case}.absmax"])), case
    print(f"NF4: packed bytes and scales bit-exact with bitsandbytes on {len(cases)} cases")


def check_adapters():
    g = np.load(GOLDEN / "adapters_peft.npz")
    for key in ("lora", "lora_rslora", "dora", "dora_rslora"):
        t = {k.split(".", 1)[1]: torch.from_numpy(np.asarray(g[k])) for k in g.files
             if k.startswith(key + ".")}
        x = t["x"].clone().requires_grad_(True)
        A, B = t["A"].clone().requires_grad_(True), t["B"].clone().requires_grad_(True)
        s = float(t["scaling"])
        assert s == float(t["alpha"]) / (math.sqrt(t["r"]) if "rslora" in key else float(t["r"]))
        if key.startswith("dora"):
            m = t["m"].clone().requires_grad_(True)
            y = my_dora(x, t["W0"], t["bias"], A, B, m, s, detach_norm=True)  # as PEFT does
        else:
            y = my_lora(x, t["W0"], t["bias"], A, B, s)
        (y * t["grad_y"]).sum().backward()            # the loss behind the golden gradients
        # float64, the same formula summed in another order: rounding is ~1e-15 here
        tol = dict(atol=1e-12, rtol=1e-12)
        close(f"{key}.y", y.detach(), t["y"], **tol)
        close(f"{key}.grad_x", x.grad, t["grad_x"], **tol)
        close(f"{key}.grad_A", A.grad, t["grad_A"], **tol)
        close(f"{key}.grad_B", B.grad, t["grad_B"], **tol)
        if key.startswith("dora"):
            close(f"{key}.grad_m", m.grad, t["grad_m"], **tol)
            V = t["W0"] + s * t["B"] @ t["A"]
            merged = (t["m"] / V.norm(dim=1))[:, None] * V
        else:
            merged = t["W0"] + s * t["B"] @ t["A"]
        close(f"{key}.merged_weight", merged, t["merged_weight"], **tol)
        print(f"{key:12s}: output, gradients and merged weight match PEFT to 1e-12 (float64)")


def check_gradients():
    """gradcheck the exact DoRA gradient; compare with minidora on fresh random data."""
    import minidora

    torch.manual_seed(0)
    out_f, in_f, r, s = 7, 11, 3, 2.0                 # odd sizes on purpose
    W0, bias = torch.randn(out_f, in_f, dtype=torch.float64), torch.randn(out_f, dtype=torch.float64)
    args = [torch.randn(5, in_f, dtype=torch.float64), torch.randn(r, in_f, dtype=torch.float64),
            torch.randn(out_f, r, dtype=torch.float64), torch.rand(out_f, dtype=torch.float64) + 0.5]
    args = [a.requires_grad_(True) for a in args]
    f = lambda x, A, B, m: my_dora(x, W0, bias, A, B, m, s, detach_norm=False)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda x, A, B: my_lora(x, W0, bias, A, B, s), args[:3])
    print("gradcheck (float64) of the exact DoRA and of LoRA: passed")

    lin = torch.nn.Linear(in_f, out_f, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.copy_(bias)
    ref = minidora.DoRALinear(lin, r=r, alpha=s * r, detach_norm=True, adapter_dtype=torch.float64)
    x, A, B, m = (a.detach() for a in args)
    with torch.no_grad():
        ref.lora_A.copy_(A)
        ref.lora_B.copy_(B)
        ref.magnitude.copy_(m)
    close("DoRA vs minidora.DoRALinear", my_dora(x, W0, bias, A, B, m, s), ref(x).detach(),
          atol=1e-12, rtol=1e-12)
    print("DoRA output equals minidora.DoRALinear on random data")


def check_catches_a_bug():
    """The checks must be able to fail: DoRA with the norm over the wrong axis (dim=0)."""
    global my_dora
    correct = my_dora

    def wrong_axis(x, W0, bias, A, B, m, s, detach_norm=True):
        V = W0 + s * B @ A
        c = V.norm(dim=0, keepdim=True).detach()        # [1, in]: one norm per INPUT column
        return F.linear(x, m[:, None] * V / c, bias)

    my_dora = wrong_axis
    try:
        check_adapters()
    except AssertionError as e:
        print(f"a norm over dim=0 is caught: {e}")
    else:
        raise AssertionError("the golden check did not catch a DoRA norm over the wrong axis")
    finally:
        my_dora = correct


if __name__ == "__main__":
    check_nf4()
    check_adapters()
    check_gradients()
    check_catches_a_bug()
    print("all checks passed")
