"""minidora/apps/train/synthetic.py and memory.py: the synthetic Llama checkpoint against
transformers' own model and save_pretrained, the NF4 byte counts against real NF4Linear layers,
the predicted storage per rank against what FSDP2 really gives rank 0 (a fake process group of
2 or 3 ranks, no communication), the activation estimate against what autograd keeps, and the
7B / 70B arithmetic against docs/distributed.md."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import minidora
from minidora import nf4
from minidora.apps.train import memory, shard, synthetic

DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def llama_config(size="tiny", **over) -> dict:
    return {**synthetic.SIZES[size], "tie_word_embeddings": False, **over}


def meta_llama(cfg: dict) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**cfg))


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


# --- the checkpoint's names and shapes are transformers' --------------------------------------

VARIANTS = [("tiny", {}), ("1b", {}), ("7b-width", {}),
            ("tiny", {"attention_bias": True, "mlp_bias": True}),
            ("tiny", {"head_dim": 24}),                    # q_proj [96, 72], o_proj [72, 96]
            ("tiny", {"tie_word_embeddings": True})]


@pytest.mark.parametrize("size,over", VARIANTS)
def test_tensor_shapes_are_llamas_state_dict_on_meta(size, over):
    cfg = llama_config(size, **over)
    want = {k: tuple(v.shape) for k, v in meta_llama(cfg).state_dict().items()}
    if cfg["tie_word_embeddings"]:
        del want["lm_head.weight"]              # save_pretrained writes a tied head once
    got = synthetic.tensor_shapes(cfg)
    assert list(got.items()) == list(want.items())


@pytest.mark.parametrize("size,over", VARIANTS)
def test_count_adds_up_to_the_meta_models_parameters(size, over):
    cfg = llama_config(size, **over)
    model = meta_llama(cfg)
    n = synthetic.count(cfg)
    assert n["total"] == sum(p.numel() for p in model.parameters())      # tied: counted once
    assert n["total"] == n["quantized"] + n["embeddings"] + n["norms"] + n["biases"]
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert n["norms"] == sum(p.numel() for p in norms)
    # the quantized layers are exactly those minidora's "all-linear" adapts (not lm_head)
    minidora.wrap(model, "qlora", "all-linear", r=2)
    layers = minidora.adapter_layers(model).values()
    assert n["shapes"] == [(m.out_features, m.in_features) for m in layers]
    assert n["quantized"] == sum(o * i for o, i in n["shapes"])


# --- the files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint in several files (bfloat16, 2 layers)."""
    return synthetic.write(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=5,
                           max_shard_bytes=20_000)


def test_tiny_loads_with_transformers_and_equals_what_was_drawn(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 2
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    files = read_folder(tiny)
    assert sorted(sd) == sorted(files)
    shapes = synthetic.tensor_shapes(config)
    for name, t in files.items():
        assert torch.equal(sd[name], t), name
        assert torch.equal(t, synthetic.draw(name, shapes[name], 5, torch.bfloat16)), name
    w = files["model.layers.1.mlp.down_proj.weight"].float()
    assert abs(w.std().item() - synthetic.STD) < 0.001 and abs(w.mean().item()) < 0.001
    norm = files["model.norm.weight"].float()
    assert abs(norm.mean().item() - 1) < 0.01 and not torch.all(norm == 1)
    x = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(x).logits.float()).all()


