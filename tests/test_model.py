"""minidora.model: wrap / report / merge / adapter files / PEFT interop, training, bad input.

The PEFT interop tests need transformers and peft (test extras): the tiny Hugging Face models and
PEFT adapters shipped in minidora/testing/golden/peft load from local files only.
"""

import json
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import minidora
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


def test_wrap_bad_input_leaves_model_untouched():
    model = Net()
    with pytest.raises(ValueError, match=r"method must be one of \('lora', 'dora', 'qlora', "
                                         r"'qdora'\), got 'ia3'"):
        minidora.wrap(model, "ia3", ["q_proj"])
    with pytest.raises(ValueError, match="r must be an integer >= 1, got 0"):
        minidora.wrap(model, "dora", ["q_proj"], r=0)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.5"):
        minidora.wrap(model, "lora", ["q_proj"], dropout=1.5)
    with pytest.raises(ValueError, match="alpha must be a number > 0, got -1"):
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
    m0 = {n: l.magnitude.detach().clone() for n, l in minidora.adapter_layers(model).items()
          if isinstance(l, DoRALinear)}
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


def test_merge_model_nf4_returns_requantization_errors():
    model = Net()
    minidora.wrap(model, "qdora", ["q_proj"], compute_dtype=torch.float32)
    randomize_adapters(model)
    errors = minidora.merge(model)
    assert len(errors) == 2 and all(0 < e < 0.2 for e in errors.values())
    with pytest.raises(ValueError, match="no minidora adapter layers to merge"):
        minidora.merge(Net())


# --- minidora adapter files ------------------------------------------------------------------

@pytest.mark.parametrize("method", minidora.METHODS)
def test_save_load_adapters_round_trip(tmp_path, method):
    src = minidora.wrap(Net(), method, ["q_proj", "down_proj"], r=4, alpha=8, rslora=True)
    randomize_adapters(src)
    cfg_path = minidora.save_adapters(src, tmp_path / "run" / "adapters.safetensors")
    tensors = load_file(str(tmp_path / "run" / "adapters.safetensors"))
    n_per_layer = 3 if method.endswith("dora") else 2
    assert len(tensors) == 4 * n_per_layer
    config = json.loads(cfg_path.read_text())
    assert config["method"] == method and config["minidora_version"] == minidora.__version__
    assert config["layers"]["layers.0.q_proj"]["r"] == 4
    assert config["layers"]["layers.1.down_proj"]["in_features"] == 48
    dst = minidora.wrap(Net(), method, ["q_proj", "down_proj"], r=4, alpha=8, rslora=True)
    x = torch.randn(3, 32)
    assert not torch.equal(dst(x), src(x))
    minidora.load_adapters(dst, tmp_path / "run" / "adapters.safetensors")
    assert torch.equal(dst(x), src(x))


def test_load_adapters_refuses_mismatches(tmp_path):
    path = tmp_path / "a.safetensors"
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
    # a file whose tensors do not fit the shapes its own config claims
    tensors = load_file(str(path))
    tensors["layers.0.q_proj.lora_B"] = torch.zeros(32, 5)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"layers.0.q_proj.lora_B: expected shape \(32, 4\), "
                                         r"got \(32, 5\)"):
        minidora.load_adapters(minidora.wrap(Net(), "dora", ["q_proj"], r=4), path)


class _Trap:
    hit = False

    def __reduce__(self):
        return (_Trap._spring, ())

    @staticmethod
    def _spring():
        _Trap.hit = True


def test_load_adapters_never_unpickles(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"layers.0.q_proj.lora_A": _Trap()}))
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    minidora.save_adapters(model, tmp_path / "good.safetensors")
    (tmp_path / "good.json").rename(tmp_path / "evil.json")
    with pytest.raises(Exception):
        minidora.load_adapters(model, path)
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
    path = tmp_path / "a.safetensors"
    model = minidora.wrap(Net(), "lora", ["q_proj"], r=4)
    minidora.save_adapters(model, path)
    (tmp_path / "a.json").write_text(json.dumps({"format": "minidora-adapters", "method": "lora"}))
    with pytest.raises(ValueError, match="is not a minidora adapter config"):
        minidora.load_adapters(model, path)


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
