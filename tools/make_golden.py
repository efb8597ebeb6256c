"""Recompute minidora's golden vectors with the libraries they come from.

Every *output* in ``minidora/testing/golden`` is recomputed here by bitsandbytes 0.50.2 (NF4) and
PEFT 0.21.2 + transformers 5.24.0 (adapters, tiny models), on torch 2.13.0 (CPU). The *inputs*
(random weights, activations, adapter weights, the tiny models) are fixed draws stored with the
files; they are read from the shipped folder (``--inputs``) so the outputs can be compared key by
key. ``tests/test_golden.py`` runs this into a temporary folder and compares.

    pip install bitsandbytes==0.50.2 peft==0.21.2 transformers==5.24.0   # the test extra
    python tools/make_golden.py OUT_DIR [--inputs minidora/testing/golden]

What each file holds and how it is made:

- ``nf4_bitsandbytes.npz``: per case, ``bitsandbytes.functional.quantize_4bit`` (quant_type
  "nf4") with and without ``compress_statistics`` (double quantization), and
  ``dequantize_4bit``. Without double quantization the weight is quantized as given ([out, in])
  and, flattened to 1-D, again (the bytes and scales must agree); every dequantized value comes
  from the 1-D call. Its 2-D CPU dequantize depends on the CPU: bitsandbytes' AVX-512 kernel
  indexes scales as if every row started a new block, which is wrong when in_features is not a
  multiple of the blocksize (``w64x96_f32``), while its AVX2/scalar fallback follows the format.
  A golden value must be the same on every CPU, so the 2-D dequantize is not stored;
  ``tests/test_nf4_bitsandbytes.py`` checks it live on the CPU at hand.
- ``adapters_peft.npz``: a float64 ``nn.Linear`` wrapped by ``peft.get_peft_model`` (LoRA, DoRA,
  with and without rsLoRA), the adapter weights set to the stored A, B, m; the output, the
  gradients of ``sum(y * grad_y)`` and ``merge_and_unload()``'s weight.
- ``peft/llama_base_nf4/model.safetensors``: ``quantize_4bit`` (blocksize 64, no double quant)
  of every linear weight of ``llama_base`` except ``lm_head``, in ``Linear4bit``'s checkpoint keys.
- ``peft/expected_logits.safetensors``: ``PeftModel.from_pretrained`` over the stored bases and
  adapters, eval, no grad, one thread; the NF4 cases run the fp32 base with each quantized weight
  replaced by bitsandbytes' dequantization.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "minidora" / "testing" / "golden"
NF4_SUFFIXES = ("input", "dtype", "blocksize")
ADAPTER_INPUTS = ("W0", "bias", "A", "B", "r", "alpha", "x", "grad_y", "m")


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --- NF4 (bitsandbytes) ------------------------------------------------------------------------

def nf4_file(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output key of nf4_bitsandbytes.npz from its inputs."""
    import bitsandbytes.functional as bnbf

    out = {"nf4_codebook": bnbf.get_4bit_type("nf4", device="cpu").float().numpy(),
           "dynamic_map": bnbf.create_dynamic_map(signed=True).float().numpy()}
    for case in sorted({k.split(".")[0] for k in inputs if k.endswith(".input")}):
        dtype = getattr(torch, str(inputs[f"{case}.dtype"]))
        bs = int(inputs[f"{case}.blocksize"])
        w = torch.from_numpy(inputs[f"{case}.input"]).to(dtype)
        packed, st = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=False,
                                       quant_type="nf4")
        out.update({f"{case}.{k}": inputs[f"{case}.{k}"] for k in NF4_SUFFIXES})
        out[f"{case}.packed"] = packed.view(-1).numpy()
        out[f"{case}.absmax"] = st.absmax.numpy()
        # Dequantized through the 1-D call: its 2-D CPU call depends on the CPU (see above).
        flat, flat_st = bnbf.quantize_4bit(w.reshape(-1), blocksize=bs,
                                           compress_statistics=False, quant_type="nf4")
        assert torch.equal(flat.view(-1), packed.view(-1)) and torch.equal(flat_st.absmax,
                                                                         st.absmax), case
        out[f"{case}.dequantized"] = (
            bnbf.dequantize_4bit(flat, flat_st).float().reshape(w.shape).numpy())
        packed, st = bnbf.quantize_4bit(w.reshape(-1), blocksize=bs, compress_statistics=True,
                                       quant_type="nf4")
        out[f"{case}.dq.absmax_codes"] = st.absmax.numpy()
        out[f"{case}.dq.nested_absmax"] = st.state2.absmax.numpy()
        out[f"{case}.dq.offset"] = st.offset.reshape(()).numpy()
        out[f"{case}.dq.dequantized"] = (
            bnbf.dequantize_4bit(packed, st).float().reshape(w.shape).numpy())
    return out


# --- adapters (PEFT, float64) ------------------------------------------------------------------

