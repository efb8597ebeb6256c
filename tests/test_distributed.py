"""minidora.apps.train and ``minidora train``: several processes against one, on gloo.

Process groups are real: ``torch.distributed.run`` (torchrun) or processes started here with
torchrun's variables, on loopback, on ports picked free, each run under a timeout. A few groups
check many things each: one torchrun group runs the whole matrix {FSDP2, DDP} x {QLoRA, QDoRA} x
{sizes that divide by the world size, sizes that do not} in float64 and its checkpoints; the
1-process reference is a plain training loop written again here, on the whole global batch.

A second torchrun group trains a real (small, odd-sized) Hugging Face Llama loaded shard by
shard: its NF4 bytes against a one-process ``nf4.quantize``, what each rank read, losses and
gradients against one process in float32, offload, and its checkpoints at another world size.

This file is also the workers' script: ``python tests/test_distributed.py matrix|runs|real|oom
OUT`` (run by torchrun or by the tests below).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidora
from helpers import forced_isa, time_limit
from minidora.apps.demo.model import GPTConfig
from minidora.apps.train import TrainConfig, builtin, join, leave, nf4_digest, train, unwrap

HERE = Path(__file__).resolve()
GROUP_TIMEOUT = 150          # seconds a launched group may take, start to end, before it fails
# "even": every sharded size divides by 2 (width 32: NF4 codes 512 bytes, 16 scale codes; r = 4;
# 4 rows). "uneven": width 20, so a 20 x 20 weight has 400 values, 6.25 blocks of 64 (a partial
# block): 7 scale codes shard 4 + 3; r = 3 shards lora_A 2 + 1; 5 rows split 2 + 3.
SIZES = {"even": (32, 4, 4), "uneven": (20, 3, 5)}
CASES = [(s, m, z) for s in ("fsdp2", "ddp") for m in ("qlora", "qdora") for z in SIZES]
STEPS = 3


def case_cfg(strategy: str, method: str, size: str, **kw) -> TrainConfig:
    width, r, rows = SIZES[size]
    gpt = GPTConfig(vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=width)
    return TrainConfig(method=method, strategy=strategy, rank=r, batch_size=rows, steps=STEPS,
                       lr=2e-2, seed=11, dtype="float64", gpt=gpt, **kw)


def probe(task) -> torch.Tensor:
    """Fixed input rows for logits: [3, T] (held to the data, not to the run)."""
    return task.data.batch(torch.tensor([5, 1, 8]))[0]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def adapters_of(model, grad: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors (or their gradients), full even when sharded (a collective)."""
    return {n: full(p.grad if grad else p) for n, p in unwrap(model).named_parameters()
            if p.requires_grad}


# --- the workers (run by torchrun or by the tests) ---------------------------------------------

def _worker_matrix(out: Path) -> None:
    """Every case of the matrix, mixed precision, checkpoints and resume, on every rank."""
    torch.set_num_threads(1)
    g = join(timeout=60)
    rec, tensors = {"rank": g.rank, "world": g.world_size}, {}
    quiet = lambda *a, **k: None
    try:
        for case in CASES:
            key = "-".join(case)
            cfg, grads = case_cfg(*case), []
            task = builtin(cfg)
            res = train(cfg, g, out=out / key, task=task, log=quiet,
                        on_step=lambda step, m, loss, gs=grads: gs.append(adapters_of(m, True)))
            with torch.no_grad():
                logits = res["module"](probe(task))                     # [3, T, V], every rank
            rec[key] = {"losses": res["losses"], "nf4": res["nf4_sha256"],
                        "local_scale_codes": unwrap(res["module"]).blocks[0].attn.q_proj.base
                        .absmax.to_local().numel() if case[0] == "fsdp2" else None}
            for step, gs in enumerate(grads):
                tensors.update({f"{key}/grad{step}/{n}": v for n, v in gs.items()})
            tensors.update({f"{key}/final/{n}": v for n, v in adapters_of(res["module"]).items()})
            tensors[f"{key}/logits"] = logits.detach().clone()
        # bf16 mixed precision: what the NF4 layer holds while it runs, and its bytes after.
        cfg = replace(case_cfg("fsdp2", "qdora", "uneven"), dtype="float32",
                      mixed_precision="bf16", steps=2)
        task, seen = builtin(cfg), {}
        layer = task.model.blocks[0].attn.q_proj
        before = nf4_digest(task.model)
        run_base = layer.base.linear

        def spy(x, bias=True):
            seen.update({k: str(getattr(layer.base, k).dtype) for k in
                         ("packed", "absmax", "nested_absmax", "offset")})
            seen.update(lora_A=str(layer.lora_A.dtype), x=str(x.dtype))
            return run_base(x, bias)

        layer.base.linear = spy
        res = train(cfg, g, task=task, log=quiet)
        rec["bf16"] = {"during": seen, "before": before, "after": res["nf4_sha256"],
                       "losses": res["losses"],
                       "after_dtypes": {k: str(getattr(layer.base, k).dtype)
                                        for k in ("packed", "absmax", "nested_absmax", "offset")}}
        # Resume: 5 steps with a resume point after 3, then a new run from it (FSDP2 and DDP).
        for strategy, method, size in (("fsdp2", "qdora", "uneven"), ("ddp", "qlora", "even")):
            key = f"resume-{strategy}"
            cfg = replace(case_cfg(strategy, method, size), steps=5)
            first = train(cfg, g, out=out / key, save_every=3, log=quiet)["losses"]
            again = train(cfg, g, out=out / key, resume=True, log=quiet)
            rec[key] = {"first": first, "resumed": again["losses"], "start": again["start"]}
    finally:
        leave(True)
    (out / f"rank{g.rank}.json").write_text(json.dumps(rec))
    if g.rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))


# A small Llama with sizes that straddle everything: hidden 48, 4 heads of 12, 2 key/value heads
# (k_proj 24 x 48), MLP 100 (gate_proj 100 x 48 = 75 blocks of 64: at 2 ranks each holds 37.5
# blocks of codes, so both quantize the block between them, and its 75 scale codes shard 38 + 37),
# vocabulary 301 (fed UTF-8 bytes: no tokenizer), bfloat16 on disk, in several safetensors files
# with an index.
LLAMA = dict(hidden_size=48, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=301, max_position_embeddings=128,
             tie_word_embeddings=False)