def test_the_layout_is_save_pretrained(tiny, tmp_path):
    """The same files, index and metadata as transformers writes for the same model."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert ((tiny / "model.safetensors.index.json").read_text()
            == (tmp_path / "model.safetensors.index.json").read_text())
    ours = sorted(p.name for p in tiny.glob("*.safetensors"))
    assert ours == sorted(p.name for p in tmp_path.glob("*.safetensors")) and len(ours) > 2
    for f in ours:
        with safe_open(tiny / f, "pt") as a, safe_open(tmp_path / f, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()


def test_the_index_maps_every_tensor_to_the_file_that_holds_it(tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shapes = synthetic.tensor_shapes(json.loads((tiny / "config.json").read_text()))
    assert sorted(index["weight_map"]) == sorted(shapes)
    size = 0
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(tiny / f, "pt") as g:
            keys = sorted(g.keys())
            assert keys == sorted(k for k, v in index["weight_map"].items() if v == f)
            nbytes = [g.get_tensor(k).nbytes for k in keys]
        assert sum(nbytes) <= 20_000 or len(keys) == 1, f    # only a lone tensor is larger
        size += sum(nbytes)
    assert index["metadata"] == {"total_size": size,
                                 "total_parameters": sum(map(math.prod, shapes.values()))}


@pytest.mark.parametrize("limit", [1, 3000, 10**5, 10**9])
def test_shards_follow_huggingface_hubs_rule(limit):
    shapes = synthetic.tensor_shapes(llama_config("tiny", num_hidden_layers=3))
    meta = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in shapes.items()}
    want = split_torch_state_dict_into_shards(meta, filename_pattern="m{suffix}",
                                              max_shard_size=limit).filename_to_tensors
    got = synthetic.shards({k: math.prod(s) * 2 for k, s in shapes.items()}, limit)
    assert got == list(want.values())


def test_values_do_not_depend_on_the_shard_size_the_dtype_or_the_layer_count(tiny, tmp_path):
    one = synthetic.write(tmp_path / "one", "tiny", seed=5, max_shard_bytes=10**9)
    assert sorted(p.name for p in one.iterdir()) == sorted([synthetic.MARKER, "config.json",
                                                           "model.safetensors"])   # no index
    a, b = read_folder(tiny), read_folder(one)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    wide = read_folder(synthetic.write(tmp_path / "f32", "tiny", layers=3, seed=5,
                                       dtype=torch.float32, max_shard_bytes=7_000))
    assert len(wide) == len(a) + 9                                     # one block more
    assert all(torch.equal(wide[k].to(torch.bfloat16), a[k]) for k in a)
    other = read_folder(synthetic.write(tmp_path / "seed6", "tiny", seed=6))
    assert not any(torch.equal(other[k], a[k]) for k in a)


def test_a_second_write_with_the_same_settings_is_already_there(tiny):
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    lines = []
    assert synthetic.write(tiny, "tiny", seed=5, max_shard_bytes=20_000, log=lines.append) == tiny
    assert len(lines) == 1 and "already there" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before


def test_large_tensors_are_drawn_in_chunks_of_their_own_seed():
    n = synthetic.CHUNK + 1000                     # two chunks, the second partial
    t = synthetic.draw("x.weight", (n,), 3, torch.float32)
    g = torch.Generator().manual_seed(synthetic._chunk_seed(3, "x.weight", 1))
    tail = torch.empty(1000).normal_(0, synthetic.STD, generator=g)
    assert torch.equal(t[synthetic.CHUNK:], tail)
    assert torch.equal(synthetic.draw("x.weight", (n,), 3, torch.float32), t)


BAD_WRITES = [
    (dict(size="13b"), ValueError, r"size must be one of \['1b', '7b-width', 'tiny'\], got '13b'"),
    (dict(layers=0), ValueError, r"layers must be an integer >= 1 .*got 0"),
    (dict(layers=True), ValueError, r"layers must be an integer >= 1 .*got True"),
    (dict(layers=2.0), ValueError, r"layers must be an integer >= 1 .*got 2.0"),
    (dict(seed=-1), ValueError, r"seed must be an integer in 0..2\*\*63-1, got -1"),
    (dict(dtype=torch.int8), TypeError, r"dtype must be torch.float32, torch.bfloat16 or "
                                        r"torch.float16, got torch.int8"),
    (dict(max_shard_bytes=0), ValueError, r"max_shard_bytes must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_WRITES)
def test_bad_arguments_are_refused_before_any_file(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        synthetic.write(tmp_path / "x", **{"size": "tiny", **kwargs})
    assert not (tmp_path / "x").exists()


def test_a_folder_of_something_else_is_never_written_into(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"folder '.*mine' is not empty and holds no synthetic "
                                         r"checkpoint \(minidora_synthetic.json\)"):
        synthetic.write(tmp_path / "mine", "tiny")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"folder must be a folder, got the file '.*file'"):
        synthetic.write(tmp_path / "file", "tiny")
    with pytest.raises(ValueError, match=r"holds a synthetic checkpoint of other settings "
                                         r"\(\{'size': 'tiny', 'layers': 2, 'seed': 5"):
        synthetic.write(tiny, "tiny", seed=6, max_shard_bytes=20_000)
    copy = tmp_path / "copy"
    synthetic.write(copy, "tiny", max_shard_bytes=20_000)
    sorted(copy.glob("model-*.safetensors"))[0].write_bytes(b"")
    with pytest.raises(ValueError, match=r"the synthetic checkpoint's files \['model-00001-of"):
        synthetic.write(copy, "tiny", max_shard_bytes=20_000)


@pytest.mark.parametrize("config,match", [
    ([1, 2], r"config must be a dict \(a Llama config.json\), got list"),
    ({**synthetic.SIZES["tiny"], "hidden_size": 0}, r"config\['hidden_size'\] must be a positive "
                                                    r"integer, got 0"),
    ({k: v for k, v in synthetic.SIZES["tiny"].items() if k != "vocab_size"},
     r"config\['vocab_size'\] must be a positive integer, got None"),
])
def test_count_refuses_a_bad_config(config, match):
    with pytest.raises((TypeError, ValueError), match=match):
        synthetic.count(config)


# --- the NF4 bytes are NF4Linear's ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(70, 50), (33, 257), (1, 63), (257, 3), (2048, 5632)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_tensors_are_what_nf4linear_stores(shape, double_quant):
    out, n_in = shape
    # 2048 x 5632 on the meta device: the same code computes the same shapes, without 0.7 s of
    # quantizing; the small odd shapes are quantized for real.
    device = "meta" if out * n_in > 10**6 else "cpu"
    linear = torch.nn.Linear(n_in, out, bias=False, device=device)
    layer = minidora.NF4Linear.from_linear(linear, double_quant=double_quant)
    params = dict(layer.named_parameters())
    held = {**{k: (p, True) for k, p in params.items()},
            **{k: (b, False) for k, b in layer.named_buffers()}}
    want = {k: (t.numel(), t.element_size(), sharded) for k, (t, sharded) in held.items()}
    assert memory.nf4_tensors(out, n_in, double_quant=double_quant) == want
    assert all(t.dim() <= 1 for t, _ in held.values())         # dim 0 is the only one to shard
    total = sum(numel * size for numel, size, _ in want.values())
    assert 8 * total == pytest.approx(nf4.storage_bits_per_param(out * n_in, 64, double_quant)
                                      * out * n_in, rel=1e-12)
    for world in (1, 2, 3, 8):
        sharded, whole = memory.nf4_rank_bytes(out, n_in, world, double_quant=double_quant)
        chunks = {k: torch.chunk(torch.empty(t.numel(), dtype=torch.uint8, device="meta"),
                                 world)[0].numel() * t.element_size()
                  for k, (t, s) in held.items() if s}           # rank 0's share, as FSDP2 cuts
        assert sharded == sum(chunks.values())
        assert whole == sum(t.numel() * t.element_size() for t, s in held.values() if not s)


# --- the storage per rank is FSDP2's -------------------------------------------------------------

@pytest.fixture
def fake_group(request):
    """A process group of ``request.param`` ranks where this process is rank 0 and nothing is
    ever sent: enough for FSDP2 to cut the shards (its collectives are not run here)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=request.param, store=FakeStore())
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fake_group", [2, 3], indirect=True)
@pytest.mark.parametrize("method,double_quant", [("qdora", True), ("qlora", False),
                                                 ("qlora", True), ("dora", True)])
