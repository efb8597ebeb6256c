"""minidora.checkpoint: minidora's adapter folder, PEFT's adapter folder and bitsandbytes' NF4
keys into a model (round trips, logits equal to PEFT's, refusals), then the file rules (options
from the file, PEFT options by name, meta models, finite after the cast, concurrent and killed
saves, checksums, the NF4 layout, clear messages) and ``train --base``. The PEFT cases load the
tiny golden models of minidora.testing.golden from local files only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minidora
from helpers import (
    Block,
    Net,
    case_seed,
    hf_model,
    input_ids,
    peft_copy,
    randomize_adapters,
    time_limit,
)
from minidora import NF4Linear, checkpoint
from minidora.testing import golden

ST, JS = "minidora_adapters.safetensors", "minidora_adapters.json"


def _logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def _same_outputs(a, b) -> bool:
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# --- minidora's adapter folder: round trips and refusals ---------------------------------------

@pytest.mark.parametrize("method", minidora.METHODS)
def test_save_load_adapters_round_trip(tmp_path, method):
    src = minidora.wrap(Net(), method, ["q_proj", "down_proj"], r=4, alpha=8, rslora=True)
    randomize_adapters(src)
    folder = minidora.save_adapters(src, tmp_path / "run")
    assert folder == tmp_path / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["minidora_adapters.json",
                                                        "minidora_adapters.safetensors"]
    tensors = load_file(str(folder / "minidora_adapters.safetensors"))
    n_per_layer = 3 if method.endswith("dora") else 2
    assert len(tensors) == 4 * n_per_layer
    config = json.loads((folder / "minidora_adapters.json").read_text())
    assert config["method"] == method and config["minidora_version"] == minidora.__version__
    assert config["layers"]["layers.0.q_proj"]["r"] == 4
    assert config["layers"]["layers.1.down_proj"]["in_features"] == 48
    dst = minidora.wrap(Net(), method, ["q_proj", "down_proj"], r=4, alpha=8, rslora=True)
    x = torch.randn(3, 32)
    assert not torch.equal(dst(x), src(x))
    minidora.load_adapters(dst, folder)
    assert torch.equal(dst(x), src(x))


def test_load_adapters_reads_the_older_single_file_layout(tmp_path):
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4))
    folder = minidora.save_adapters(src, tmp_path / "new")
    tensors = load_file(str(folder / "minidora_adapters.safetensors"))
    save_file(tensors, str(tmp_path / "old.safetensors"))      # NAME.safetensors + NAME.json
    (tmp_path / "old.json").write_text((folder / "minidora_adapters.json").read_text())
    dst = minidora.wrap(Net(), "dora", ["q_proj"], r=4)
    minidora.load_adapters(dst, tmp_path / "old.safetensors")
    x = torch.randn(3, 32)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("name", ["a.json", "a.safetensors"])
def test_save_adapters_takes_a_folder(tmp_path, name):
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    with pytest.raises(ValueError, match="path names a folder .* got a file name"):
        minidora.save_adapters(model, tmp_path / name)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; the adapters are written into a folder"):
        minidora.save_adapters(model, tmp_path / "f")
    # run.v1 and run.v2 are two folders, not one run.json
    a, b = randomize_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), seed=1), model
    minidora.save_adapters(a, tmp_path / "run.v1")
    minidora.save_adapters(b, tmp_path / "run.v2")
    c = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    minidora.load_adapters(c, tmp_path / "run.v1")
    x = torch.randn(2, 32)
    assert torch.equal(c(x), a(x)) and not torch.equal(c(x), b(x))


def test_save_adapters_writes_given_tensors(tmp_path):
    """``tensors=`` (what a sharded model gathers) is written in place of the layers' own, in
    both layouts, under the same checks of names and shapes."""
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4), seed=3)
    model = minidora.wrap(Net(), "dora", ["q_proj"], r=4)          # other adapters, same shapes
    given = {f"{n}.{k}": getattr(layer, k).detach().clone() for n, layer in
             minidora.adapter_layers(src).items() for k in ("lora_A", "lora_B", "magnitude")}
    minidora.save_adapters(model, tmp_path / "a", tensors=given)
    minidora.save_peft_adapter(model, tmp_path / "p", tensors=given)
    for folder, load in ((tmp_path / "a", minidora.load_adapters),
                         (tmp_path / "p", minidora.load_peft_adapter)):
        dst = minidora.wrap(Net(), "dora", ["q_proj"], r=4) if load is minidora.load_adapters \
            else Net()
        dst = load(dst, folder)
        x = torch.randn(3, 32)
        assert torch.allclose(dst(x), src(x), rtol=1e-6, atol=1e-6), folder
    bad = dict(given)
    bad.pop("layers.0.q_proj.magnitude")
    with pytest.raises(ValueError, match=r"missing \['layers.0.q_proj.magnitude'\]"):
        minidora.save_adapters(model, tmp_path / "b", tensors=bad)
    bad = {**given, "layers.0.q_proj.lora_B": torch.randn(32, 5)}
    with pytest.raises(ValueError, match=r"lora_B'\] must be a tensor of shape \(32, 4\)"):
        minidora.save_peft_adapter(model, tmp_path / "c", tensors=bad)
    assert not (tmp_path / "b").exists()


def test_load_adapters_refuses_mismatches(tmp_path):
    path = tmp_path / "a"
    minidora.save_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4), path)
    with pytest.raises(ValueError, match="file holds method 'dora' but the model is wrapped "
                                         "with 'lora'"):
        minidora.load_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), path)
    with pytest.raises(ValueError, match=r"names differ: in the file only \[\], in the model only "
                                         r"\['layers.0.v_proj', 'layers.1.v_proj'\]"):
        minidora.load_adapters(minidora.wrap(Net(), "dora", ["q_proj", "v_proj"], r=4), path)
    with pytest.raises(ValueError, match="'layers.0.q_proj': the file has r=4, the model has r=8"):
        minidora.load_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=8), path)
    with pytest.raises(ValueError, match="the file has alpha=16, the model has alpha=4"):
        minidora.load_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4, alpha=4), path)
    wide = nn.Module()
    wide.layers = nn.ModuleList([Block(40), Block(40)])
    with pytest.raises(ValueError, match="the file has in_features=32, the model has "
                                         "in_features=40"):
        minidora.load_adapters(minidora.wrap(wide, "dora", ["q_proj"], r=4), path)
    with pytest.raises(ValueError, match="model has no adapter layers: call minidora.wrap"):
        minidora.load_adapters(Net(), path)
    with pytest.raises(FileNotFoundError, match="no adapter folder or file"):
        minidora.load_adapters(Net(), tmp_path / "nowhere")


def _rewrite(folder, change):
    """Change the tensors of a saved adapter folder, keeping its embedded config."""
    st = folder / "minidora_adapters.safetensors"
    from safetensors import safe_open
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(st))
    change(tensors)
    save_file(tensors, str(st), metadata=meta)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.__setitem__("layers.0.q_proj.lora_B", torch.zeros(32, 5)),
     r"layers.0.q_proj.lora_B: expected shape \(32, 4\), got \(32, 5\)"),
    (lambda t: t["layers.1.q_proj.lora_A"].__setitem__((0, 0), float("nan")),
     r"layers.1.q_proj.lora_A holds 1 NaN/Inf"),
    (lambda t: t.__setitem__("layers.0.q_proj.magnitude", torch.ones(32, dtype=torch.int32)),
     r"layers.0.q_proj.magnitude must be floating point, got torch.int32"),
    (lambda t: t.__setitem__("layers.0.q_proj.lora_A", torch.ones(4, 32, dtype=torch.bool)),
     r"layers.0.q_proj.lora_A must be floating point, got torch.bool"),
    (lambda t: t.__setitem__("layers.0.k_proj.lora_A", torch.ones(4, 32)),
     r"holds 1 tensor\(s\) that minidora would not use: layers.0.k_proj.lora_A"),
    (lambda t: t.pop("layers.1.q_proj.lora_B"), r"tensor layers.1.q_proj.lora_B is missing"),
])
def test_load_adapters_is_atomic_and_refuses_bad_tensors(tmp_path, change, match):
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4))
    folder = minidora.save_adapters(src, tmp_path / "a")
    _rewrite(folder, change)
    dst = minidora.wrap(Net(), "dora", ["q_proj"], r=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        minidora.load_adapters(dst, folder)
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())   # nothing changed


def test_load_adapters_refuses_a_config_that_disagrees_with_the_tensors(tmp_path):
    # what an interrupted save leaves: new tensors (rank 4), the old JSON (rank 8)
    folder = minidora.save_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=8), tmp_path / "a")
    old_json = (folder / "minidora_adapters.json").read_text()
    minidora.save_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), folder)
    (folder / "minidora_adapters.json").write_text(old_json)
    with pytest.raises(ValueError, match="disagrees with the config stored in .* interrupted save"):
        minidora.load_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), folder)


@pytest.mark.parametrize("content,match", [
    (b"not a safetensors file at all", "is not a readable safetensors file"),
    (b"\xff\xfe" * 40, "is not a readable safetensors file"),
])
def test_load_adapters_corrupt_files_are_one_value_error(tmp_path, content, match):
    folder = minidora.save_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), tmp_path / "a")
    (folder / "minidora_adapters.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        minidora.load_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), folder)
    (folder / "minidora_adapters.json").write_bytes(b"\xff\xfe{")
    minidora.save_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), tmp_path / "b")
    (tmp_path / "b" / "minidora_adapters.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="is not a JSON file"):
        minidora.load_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), tmp_path / "b")


def _ranks_that_load(folder, refusals) -> list[int]:
    """Which of r = 4, 8 loads the adapter in ``folder``; any other load must be refused with a
    message holding one of ``refusals``."""
    loaded = []
    for r in (4, 8):
        model = minidora.wrap(nn.Sequential(nn.Linear(64, 64)), "lora", ["0"], r=r)
        try:
            minidora.load_adapters(model, folder)
            loaded.append(r)
        except (ValueError, FileNotFoundError) as e:
            assert any(phrase in str(e) for phrase in refusals), e
    return loaded


def test_saves_survive_being_killed(tmp_path):
    # kill -9 a process that saves adapters of rank 4 and 8 in turn, many times: every folder
    # left behind loads as one consistent adapter or is refused, never a mix
    script = tmp_path / "saver.py"
    script.write_text(
        "import sys, torch, torch.nn as nn, minidora\n"
        "torch.set_num_threads(1)\n"
        "ms = [minidora.wrap(nn.Sequential(nn.Linear(64, 64)), 'lora', ['0'], r=r) "
        "for r in (4, 8)]\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while i < int(sys.argv[2]):\n"
        "    minidora.save_adapters(ms[i % 2], sys.argv[1]); i += 1\n")
    for round_ in range(6):
        folder = tmp_path / f"a{round_}"
        proc = subprocess.Popen([sys.executable, str(script), str(folder), "1000000000"],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2 + 0.05 * round_)
        proc.kill()
        proc.wait()
        loaded = _ranks_that_load(folder, ("r=", "disagrees", "has no minidora"))
        assert len(loaded) <= 1                   # one whole adapter, or a clear refusal
        assert any(folder.glob("minidora_adapters.*")), folder   # saves had been made
    # A killed save may leave a refused mix in every round (a save takes ~2 ms, most of it between
    # the two renames); a run that ends leaves one whole adapter: the one it saved last.
    folder = tmp_path / "finished"
    subprocess.run([sys.executable, str(script), str(folder), "7"], check=True,
                   capture_output=True, timeout=time_limit(120))
    assert _ranks_that_load(folder, ("r=",)) == [4]   # saves 0..6 alternate 4, 8: the last is 4


class _Trap:
    hit = False

    def __reduce__(self):
        return (_Trap._spring, ())

    @staticmethod
    def _spring():
        _Trap.hit = True


def test_load_adapters_never_unpickles(tmp_path):
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    folder = minidora.save_adapters(model, tmp_path / "evil")
    (folder / "minidora_adapters.safetensors").write_bytes(
        pickle.dumps({"layers.0.q_proj.lora_A": _Trap()}))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        minidora.load_adapters(model, folder)
    assert not _Trap.hit


def test_load_adapters_refuses_a_foreign_json(tmp_path):
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    folder = minidora.save_adapters(model, tmp_path / "a")
    save_file(load_file(str(folder / "minidora_adapters.safetensors")),
              str(folder / "minidora_adapters.safetensors"))          # no embedded config
    (folder / "minidora_adapters.json").write_text(
        json.dumps({"format": "minidora-adapters", "method": "lora"}))
    with pytest.raises(ValueError, match="is not a minidora adapter config"):
        minidora.load_adapters(model, folder)


# --- PEFT's adapter folder (needs transformers and peft) ----------------------------------------

PEFT_CASES = {
    "llama_base": ("llama_base", None), "llama_lora_qv": ("llama_base", "llama_lora_qv"),
    "llama_dora_qv": ("llama_base", "llama_dora_qv"),
    "llama_dora_all_rslora": ("llama_base", "llama_dora_all_rslora"),
    "gpt2_base": ("gpt2_base", None), "gpt2_lora_cattn": ("gpt2_base", "gpt2_lora_cattn"),
    "gpt2_dora_cattn_cproj": ("gpt2_base", "gpt2_dora_cattn_cproj"),
    "llama_nf4_base": ("llama_base_nf4", None),
    "llama_nf4_lora_qv": ("llama_base_nf4", "llama_lora_qv"),
    "llama_nf4_dora_qv": ("llama_base_nf4", "llama_dora_qv"),
    "llama_nf4_dora_all_rslora": ("llama_base_nf4", "llama_dora_all_rslora"),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_load_peft_adapter_matches_peft_logits(case):
    base, adapter = PEFT_CASES[case]
    model = hf_model(base)
    if adapter:
        minidora.load_peft_adapter(model, golden.peft_dir() / adapter, compute_dtype=torch.float32)
        n = len(minidora.adapter_layers(model))
        assert n == {"llama_lora_qv": 4, "llama_dora_qv": 4, "llama_dora_all_rslora": 14,
                     "gpt2_lora_cattn": 2, "gpt2_dora_cattn_cproj": 6}[adapter]
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    want = load_file(str(golden.peft_dir() / "expected_logits.safetensors"))[case]
    # float32 forward of a 2-layer model with other summation orders: ~1e-7 observed.
    assert (logits - want).abs().max() < 1e-5


@pytest.mark.parametrize("base,method,targets", [
    ("llama_base", "dora", ["q_proj", "o_proj", "down_proj"]),
    ("gpt2_base", "lora", ["c_attn", "c_fc"]),
    ("gpt2_base", "dora", ["c_proj"]),
])
def test_save_peft_adapter_loads_in_peft(tmp_path, base, method, targets):
    from peft import PeftModel
    model = minidora.wrap(hf_model(base), method, targets, r=4, alpha=8, rslora=True)
    randomize_adapters(model)
    minidora.save_peft_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    peft_model = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter")).eval()
    ids = input_ids()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        plain = hf_model(base)(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3            # the adapter changes the output...
    assert (ours - theirs).abs().max() < 1e-5           # ...exactly as PEFT applies it
    # and back: minidora reads the exported files into a fresh model
    again = minidora.load_peft_adapter(hf_model(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ours)


def test_load_peft_adapter_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        minidora.load_peft_adapter(hf_model("llama_base"), tmp_path)
    d = tmp_path / "ia3"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"x": torch.zeros(1)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="peft_type must be 'LORA', got 'IA3'"):
        minidora.load_peft_adapter(hf_model("llama_base"), d)
    # LoRA adapter into a model already wrapped with DoRA on the same layers
    model = minidora.wrap(hf_model("llama_base"), "dora", ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="is DoRALinear but the file is lora"):
        minidora.load_peft_adapter(model, golden.peft_dir() / "llama_lora_qv")


P = "base_model.model.model.layers."


@pytest.mark.parametrize("adapter,edit_config,edit_tensors,match", [
    ("llama_lora_qv", None,
     lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A",
                             torch.ones(4, 256)),
     r"holds 1 tensor\(s\) that minidora would not use: .*embed_tokens.lora_embedding_A"),
    ("llama_lora_qv", lambda c: c.__setitem__("modules_to_save", ["norm"]),
     lambda t: t.__setitem__("base_model.model.model.norm.weight", torch.ones(64)),
     r"modules_to_save \['norm'\] .* not supported"),
    ("llama_lora_qv", None,
     lambda t: t.__setitem__(P + "0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)),
     r"would not use: .*q_proj.lora_magnitude_vector \(magnitudes belong to a file with "
     r"use_dora: true\)"),
    ("llama_lora_qv", lambda c: c.pop("r"), None, r"'r' must be an integer >= 1, got None"),
    ("llama_lora_qv", lambda c: c.__setitem__("lora_alpha", float("inf")), None,
     r"'lora_alpha' must be a finite number > 0, got inf"),
    ("llama_dora_qv", None,
     lambda t: t[P + "1.self_attn.v_proj.lora_B.weight"].__setitem__((0, 0), float("nan")),
     r"layers.1.self_attn.v_proj.lora_B.weight holds 1 NaN/Inf"),
    ("llama_dora_qv", None,
     lambda t: t.__setitem__(P + "1.self_attn.v_proj.lora_A.weight", torch.ones(4, 63)),
     r"v_proj.lora_A.weight: expected shape \(4, 64\), got \(4, 63\)"),
    ("llama_dora_qv", None,
     lambda t: t.__setitem__(P + "1.self_attn.v_proj.lora_A.weight",
                             torch.ones(4, 64, dtype=torch.int64)),
     r"v_proj.lora_A.weight must be floating point, got torch.int64"),
])
def test_load_peft_adapter_refuses_and_leaves_the_model_untouched(tmp_path, adapter, edit_config,
                                                                  edit_tensors, match):
    folder = peft_copy(tmp_path, adapter, edit_config, edit_tensors)
    model = hf_model("llama_base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        minidora.load_peft_adapter(model, folder)
    assert not minidora.adapter_layers(model)                  # not wrapped with random adapters
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_peft_adapter_corrupt_files_name_the_file(tmp_path):
    folder = peft_copy(tmp_path, "llama_lora_qv")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="adapter_model.safetensors' is not a readable"):
        minidora.load_peft_adapter(hf_model("llama_base"), folder)
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="adapter_config.json' is not a JSON file"):
        minidora.load_peft_adapter(hf_model("llama_base"), folder)
    with pytest.raises(FileNotFoundError, match="PEFT adapter folder .* does not exist"):
        minidora.load_peft_adapter(hf_model("llama_base"), tmp_path / "nowhere")


def test_save_peft_adapter_keeps_float64(tmp_path):
    model = minidora.wrap(hf_model("llama_base"), "dora", ["q_proj"], r=2,
                          adapter_dtype=torch.float64)
    randomize_adapters(model)
    minidora.save_peft_adapter(model, tmp_path / "p")
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float64}
    again = minidora.load_peft_adapter(hf_model("llama_base"), tmp_path / "p",
                                       adapter_dtype=torch.float64)
    for n, layer in minidora.adapter_layers(model).items():
        other = minidora.adapter_layers(again)[n]
        assert torch.equal(layer.lora_B, other.lora_B) and torch.equal(layer.magnitude,
                                                                      other.magnitude)


# --- bitsandbytes' NF4 keys into a model's layers ----------------------------------------------

def _with_bias_checkpoint():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    sd = {}
    for name in ("0", "2"):
        layer = NF4Linear.from_linear(src.get_submodule(name), double_quant=False)
        sd.update(layer.to_bnb_state_dict(f"{name}."))
    return src, sd


def test_load_bnb_nf4_linears_keeps_biases_where_they_are():
    src, sd = _with_bias_checkpoint()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    assert minidora.load_bnb_nf4_linears(model, sd, compute_dtype=torch.float32) == ["0", "2"]
    assert torch.equal(model[0].bias, src[0].bias) and model[2].bias is None
    # a checkpoint without the bias the model's layer has: refused, nothing replaced
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=True))
    with pytest.raises(ValueError, match="2: the checkpoint has no 2.bias but the model's layer "
                                         "has one"):
        minidora.load_bnb_nf4_linears(model, sd)
    assert type(model[0]) is nn.Linear                          # layer 0 was valid: untouched
    sd2 = {k: v for k, v in sd.items() if k != "0.bias"}
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 64, bias=False))
    model2 = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 64, bias=True))
    assert minidora.load_bnb_nf4_linears(model, sd2) == ["0", "2"]
    with pytest.raises(ValueError, match="0: the checkpoint has 0.bias but the model's layer "
                                         "has none"):
        minidora.load_bnb_nf4_linears(model2, sd)


def test_load_bnb_nf4_linears_refuses_nan_scales():
    _, sd = _with_bias_checkpoint()
    sd["2.weight.absmax"] = sd["2.weight.absmax"].clone()
    sd["2.weight.absmax"][3] = float("nan")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    with pytest.raises(ValueError, match=r"'2.weight.absmax' holds 1 NaN/Inf scale\(s\), first at "
                                         r"index 3"):
        minidora.load_bnb_nf4_linears(model, sd)
    assert type(model[0]) is nn.Linear


# --- 1. r / alpha / rslora / dropout come from the file -------------------------------------------

@pytest.fixture
def rank1(tmp_path):
    model = minidora.wrap(hf_model("llama_base"), "dora", ["q_proj", "v_proj"], r=1, alpha=16,
                          rslora=True)
    randomize_adapters(model)
    return minidora.save_peft_adapter(model, tmp_path / "r1"), model


def test_load_peft_adapter_compares_r_with_a_wrapped_model(rank1):
    folder, src = rank1
    model = minidora.wrap(hf_model("llama_base"), "dora", ["q_proj", "v_proj"], r=4, alpha=16,
                          rslora=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' has r=4, but "
                                         r"'.*adapter_config.json' has r=1"):
        minidora.load_peft_adapter(model, folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    same = minidora.wrap(hf_model("llama_base"), "dora", ["q_proj", "v_proj"], r=1, alpha=16,
                         rslora=True)
    minidora.load_peft_adapter(same, folder)
    assert torch.equal(_logits(same), _logits(src))


@pytest.mark.parametrize("given,message", [
    (dict(r=4), "r=4 was given, but '.*adapter_config.json' has r=1"),
    (dict(alpha=32), "alpha=32 was given, but '.*' has lora_alpha=16"),
    (dict(rslora=False), "rslora=False was given, but '.*' has use_rslora=True"),
    (dict(dropout=0.1), "dropout=0.1 was given, but '.*' has lora_dropout=0.0"),
])
def test_load_peft_adapter_refuses_options_that_override_the_file(rank1, given, message):
    folder, src = rank1
    model = hf_model("llama_base")
    with pytest.raises(ValueError, match=message):
        minidora.load_peft_adapter(model, folder, **given)
    assert not minidora.adapter_layers(model)
    agreeing = {"r": 1, "alpha": 16, "rslora": True, "dropout": 0.0}
    again = minidora.load_peft_adapter(hf_model("llama_base"), folder,
                                       **{k: agreeing[k] for k in given})
    assert torch.equal(_logits(again), _logits(src))


# --- 2. every field of PEFT 0.21.2's LoraConfig ---------------------------------------------------

def _sub(name):
    """A PEFT sub-config with its defaults, as save_pretrained writes it (a JSON object)."""
    import peft.tuners.lora.config as c
    return dataclasses.asdict(getattr(c, name)())


# field -> [(value, build)]: "peft" passes it to LoraConfig before the adapter is made and saved;
# "json" writes it into the saved adapter_config.json (values PEFT cannot build here).
FIELD_CASES = {
    "peft_type": [("LOHA", "json")],
    "task_type": [("CAUSAL_LM", "peft")],
    "auto_mapping": [({"base_model_class": "LlamaForCausalLM",
                       "parent_library": "transformers.models.llama.modeling_llama"}, "json")],
    "peft_version": [("0.15.0", "json")],
    "base_model_name_or_path": [("someone/tiny-llama", "json")],
    "revision": [("v1", "json")],
    "inference_mode": [(False, "json")],
    "r": [(3, "peft")],
    "target_modules": [(r".*\.(q|o)_proj", "peft")],
    "exclude_modules": [(["k_proj"], "peft")],
    "layers_to_transform": [([1], "peft")],
    "layers_pattern": [("layers", "peft")],
    "lora_alpha": [(5, "peft")],
    "lora_dropout": [(0.25, "peft")],
    "fan_in_fan_out": [(True, "peft")],
    "use_rslora": [(True, "peft")],
    "use_dora": [(True, "peft")],
    "bias": [("all", "json"), ("lora_only", "json")],
    "lora_bias": [(True, "json")],
    "modules_to_save": [(["lm_head"], "json")],
    "init_lora_weights": [(False, "peft"), ("gaussian", "peft"), ("orthogonal", "peft"),
                          ("eva", "json"), ("pissa", "json"), ("pissa_niter_16", "json"),
                          ("olora", "json"), ("corda", "json"), ("loftq", "json"),
                          ("lora_ga", "json"), ("mica", "json"), ("fancy", "json")],
    "rank_pattern": [({"v_proj": 2}, "json")],
    "alpha_pattern": [({"v_proj": 3}, "json")],
    "megatron_config": [({"hidden_size": 64}, "json")],
    "megatron_core": [("my.megatron.core", "json")],
    "trainable_token_indices": [([1, 2], "json")],
    "loftq_config": [({"loftq_bits": 4, "loftq_iter": 1}, "json")],
    "eva_config": [("EvaConfig", "json")],
    "corda_config": [("CordaConfig", "json")],
    "lora_ga_config": [("LoraGAConfig", "json")],
    "velora_config": [("VeloraConfig", "json")],
    "alora_invocation_tokens": [([5, 7], "json")],
    "use_qalora": [(True, "json")],
    "qalora_group_size": [(8, "json")],
    "monteclora_config": [("MontecloraConfig", "json")],
    "layer_replication": [([[0, 2], [1, 2]], "json")],
    "runtime_config": [({"ephemeral_gpu_offload": True}, "json")],
    "target_parameters": [(["mlp.gate_proj.weight"], "json")],
    "use_bdlora": [("BdLoraConfig", "json")],
    "arrow_config": [("ArrowConfig", "json")],
    "kasa_config": [("KasaConfig", "json")],
    "ensure_weight_tying": [(True, "json")],
}
_SUBCONFIGS = {"eva_config", "corda_config", "lora_ga_config", "velora_config",
               "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"}
# What must be refused (a value that changes the computation and is not implemented); every
# other case must load with PEFT's logits.
_REFUSED_FIELDS = {"lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
                   "megatron_config", "trainable_token_indices", "velora_config",
                   "alora_invocation_tokens", "use_qalora", "monteclora_config",
                   "layer_replication", "target_parameters", "use_bdlora", "arrow_config",
                   "kasa_config", "ensure_weight_tying", "bias"}
_REFUSED_INITS = {"pissa", "pissa_niter_16", "olora", "corda", "loftq", "lora_ga", "mica", "fancy"}


def test_peft_options_table_covers_every_lora_config_field():
    from peft import LoraConfig
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(checkpoint.PEFT_OPTIONS) == fields == set(FIELD_CASES)
    assert {how for how, _, _ in checkpoint.PEFT_OPTIONS.values()} == {"exact", "harmless",
                                                                       "refused"}


def _peft_adapter(folder, field, value, build):
    """A real PEFT adapter (random A, B and magnitudes), saved by PEFT into ``folder``, with
    ``field`` set to ``value``; returns the name of its base model."""
    from peft import LoraConfig, get_peft_model
    base = "gpt2_base" if field == "fan_in_fan_out" else "llama_base"
    opts = dict(r=4, lora_alpha=8, target_modules=["c_attn"] if base == "gpt2_base"
                else ["q_proj", "v_proj"])
    if build == "peft":
        opts[field] = value
        if field == "exclude_modules":
            opts["target_modules"] = ["q_proj", "k_proj", "v_proj"]
        if field == "layers_pattern":
            opts["layers_to_transform"] = [0]
    torch.manual_seed(case_seed(field, repr(value)))
    model = get_peft_model(hf_model(base), LoraConfig(**opts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    if build == "json":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg[field] = _sub(value) if field in _SUBCONFIGS else value
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return base


@pytest.mark.parametrize("field,value,build", [(f, v, b) for f, cases in FIELD_CASES.items()
                                               for v, b in cases])
def test_every_peft_option_loads_exactly_or_is_refused_by_name(tmp_path, field, value, build):
    from peft import PeftModel
    folder = tmp_path / "adapter"
    base = _peft_adapter(folder, field, value, build)
    written = json.loads((folder / "adapter_config.json").read_text())[field]
    model = hf_model(base)
    refused = field in _REFUSED_FIELDS or (field == "init_lora_weights"
                                           and value in _REFUSED_INITS)
    if field == "peft_type":
        with pytest.raises(ValueError, match="peft_type must be 'LORA', got 'LOHA'"):
            minidora.load_peft_adapter(model, folder)
        return
    if refused:
        with pytest.raises(ValueError, match=re.escape(f"PEFT option {field} {written!r} (")):
            minidora.load_peft_adapter(model, folder)
        assert not minidora.adapter_layers(model)
        return
    model = minidora.load_peft_adapter(model, folder)
    if field == "runtime_config":            # not a field of a saved config: PEFT reads none
        cfg = json.loads((folder / "adapter_config.json").read_text())
        del cfg[field]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    theirs = PeftModel.from_pretrained(hf_model(base), str(folder)).eval()
    ids = input_ids()
    with torch.no_grad():
        ours, want, plain = (model(input_ids=ids).logits, theirs(input_ids=ids).logits,
                             hf_model(base)(input_ids=ids).logits)
    assert (want - plain).abs().max() > 1e-3               # the adapter changes the output...
    # ...and minidora applies it as PEFT does (float32, other summation orders: ~1e-7 seen)
    assert (ours - want).abs().max() < 1e-5


@pytest.mark.parametrize("edit,option", [
    (lambda c: c.__setitem__("target_modules", ["q_proj"]), "target_modules=['q_proj']"),
    (lambda c: c.__setitem__("exclude_modules", ["v_proj"]), "exclude_modules=['v_proj']"),
    (lambda c: c.__setitem__("layers_to_transform", [1]), "layers_to_transform=[1]"),
])
def test_load_peft_adapter_refuses_tensors_peft_would_not_load(tmp_path, edit, option):
    folder = peft_copy(tmp_path, "llama_lora_qv", edit)
    with pytest.raises(ValueError, match=re.escape(f"which PEFT would not adapt ({option})")):
        minidora.load_peft_adapter(hf_model("llama_base"), folder)


# --- 3. a model on the meta device ----------------------------------------------------------------

def test_loads_into_a_meta_model_are_refused(tmp_path):
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4))
    minidora.save_adapters(src, tmp_path / "a")
    minidora.save_peft_adapter(src, tmp_path / "p")
    with torch.device("meta"):
        wrapped = minidora.wrap(Net(), "dora", ["q_proj"], r=4)
        bare = Net()
    with pytest.raises(ValueError, match="layer 'layers.0.q_proj' is on the meta device .* "
                                         "materialize the model first"):
        minidora.load_adapters(wrapped, tmp_path / "a")
    with pytest.raises(ValueError, match="layer 'layers.0.q_proj' is on the meta device"):
        minidora.load_peft_adapter(bare, tmp_path / "p")
    assert not minidora.adapter_layers(bare)
    with pytest.raises(ValueError, match="layer 'layers.0.q_proj' is on the meta device"):
        minidora.load_peft_adapter(wrapped, tmp_path / "p")


# --- 4. finite after the cast ---------------------------------------------------------------------

@pytest.mark.parametrize("file_dtype,model_dtype,big", [
    (torch.float64, torch.float32, 1e300), (torch.float32, torch.float16, 1e5),
])
def test_values_that_overflow_the_adapters_dtype_are_refused(tmp_path, file_dtype, model_dtype,
                                                             big):
    src = minidora.wrap(Net(), "lora", ["q_proj"], r=4, adapter_dtype=file_dtype)
    with torch.no_grad():
        src.layers[1].q_proj.lora_B[5, 2] = big
    minidora.save_adapters(src, tmp_path / "a")
    minidora.save_peft_adapter(src, tmp_path / "p")
    dst = minidora.wrap(Net(), "lora", ["q_proj"], r=4, adapter_dtype=model_dtype)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    message = (rf"tensor layers.1.q_proj.lora_B holds 1 NaN/Inf value\(s\) once cast from "
               rf"{file_dtype} to {model_dtype}")
    with pytest.raises(ValueError, match=message):
        minidora.load_adapters(dst, tmp_path / "a")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=message.replace("layers.1", r"base_model.model.layers.1")
                       .replace("lora_B", "lora_B.weight")):
        minidora.load_peft_adapter(Net(), tmp_path / "p", adapter_dtype=model_dtype)


# --- 5. concurrent saves, and the files of killed ones --------------------------------------------

def test_threads_saving_into_one_folder_take_turns(tmp_path):
    models = [randomize_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=r), seed=r)
              for r in (4, 8)]
    for round_ in range(25):
        folder = tmp_path / f"f{round_}"
        errors, start = [], threading.Barrier(2)

        def save(model, folder=folder, errors=errors, start=start):
            start.wait()
            try:
                minidora.save_adapters(model, folder)
            except Exception as e:          # collected: the test fails on any
                errors.append(e)

        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sorted(p.name for p in folder.iterdir()) == [JS, ST]     # no temporary files
        loaded = []
        for src in models:                  # one whole adapter, never a mix of the two
            dst = minidora.wrap(Net(), "lora", ["q_proj"], r=src.layers[0].q_proj.r)
            try:
                minidora.load_adapters(dst, folder)
            except ValueError:
                continue
            assert _same_outputs(dst, src)
            loaded.append(src)
        assert len(loaded) == 1


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_save_removes_the_temporary_files_of_killed_saves(tmp_path):
    folder = tmp_path / "a"
    model = randomize_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4))
    minidora.save_adapters(model, folder)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = [f".{ST}.{dead}.tmp", f".{JS}.{dead}.140000.0a1b2c3d4e5f.tmp",
                 f".{ST}.{live.pid}.7.00ff00ff00ff.tmp"]       # the last one made old below
        kept = [f".{ST}.{live.pid}.9.abcdefabcdef.tmp", f".notes.{dead}.tmp", "notes.txt"]
        for name in stale + kept:
            (folder / name).write_bytes(b"partial")
        old = time.time() - 2 * checkpoint.STALE_TMP_SECONDS
        os.utime(folder / stale[2], (old, old))
        minidora.save_adapters(model, folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted([JS, ST, *kept])
    finally:
        live.kill()
        live.wait()


# --- 6. the checksum ------------------------------------------------------------------------------

def _data_start(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("layout", ["minidora", "peft"])
def test_every_bit_flip_in_the_tensor_data_is_refused(tmp_path, layout):
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj", "up_proj"], r=3))
    save, load = ((minidora.save_adapters, minidora.load_adapters) if layout == "minidora" else
                  (minidora.save_peft_adapter, minidora.load_peft_adapter))
    name = ST if layout == "minidora" else "adapter_model.safetensors"
    fresh = lambda: (minidora.wrap(Net(), "dora", ["q_proj", "up_proj"], r=3)
                     if layout == "minidora" else Net())
    good = save(src, tmp_path / "good")
    blob = (good / name).read_bytes()
    start = _data_start(good / name)
    g = torch.Generator().manual_seed(case_seed(layout))
    for i in range(60):
        pos = int(torch.randint(start, len(blob), (1,), generator=g))
        bit = int(torch.randint(0, 8, (1,), generator=g))
        folder = tmp_path / f"flip{i}"
        shutil.copytree(good, folder)
        (folder / name).write_bytes(blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1:])
        with pytest.raises(ValueError, match=re.escape(repr(str(folder / name)))):
            load(fresh(), folder)
    assert _same_outputs(load(fresh(), good), src)


def test_files_without_the_checksum_still_load(tmp_path):
    src = randomize_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4))
    folder = minidora.save_adapters(src, tmp_path / "a")
    with safe_open(str(folder / ST), "pt") as f:
        meta = f.metadata()
    assert checkpoint.DIGEST_KEY in meta
    del meta[checkpoint.DIGEST_KEY]
    save_file(load_file(str(folder / ST)), str(folder / ST), metadata=meta)
    dst = minidora.wrap(Net(), "dora", ["q_proj"], r=4)
    assert _same_outputs(minidora.load_adapters(dst, folder), src)


# --- 7. the NF4 layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qdora", "qlora"])
@pytest.mark.parametrize("change,message", [
    (dict(blocksize=4096), "the file has blocksize=64, the model has blocksize=4096"),
    (dict(double_quant=False), "the file has double_quant=True, the model has double_quant=False"),
])
def test_the_nf4_layout_must_agree_for_qdora(tmp_path, method, change, message):
    kw = dict(r=4, compute_dtype=torch.float32)
    src = randomize_adapters(minidora.wrap(Net(), method, ["q_proj", "up_proj"], **kw))
    folder = minidora.save_adapters(src, tmp_path / "a")
    layer = json.loads((folder / JS).read_text())["layers"]["layers.0.q_proj"]
    assert (layer["blocksize"], layer["double_quant"], layer["compute_dtype"]) == (64, True,
                                                                                   "float32")
    dst = minidora.wrap(Net(), method, ["q_proj", "up_proj"], **kw, **change)
    if method == "qdora":        # the magnitude was trained against the other layout's norms
        with pytest.raises(ValueError, match=f"layer 'layers.0.q_proj': {message}"):
            minidora.load_adapters(dst, folder)
    else:                        # y = base(x) + s B A x: the adapter is the same on any layout
        minidora.load_adapters(dst, folder)
        for n, layer in minidora.adapter_layers(dst).items():
            assert torch.equal(layer.lora_B, minidora.adapter_layers(src)[n].lora_B)


def _mixed(quantized: str) -> nn.Module:
    """Net with DoRA on both q_proj layers, the base of ``quantized`` in NF4."""
    net = Net()
    name, _, child = quantized.rpartition(".")
    lin = net.get_submodule(quantized)
    setattr(net.get_submodule(name), child, NF4Linear.from_linear(lin, compute_dtype=torch.float32))
    return minidora.wrap(net, "dora", ["q_proj"], r=4)


def test_the_quantized_flag_is_compared_per_layer(tmp_path):
    src = randomize_adapters(_mixed("layers.0.q_proj"))
    folder = minidora.save_adapters(src, tmp_path / "a")
    assert json.loads((folder / JS).read_text())["method"] == "mixed"
    with pytest.raises(ValueError, match="layer 'layers.0.q_proj': the file has quantized=True, "
                                         "the model has quantized=False"):
        minidora.load_adapters(_mixed("layers.1.q_proj"), folder)
    assert _same_outputs(minidora.load_adapters(_mixed("layers.0.q_proj"), folder), src)


# --- 8. clear messages ----------------------------------------------------------------------------

def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path):
    nested = "[" * 200_000 + "]" * 200_000
    folder = minidora.save_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), tmp_path / "a")
    (folder / JS).write_text(nested)
    with pytest.raises(ValueError, match=re.escape(repr(str(folder / JS))) + " .*nested too "
                                                                              "deeply"):
        minidora.load_adapters(minidora.wrap(Net(), "lora", ["q_proj"], r=4), folder)
    peft = peft_copy(tmp_path, "llama_lora_qv")
    (peft / "adapter_config.json").write_text(nested)
    with pytest.raises(ValueError, match="adapter_config.json' is not a JSON file .*nested"):
        minidora.load_peft_adapter(hf_model("llama_base"), peft)
    from minidora.bnb_checkpoint import from_bnb_state_dict
    sd = NF4Linear.from_linear(nn.Linear(64, 8)).to_bnb_state_dict("")
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(nested.encode()),
                                                              dtype=torch.uint8)
    with pytest.raises(ValueError, match="bitsandbytes__nf4' does not hold the JSON object .* "
                                         "nested too deeply"):
        from_bnb_state_dict(sd)


def test_save_to_a_dangling_symlink_names_it(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    for save in (minidora.save_adapters, minidora.save_peft_adapter):
        with pytest.raises(ValueError, match=r"path '.*link' is a symbolic link to '.*gone', which "
                                             "does not exist"):
            save(model, tmp_path / "link")


def test_save_of_adapters_on_the_meta_device_names_the_layer(tmp_path):
    with torch.device("meta"):
        model = minidora.wrap(Net(), "dora", ["up_proj"], r=4)
    for save in (minidora.save_adapters, minidora.save_peft_adapter):
        with pytest.raises(ValueError, match="layer 'layers.0.up_proj': its lora_A is on the meta "
                                             "device"):
            save(model, tmp_path / "a")
    assert not (tmp_path / "a" / ST).exists()


# --- 10. train --base -----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"not a safetensors file", None])
def test_train_base_that_is_not_safetensors_names_the_file(tmp_path, capsys, content):
    from minidora.__main__ import main
    base = tmp_path / "gpt.bin"
    if content is None:
        base.mkdir()
    else:
        base.write_bytes(content)
    assert main(["train", "--quick", "--base", str(base), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"error: --base: {str(base)!r} is not a readable safetensors file" in err, err
    assert len(err.strip().splitlines()) == 1


def test_golden_files_still_load_exactly():
    """The shipped PEFT adapters (written by PEFT, no checksum) load as before."""
    model = minidora.load_peft_adapter(hf_model("llama_base"), golden.peft_dir() / "llama_dora_qv")
    want = load_file(str(golden.peft_dir() / "expected_logits.safetensors"))["llama_dora_qv"]
    assert (_logits(model) - want).abs().max() < 1e-5
