"""Check an independent NF4, LoRA and DoRA implementation with minidora's conformance kit.

Needs only ``pip install minidora``: the golden values ship with the package. The code under
"YOUR IMPLEMENTATION" is small and independent of minidora; replace it with calls into your own
code and run

    python verify_your_implementation.py
"""

import torch
import torch.nn.functional as F

from minidora.testing import check_dora, check_lora, check_nf4

torch.set_num_threads(1)


# --- YOUR IMPLEMENTATION ----------------------------------------------------------------------

def nf4_codebook(p=0.9677083):
    """The 16 NF4 values: normal quantiles, 8 positive, 7 negative and 0, scaled to [-1, 1].
    p is bitsandbytes' constant as written there, ((1 - 1/30) + (1 - 1/32)) / 2 rounded."""
    q = lambda t: torch.special.ndtri(t.double())
    v = torch.cat([q(torch.linspace(p, 0.5, 9)[:-1]), torch.zeros(1, dtype=torch.float64),
                   -q(torch.linspace(p, 0.5, 8)[:-1])]).float().sort().values
    return v / v.max()


CODE = nf4_codebook()                                                     # [16] float32


def my_quantize(weight, blocksize, double_quant):
    """weight: any shape -> dict(packed [ceil(n/2)] uint8, absmax [n_blocks] float32)."""
    if double_quant:
        raise NotImplementedError("this small quantizer has no double quantization")
    x = weight.reshape(-1).float()
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)  # [n_blocks, bs]
    absmax = blocks.abs().amax(1)
    scaled = blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]            # the float32 reciprocal
    idx = torch.bucketize(scaled, (CODE[:-1] + CODE[1:]) / 2).view(-1)[: x.numel()]
    idx = torch.cat([idx, idx.new_full((idx.numel() % 2,), 7)])         # pad with code 7
    return {"packed": ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8), "absmax": absmax,
            "shape": weight.shape, "dtype": weight.dtype, "blocksize": blocksize}


def my_dequantize(q):
    """The dict of my_quantize -> a tensor of the weight's shape and dtype."""
    codes = torch.stack([q["packed"] >> 4, q["packed"] & 0xF], 1).view(-1).long()
    n = q["shape"].numel()
    scales = q["absmax"].repeat_interleave(q["blocksize"])[:n]
    return (CODE[codes[:n]] * scales).to(q["dtype"]).view(q["shape"])


class MyAdapter:
    """LoRA (m=None) or DoRA: y = x W0^T + b + dropout(x) (W' - W0)^T, W' = W0 + s B A for LoRA
    and W' = (m / ||W0 + s B A||_row) (W0 + s B A) for DoRA. Uses the tensors it is given."""

    def __init__(self, *, W0, bias, A, B, r, alpha, rslora, dropout, m=None, detach_norm=True):
        self.W0, self.bias, self.A, self.B, self.m = W0, bias, A, B, m
        self.s = alpha / (r ** 0.5 if rslora else r)
        self.dropout, self.detach_norm = dropout, detach_norm

    def norm(self, V):
        """One norm per output row of V [out, in]: [out, 1]."""
        return V.norm(dim=1, keepdim=True)

    def merged_weight(self):
        V = self.W0 + self.s * self.B @ self.A                            # [out, in]
        if self.m is None:
            return V
        c = self.norm(V).clamp_min(1e-12)
        return self.m[:, None] * V / (c.detach() if self.detach_norm else c)

    def __call__(self, x):
        xd = F.dropout(x, self.dropout, training=True)                   # the adapter's input only
        return F.linear(x, self.W0, self.bias) + F.linear(xd, self.merged_weight() - self.W0)


# --- the checks -----------------------------------------------------------------------------------

if __name__ == "__main__":
    for report in (check_nf4(my_quantize, my_dequantize, double_quant=False),
                   check_lora(MyAdapter),
                   check_dora(MyAdapter)):
        print(report, end="\n\n")
        report.assert_ok()                   # raises AssertionError listing the failing rows

    # The checks can fail, and say why. DoRA with the norm over the wrong axis:
    class WrongAxis(MyAdapter):
        def norm(self, V):
            return V.norm(dim=0, keepdim=True)                            # [1, in]: per column

    report = check_dora(WrongAxis)
    print(report.summary())
    print(report.failures[0].name, "->", report.failures[0].note, end="\n\n")
    assert "norm over dim=0" in report.failures[0].note

    # and an NF4 codebook derived from the unrounded constant 0.96770833...:
    CODE = nf4_codebook(((1 - 1 / 30) + (1 - 1 / 32)) / 2)
    report = check_nf4(my_quantize, my_dequantize, double_quant=False)
    print(report.summary())
    print(report.failures[0].name, "->", report.failures[0].note)
    assert "codebook from the unrounded offset" in report.failures[0].note
    print("\nall checks passed")