class _One(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def adapters_file(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output key of adapters_peft.npz from its inputs (W0, bias, A, B, m, x, grad_y)."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for case in sorted({k.split(".")[0] for k in inputs}):
        def g(n, case=case):
            return torch.from_numpy(inputs[f"{case}.{n}"])

        W0, r, alpha = g("W0"), int(g("r")), float(g("alpha"))
        dora = case.startswith("dora")
        lin = nn.Linear(W0.shape[1], W0.shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(W0)
            lin.bias.copy_(g("bias"))
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora="rslora" in case, use_dora=dora,
                         target_modules=["lin"], lora_dropout=0.0)
        model = get_peft_model(_One(lin), cfg).double()
        layer = model.base_model.model.lin
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(g("A"))
            layer.lora_B["default"].weight.copy_(g("B"))
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(g("m"))
        x = g("x").clone().requires_grad_(True)
        y = model(x)
        (y * g("grad_y")).sum().backward()
        keep = ADAPTER_INPUTS if dora else ADAPTER_INPUTS[:-1]
        out.update({f"{case}.{k}": inputs[f"{case}.{k}"] for k in keep})
        res = {"scaling": np.asarray(layer.scaling["default"], dtype=np.float64),
               "y": y, "grad_x": x.grad, "grad_A": layer.lora_A["default"].weight.grad,
               "grad_B": layer.lora_B["default"].weight.grad}
        if dora:
            res["grad_m"] = layer.lora_magnitude_vector["default"].weight.grad
        merged = model.merge_and_unload().lin
        res["merged_weight"], res["merged_bias"] = merged.weight, merged.bias
        for k, v in res.items():
            out[f"{case}.{k}"] = v.detach().numpy() if isinstance(v, torch.Tensor) else v
    return out


# --- tiny Hugging Face models ------------------------------------------------------------------

def nf4_checkpoint(base_dir: Path) -> dict[str, torch.Tensor]:
    """llama_base's linear weights (except lm_head) in bitsandbytes' Linear4bit checkpoint keys."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    sd = load_file(str(base_dir / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            packed, st = bnbf.quantize_4bit(v, blocksize=64, compress_statistics=False,
                                           quant_type="nf4")
            out[k] = packed
            out.update({f"{k}.{n}": t for n, t in st.as_dict(packed=True).items()})
        else:
            out[k] = v
    return out


def _dequantized_llama(golden: Path):
    """The fp32 llama_base with each NF4 weight of llama_base_nf4 dequantized by bitsandbytes."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(golden / "peft" / "llama_base"))
    sd = load_file(str(golden / "peft" / "llama_base_nf4" / "model.safetensors"))
    with torch.no_grad():
        for name, m in model.named_modules():
            key = f"{name}.weight"
            if isinstance(m, nn.Linear) and f"{key}.absmax" in sd:
                qs = {k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + ".")}
                st = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
                m.weight.copy_(bnbf.dequantize_4bit(sd[key], st).reshape(m.weight.shape))
    return model


def expected_logits(golden: Path) -> dict[str, torch.Tensor]:
    """The logits of every case of peft/expected.json over the stored models and adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    meta = json.loads((golden / "peft" / "expected.json").read_text())
    ids = torch.tensor(meta["input_ids"])
    torch.set_num_threads(1)
    out = {}
    for case, pair in meta["pairs"].items():
        if case.startswith("llama_nf4"):
            model = _dequantized_llama(golden)
            adapter = pair.split(" + ")[1] if "+" in pair else None
        else:
            model = AutoModelForCausalLM.from_pretrained(str(golden / "peft" / pair))
            adapter = None if case == pair else case
        if adapter:
            model = PeftModel.from_pretrained(model, str(golden / "peft" / adapter))
        with torch.no_grad():
            out[case] = model.eval()(input_ids=ids).logits.float().contiguous()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write into (created; never the shipped one)")
    p.add_argument("--inputs", type=Path, default=SHIPPED,
                   help="golden folder whose inputs are used (default: the shipped one)")
    args = p.parse_args()
    if args.out.resolve() == args.inputs.resolve():
        p.error("OUT must differ from --inputs: compare, never overwrite")
    from safetensors.torch import save_file

    (args.out / "peft" / "llama_base_nf4").mkdir(parents=True, exist_ok=True)
    for name, make in (("nf4_bitsandbytes.npz", nf4_file), ("adapters_peft.npz", adapters_file)):
        np.savez(args.out / name, **make(_npz(args.inputs / name)))
    save_file(nf4_checkpoint(args.inputs / "peft" / "llama_base"),
              str(args.out / "peft" / "llama_base_nf4" / "model.safetensors"))
    save_file(expected_logits(args.inputs), str(args.out / "peft" / "expected_logits.safetensors"))
    shutil.copy(args.inputs / "VERSIONS.json", args.out / "VERSIONS.json")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