REAL_CASES = [("fsdp2", "qlora", False), ("fsdp2", "qdora", False), ("ddp", "qdora", False),
              ("fsdp2", "qdora", True)]


def write_llama(folder: Path, seed: int = 5) -> Path:
    """A random small Llama (:data:`LLAMA`) saved the way ``save_pretrained`` shards it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():                   # norms away from 1, weights of all sizes
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def real_cfg(folder: Path, strategy: str, method: str, offload: bool = False, **kw):
    return TrainConfig(model=str(folder), method=method, strategy=strategy, rank=3, alpha=6.0,
                       batch_size=5, steps=STEPS, lr=2e-2, seed=3, offload=offload, **kw)


def _worker_real(out: Path) -> None:
    """The real-model cases on every rank: losses, full gradients per step, final adapters,
    logits on fixed rows, the NF4 tensors gathered, and what this rank read."""
    torch.set_num_threads(1)
    folder = out / "llama"
    g = join(timeout=60)
    rec, tensors = {"rank": g.rank}, {}
    quiet = lambda *a, **k: None
    try:
        for strategy, method, offload in REAL_CASES:
            key = f"{strategy}-{method}" + ("-offload" if offload else "")
            grads = []
            res = train(real_cfg(folder, strategy, method, offload), g, out=out / key, log=quiet,
                        on_step=lambda step, m, loss, gs=grads: gs.append(adapters_of(m, True)))
            module = res["module"]
            with torch.no_grad():
                logits = module(input_ids=torch.arange(40, 76).view(3, 12)).logits
            rec[key] = {"losses": res["losses"], "nf4": res["nf4_sha256"], "reads": res["reads"],
                        "local_bytes": res["local_bytes"]}
            for step, gs in enumerate(grads):
                tensors.update({f"{key}/grad{step}/{n}": v for n, v in gs.items()})
            tensors.update({f"{key}/final/{n}": v for n, v in adapters_of(module).items()})
            tensors[f"{key}/logits"] = logits.detach().clone()
            if key == "fsdp2-qdora":
                for name, m in unwrap(module).named_modules():
                    if isinstance(m, minidora.NF4Linear):
                        for k in ("packed", "absmax", "nested_absmax", "offset"):
                            tensors[f"nf4/{name}.{k}"] = full(getattr(m, k))
        cfg = replace(real_cfg(folder, "fsdp2", "qdora"), steps=5)
        rec["resume"] = train(cfg, g, out=out / "resume", save_every=3, log=quiet)["losses"]
    finally:
        leave(True)
    (out / f"real{g.rank}.json").write_text(json.dumps(rec))
    if g.rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "real.safetensors"))


def _worker_oom(out: Path) -> None:
    """``minidora train`` on the wide Llama in OUT/wide; rank 1's address space is capped at 64
    MiB above what it holds once its model is built, so quantizing its half of a 262144 x 64
    projection (about 150 MiB of temporaries) runs out of memory."""
    import resource

    import minidora.apps.train.load as load
    from minidora.__main__ import main

    rank = int(os.environ["RANK"])
    if rank == 1:
        fill = load._fill_adapter

        def capped(*args):
            vm = [ln for ln in open("/proc/self/status") if ln.startswith("VmSize:")][0]
            cap = int(vm.split()[1]) * 1024 + 64 * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
            return fill(*args)

        load._fill_adapter = capped
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", "--model", str(out / "wide"), "--method", "qlora", "--steps", "1",
                   "--batch-size", "2", "--timeout", "300", "--out", str(out / "o")])
    (out / f"oom-{rank}.json").write_text(json.dumps(
        {"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0}))


def _failing_builder(build, rank: int):
    """``build`` with rank 1's third forward (step 2) raising."""
    def failing(cfg):
        task, calls = build(cfg), [0]
        logits = task.logits

        def run(m, x):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                raise RuntimeError("injected failure in step 2")
            return logits(m, x)

        task.logits = run
        return task

    return failing


