"""minidora.model: wrap / report / merge / cast, state dicts, training, meta models, bad input.

Adapter files (minidora's, PEFT's, bitsandbytes' keys) are tested in tests/test_checkpoint.py.
The tiny Hugging Face models shipped in minidora/testing/golden/peft load from local files only.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import minidora
from helpers import Net, hf_model, randomize_adapters
from minidora import DoRALinear, LoRALinear, NF4Linear

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


def test_wrap_a_bare_linear_returns_the_adapter_layer():
    lin = nn.Linear(8, 6)
    layer = minidora.wrap(lin, "dora", "", r=2)          # "" is the module itself
    assert isinstance(layer, DoRALinear) and layer.base is lin
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), lin(x))


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