def test_predicted_storage_is_what_fsdp2_leaves_on_rank_0(fake_group, method, double_quant):
    cfg = llama_config("tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    minidora.wrap(model, method, "all-linear", r=3, double_quant=double_quant,
                  compute_dtype=torch.float32)
    shard.parallelize(model, "fsdp2")
    p = memory.predict(cfg, method, 3, fake_group, double_quant=double_quant)
    held = p["base_sharded"] + p["base_whole"] + p["unquantized"] + p["rope"]
    assert shard.local_bytes(model) == held + p["adapters"] // 4     # parameters of the adapters
    assert p["adapters"] % 4 == 0 and p["total"] == sum(p[k] for k in memory.PARTS)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny Llama with its head tied to the embeddings, as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_config("tiny", tie_word_embeddings=True))
                     ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fake_group", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_gathered_units_are_what_fsdp2_allocates(fake_group, which, tiny, tied, monkeypatch):
    """load.build's units outside the adapter layers (root, embeddings, head) unsharded one by
    one: the bytes of their unsharded parameters and of FSDP2's all-gather output (301 rows:
    padded at 2 and 3 ranks) against gathered_root, gathered_outer and gather_buffer."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    from minidora.apps.train import load

    folder = tiny if which == "untied" else tied
    _, model, _ = load.build(folder, "qlora", 3, 6.0, 0, torch.float32, "fsdp2",
                             torch.device("cpu"))
    buffers = []
    allocate = _fsdp_collectives.DefaultAllGather.allocate

    def spy(self, size, *, dtype, device):
        out = allocate(self, size, dtype=dtype, device=device)
        buffers.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(_fsdp_collectives.DefaultAllGather, "allocate", spy)
    whole, states = {}, set()
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule) or name.startswith("model.layers."):
            continue
        state = m._get_fsdp_state()
        if id(state) in states:                  # tied: the embeddings and head, one unit
            continue
        states.add(id(state))
        m.unshard()
        whole[name] = sum(fp.unsharded_param.numel() * fp.unsharded_param.element_size()
                          for fp in state._fsdp_param_group.fsdp_params)
        m.reshard()
    assert sorted(whole) == (["", "lm_head", "model.embed_tokens"] if which == "untied"
                             else ["", "model.embed_tokens"])
    cfg = json.loads((folder / "config.json").read_text())
    p = memory.predict(cfg, "qlora", 3, fake_group)
    assert p["gathered_root"] == whole.pop("")
    assert p["gathered_outer"] == max(whole.values())
    assert p["gather_buffer"] == max(buffers, default=0)
    assert (p["gather_buffer"] == 0) == (fake_group == 1)
    # loading: the storage load.build leaves on rank 0 (adapters without gradients or moments)
    loading = memory.predict_loading(cfg, "qlora", 3, fake_group, runtime=7)
    assert shard.local_bytes(model) == sum(loading[k] for k in memory.LOAD_PARTS[:5])
    assert loading["transient"] == max(loading[k] for k in memory.TRANSIENTS)
    assert loading["total"] == sum(loading[k] for k in memory.LOAD_PARTS)


def test_sharded_parts_divide_and_whole_parts_stay():
    cfg = llama_config("1b")
    one, eight = (memory.predict(cfg, "qdora", 16, w, batch_tokens=8192) for w in (1, 8))
    for part in ("base_sharded", "unquantized", "adapters", "activations", "loss_gradients"):
        assert one[part] / 8 <= eight[part] < one[part] / 8 * 1.01, part
    for part in ("base_whole", "rope", "gathered_layer", "prefetched_layer", "gathered_root",
                 "gathered_outer"):
        assert eight[part] == one[part], part
    n = synthetic.count(cfg)
    assert one["gathered_root"] == 4 * n["norms"]                           # float32
    assert one["gathered_outer"] == 4 * 32000 * 2048                        # the head or the
    # embeddings, one at a time; FSDP2's flat all-gather output: none at W = 1; at W = 8 the
    # 8 padded shards of the larger unit
    assert one["gather_buffer"] == 0
    assert eight["gather_buffer"] == 4 * 8 * math.ceil(32000 / 8) * 2048
    # the largest layer: gate/up/down 5632 x 2048; its dense float32 weight, NF4 bytes, adapters
    nf4_full = sum(k * s for k, s, sh in memory.nf4_tensors(5632, 2048).values() if sh)
    adapters = 16 * (5632 + 2048) + 5632
    assert one["gathered_layer"] == 5632 * 2048 * 4 + nf4_full + 2 * 4 * adapters
    assert one["prefetched_layer"] == nf4_full + 4 * adapters
    assert one["loss_gradients"] == 8192 * 2 * 32000 * 4


def test_mixed_precision_gathers_in_the_compute_dtype():
    cfg = llama_config("1b")
    f32 = memory.predict(cfg, "qlora", 8, 4)
    bf16 = memory.predict(cfg, "qlora", 8, 4, compute_dtype=torch.bfloat16)
    for part in ("base_sharded", "base_whole", "unquantized", "adapters", "loss_gradients"):
        assert bf16[part] == f32[part], part            # stored as they are, float32 losses
    for part in ("gathered_root", "gathered_outer", "gather_buffer"):
        assert 2 * bf16[part] == f32[part], part
    assert bf16["activations"] < f32["activations"]


# --- the activation estimate against autograd ----------------------------------------------------

def saved_bytes(model, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for a training step of ``model`` on rows ``x``
    [B, T] (each storage once, the model's own parameters and buffers left out), plus the
    logits when they are not float32 (the loop holds them; float32 ones are the log-softmax's
    input, kept anyway)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x).logits                                         # [B, T, V]
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    return sum(kept.values()) + (logits.nbytes if logits.dtype != torch.float32 else 0)


@pytest.mark.parametrize("method,dtype", [("qlora", torch.float32), ("qdora", torch.float32),
                                          ("dora", torch.bfloat16)])   # bf16: float32 adapters
def test_activation_bytes_per_token_are_what_autograd_keeps(method, dtype):
    """Per token exactly: the difference between 80 and 48 tokens (one row) cancels what does not
    grow with the tokens (layer-sized tensors such as s B); the estimate is per token only."""
    cfg = llama_config("tiny", num_hidden_layers=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    minidora.wrap(model, method, "all-linear", r=5, compute_dtype=dtype)
    x = torch.randint(0, cfg["vocab_size"], (1, 80))
    per_token = (saved_bytes(model, x) - saved_bytes(model, x[:, :48].clone())) / 32
    assert per_token == memory.activation_bytes(cfg, method, 5, dtype, torch.float32)
    fixed = saved_bytes(model, x) - 80 * per_token                 # layer-sized: a few percent
    assert 0 < fixed < 0.2 * 80 * per_token


# --- the loading transients against what PyTorch allocates -------------------------------------

def allocation_peaks(fn) -> dict[str, int]:
    """Run ``fn(mark)`` under PyTorch's profiler, where ``fn`` calls ``mark(name)`` as each
    phase begins (``name`` None: the phase ends): for each name, the peak of the bytes
    allocated within the phase above the level where its ``step`` began (a phase named
    ``step:X`` begins a step), the largest over the phases of that name; from every
    allocation and free in the order they happened."""
    from torch.profiler import ProfilerActivity, profile

    names = []

    def mark(name):                       # a 0-element op the profiler records, in order
        names.append(name)
        torch.empty(0).sinc_()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(mark)
    peaks, now, base, phase, k = {}, 0, 0, None, 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.name == "aten::sinc_":
            phase, k = names[k], k + 1
            if phase is not None and phase.startswith("step:"):
                phase, base = phase[5:], now
            continue
        now += e.self_cpu_memory_usage    # allocations (+) and frees (-) of e itself
        if phase is not None:
            peaks[phase] = max(peaks.get(phase, 0), now - base)
    assert k == len(names)
    return peaks


# Chunks of 256 weights (many chunks per layer: slow under the profiler) in one case; 4096 (a few
# per layer) and 2 Mi (one) in every case.
@pytest.mark.parametrize("method,world,double_quant,chunk", [
    (m, w, dq, c) for m in ("qlora", "qdora") for w, dq in ((1, True), (2, True), (1, False))
    for c in (4096, 1 << 21)] + [("qdora", 2, True, 256)])
def test_loading_transients_are_what_each_step_allocates(tiny, chunk, world, double_quant,
                                                         method):
    """Each step of load.py's filling of every layer of the tiny Llama (rank 0's bytes of
    ``world``), one chunk size at a time: the peak of what it allocates against its term of
    loading_transients, to the byte or a few percent above (whole rows read, an index's
    rounding) and never below. Chunks of 4 blocks (double quantization's step is the largest),
    of a few rows, and the default (a whole layer)."""
    from minidora.apps.train import load

    ckpt = load.Checkpoint(tiny)
    cfg = ckpt.config()
    want = memory.loading_transients(cfg, method, 5, world, double_quant, chunk=chunk)

    def fill(mark):
        for name, shape in synthetic.tensor_shapes(cfg).items():
            if not synthetic.is_quantized(name):
                continue
            n = shape[0] * shape[1]
            hi = math.ceil(math.ceil(n / 2) / world)         # rank 0's bytes of the codes
            out = torch.empty(hi, dtype=torch.uint8)         # the shard: held, not transient
            lora_a = torch.empty(5, shape[1], dtype=torch.float32)
            mark("step:quantize")
            q = load.nf4_shard(ckpt, name, shape, 0, hi, double_quant=double_quant,
                               sharded=False, chunk=chunk, out=out)
            if method == "qdora":
                mark("row_norms")
                load._row_norms_sq(q, shape, 64, torch.float32, torch.float32, chunk)
            mark("adapter_init")
            load._copy_rows(lora_a, lambda a, b, k=name, s=tuple(lora_a.shape):
                            load.adapter_init(k, s, 0)[a:b], chunk)
            mark(None)
            del q
        embed = torch.empty(cfg["vocab_size"], cfg["hidden_size"])
        mark("step:copy_rows")
        load._copy_rows(embed, lambda a, b: ckpt.rows("model.embed_tokens.weight", a, b),
                        chunk)
        mark(None)

    got = allocation_peaks(fill)
    quantize = max(want["quantize_chunk"], want["double_quantize"])
    pairs = [(got["quantize"], quantize), (got["adapter_init"], want["adapter_init"])]
    if world == 1:                                # the whole embeddings: rank 0's at W = 1
        pairs.append((got["copy_rows"], want["copy_rows"]))
    if method == "qdora":
        pairs.append((got["row_norms"], want["row_norms"]))
    else:
        assert want["row_norms"] == 0
    for measured, predicted in pairs:
        assert measured <= predicted <= 1.05 * measured, (measured, predicted, got, want)


# --- the 7B / 70B arithmetic of docs/distributed.md ----------------------------------------------

def test_extrapolate_reproduces_the_docs_table():
    rows = re.findall(r"^\| (7|70) B \| (NF4(?: \+ DQ)?) \|((?: [\d.]+ GiB \|){4})$",
                      DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) == 4, "docs/distributed.md: the 7B / 70B table is not where it was"
    for billions, fmt, cells in rows:
        want = [float(c) for c in re.findall(r"([\d.]+) GiB", cells)]
        got = [round(memory.extrapolate(int(billions) * 1e9, w, fmt.endswith("DQ")) / 2**30, 2)
               for w in (1, 2, 4, 8)]
        assert got == want, (billions, fmt)


def test_extrapolate_agrees_with_predict_on_whole_blocks():
    """4096 x 4096 layers hold whole blocks of 64 and of 256 scales: the per-bit arithmetic and
    the per-layer count differ by the 4-byte offsets only."""
    cfg = llama_config("tiny", hidden_size=4096, intermediate_size=4096, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=1)
    for world in (1, 2, 8):                  # every tensor divides: no rank gets a padded share
        for dq in (True, False):
            p = memory.predict(cfg, "qlora", 8, world, double_quant=dq)
            layers = len(synthetic.count(cfg)["shapes"])
            exact = p["base_sharded"] + p["base_whole"] - (4 * layers if dq else 0)
            assert exact == memory.extrapolate(7 * 4096 * 4096, world, dq)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="adalora"), ValueError, r"method must be one of \('qlora', 'qdora', 'lora', "
                                         r"'dora'\), got 'adalora'"),
    (dict(r=0), ValueError, r"r must be an integer >= 1, got 0"),
    (dict(world=0), ValueError, r"world must be an integer >= 1, got 0"),
    (dict(world=2.0), ValueError, r"world must be an integer >= 1, got 2.0"),
    (dict(batch_tokens=-1), ValueError, r"batch_tokens must be an integer >= 0, got -1"),
    (dict(runtime=-5), ValueError, r"runtime must be an integer >= 0, got -5"),
    (dict(double_quant=1), TypeError, r"double_quant must be a bool, got 1"),
    (dict(blocksize=48), ValueError, r"blocksize must be a power of two in 32..4096, got 48"),
    (dict(dtype=torch.int8), TypeError, r"dtype must be float32, bfloat16, float16 or float64, "
                                        r"got torch.int8"),
    (dict(compute_dtype="bf16"), TypeError, r"compute_dtype must be float32, bfloat16, float16 "
                                            r"or float64, got 'bf16'"),
])
def test_predict_refuses_bad_arguments(kwargs, error, match):
    args = {"config": llama_config("tiny"), "method": "qlora", "r": 8, "world": 2, **kwargs}
    with pytest.raises(error, match=match):
        memory.predict(**args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="lokr"), ValueError, r"method must be one of \('qlora', 'qdora', 'lora', "
                                      r"'dora'\), got 'lokr'"),
    (dict(world=-1), ValueError, r"world must be an integer >= 1, got -1"),
    (dict(chunk=0), ValueError, r"chunk must be an integer >= 1, got 0"),
    (dict(chunk=2.5), ValueError, r"chunk must be an integer >= 1, got 2.5"),
    (dict(runtime=-1), ValueError, r"runtime must be an integer >= 0, got -1"),
    (dict(checkpoint_dtype=torch.uint8), TypeError, r"checkpoint_dtype must be float32, "
                                                    r"bfloat16, float16 or float64, got "
                                                    r"torch.uint8"),
])
def test_predict_loading_refuses_bad_arguments(kwargs, error, match):
    args = {"config": llama_config("tiny"), "method": "qdora", "r": 8, "world": 2, **kwargs}
    with pytest.raises(error, match=match):
        memory.predict_loading(**args)


def test_extrapolate_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"params_quantized must be a finite number > 0, got nan"):
        memory.extrapolate(float("nan"), 8)
    with pytest.raises(ValueError, match=r"world must be an integer >= 1, got 0"):
        memory.extrapolate(7e9, 0)


def test_format_table_sets_measured_beside_predicted():
    p = {"base_sharded": 3 * 2**20, "total": 5 * 2**20}
    text = memory.format_table(memory.compare({"total": 6 * 2**20, "peak": 2**19}, p))
    assert text.splitlines()[2:] == ["| base_sharded |  | 3.00 |  |",
                                     "| total | 6.00 | 5.00 | 1.200 |",
                                     "| peak | 0.50 |  |  |"]