def _worker_runs(out: Path) -> None:
    """Runs of ``minidora train`` in a row on every rank, as OUT/runs.json lists them
    ([argv, port, fault]); each one's exit status, stderr and seconds go to OUT/runs-RANK.json.
    A run that meets the group gets its own port (None: one nobody else uses, a lone rank);
    ``fault`` makes rank 1 raise in step 2."""
    import minidora.apps.train.loop as loop
    from minidora.__main__ import main

    rank, build = int(os.environ["RANK"]), loop.MODELS["builtin"]
    results = []
    for argv, port, fault in json.loads((out / "runs.json").read_text()):
        os.environ["MASTER_PORT"] = str(port if port is not None else free_port())
        loop.MODELS["builtin"] = _failing_builder(build, rank) if fault else build
        err, t0 = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        results.append({"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0})
    (out / f"runs-{rank}.json").write_text(json.dumps(results))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and steady on a busy machine (values are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- launching -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launch(mode: str, out: Path, world: int = 2, timeout: float = GROUP_TIMEOUT):
    """``world`` processes of this script with torchrun's variables (no agent): [(exit status,
    stderr, seconds from the start to its exit)] by rank."""
    port, procs, t0 = free_port(), [], time.perf_counter()
    timeout = time_limit(timeout)
    for rank in range(world):
        env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HERE), mode, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            results.append((p.returncode, err, time.perf_counter() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """One torchrun group of 2 runs every case (``_worker_matrix``); its records and tensors."""
    out = tmp_path_factory.mktemp("matrix")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE), "matrix", str(out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                       timeout=time_limit(GROUP_TIMEOUT))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SIGABRT" not in p.stderr and "destroy_process_group() was not called" not in p.stderr
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, recs, load_file(str(out / "tensors.safetensors"))


_REFERENCES = {}


def reference(case):
    """The 1-process run, written again as a plain loop: the mean loss over the whole global
    batch (GPT.loss), no process group, no wrapper. Losses, gradients per step, final adapters,
    NF4 digest."""
    if case in _REFERENCES:
        return _REFERENCES[case]
    cfg = case_cfg(*case)
    task = builtin(cfg)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses, grads = [], []
    for _ in range(cfg.steps):
        rows = torch.randint(len(task.data.lines), (cfg.batch_size,), generator=gen)
        loss = model.loss(*task.data.batch(rows))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ref = {"losses": losses, "grads": grads, "final": adapters_of(model),
           "nf4": nf4_digest(model)}
    _REFERENCES[case] = ref
    return ref


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """|a - b| <= 1e-12 (|b| + max |b|): float64 rounding of a different summation order."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, what
    tol = 1e-12 * (b.abs() + b.abs().max())
    assert ((a - b).abs() <= tol).all(), f"{what}: max |a-b| = {(a - b).abs().max():.3e}"


# --- the matrix: 2 processes equal 1 --------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_processes_equal_one(matrix, case):
    """Losses, adapter gradients at every step and adapters after the steps, to 1e-12 in
    float64; the frozen NF4 bytes are the same on both ranks and the reference's."""
    _, recs, tensors = matrix
    key, ref = "-".join(case), reference(case)
    assert recs[0][key]["losses"] == recs[1][key]["losses"]
    assert_close(recs[0][key]["losses"], ref["losses"], f"{key} losses")
    names = sorted(ref["final"])
    assert len(names) == 6 * (3 if case[1] == "qdora" else 2)
    for step in range(STEPS):
        for n in names:
            assert_close(tensors[f"{key}/grad{step}/{n}"], ref["grads"][step][n],
                         f"{key} step {step} grad {n}")
    for n in names:
        assert_close(tensors[f"{key}/final/{n}"], ref["final"][n], f"{key} final {n}")
        assert not torch.equal(ref["final"][n], reference(case)["grads"][0][n])
    assert recs[0][key]["nf4"] == recs[1][key]["nf4"] == ref["nf4"]
    if case[0] == "fsdp2":          # the scale codes really are sharded: 8 + 8, or 4 + 3
        split = [r[key]["local_scale_codes"] for r in recs]
        assert split == ([8, 8] if case[2] == "even" else [4, 3])


def test_checkpoint_of_two_processes_loads_in_one(matrix):
    """The adapter folder rank 0 wrote from the shards loads into a fresh 1-process model and
    gives the logits the 2 processes computed; the PEFT folder holds the same tensors."""
    out, _, tensors = matrix
    for case in CASES:
        key = "-".join(case)
        task = builtin(case_cfg(*case))
        minidora.load_adapters(task.model, out / key / "adapters")
        with torch.no_grad():
            logits = task.model(probe(task))
        assert_close(logits, tensors[f"{key}/logits"], f"{key} logits")
        mine = load_file(str(out / key / "adapters" / "minidora_adapters.safetensors"))
        peft = load_file(str(out / key / "adapters" / "peft" / "adapter_model.safetensors"))
        for n, t in mine.items():
            layer, _, kind = n.rpartition(".")
            pk = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                  "magnitude": "lora_magnitude_vector"}[kind]
            assert torch.equal(peft[f"base_model.model.{layer}.{pk}"], t)
            assert_close(t, tensors[f"{key}/final/{n}"], f"{key} file {n}")


def test_bf16_mixed_precision_keeps_the_nf4_state(matrix):
    """MixedPrecisionPolicy(param_dtype=bfloat16) runs the adapters in bf16 (the policy is on)
    while the NF4 codes stay uint8 and the scales float32, and leaves every NF4 byte as it was."""
    _, recs, _ = matrix
    for rec in recs:
        bf = rec["bf16"]
        assert bf["during"] == {"packed": "torch.uint8", "absmax": "torch.uint8",
                                "nested_absmax": "torch.float32", "offset": "torch.float32",
                                "lora_A": "torch.bfloat16", "x": "torch.bfloat16"}
        assert bf["after_dtypes"] == {k: v for k, v in bf["during"].items() if k in
                                      ("packed", "absmax", "nested_absmax", "offset")}
        assert bf["before"] == bf["after"] == recs[0]["bf16"]["after"]
        assert all(torch.isfinite(torch.tensor(bf["losses"])))


def test_resume_continues_the_loss_curve(matrix):
    """A run resumed from its step-3 resume point (adapters + AdamW state, DCP) repeats steps 3
    and 4 exactly, under FSDP2 and DDP at world size 2, and at world size 1 (resharded)."""
    out, recs, _ = matrix
    for key in ("resume-fsdp2", "resume-ddp"):
        rec = recs[0][key]
        assert rec["start"] == 3 and len(rec["first"]) == 5
        assert rec["resumed"] == rec["first"][3:]
        assert rec["first"][3] != rec["first"][2]
    cfg = replace(case_cfg("fsdp2", "qdora", "uneven"), steps=5)
    g = join(timeout=30)
    try:
        again = train(cfg, g, out=out / "resume-fsdp2", resume=True, log=lambda *a: None)
    finally:
        leave(True)
    assert again["start"] == 3
    assert_close(again["losses"], recs[0]["resume-fsdp2"]["first"][3:], "resumed at 1 process")


# --- failures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs_of_two(tmp_path_factory):
    """Two processes started with torchrun's variables (no agent, so nothing but minidora stops
    a rank) run ``minidora train`` with every bad input in a row, then a run where rank 1 raises.
    Returns [(argv, expected message)], the records by rank, and the processes' exits."""
    from minidora.__main__ import main

    tmp = tmp_path_factory.mktemp("runs")
    quick = ["train", "--quick", "--steps", "1"]
    for method in ("qlora", "qdora"):                       # folders and a resume point, r = 8
        assert main([*quick, "--method", method, "--out", str(tmp / method)]) == 0
    assert main([*quick, "--save-every", "1", "--steps", "2", "--out", str(tmp / "res")]) == 0
    out = str(tmp / "o")
    bad = [([*quick, "--batch-size", "1", "--out", out],
            "--batch-size: got 1 rows for a world size of 2; expected at least one row per rank"),
           ([*quick, "--init-adapters", str(tmp / "qlora" / "adapters"), "--out", out],
            "adapter file holds method 'qlora' but the model is wrapped with 'qdora'"),
           ([*quick, "--rank", "4", "--init-adapters", str(tmp / "qdora" / "adapters"),
             "--out", out], "the file has r=8, the model has r=4"),
           ([*quick, "--steps", "3", "--rank", "4", "--resume", "--out", str(tmp / "res")],
            "--resume: the resume point in"),
           ([*quick, "--steps", "3", "--method", "qlora", "--resume", "--out", str(tmp / "res")],
            "has method='qdora', this run method='qlora'"),
           ([*quick, "--timeout", "2", "--out", out], "did not meet the other processes")]
    runs = [[argv + ([] if "--timeout" in argv else ["--timeout", "60"]), free_port(), False]
            for argv, _ in bad]
    runs[-1][1] = None                       # the rendezvous: each rank its own unused port
    runs.append([["train", "--quick", "--out", str(tmp / "fault"), "--timeout", "60"],
                 free_port(), True])
    (tmp / "runs.json").write_text(json.dumps(runs))
    exits = launch("runs", tmp)
    assert [e[0] for e in exits] == [0, 0], exits
    return bad, [json.loads((tmp / f"runs-{r}.json").read_text()) for r in range(2)], exits


def test_a_failing_rank_stops_the_others(runs_of_two):
    """Rank 1 raises in step 2: it names itself and its error; rank 0 stops at its next
    collective and names rank 1 and the error; both end with status 1, long before the 60 s
    collective timeout, and leave the group (the next runs and the exits are clean)."""
    _, recs, exits = runs_of_two
    e0, e1 = recs[0][-1], recs[1][-1]
    assert (e0["rc"], e1["rc"]) == (1, 1), (e0, e1)
    assert e1["stderr"] == ("minidora train: rank 1 of 2: error: RuntimeError: injected failure "
                            "in step 2\n")
    assert e0["stderr"].startswith("minidora train: rank 0 of 2: error: stopped because rank 1 "
                                   "failed: RuntimeError: injected failure in step 2 ("), e0
    assert max(e0["seconds"], e1["seconds"]) < 30
    assert all(rc == 0 for rc, _, _ in exits)        # no SIGABRT (-6) at exit


def test_bad_input_errors_on_every_rank(runs_of_two):
    """World size vs batch, an adapter folder of another method or adapter rank, a resume point
    of another rank or method, a rendezvous nobody joins: the same clear error on both ranks."""
    bad, recs, _ = runs_of_two
    for rank, got in enumerate(recs):
        for (argv, want), rec in zip(bad, got, strict=False):
            assert rec["rc"] == 1, (argv, rec)
            assert rec["stderr"].startswith(f"minidora train: rank {rank} of 2: error: "), rec
            assert want in rec["stderr"], (want, rec["stderr"])
            assert len(rec["stderr"].strip().splitlines()) == 1, rec["stderr"]
        assert "rank=8, this run rank=4" in got[3]["stderr"]
        assert got[len(bad) - 1]["seconds"] < 30


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt-5"], "--model: got 'gpt-5' (no such model or folder); expected builtin, "
                           "smollm2-135m or a Hugging Face checkpoint folder"),
    (["--steps", "0"], "--steps: got 0; expected an integer in 1..100000"),
    (["--rank", "33"], "--rank: got 33; expected an integer in 1..32"),
    (["--alpha", "nan"], "--alpha: got nan; expected a finite number > 0"),
    (["--lr", "2"], "--lr: got 2.0; expected a finite number > 0 and <= 1"),
    (["--timeout", "0.5"], "--timeout: got 0.5; expected 1..86400 seconds"),
    (["--threads", "0"], "--threads: got 0; expected an integer in 1..256"),
    (["--save-every", "-1"], "--save-every: got -1; expected an integer in 0..100000"),
    (["--strategy", "ddp", "--mixed-precision", "bf16"], "--mixed-precision bf16 is FSDP2's"),
    (["--base", "/nonexistent/gpt.safetensors"], "--base: '/nonexistent/gpt.safetensors' does"),
    (["--mixed-precision", "bf16", "--dtype", "float64"], "bf16 needs --dtype float32"),
    (["--out", str(HERE)], f"--out: {str(HERE)!r} exists and is not a folder"),
    (["--strategy", "ddp", "--offload"], "--offload is FSDP2's CPUOffloadPolicy; use --strategy"),
    (["--model", str(minidora.testing.golden.path("peft", "llama_base")), "--base", str(HERE)],
     "--base: the built-in model's weights; a real model's come from --model itself"),
    (["--model", str(minidora.testing.golden.path("peft", "llama_base")), "--rank", "33"],
     "--rank: got 33; expected an integer in 1..32"),      # k_proj, v_proj: 2 heads of 16 rows
    (["--write-synthetic", str(HERE)], "minidora train: error: --write-synthetic: folder must be "
                                       "a folder, got the file"),
])
def test_cli_rejects_bad_options(argv, message, capsys, tmp_path):
    from minidora.__main__ import main

    assert main(["train", "--quick", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    head = "minidora train: " + ("" if "--write-synthetic" in argv else "rank 0 of 1: ")
    assert err.startswith(head + "error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_cli_init_adapters_resume_and_write_errors(capsys, tmp_path):
    """One process: a run that starts from another run's adapters starts trained; no resume
    point, a resume point with nothing left to do, an adapter folder rank 0 cannot write: each a
    one-line error, and the process group is gone afterwards."""
    import torch.distributed as dist

    from minidora.__main__ import main

    quick = ["train", "--quick", "--steps", "2"]
    assert main([*quick, "--resume", "--out", str(tmp_path / "none")]) == 1
    assert "--resume: no resume point in" in capsys.readouterr().err
    assert main([*quick, "--save-every", "2", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "resume" / "step-000002").is_dir()
    fresh = capsys.readouterr().out.splitlines()[1]                  # train: step 1/2 loss ...
    assert main([*quick, "--init-adapters", str(tmp_path / "r" / "adapters"), "--out",
                 str(tmp_path / "i")]) == 0
    started = capsys.readouterr().out.splitlines()[1]
    assert fresh.startswith("train: step 1/2 loss") and started.startswith("train: step 1/2")
    assert float(started.split()[-1]) < float(fresh.split()[-1])     # it starts trained
    assert main([*quick, "--resume", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "the resume point is at step 2; --steps 2 leaves nothing to do" in err, err
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "adapters").write_text("in the way")
    assert main([*quick, "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: rank 0 could not write the checkpoint: ValueError: path" in err
    assert len(err.strip().splitlines()) == 1 and not dist.is_initialized()


def test_a_batch_without_targets_is_refused():
    """A task whose rows have no target token would divide by zero: a ValueError instead."""
    cfg = case_cfg("ddp", "qlora", "uneven")
    task = builtin(cfg)
    task.data.y.fill_(-100)
    g = join(timeout=30)
    try:
        with pytest.raises(ValueError, match="step 0: the global batch has no target token"):
            train(cfg, g, task=task, log=lambda *a: None)
    finally:
        leave(False)


@pytest.mark.parametrize("error", [RuntimeError("disk on fire\nsecond line"), KeyboardInterrupt()])
def test_cli_unexpected_error_and_interrupt(error, capsys, monkeypatch, tmp_path):
    """Inside the run: one line and status 1, or ``interrupted`` and 130; the group is left."""
    import torch.distributed as dist

    import minidora.apps.train.loop as loop
    from minidora.__main__ import main

    def run(*args, **kwargs):
        assert dist.is_initialized()
        raise error

    monkeypatch.setattr(loop, "train", run)
    monkeypatch.delenv("MINIDORA_DEBUG", raising=False)
    rc = main(["train", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    if isinstance(error, KeyboardInterrupt):
        assert (rc, err) == (130, "minidora train: interrupted\n")
    else:
        assert (rc, err) == (1, "minidora train: rank 0 of 1: error: RuntimeError: disk on fire\n")
    assert not dist.is_initialized()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_train_subprocess(tmp_path):
    """A real run interrupted after its first line: status 130, one line, no traceback."""
    import signal

    env = _env(PYTHONUNBUFFERED="1")
    env.pop("MINIDORA_DEBUG", None)
    p = subprocess.Popen([sys.executable, "-m", "minidora", "train", "--quick", "--steps", "100000",
                          "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.readline()
        assert first.startswith("train: builtin qdora"), p.communicate(timeout=time_limit(60))[1]
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=time_limit(60))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.splitlines()[-1] == "minidora train: interrupted"


def test_parallelize_and_join_refuse_bad_arguments(monkeypatch):
    from minidora.apps.demo.model import GPT
    from minidora.apps.train import DistributedError, parallelize

    model = builtin(case_cfg("ddp", "qlora", "even")).model
    with pytest.raises(ValueError, match=r"strategy must be one of \('fsdp2', 'ddp'\), got 'z"):
        parallelize(model, "zero3")
    with pytest.raises(ValueError, match="mixed_precision must be 'none' or 'bf16', got 'fp8'"):
        parallelize(model, "fsdp2", "fp8")
    with pytest.raises(ValueError, match="mixed_precision 'bf16' is FSDP2's MixedPrecisionPolicy"):
        parallelize(model, "ddp", "bf16")
    with pytest.raises(ValueError, match="model has no minidora adapter layers"):
        parallelize(GPT(GPTConfig(vocab_size=41, n_embd=32, n_head=2)), "fsdp2")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        join(device="tpu")
    for env, message in (({"WORLD_SIZE": "two"}, r"\$WORLD_SIZE='two'; expected an integer >= 1"),
                         ({"RANK": "2"}, r"\$RANK=2; expected 0..1 \(\$WORLD_SIZE=2\)")):
        for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "1", **env}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(DistributedError, match=message):
            join(timeout=1)


def test_cli_names_a_missing_rendezvous_variable(capsys, monkeypatch, tmp_path):
    from minidora.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing rendezvous: $RANK, $WORLD_SIZE set but $MASTER_ADDR, $MASTER_PORT not" in err


def test_a_resume_point_is_on_disk_before_the_older_one_goes(tmp_path, monkeypatch):
    """save_resume: every file and folder of the new step is flushed to disk, then the JSON that
    names it is replaced (and flushed), and only then is the older step removed, so a crash at
    any moment leaves a whole, loadable resume point."""
    import shutil

    from minidora.apps.train import save_resume
    from minidora.apps.train.state import RESUME_FILE

    task = builtin(case_cfg("ddp", "qdora", "uneven"))
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad])
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def spy_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    def spy_rmtree(path, *args, **kwargs):
        events.append(("rmtree", Path(path).name))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(shutil, "rmtree", spy_rmtree)
    join(timeout=30)
    try:
        save_resume(task.model, opt, tmp_path, 1, {})
        events.clear()
        save_resume(task.model, opt, tmp_path, 2, {})
    finally:
        leave(True)
    new = tmp_path / "step-000002"
    assert not (tmp_path / "step-000001").exists()
    published = events.index(("replace", RESUME_FILE))
    removed = events.index(("rmtree", "step-000001"))
    assert published < removed

    def flushed(path, before):
        st = path.stat()
        return ("fsync", (st.st_dev, st.st_ino)) in events[:before]

    parts = [new, *new.rglob("*")]
    assert len(parts) >= 3                              # the folder, .metadata, a .distcp
    missing = [str(p.relative_to(tmp_path)) for p in parts if not flushed(p, published)]
    assert not missing, f"not on disk before the resume JSON named them: {missing}"
    assert flushed(tmp_path, published)                 # the entry of step-000002
    assert flushed(tmp_path / RESUME_FILE, published)   # the JSON's bytes, before its rename
    folder = tmp_path.stat()
    assert ("fsync", (folder.st_dev, folder.st_ino)) in events[published + 1:removed]


# --- the compute dtype in the first line; times in the step lines --------------------------------



@pytest.mark.parametrize("isa, argv, why", [
    ("avx2", [], "float32 (--dtype; bfloat16 only with --mixed-precision bf16)"),
    ("avx2", ["--mixed-precision", "bf16"], "bfloat16 (--mixed-precision bf16; this CPU has no "
     "native bfloat16 arithmetic (CPU kernels avx2), so bfloat16 is emulated, several times "
     "slower than float32)"),
    ("avx512bf16", ["--mixed-precision", "bf16"], "bfloat16 (--mixed-precision bf16)"),
])
def test_cli_first_line_says_the_compute_dtype(isa, argv, why, capsys, tmp_path):
    from minidora.__main__ import main

    with forced_isa(isa):
        assert main(["train", "--quick", "--steps", "2", *argv, "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train: builtin qdora") and first.endswith(f", compute dtype {why}")


def test_step_lines_say_elapsed_and_left_once_the_run_is_not_short(capsys, tmp_path,
                                                                   monkeypatch):
    """Runs of a few seconds print the loss alone; past progress.QUIET_S (set to none here) each
    step line adds the time so far and an estimate of the rest."""
    import re

    from minidora.__main__ import main
    from minidora.apps.demo import progress

    assert main(["train", "--quick", "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    short = capsys.readouterr().out.splitlines()[1:3]
    assert [re.fullmatch(r"train: step (\d)/2 loss \d\.\d{4}", ln)[1] for ln in short] == ["1", "2"]
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    assert main(["train", "--quick", "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    timed = capsys.readouterr().out.splitlines()[1:3]
    assert re.fullmatch(r"train: step 1/2 loss \d\.\d{4} \(\d+ s elapsed, about \d+ s left\)",
                        timed[0]), timed
    assert re.fullmatch(r"train: step 2/2 loss \d\.\d{4} \(\d+ s elapsed, done\)", timed[1]), timed



# --- a real model, loaded shard by shard -------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One torchrun group of 2 trains the small Llama in every :data:`REAL_CASES` case."""
    out = tmp_path_factory.mktemp("real")
    write_llama(out / "llama")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE), "real", str(out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                       timeout=time_limit(GROUP_TIMEOUT))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads((out / f"real{r}.json").read_text()) for r in range(2)]
    return out, recs, load_file(str(out / "real.safetensors"))


def one_process(cfg, **kw) -> dict:
    """``train`` in this process, a group of one, with the full gradients of every step."""
    grads = []
    g = join(timeout=60)
    try:
        res = train(cfg, g, log=lambda *a, **k: None,
                    on_step=lambda step, m, loss: grads.append(adapters_of(m, True)), **kw)
        with torch.no_grad():
            res["logits"] = res["module"](input_ids=torch.arange(40, 76).view(3, 12)).logits
        res["grads"], res["final"] = grads, adapters_of(res["module"])
    finally:
        leave(True)
    return res


def assert_close32(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 0.0) -> None:
    """|a - b| <= 2e-5 (|b| + max |b|) + atol: float32 rounding of another summation order and
    another split of the batch (a wrong row, block or shard is off by far more)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, what
    tol = 2e-5 * (b.abs() + b.abs().max()) + atol
    assert ((a - b).abs() <= tol).all(), f"{what}: max |a-b| = {(a - b).abs().max():.3e}"


def test_sharded_nf4_bytes_equal_one_process_quantization(real):
    """Every NF4 tensor the two ranks built from their own rows, gathered, equals
    ``nf4.quantize`` of the whole weight in one process, bit for bit (codes, scale codes,
    nested scales, offset), and the checkpoint's dtype is recorded."""
    out, _, t = real
    from minidora import nf4

    weights = {}
    for f in (out / "llama").glob("*.safetensors"):
        weights.update(load_file(str(f)))
    names = sorted({k[4:].rsplit(".base.", 1)[0] for k in t if k.startswith("nf4/")})
    assert len(names) == 14                             # 7 linear layers in each of 2 blocks
    for name in names:
        q = nf4.quantize(weights[f"{name}.weight"])
        for k, want in (("packed", q.packed), ("absmax", q.absmax),
                        ("nested_absmax", q.nested_absmax), ("offset", q.offset)):
            got = t[f"nf4/{name}.base.{k}"]
            assert got.dtype == want.dtype and torch.equal(got, want.reshape(got.shape)), (name, k)


def test_no_rank_reads_a_whole_weight(real):
    """Under FSDP2 each rank reads, of every quantized weight, only the rows of its half (plus
    the rows of the one block it shares); of everything else, exactly its rows. Under DDP each
    rank reads everything."""
    out, recs, _ = real
    from minidora.apps.train.load import Checkpoint

    ckpt = Checkpoint(out / "llama")
    for rec in recs:
        for key in ("fsdp2-qlora", "fsdp2-qdora", "ddp-qdora"):
            reads = rec[key]["reads"]
            got = {}
            for name, r0, r1, n in reads:
                got.setdefault(name, []).append((r0, r1))
                assert n == (r1 - r0) * ckpt.entries[name].row_bytes
            assert set(got) == set(ckpt.entries), key           # every tensor, read once
            assert all(len(v) == 1 for v in got.values()), key
            for name, [(r0, r1)] in got.items():
                rows = ckpt.entries[name].shape[0]
                if key.startswith("ddp"):
                    assert (r0, r1) == (0, rows), (key, name)
                    continue
                half = -(-rows // 2)
                mine = (0, half) if rec["rank"] == 0 else (half, rows)
                if "proj" in name:     # codes: whole blocks of 64 around the rank's bytes
                    in_f = ckpt.entries[name].shape[1]
                    slack = -(-64 // in_f) + 1
                    assert r1 - r0 < rows and r0 <= mine[0] and r1 >= mine[1] and \
                        (r1 - r0) <= (mine[1] - mine[0]) + slack, (name, r0, r1, mine)
                else:
                    assert (r0, r1) == mine, (name, r0, r1)
        assert rec["fsdp2-qdora"]["local_bytes"] < 0.6 * rec["ddp-qdora"]["local_bytes"]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_real_model_two_processes_equal_one(real, case):
    """The small Llama, 3 steps at 2 processes against 1 (the same loader at world size 1): the
    losses, the adapters' gradients at every step, the adapters after and the logits, within
    float32 rounding; the NF4 bytes after training equal on both."""
    out, recs, t = real
    strategy, method, offload = case
    key = f"{strategy}-{method}" + ("-offload" if offload else "")
    ref = one_process(real_cfg(out / "llama", strategy, method))        # offload: without it
    for rec in recs:
        assert rec[key]["nf4"] == ref["nf4_sha256"]
        assert_close32(torch.tensor(rec[key]["losses"]), torch.tensor(ref["losses"]), "losses")
    for step, gs in enumerate(ref["grads"]):
        for n, v in gs.items():
            assert_close32(t[f"{key}/grad{step}/{n}"], v, f"grad {step} {n}")
    # AdamW divides by sqrt(v): where a gradient is near 0 its rounding moves the step by a part
    # of the learning rate, so the adapters after the steps are held to 1e-3 of lr per step too
    # (a wrong shard moves them by whole steps, lr each).
    lr = real_cfg(out, strategy, method).lr
    for n, v in ref["final"].items():
        assert_close32(t[f"{key}/final/{n}"], v, f"final {n}", atol=1e-3 * lr * STEPS)
    assert_close32(t[f"{key}/logits"], ref["logits"], "logits")


def test_real_model_loader_equals_from_pretrained(real):
    """Independently of the loader: at initialization (B = 0) the loaded QDoRA model computes
    the logits of ``from_pretrained`` + ``minidora.wrap`` in one process (same NF4 weights)."""
    from transformers import AutoModelForCausalLM

    out, _, _ = real
    cfg = replace(real_cfg(out / "llama", "fsdp2", "qdora"), lr=1e-30, steps=1)
    ref = one_process(cfg)
    model = AutoModelForCausalLM.from_pretrained(out / "llama", dtype=torch.float32)
    minidora.wrap(model, "qdora", "all-linear", r=3, alpha=6.0, compute_dtype=torch.float32)
    with torch.no_grad():
        want = model(input_ids=torch.arange(40, 76).view(3, 12)).logits
    assert_close32(ref["logits"], want, "logits")


def test_real_model_checkpoints_cross_world_sizes(real):
    """The adapters 2 processes wrote load into 1 process (``--init-adapters``), and their PEFT
    layout into a plain ``from_pretrained`` model, and give their logits; the 2-process resume
    point (after step 3 of 5) resumes in 1 process on the loss
    curve of the 2-process run."""
    out, recs, t = real
    cfg = replace(real_cfg(out / "llama", "fsdp2", "qdora"), lr=1e-30, steps=1)
    got = one_process(cfg, init_adapters=out / "fsdp2-qdora" / "adapters")
    assert_close32(got["logits"], t["fsdp2-qdora/logits"], "logits")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "llama", dtype=torch.float32)
    minidora.wrap(model, "qdora", "all-linear", r=3, alpha=6.0, compute_dtype=torch.float32)
    minidora.load_peft_adapter(model, out / "fsdp2-qdora" / "adapters" / "peft")   # PEFT layout
    with torch.no_grad():
        peft = model(input_ids=torch.arange(40, 76).view(3, 12)).logits
    assert_close32(peft, t["fsdp2-qdora/logits"], "logits of the PEFT folder")
    cfg = replace(real_cfg(out / "llama", "fsdp2", "qdora"), steps=5)
    again = one_process(cfg, out=out / "resume", resume=True)
    assert again["start"] == 3 and len(again["losses"]) == 2
    assert_close32(torch.tensor(again["losses"]), torch.tensor(recs[0]["resume"][3:]), "losses")


def test_checkpoint_folder_errors(tmp_path):
    """A missing shard, an index that puts a tensor in the wrong file, a truncated file, no
    config.json, a tensor of the wrong shape: one clear error each, before any rank starts."""
    import shutil

    from minidora.__main__ import main
    from minidora.apps.train.load import Checkpoint, CheckpointError

    good = write_llama(tmp_path / "good")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    cases = []
    d = tmp_path / "missing"
    shutil.copytree(good, d)
    (d / files[-1]).unlink()
    cases.append((d, f"names the shard {files[-1]!r}, which is missing"))
    d = tmp_path / "mismatch"
    shutil.copytree(good, d)
    wm = dict(index["weight_map"])
    key = "model.layers.0.mlp.up_proj.weight"
    wm[key] = next(f for f in files if f != wm[key])
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    cases.append((d, f"puts {key!r} in {wm[key]}, but {index['weight_map'][key]} holds it"))
    d = tmp_path / "truncated"
    shutil.copytree(good, d)
    f = d / files[0]
    f.write_bytes(f.read_bytes()[:-100])
    cases.append((d, "a truncated file?"))
    d = tmp_path / "noconfig"
    shutil.copytree(good, d)
    (d / "config.json").unlink()
    cases.append((d, "has no config.json"))
    for folder, want in cases:
        with pytest.raises(CheckpointError) as e:
            Checkpoint(folder)
        assert want in str(e.value), (want, str(e.value))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["train", "--model", str(folder), "--out", str(tmp_path / "o")]) == 1
        line = err.getvalue()
        if folder.name == "noconfig":
            want = "(a folder without config.json); expected builtin, smollm2-135m or a Hugging"
        assert line.startswith("minidora train: rank 0 of 1: error: --model: ") and want in line, \
            line
        assert len(line.strip().splitlines()) == 1
    d = tmp_path / "shape"                     # a config that does not match the weights
    shutil.copytree(good, d)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 104
    (d / "config.json").write_text(json.dumps(config))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--model", str(d), "--steps", "1", "--out", str(tmp_path / "o")]) == 1
    assert "'model.layers.0.mlp.gate_proj.weight' has shape [100, 48], the model (config.json) " \
           "expects [104, 48]" in err.getvalue(), err.getvalue()
    d = tmp_path / "lacking"                   # a tensor the model needs is in no file
    shutil.copytree(good, d)
    for f in d.glob("*.safetensors"):
        sd = load_file(str(f))
        if sd.pop("model.norm.weight", None) is not None:
            save_file(sd, str(f), metadata={"format": "pt"})
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                k: v for k, v in index["weight_map"].items() if k != "model.norm.weight"}}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--model", str(d), "--steps", "1", "--out", str(tmp_path / "o")]) == 1
    assert "the model needs 'model.norm.weight', which no safetensors file of the checkpoint " \
           "holds" in err.getvalue(), err.getvalue()



def test_a_rank_out_of_memory_while_loading(tmp_path):
    """Rank 1 runs out of memory while it quantizes its shard: it names the layer, the failed
    allocation and what to do; rank 0 stops at its next collective and names rank 1's error;
    both exit cleanly, long before the 300 s timeout (about 8 s on a quiet machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA, "intermediate_size": 262144, "num_hidden_layers": 1})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "wide")
    exits = launch("oom", tmp_path)
    assert [e[0] for e in exits] == [0, 0], exits
    r0, r1 = (json.loads((tmp_path / f"oom-{r}.json").read_text()) for r in range(2))
    assert (r0["rc"], r1["rc"]) == (1, 1), (r0, r1)
    want = "ran out of memory while loading model.layers.0.mlp.gate_proj (an allocation of "
    assert r1["stderr"].startswith(f"minidora train: rank 1 of 2: error: {want}"), r1
    assert "use more ranks (FSDP2 divides the model by their number)" in r1["stderr"]
    assert r0["stderr"].startswith("minidora train: rank 0 of 2: error: stopped because rank 1 "
                                   f"failed: {want}"), r0
    assert max(r0["seconds"], r1["seconds"]) < min(250, time_limit(60))



@pytest.mark.parametrize("chunk", [64, 192, 1 << 21])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_nf4_shard_of_any_rank_and_chunk_is_a_slice_of_one_quantization(tmp_path, world, chunk):
    """Without a group: each rank's bytes of a 37 x 45 weight (1665 values, 26.0 blocks of 64,
    the last partial; odd, so the last byte is half padding), quantized a chunk at a time, are
    that slice of ``nf4.quantize``'s bytes; its scales are those blocks' scales; the row norms
    from its weights, summed over the ranks, are ``NF4Linear.row_norms_sq``."""
    from minidora import nf4
    from minidora.apps.train import load

    w = torch.randn(37, 45, generator=torch.Generator().manual_seed(world)).to(torch.bfloat16)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ckpt = load.Checkpoint(tmp_path)
    q = nf4.quantize(w)
    size = q.packed.numel()
    per = -(-size // world)
    norms = torch.zeros(37, dtype=torch.float64)
    seen = torch.zeros(q.absmax.numel(), dtype=torch.bool)
    for rank in range(world):
        lo, hi = min(rank * per, size), min((rank + 1) * per, size)
        got = load.nf4_shard(ckpt, "w", (37, 45), lo, hi, chunk=chunk, sharded=False)
        assert torch.equal(got["packed"], q.packed[lo:hi]), rank
        mine = got["absmax"] != 0
        plain = nf4.quantize(w, double_quant=False).absmax             # the float32 scales
        assert torch.equal(got["absmax"][mine], plain[mine]) and mine.any() == (hi > lo)
        seen |= mine
        norms += load._row_norms_sq({**got, "absmax": plain, "codes8": q.absmax,
                                     "nested": q.nested_absmax, "offset": q.offset},
                                    (37, 45), 64, torch.float32, torch.float64, chunk)
    assert seen.all()
    layer = minidora.NF4Linear(q, compute_dtype=torch.float32)
    ref = layer.row_norms_sq(dtype=torch.float64)
    assert torch.allclose(norms, ref, rtol=1e-12, atol=0), (norms - ref).abs().max()



@pytest.mark.llm
def test_smollm2_two_processes_equal_one(tmp_path):
    """SmolLM2-135M under ``torchrun --nproc_per_node 2 -m minidora train --model smollm2-135m``
    (converted once to safetensors in the cache, then read shard by shard) against one process:
    the same losses within float32 rounding and the same NF4 bytes; each rank read about half
    of the checkpoint; its adapters load into the one-process run."""
    import re

    from minidora.__main__ import main

    argv = ["--model", "smollm2-135m", "--method", "qdora", "--steps", "2", "--batch-size", "4",
            "--rank", "4", "--timeout", "120"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *argv, "--out", str(tmp_path / "one")]) == 0
    one = out.getvalue()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minidora", "train", *argv, "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                       timeout=time_limit(2 * GROUP_TIMEOUT))
    assert p.returncode == 0, p.stderr[-3000:]
    loss = lambda text: [float(v) for v in re.findall(r"step \d+/2 loss (\d+\.\d+)", text)]
    assert len(loss(one)) == 2 and loss(p.stdout) == pytest.approx(loss(one), rel=1e-4, abs=1e-4)
    read = lambda text: [float(v) for v in re.findall(r"this rank read ([\d.]+) MiB", text)]
    assert read(p.stdout)[0] < 0.55 * read(one)[0], (read(p.stdout), read(one))
    sha = re.findall(r"NF4 sha256 ([0-9a-f]{16})", p.stderr)
    assert len(sha) == 2 and len(set(sha)) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *argv, "--steps", "1", "--init-adapters",
                     str(tmp_path / "two" / "adapters"), "--out", str(tmp_path / "again")]) == 0



def test_question_rows_as_bytes_without_a_tokenizer(tmp_path):
    """A checkpoint without tokenizer files trains on the question set as UTF-8 bytes: every id
    is a byte, the targets are the answers' bytes and the newline that ends them; a vocabulary
    under 256 cannot take bytes and is refused."""
    from minidora.apps.finetune.data import load_dataset
    from minidora.apps.train.load import CheckpointError
    from minidora.apps.train.models import question_rows

    rows, how = question_rows(tmp_path, 300)
    data = load_dataset()
    assert how == f"{len(data.train)} questions of {data.name} as UTF-8 bytes (no tokenizer files)"
    assert rows.x.max() < 256 and len(rows.lines) == len(data.train)
    ex = data.train[7]
    x, y = rows.batch(torch.tensor([7]))
    answer = y[0][y[0] != -100].tolist()
    assert bytes(answer) == (ex.response + "\n").encode()
    prompt = f"Question: {ex.prompt}\nAnswer: ".encode()
    assert bytes(x[0, :len(prompt)].tolist()) == prompt
    with pytest.raises(CheckpointError, match="a vocabulary of 100 < 256"):
        question_rows(tmp_path, 100)



def test_a_nan_in_a_checkpoint_weight_is_named(tmp_path):
    """A NaN in the rows a rank quantizes: the file, the tensor and the rows, not NaN scales."""
    from minidora.apps.train import load

    w = torch.randn(9, 70)
    w[6, 3] = float("nan")
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ckpt = load.Checkpoint(tmp_path)
    assert load.nf4_shard(ckpt, "w", (9, 70), 0, 100, sharded=False)["packed"].numel() == 100
    with pytest.raises(load.CheckpointError, match=r"'w' has 1 NaN/Inf value\(s\) in rows 5..6;"):
        load.nf4_shard(ckpt, "w", (9, 70), 0, 315, sharded=False, chunk=64)


if __name__ == "__main__":
    {"matrix": _worker_matrix, "runs": _worker_runs, "real": _worker_real,
     "oom": _worker_oom}[sys.argv[1]](
        Path(sys.argv[2]))
    sys.exit(0)
