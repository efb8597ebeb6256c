"""minidora.model: wrap / report / merge / adapter files / PEFT interop, training, bad input.

The PEFT interop tests need transformers and peft (test extras): the tiny Hugging Face models and
PEFT adapters shipped in minidora/testing/golden/peft load from local files only.
"""

import copy
import json
import pickle
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import minidora
from helpers import time_limit
from minidora import DoRALinear, LoRALinear, NF4Linear
from minidora.testing import golden


class Block(nn.Module):
    def __init__(self, d=32, h=48):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return self.norm(x + self.down_proj(torch.tanh(self.up_proj(x))))


class Net(nn.Module):
    def __init__(self, d=32, n_out=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in minidora.adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            if isinstance(layer, DoRALinear):
                layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
    return model


# --- wrap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", minidora.METHODS)
def test_wrap_replaces_targets_and_freezes_the_rest(method):
    model = Net()
    x = torch.randn(4, 32)
    y0 = model(x)
    out = minidora.wrap(model, method, ["q_proj", "layers.1.up_proj"], r=4, alpha=8,
                        compute_dtype=torch.float32)
    assert out is model
    layers = minidora.adapter_layers(model)
    assert sorted(layers) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.up_proj"]
    cls = DoRALinear if method.endswith("dora") else LoRALinear
    assert all(type(layer) is cls for layer in layers.values())
    assert all(isinstance(layer.base, NF4Linear) == method.startswith("q")
               for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    if cls is DoRALinear:
        want |= {f"{n}.magnitude" for n in layers}
    assert trainable == want
    if not method.startswith("q"):
        assert torch.equal(model(x), y0)        # B = 0: the wrapped model is the model


def test_report_counts():
    model = Net()
    total0 = sum(p.numel() for p in model.parameters())
    bytes0 = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    rep = minidora.report(model)
    assert (rep.trainable_params, rep.total_params, rep.weight_bytes) == (total0, total0, bytes0)
    minidora.wrap(model, "qlora", ["up_proj"], r=4, double_quant=False)
    n_adapter = 2 * 4 * (32 + 48)
    rep = minidora.report(model)
    assert rep.method == "qlora" and rep.adapted_layers == 2
    assert rep.trainable_params == n_adapter
    assert rep.total_params == total0 + n_adapter         # an NF4 weight counts out x in params
    # each 48x32 weight: 1536 fp32 bytes*4 -> 768 packed bytes + 24 float32 scales
    saved = 2 * (48 * 32 * 4 - 48 * 32 // 2 - 4 * 48 * 32 // 64)
    assert rep.weight_bytes == bytes0 - saved + 4 * n_adapter
    text = str(rep)
    assert f"{n_adapter:,}" in text and f"{total0 + n_adapter:,}" in text and "MiB" in text


def test_target_matching_rules():
    m = minidora.wrap(Net(), "lora", r".*\.(q|v)_proj")
    assert len(minidora.adapter_layers(m)) == 4
    m = minidora.wrap(Net(), "lora", ["layers.0.down_proj", "head"])
    assert sorted(minidora.adapter_layers(m)) == ["head", "layers.0.down_proj"]
    with pytest.raises(ValueError, match=r"\['proj'\] match no linear layer"):
        minidora.wrap(Net(), "lora", ("proj",))   # a suffix must be whole name components


def test_unknown_target_lists_linear_layers():
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no linear layer; the model's "
                                         r"linear layers are: \[layers\.0\.q_proj, .*head\]"):
        minidora.wrap(Net(), "lora", ["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="match no linear layer"):
        minidora.wrap(Net(), "lora", ["norm"])                 # exists, but is no Linear
    with pytest.raises(ValueError, match="match no linear layer"):
        minidora.wrap(Net(), "lora", r"q_proj")                # regex must match the full name


@pytest.mark.parametrize("method", minidora.METHODS)
def test_wrap_keeps_an_eval_model_in_eval(method):
    """A layer built by wrap takes the mode of the layer it replaces: dropout on the adapters'
    input never runs in a model that was put in eval mode before wrapping."""
    model = Net().eval()
    minidora.wrap(model, method, ["q_proj"], r=4, dropout=0.5, compute_dtype=torch.float32)
    layers = minidora.adapter_layers(model)
    assert layers and not any(layer.training for layer in layers.values())
    randomize_adapters(model)
    x = torch.randn(4, 32)
    assert torch.equal(model(x), model(x))
    model.train()
    assert all(layer.training for layer in layers.values())


def test_wrap_bad_input_leaves_model_untouched():
    model = Net()
    with pytest.raises(ValueError, match=r"method must be one of \('lora', 'dora', 'qlora', "
                                         r"'qdora'\), got 'ia3'"):
        minidora.wrap(model, "ia3", ["q_proj"])
    with pytest.raises(ValueError, match="r must be an integer >= 1, got 0"):
        minidora.wrap(model, "dora", ["q_proj"], r=0)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.5"):
        minidora.wrap(model, "lora", ["q_proj"], dropout=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got -1"):
        minidora.wrap(model, "lora", ["q_proj"], alpha=-1)
    with pytest.raises(ValueError, match="init must be one of"):
        minidora.wrap(model, "lora", ["q_proj"], init="orthogonal")
    with pytest.raises(TypeError, match="target_modules must be a regex string or a non-empty"):
        minidora.wrap(model, "lora", [])
    assert not minidora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    minidora.wrap(model, "lora", ["q_proj"])
    with pytest.raises(ValueError, match=r"model is already wrapped \(2 adapter layers"):
        minidora.wrap(model, "dora", ["v_proj"])


# --- training --------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny layers: one thread avoids stalls when the machine is shared (values are the same)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("method", minidora.METHODS)
def test_training_reduces_loss(method, one_thread):
    teacher, model = Net(seed=10), Net(seed=0)
    minidora.wrap(model, method, ["q_proj", "v_proj", "up_proj", "down_proj", "head"], r=4,
                  alpha=8, dropout=0.05)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m0 = {n: lay.magnitude.detach().clone() for n, lay in minidora.adapter_layers(model).items()
          if isinstance(lay, DoRALinear)}
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 32, generator=g) for _ in range(8)]
    xs = torch.cat(data)

    def loss_on(x):
        with torch.no_grad():
            target = teacher(x)
        return (model(x) - target).pow(2).mean()

    model.eval()
    before = loss_on(xs).item()
    model.train()
    for step in range(120):
        loss = loss_on(data[step % 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = loss_on(xs).item()
    assert after < 0.1 * before, (before, after)      # observed: about 30x lower
    for n, m in m0.items():
        assert (minidora.adapter_layers(model)[n].magnitude - m).abs().max() > 1e-3


# --- merge -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_unmerge_model_dense(method):
    model = Net().double()
    minidora.wrap(model, method, ["q_proj", "down_proj"], adapter_dtype=torch.float64)
    randomize_adapters(model)
    x = torch.randn(5, 32, dtype=torch.float64)
    y = model(x)
    errors = minidora.merge(model)
    assert set(errors) == set(minidora.adapter_layers(model)) and set(errors.values()) == {0.0}
    assert all(isinstance(m.base, nn.Linear) and m.merged
               for m in minidora.adapter_layers(model).values())
    assert (model(x) - y).abs().max() < 1e-12
    minidora.unmerge(model)
    assert (model(x) - y).abs().max() < 1e-12


def test_merge_model_nf4_returns_the_share_of_the_update_lost():
    model = Net()
    minidora.wrap(model, "qdora", ["q_proj"], compute_dtype=torch.float32)
    randomize_adapters(model)
    layers = minidora.adapter_layers(model)
    exact = {n: lay.merged_weight() for n, lay in layers.items()}
    w0 = {n: lay.base.dequantize_weight(torch.float32) for n, lay in layers.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = minidora.merge(model)
    for n, err in errors.items():
        stored = layers[n].base.dequantize_weight(torch.float32)
        want = ((stored - exact[n]).norm() / (exact[n] - w0[n]).norm()).item()
        assert err > 0 and abs(err - want) <= 1e-5 * want
    assert len(caught) == (max(errors.values()) > 0.1)       # one warning for the whole model
    with pytest.raises(ValueError, match="no minidora adapter layers to merge"):
        minidora.merge(Net())


def test_qlora_merge_of_a_small_update_warns_and_merge_and_unload_keeps_it():
    model = minidora.wrap(Net(), "qlora", "all-linear", compute_dtype=torch.float32)
    randomize_adapters(model)
    for layer in minidora.adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.mul_(1e-3)        # far below one NF4 step of these weights
    x = torch.randn(6, 32)
    y = model(x)
    dense = minidora.merge_and_unload(copy.deepcopy(model))
    assert not minidora.adapter_layers(dense)
    assert all(type(m) is nn.Linear for n, m in dense.named_modules() if n.endswith("proj"))
    assert (dense(x) - y).abs().max() < 1e-5                  # the update survives exactly
    with pytest.warns(UserWarning, match=r"merging lost more than 10% of the adapter's update in "
                                         r"\d+ of \d+ layers .*merge_and_unload"):
        errors = minidora.merge(model)
    assert min(errors.values()) > 0.9                         # re-quantization rounds it away


def test_merge_is_all_or_none():
    model = minidora.wrap(Net(), "lora", ["q_proj", "down_proj"])
    randomize_adapters(model)
    layers = list(minidora.adapter_layers(model).values())
    w = [lay.base.weight.detach().clone() for lay in layers]

    def boom(warn=True):
        raise RuntimeError("disk full")
    layers[2].merge = boom
    with pytest.raises(RuntimeError, match="layer 'layers.1.q_proj': disk full"):
        minidora.merge(model)
    assert not any(lay.merged for lay in layers)
    for lay, w0 in zip(layers, w, strict=True):
        assert torch.allclose(lay.base.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,match", [
    ("lora", r"the merged weight has \d+ value\(s\) that a torch.float16 weight stores as inf"),
    ("qlora", r"NaN/Inf")])
def test_merge_refuses_an_overflow_naming_the_layer(method, match):
    model = minidora.wrap(Net(), method, ["q_proj"], compute_dtype=torch.float32)
    if method == "lora":
        model.half()
    randomize_adapters(model)
    layer = minidora.adapter_layers(model)["layers.0.q_proj"]
    with torch.no_grad():
        layer.lora_B.fill_(1e37 if method == "qlora" else 1e3)
        layer.lora_A.fill_(1e3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"layer 'layers.0.q_proj': .*{match}"):
        minidora.merge(model)
    assert not any(lay.merged for lay in minidora.adapter_layers(model).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_on_the_meta_device_names_the_layer():
    with torch.device("meta"):
        model = minidora.wrap(Net(), "dora", ["q_proj"])
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj': the layer's weights are on "
                                         r"the meta device"):
        minidora.merge(model)


def test_merge_refuses_a_weight_tied_to_another_module():
    model = hf_model("gpt2_base")                          # lm_head.weight is wte.weight
    minidora.wrap(model, "lora", ["lm_head"], r=2)
    emb = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'lm_head': its base weight is also "
                                         r"\['transformer.wte.weight'\] \(tied weights\)"):
        minidora.merge(model)
    assert torch.equal(model.transformer.wte.weight, emb)
    assert not minidora.adapter_layers(model)["lm_head"].merged


def test_all_linear_leaves_out_the_output_head():
    names = sorted(minidora.adapter_layers(minidora.wrap(hf_model("llama_base"), "lora",
                                                          "all-linear")))
    assert len(names) == 14 and "lm_head" not in names
    net = sorted(minidora.adapter_layers(minidora.wrap(Net(), "dora", "all-linear")))
    assert "head" in net and len(net) == 9                  # no Hugging Face head here: all


@pytest.mark.parametrize("method", minidora.METHODS)
def test_state_dict_round_trip_refreshes_dora_norms(method):
    # b has other base weights than a: load_state_dict must make b compute exactly what a does
    a = minidora.wrap(Net(seed=0), method, ["q_proj", "up_proj"], compute_dtype=torch.float32)
    b = minidora.wrap(Net(seed=1), method, ["q_proj", "up_proj"], compute_dtype=torch.float32)
    randomize_adapters(a)
    x = torch.randn(5, 32)
    assert (a(x) - b(x)).abs().max() > 1e-2
    assert not b.load_state_dict(a.state_dict())._asdict()["missing_keys"]
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("method", minidora.METHODS)
def test_merged_flag_travels_with_the_state_dict(method):
    a = minidora.wrap(Net(), method, ["q_proj"], compute_dtype=torch.float32)
    randomize_adapters(a)
    x = torch.randn(4, 32)
    y = a(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minidora.merge(a)
    state = a.state_dict()
    assert state["layers.0.q_proj.merged"].item() is True
    b = minidora.wrap(Net(), method, ["q_proj"], compute_dtype=torch.float32)
    b.load_state_dict(state)                  # a fresh model must not add the adapter again
    assert "layers.0.q_proj.merged" in state  # the caller's dict is left as it was
    assert all(lay.merged for lay in minidora.adapter_layers(b).values())
    assert torch.equal(b(x), a(x))
    tol = 1e-5 if method in ("lora", "dora") else 0.05
    assert (b(x) - y).abs().max() < tol * y.abs().max()
    if method != "lora":                      # the unmerged weight is not in a merged state
        with pytest.raises(RuntimeError, match="came from a loaded state dict"):
            minidora.unmerge(b)
    b.load_state_dict(minidora.wrap(Net(), method, ["q_proj"]).state_dict())
    assert not any(lay.merged for lay in minidora.adapter_layers(b).values())


@pytest.mark.parametrize("method", minidora.METHODS)
def test_a_state_without_merged_flags_loads_unmerged(method):
    # older files have no ".merged" keys: what they hold is an unmerged layer, whatever the
    # model they are loaded into was
    a = randomize_adapters(minidora.wrap(Net(), method, ["q_proj"], compute_dtype=torch.float32))
    old = {k: v for k, v in a.state_dict().items() if not k.endswith(".merged")}
    b = minidora.wrap(Net(seed=1), method, ["q_proj"], compute_dtype=torch.float32)
    randomize_adapters(b, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minidora.merge(b)
    b.load_state_dict(old)
    assert not any(lay.merged for lay in minidora.adapter_layers(b).values())
    x = torch.randn(4, 32)
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("method", minidora.METHODS)
def test_a_state_without_base_weights_cannot_leave_a_layer_merged(method):
    a = randomize_adapters(minidora.wrap(Net(), method, ["q_proj"], compute_dtype=torch.float32))
    adapters = {k: v for k, v in a.state_dict().items() if ".base." not in k}
    b = minidora.wrap(Net(seed=1), method, ["q_proj"], compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minidora.merge(b)
    layer, x = b.layers[0].q_proj, torch.randn(4, 32)
    y = layer(x)
    no_flag = {k: v for k, v in adapters.items() if not k.endswith(".merged")}
    with pytest.raises(RuntimeError, match=r"layer 'layers.0.q_proj' is merged but the state does "
                                           r"not hold its base weights .*minidora.unmerge"):
        b.load_state_dict(no_flag, strict=False)     # the old adapter stays in the base weight
    assert layer.merged and torch.equal(layer(x), y)  # the layer is left as it was
    c = minidora.wrap(Net(seed=1), method, ["q_proj"], compute_dtype=torch.float32)
    merged_flag = {**adapters, "layers.0.q_proj.merged": torch.tensor(True)}
    with pytest.raises(RuntimeError, match="'layers.0.q_proj' would be merged but the state"):
        c.load_state_dict(merged_flag, strict=False)  # W0 would be taken for a merged weight
    assert not any(lay.merged for lay in minidora.adapter_layers(c).values())


def test_model_to_bfloat16_keeps_adapters_float32_unless_cast():
    model = minidora.wrap(Net(), "qdora", ["q_proj", "v_proj"])
    model.to(torch.bfloat16)
    layers = minidora.adapter_layers(model).values()
    adapters = [p for lay in layers for p in (lay.lora_A, lay.lora_B, lay.magnitude)]
    assert {p.dtype for p in adapters} == {torch.float32}
    assert model.layers[0].norm.weight.dtype == torch.bfloat16
    y = model(torch.randn(3, 32, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert all(lay.lora_A.grad.dtype == torch.float32 for lay in layers)
    minidora.cast_adapters(model, torch.bfloat16)
    assert {p.dtype for lay in layers for p in (lay.lora_A, lay.lora_B, lay.magnitude)} == {
        torch.bfloat16}


@pytest.mark.parametrize("method", minidora.METHODS)
def test_build_on_meta_then_materialize(method):
    ref = minidora.wrap(Net(), method, ["q_proj", "down_proj"], compute_dtype=torch.float32)
    randomize_adapters(ref)
    with torch.device("meta"):
        model = minidora.wrap(Net(), method, ["q_proj", "down_proj"],
                              compute_dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(model(x), ref(x))


# --- minidora adapter files ------------------------------------------------------------------

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
        loaded = []
        for r in (4, 8):
            model = minidora.wrap(nn.Sequential(nn.Linear(64, 64)), "lora", ["0"], r=r)
            try:
                minidora.load_adapters(model, folder)
                loaded.append(r)
            except (ValueError, FileNotFoundError) as e:
                assert "r=" in str(e) or "disagrees" in str(e) or "has no minidora" in str(e), e
        assert len(loaded) <= 1                   # one whole adapter, or a clear refusal
        assert any(folder.glob("minidora_adapters.*")), folder   # saves had been made
    # A killed save may leave a refused mix in every round (a save takes ~2 ms, most of it between
    # the two renames); a run that ends leaves one whole adapter: the one it saved last.
    folder = tmp_path / "finished"
    subprocess.run([sys.executable, str(script), str(folder), "7"], check=True,
                   capture_output=True, timeout=time_limit(120))
    loads = []
    for r in (4, 8):
        model = minidora.wrap(nn.Sequential(nn.Linear(64, 64)), "lora", ["0"], r=r)
        try:
            minidora.load_adapters(model, folder)
            loads.append(r)
        except ValueError as e:
            assert "r=" in str(e), e
    assert loads == [4]                           # saves 0..6 alternate 4, 8: the last is r=4


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


# --- PEFT interop (needs transformers and peft) ------------------------------------------------

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


def hf_model(base):
    from transformers import AutoConfig, AutoModelForCausalLM
    if base != "llama_base_nf4":
        return AutoModelForCausalLM.from_pretrained(str(golden.peft_dir() / base)).eval()
    config = AutoConfig.from_pretrained(str(golden.peft_dir() / base))
    del config.quantization_config                   # bitsandbytes layout, read by minidora
    model = AutoModelForCausalLM.from_config(config).eval()
    sd = load_file(str(golden.peft_dir() / base / "model.safetensors"))
    names = minidora.load_bnb_nf4_linears(model, sd, compute_dtype=torch.float32)
    assert len(names) == 14                          # 7 linears x 2 layers; lm_head stays fp32
    rest = {k: v for k, v in sd.items() if not any(k.startswith(n + ".") for n in names)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(k.rpartition(".")[0] in names for k in missing)
    return model


def input_ids():
    return torch.tensor(json.loads((golden.peft_dir() / "expected.json").read_text())["input_ids"])


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


def test_wrap_a_bare_linear_returns_the_adapter_layer():
    lin = nn.Linear(8, 6)
    layer = minidora.wrap(lin, "dora", "", r=2)          # "" is the module itself
    assert isinstance(layer, DoRALinear) and layer.base is lin
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), lin(x))


def test_load_adapters_refuses_a_foreign_json(tmp_path):
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    folder = minidora.save_adapters(model, tmp_path / "a")
    save_file(load_file(str(folder / "minidora_adapters.safetensors")),
              str(folder / "minidora_adapters.safetensors"))          # no embedded config
    (folder / "minidora_adapters.json").write_text(
        json.dumps({"format": "minidora-adapters", "method": "lora"}))
    with pytest.raises(ValueError, match="is not a minidora adapter config"):
        minidora.load_adapters(model, folder)


def test_report_counts_tied_weights_once():
    model = hf_model("gpt2_base")                    # lm_head.weight is wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}   # parameters() deduplicates too
    rep = minidora.report(model)
    assert rep.total_params == sum(unique.values()) == model.num_parameters()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_qdora_trains_under_torch_distributed(tmp_path, wrapper, one_thread):
    """One-process gloo group: the uint8 NF4 parameters and float32 buffers pass DDP's broadcast
    and FSDP2's sharding unchanged, and the gradients equal the undistributed ones."""
    import torch.distributed as dist
    ref, model = Net(), Net()
    for m in (ref, model):
        minidora.wrap(m, "qdora", ["q_proj", "up_proj"], compute_dtype=torch.float32)
    randomize_adapters(ref)
    model.load_state_dict(ref.state_dict())          # the same NF4 bytes and adapters
    x = torch.randn(6, 32)
    ref(x).square().sum().backward()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        if wrapper == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in minidora.adapter_layers(model).values():
                fully_shard(layer)
            wrapped = fully_shard(model)
        wrapped(x).square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        assert set(grads) == set(want) and len(want) == 4 * 3
        for n, g in grads.items():
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            assert torch.allclose(g, want[n], rtol=1e-5, atol=1e-6), n
    finally:
        dist.destroy_process_group()


# --- PEFT and bitsandbytes files: everything checked before anything changes -------------------

def _peft_copy(tmp_path, adapter, edit_config=None, edit_tensors=None):
    src, dst = golden.peft_dir() / adapter, tmp_path / adapter
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


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
    folder = _peft_copy(tmp_path, adapter, edit_config, edit_tensors)
    model = hf_model("llama_base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        minidora.load_peft_adapter(model, folder)
    assert not minidora.adapter_layers(model)                  # not wrapped with random adapters
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_peft_adapter_corrupt_files_name_the_file(tmp_path):
    folder = _peft_copy(tmp_path, "llama_lora_qv")
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
