r"""The memory of one rank under FSDP2, predicted term by term, in bytes.

For a Llama-shaped model (a ``config.json`` as a dict), an adapter method, rank r and W ranks,
:func:`predict` adds up what the rank holding the most (rank 0) keeps during a training step:

.. math::  M = \underbrace{B_{\text{shard}} / W + B_{\text{whole}} + U / W + 4 A / W}
                          _{\text{held all the time}}
           + \underbrace{L_{\text{run}} + L_{\text{next}} + N + E + G}_{\text{gathered}}
           + \underbrace{\tfrac{T}{W} (a + 8 V)}_{\text{activations}} + R

The FSDP2 units are those :func:`minidora.apps.train.load.build` makes: each adapter layer
(its base and its adapter), the input embeddings, the output head (one unit with the
embeddings when the two are tied), and the root unit, which keeps the rest: the norms.

Held all the time (``shard.local_bytes`` reports their sum, less the optimizer's 3 A / W):

- ``base_sharded``, :math:`B_{\text{shard}}`: the NF4 codes (4 bits per weight) and, with double
  quantization, the 8-bit scale codes: uint8 parameters, which FSDP2 shards on dim 0.
- ``base_whole``, :math:`B_{\text{whole}}`: buffers, which FSDP2 never shards: with double
  quantization the float32 nested scales (one per 256 scales) and a 4-byte offset per layer;
  without it the float32 scales themselves (32 / 64 bits per weight).
- ``unquantized``, :math:`U`: embeddings, output head, norms (and biases) in their dtype,
  sharded on dim 0.
- ``rope``: RoPE's two tables of head_dim / 2 float32 frequencies, buffers on every rank.
- ``adapters``, :math:`4 A`: r (in + out) per layer (+ out for DoRA's magnitude), times 4: the
  parameters, their gradients and AdamW's two moments, all sharded like the parameters.

Gathered while they are used (not divided by W):

- ``gathered_layer``, :math:`L_{\text{run}}`: the largest adapted layer while it runs: its full
  NF4 bytes (and bias), its adapters and their gradients, and its weight dequantized to the
  compute dtype.
- ``prefetched_layer``, :math:`L_{\text{next}}`: the next layer's all-gather, which FSDP2 issues
  before the running one is freed.
- ``gathered_root``, :math:`N`: the root unit (the norms) unsharded in the compute dtype: FSDP2
  keeps the root gathered from its forward to the end of its backward.
- ``gathered_outer``, :math:`E`: the larger of the embeddings' and the output head's units,
  unsharded in the compute dtype. Each is gathered only while it runs and freed after: the
  embeddings in the forward only (they are frozen and their input needs no gradient), the head
  in the forward and again at the start of the backward, when the activations and the loss's
  gradients are all alive, so one of them counts. Tied, the one [V, H] weight is one unit.
- ``gather_buffer``, :math:`G`: with W > 1, FSDP2's flat all-gather output for that unit (W
  padded shards), alive beside its unsharded copy while the copy is filled (at W = 1 FSDP2
  copies the shard directly): the largest of the root's, the embeddings' and the head's. The
  adapter layers' is ``prefetched_layer``.

Per token, for the ``ceil(T / W)`` tokens of the rank's rows:

- ``activations``, :math:`a`: what autograd keeps (:func:`activation_bytes`, exact per token
  for transformers' Llama with SDPA).
- ``loss_gradients``, :math:`8 V`: at the start of backward, the gradients of the log-softmax
  and of the logits, two float32 [T, V] tensors.

And ``runtime``, :math:`R`: PyTorch itself (allocator, libraries, the CUDA context): measured on
the same device (a process's memory before the model), passed in, never predicted.

Which terms are checked against what (tests/test_train_memory.py): the held terms against the
bytes FSDP2 leaves on rank 0 (exact); ``gathered_root``, ``gathered_outer`` and
``gather_buffer`` against what FSDP2 allocates when it unshards those units (exact);
``activations`` against the tensors autograd saves (exact per token). ``gathered_layer``,
``prefetched_layer`` and ``loss_gradients`` are modelled from the code, not measured; and the
terms are not all alive at one moment (the embeddings' copy is gone before the head's exists,
the all-gather buffers come and go), so the sum is an upper bound of the peak of the tensors.
A process's RSS also holds what its allocator keeps of freed blocks, which no term counts: on
glibc with its default (dynamic) mmap threshold, measured up to 72 % above the training
prediction at 4 processes, and within it with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB
(docs/distributed.md, benchmarks/bench_train_memory.py).

Loading (:func:`predict_loading`): what ``load.build`` holds at its peak, before any step:

.. math::  M_{\text{load}} = \underbrace{B_{\text{shard}} / W + B_{\text{whole}} + U / W + A / W}
                                        _{\text{this rank's storage}}
           + \underbrace{\max_{\text{step}} X}_{\text{transient}} + R

``to_empty`` allocates this rank's shards (the adapters without gradients or AdamW's moments
yet), which are filled one tensor at a time; :math:`X` is the largest transient of one step of
filling them, read from ``load.py``'s code: quantizing one chunk of ``CHUNK_ELEMS`` weights, the
double quantization of a layer's scales, DoRA's row norms of one chunk, or copying one chunk of
rows of an unquantized tensor (see :func:`loading_transients`). At that moment the rank already
holds part of its storage; counting all of it makes the total an upper bound too.

Every sharded tensor counts ``ceil(dim0 / W)`` rows: FSDP2 gives rank 0 the largest share (the
last ranks get fewer rows, or none). The NF4 sizes are those :class:`minidora.NF4Linear` stores
(see docs/format.md), per layer, partial blocks included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

import minidora

from .load import CHUNK_ELEMS
from .synthetic import count, is_quantized, tensor_shapes

__all__ = ["METHODS", "PARTS", "LOAD_PARTS", "nf4_tensors", "nf4_rank_bytes",
           "activation_bytes", "predict", "TRANSIENTS", "loading_transients", "predict_loading",
           "extrapolate", "compare", "format_table"]

METHODS = ("qlora", "qdora", "lora", "dora")
PARTS = ("base_sharded", "base_whole", "unquantized", "rope", "adapters", "gathered_layer",
         "prefetched_layer", "gathered_root", "gathered_outer", "gather_buffer", "activations",
         "loss_gradients", "runtime")
LOAD_PARTS = ("base_sharded", "base_whole", "unquantized", "rope", "adapters", "transient",
              "runtime")
TRANSIENTS = ("quantize_chunk", "double_quantize", "row_norms", "copy_rows", "adapter_init")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _positive(name: str, value, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _bytes(dtype: torch.dtype, name: str) -> int:
    if dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {dtype!r}")
    return torch.empty(0, dtype=dtype).element_size()


def _shard(rows: int, row_bytes: int, world: int) -> int:
    """Bytes of rank 0's dim-0 shard of a tensor of ``rows`` rows: ceil(rows / W) of them."""
    return -(-rows // world) * row_bytes


def _checked(method, r, world, double_quant, blocksize, runtime) -> tuple[int, int, int]:
    """The arguments :func:`predict` and :func:`predict_loading` share, checked."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r, world = _positive("r", r), _positive("world", world)
    runtime = _positive("runtime", runtime, 0)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 32
            or blocksize > 4096 or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
    return r, world, runtime


def _bias(weight: str) -> str:
    return weight[: -len("weight")] + "bias"


def _adapted(shapes: Mapping[str, tuple[int, ...]]):
    """(name, (out, in)) of each adapted layer's weight, in order."""
    return [(name, shape) for name, shape in shapes.items() if is_quantized(name)]


def _outer_units(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[tuple[int, int]]]:
    """The FSDP2 units outside the adapter layers, as ``load.build`` makes them, each as its
    tensors' (rows, elements per row): ``root`` (the norms), ``embeddings`` and ``head`` (absent
    when tied: the tied weight is one unit, ``embeddings``)."""
    units = {"root": [], "embeddings": [], "head": []}
    for name, shape in shapes.items():
        if is_quantized(name) or name.endswith(".bias"):             # in the adapter layers
            continue
        unit = ("embeddings" if name == "model.embed_tokens.weight" else
                "head" if name == "lm_head.weight" else "root")
        units[unit].append((shape[0], math.prod(shape[1:])))
    return {k: v for k, v in units.items() if v or k == "root"}


def _storage(config: Mapping, method: str, r: int, world: int, double_quant: bool,
             dtype: torch.dtype, blocksize: int, adapter_dtype: torch.dtype) -> dict[str, int]:
    """The held parts of :data:`PARTS` (``adapters``: four times the parameters' bytes)."""
    stored, adapter = _bytes(dtype, "dtype"), _bytes(adapter_dtype, "adapter_dtype")
    quantized, dora = method in ("qlora", "qdora"), method in ("qdora", "dora")
    parts = dict.fromkeys(("base_sharded", "base_whole", "unquantized", "rope", "adapters"), 0)
    count(config)                                                    # checks config
    for _, (out, n_in) in _adapted(tensor_shapes(config)):           # each adapted layer
        if quantized:
            sharded, whole = nf4_rank_bytes(out, n_in, world, blocksize, double_quant)
        else:
            sharded, whole = _shard(out, n_in * stored, world), 0    # frozen [out, in] weight
        parts["base_sharded"] += sharded
        parts["base_whole"] += whole
        # A [r, in], B [out, r], m [out]: param, grad, two AdamW moments, each sharded on dim 0
        own = _shard(r, n_in * adapter, world) + _shard(out, r * adapter, world)
        own += _shard(out, adapter, world) if dora else 0
        parts["adapters"] += 4 * own
    for name, shape in tensor_shapes(config).items():                # sharded on dim 0
        if not is_quantized(name):                                   # embeddings, norms, head
            parts["unquantized"] += _shard(shape[0], math.prod(shape[1:]) * stored, world)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    parts["rope"] = 2 * (head_dim // 2) * 4            # inv_freq, original_inv_freq: float32
    return parts


def nf4_tensors(out_features: int, in_features: int, blocksize: int = 64,
                double_quant: bool = True) -> dict[str, tuple[int, int, bool]]:
    """What an :class:`~minidora.NF4Linear` of weight [out, in] stores, tensor by tensor.

    Returns:
        name -> (numel, bytes per element, sharded): ``sharded`` for the uint8 parameters FSDP2
        shards (all 1-D), not for the buffers every rank holds whole.
    """
    n = out_features * in_features
    blocks = -(-n // blocksize)                        # the last block may be partial
    held = {"packed": (-(-n // 2), 1, True)}           # two 4-bit codes per byte
    if double_quant:
        held["absmax"] = (blocks, 1, True)             # 8-bit scale codes: a parameter
        nested = -(-blocks // minidora.nf4.NESTED_BLOCKSIZE)
        held["nested_absmax"] = (nested, 4, False)     # float32, one per 256 scales: a buffer
        held["offset"] = (1, 4, False)                 # float32 mean of the scales: a buffer
    else:
        held["absmax"] = (blocks, 4, False)            # float32 scales: a buffer
    return held


def nf4_rank_bytes(out_features: int, in_features: int, world: int, blocksize: int = 64,
                   double_quant: bool = True) -> tuple[int, int]:
    """(sharded, whole) bytes rank 0 holds of one NF4 layer under FSDP2 with ``world`` ranks."""
    sharded = whole = 0
    for numel, size, is_sharded in nf4_tensors(out_features, in_features, blocksize,
                                               double_quant).values():
        if is_sharded:
            sharded += _shard(numel, size, world)
        else:
            whole += numel * size
    return sharded, whole


def activation_bytes(config: Mapping, method: str, r: int,
                     compute_dtype: torch.dtype = torch.float32,
                     adapter_dtype: torch.dtype | None = None) -> int:
    """The bytes autograd keeps per token of a training step, whole model (an estimate).

    Per decoder block, in the compute dtype c: q, k and v after RoPE (q + 2 kv), the attention
    output (q; o_proj's input is a view of it), the MLP's gate and up outputs and SiLU(gate)
    (3 I). Then what the adapters need for their gradients, in their dtype a: each adapted
    layer's input; when a is c the layers share it (the two RMSNorm outputs 2 H, and the MLP's
    product I; o_proj's input is counted already), otherwise each layer keeps its own cast copy
    (5 H + q + I); each layer's A x (r), and for DoRA its base output (out). In float32 whatever
    c: the RMSNorms' inputs (Llama's RMSNorm upcasts; 2 H + 2 with the 1 / rms; block 0's is not
    kept, as nothing before it trains) and the attention's log-sum-exp (one per head). Once per
    token: RoPE's cos and sin (2 head_dim in c: they are per position, so this is exact for one
    row and B times too much for B rows of the same length), the final norm's input (H + 1,
    float32), the log-softmax the loss keeps (V, float32), the int64 targets, and when c is not
    float32 the logits the loop holds (V in c).

    Measured against autograd's saved tensors (tests/test_train_memory.py), the bytes per token
    are exact for transformers' Llama with SDPA. Not counted: tensors of a layer's size rather
    than a token's (s B, [out, r]), the gradients alive during backward, and the attention
    matrix of a non-fused attention (the plain math path adds heads x T per token).

    Args:
        config: a Llama ``config.json`` as a dict.
        method: one of :data:`METHODS`.
        r: adapter rank.
        compute_dtype: dtype of the activations.
        adapter_dtype: dtype the adapters compute in (default ``compute_dtype``, as under FSDP2's
            mixed precision, which casts them too).
    """
    n = count(config)                                  # checks config
    c = _bytes(compute_dtype, "compute_dtype")
    a = c if adapter_dtype is None else _bytes(adapter_dtype, "adapter_dtype")
    shared = adapter_dtype is None or adapter_dtype == compute_dtype
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, config["num_key_value_heads"] * head_dim   # q_proj, k_proj rows
    block = c * ((q + 2 * kv) + q + 3 * inter)                           # attention, MLP
    block += a * (2 * h + inter if shared else 5 * h + q + inter)        # the adapters' inputs
    block += a * sum(r + (out if method in ("dora", "qdora") else 0)     # A x, DoRA's base out
                     for out, _ in n["shapes"][: len(n["shapes"]) // layers])
    block += 4 * (2 * h + 2 + heads)                                     # norms' inputs, LSE
    v = config["vocab_size"]
    once = 2 * head_dim * c + 4 * (h + 1) + 4 * v + 8 + (c * v if c != 4 else 0)
    return layers * block - 4 * (h + 1) + once        # block 0's norm input: not kept


def predict(config: Mapping, method: str, r: int, world: int, double_quant: bool = True,
            dtype: torch.dtype = torch.float32, batch_tokens: int = 4096, blocksize: int = 64,
            adapter_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
            runtime: int = 0) -> dict[str, int]:
    """Bytes rank 0 holds at the peak of a training step under FSDP2, by part (see the module).

    Args:
        config: a Llama ``config.json`` as a dict (see :func:`minidora.apps.train.synthetic.count`).
        method: "qlora" or "qdora" (NF4 base), "lora" or "dora" (base in ``dtype``).
        r: adapter rank.
        world: W, the number of ranks.
        double_quant: the NF4 scales double-quantized (QLoRA's DQ).
        dtype: stored dtype of the parameters left unquantized (and of a lora/dora base).
        batch_tokens: tokens of the global batch (rows x sequence length); a rank gets
            ceil(batch_tokens / W).
        blocksize: NF4 elements per scale.
        adapter_dtype: dtype of A, B, m, their gradients and AdamW's moments.
        compute_dtype: dtype of the gathered floating-point parameters (FSDP2's mixed precision
            ``param_dtype``), of the dequantized weight and of the activations; default ``dtype``.
        runtime: bytes of PyTorch itself, measured on the same device (e.g. the peak of a step of
            a tiny model); added as it is.

    Returns:
        Each of :data:`PARTS` in bytes, and ``total``.
    """
    r, world, runtime = _checked(method, r, world, double_quant, blocksize, runtime)
    batch_tokens = _positive("batch_tokens", batch_tokens, 0)
    compute = _bytes(compute_dtype or dtype, "compute_dtype")
    parts = {**dict.fromkeys(PARTS, 0), **_storage(config, method, r, world, double_quant,
                                                   dtype, blocksize, adapter_dtype)}
    quantized, dora = method in ("qlora", "qdora"), method in ("qdora", "dora")
    shapes = tensor_shapes(config)
    largest_layer, largest_gather = 0, 0
    for name, (out, n_in) in _adapted(shapes):                       # each adapted layer
        if quantized:
            full = sum(k * s for k, s, sh in nf4_tensors(out, n_in, blocksize,
                                                         double_quant).values() if sh)
            dense = out * n_in * compute                             # dequantized while it runs
        else:
            full = out * n_in * compute                              # gathered in compute dtype
            dense = 0                                                # used as it is gathered
        full += out * compute if _bias(name) in shapes else 0        # the bias, with its layer
        adapters_full = (r * (n_in + out) + (out if dora else 0)) * compute
        gather = full + 2 * adapters_full                            # gathered params + grads
        largest_layer = max(largest_layer, gather + dense)
        largest_gather = max(largest_gather, full + adapters_full)
    parts["gathered_layer"] = largest_layer            # the layer running now
    parts["prefetched_layer"] = largest_gather         # the next layer's all-gather, in flight
    units = _outer_units(shapes)                       # unit -> [(rows, row elements)]
    whole = {k: sum(rows * row for rows, row in u) * compute for k, u in units.items()}
    parts["gathered_root"] = whole.pop("root")         # gathered for the whole step
    parts["gathered_outer"] = max(whole.values(), default=0)    # one at a time, while it runs
    if world > 1:                                      # W padded shards of each tensor, flat
        parts["gather_buffer"] = max(world * sum(-(-rows // world) * row for rows, row in u)
                                     * compute for u in units.values())
    tokens = -(-batch_tokens // world)                               # the rank's share
    parts["activations"] = tokens * activation_bytes(config, method, r, compute_dtype or dtype)
    parts["loss_gradients"] = tokens * 2 * config["vocab_size"] * 4   # two float32 [T, V]
    parts["runtime"] = runtime
    return {**parts, "total": sum(parts.values())}


def loading_transients(config: Mapping, method: str, r: int, world: int,
                       double_quant: bool = True, blocksize: int = 64,
                       dtype: torch.dtype = torch.float32,
                       checkpoint_dtype: torch.dtype = torch.bfloat16,
                       adapter_dtype: torch.dtype = torch.float32,
                       chunk: int = CHUNK_ELEMS) -> dict[str, int]:
    """The largest temporary bytes of each step of ``load.build``'s filling, over the layers.

    Read from ``load.py`` and ``minidora/nf4.py`` (tensor by tensor, in the order CPython frees
    them; tests/test_train_memory.py holds each against the allocations PyTorch's profiler
    records). With n the weights of one chunk (``chunk`` rounded down to whole blocks, at most
    the weights this rank owns of the layer), p = n rounded up to whole blocks, h = ceil(n / 2),
    s the checkpoint's bytes per weight and nb the layer's scales:

    - ``quantize_chunk`` (NF4 methods): the rows read (s bytes, whole rows around the chunk),
      the float32 blocks (4 p), the int64 codes (8 p), :func:`minidora.nf4.pack`'s two int64
      halves (16 h), the chunk's scales, and the layer's float32 scales (4 nb).
    - ``double_quantize``: the layer's scales (4 nb), their centered copy (4 nb) and, in
      blocks of 256, the padded blocks, their clamped copy and two int64 code vectors (24 bytes
      per padded scale), the nested scales and the offset.
    - ``row_norms`` (qdora): the kept scales, scale codes and offset, the decoded scales (4 nb),
      the [out] sums, and per weight of a chunk its int64 codes, indices and block indices and
      two float32 gathers (32 bytes; the previous chunk's are freed before the next is decoded);
      dora: the squared shard.
    - ``copy_rows``: one chunk of rows of an unquantized tensor (or a lora/dora base) as read.
    - ``adapter_init``: ``lora_A`` drawn whole in float64 (8 r in) beside the layer's scales.

    Args:
        config, method, r, world, double_quant, blocksize, adapter_dtype: as for
            :func:`predict`.
        dtype: the model's dtype in memory (train's ``--dtype``).
        checkpoint_dtype: the dtype of the checkpoint's weights (what is read).
        chunk: weights quantized or copied at a time (``load.CHUNK_ELEMS``).

    Returns:
        Each of :data:`TRANSIENTS` in bytes (0 where the method has no such step).
    """
    r, world, _ = _checked(method, r, world, double_quant, blocksize, 0)
    chunk = _positive("chunk", chunk)
    s = _bytes(checkpoint_dtype, "checkpoint_dtype")
    stored = _bytes(dtype, "dtype")
    acc = 8 if torch.float64 in (dtype, adapter_dtype) else 4        # LoRALinear.acc_dtype
    shapes = tensor_shapes(config)
    quantized, dora = method in ("qlora", "qdora"), method in ("qdora", "dora")
    nested = minidora.nf4.NESTED_BLOCKSIZE
    out_parts = dict.fromkeys(TRANSIENTS, 0)

    def keep(name: str, value: int) -> None:
        out_parts[name] = max(out_parts[name], value)

    def rows_read(rows: int, row: int, n: int) -> int:               # whole rows around n
        return min(rows, -(-n // row) + 1) * row * s

    for _, (out, n_in) in _adapted(shapes):
        n_all = out * n_in
        nb = -(-n_all // blocksize)
        if quantized:
            packed = -(-n_all // 2)
            owned = min(2 * -(-packed // world), n_all)              # rank 0's bytes, as weights
            n = min(max(1, chunk // blocksize) * blocksize, -(-owned // blocksize) * blocksize,
                    n_all)
            p, h = -(-n // blocksize) * blocksize, -(-n // 2)
            scales = 4 * nb                                          # [nb] float32, all blocks
            odd = 8 * (n + 1) if n % 2 else 0                        # pack pads an odd count
            keep("quantize_chunk", rows_read(out, n_in, n) + 4 * p + 8 * p + odd + 16 * h
                 + 2 * 4 * (p // blocksize) + scales)                # this chunk's and the last
            kept = scales + (nb + 4 * -(-nb // nested) + 4 if double_quant else 0)   # q's
            if double_quant:                                         # + the last chunk's
                keep("double_quantize", scales + 4 * (p // blocksize) + 4 * nb    # scales
                     + 24 * -(-nb // nested) * nested + 4 + 4 * -(-nb // nested))
            if dora:
                c = min(2 * max(1, chunk // 2), owned)
                decoded = 4 * nb if double_quant else 0
                per = 32 * c          # 32 bytes per weight of a chunk (the last one freed)
                keep("row_norms", kept + decoded + out * acc + per)
            keep("adapter_init", kept + 8 * r * n_in)
        else:
            step = max(1, chunk // n_in)
            keep("copy_rows", min(step, -(-out // world)) * n_in * s)
            if dora:                                                 # local.to(acc).square()
                local = -(-out // world) * n_in
                keep("row_norms", local * acc * (1 if acc == stored else 2) + out * acc)
            keep("adapter_init", 8 * r * n_in)
    for name, shape in shapes.items():                               # the rest, row chunks
        if not is_quantized(name):
            row = math.prod(shape[1:])
            step = max(1, chunk // max(1, row))
            keep("copy_rows", min(step, -(-shape[0] // world)) * row * s)
    return out_parts


def predict_loading(config: Mapping, method: str, r: int, world: int, double_quant: bool = True,
                    dtype: torch.dtype = torch.float32,
                    checkpoint_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    adapter_dtype: torch.dtype = torch.float32, chunk: int = CHUNK_ELEMS,
                    runtime: int = 0) -> dict[str, int]:
    """Bytes rank 0 holds at the peak of ``load.build`` under FSDP2 (see the module): its
    storage, the largest transient of :func:`loading_transients`, and the runtime.

    Args:
        config, method, r, world, double_quant, blocksize, adapter_dtype: as for
            :func:`predict`.
        dtype: the model's dtype in memory (train's ``--dtype``).
        checkpoint_dtype: the dtype of the checkpoint's weights.
        chunk: ``load.CHUNK_ELEMS``.
        runtime: bytes of the process before the model's storage (train's "before the model").

    Returns:
        Each of :data:`LOAD_PARTS` in bytes (``adapters``: the parameters alone, as no
        gradient or optimizer state exists yet), ``total``, and each of :data:`TRANSIENTS`
        (``transient`` is the largest of them; they are not added to ``total``).
    """
    r, world, runtime = _checked(method, r, world, double_quant, blocksize, runtime)
    held = _storage(config, method, r, world, double_quant, dtype, blocksize, adapter_dtype)
    held["adapters"] //= 4                             # parameters: no gradients, no moments
    steps = loading_transients(config, method, r, world, double_quant, blocksize, dtype,
                               checkpoint_dtype, adapter_dtype, chunk)
    parts = {**held, "transient": max(steps.values()), "runtime": runtime}
    return {**parts, "total": sum(parts.values()), **steps}


def extrapolate(params_quantized: float, world: int, double_quant: bool = True,
                blocksize: int = 64) -> float:
    """Bytes per rank of an NF4 base of ``params_quantized`` weights, by bits per weight.

    The arithmetic of docs/distributed.md's 7B / 70B table: codes (4 bits) and, with double
    quantization, the scale codes (8 / blocksize bits) divided by W; the float32 buffers whole on
    every rank (32 / (blocksize x 256) bits with double quantization, 32 / blocksize without).
    Whole blocks and no per-layer offset: :func:`predict` counts those exactly per layer.
    """
    world = _positive("world", world)
    if (not isinstance(params_quantized, (int, float)) or isinstance(params_quantized, bool)
            or not 0 < params_quantized < math.inf):
        raise ValueError(f"params_quantized must be a finite number > 0, got {params_quantized!r}")
    nested = minidora.nf4.NESTED_BLOCKSIZE
    if double_quant:
        sharded_bits, whole_bits = 4 + 8 / blocksize, 32 / (blocksize * nested)
    else:
        sharded_bits, whole_bits = 4, 32 / blocksize
    return params_quantized * (sharded_bits / world + whole_bits) / 8


def compare(measured: Mapping[str, int], predicted: Mapping[str, int]) -> list[tuple]:
    """Rows (part, measured, predicted) for :func:`format_table`: every predicted part, then
    measured quantities that have no part of their own (None where a side has no number)."""
    rows = [(k, measured.get(k), v) for k, v in predicted.items()]
    return rows + [(k, v, None) for k, v in measured.items() if k not in predicted]


def format_table(rows) -> str:
    """A Markdown table of (what, measured bytes or None, predicted bytes or None) rows, in MiB,
    with measured / predicted where both are there."""
    lines = ["| part | measured MiB | predicted MiB | measured / predicted |",
             "|---|---:|---:|---:|"]
    for what, got, want in rows:
        mib = [f"{v / 2**20:,.2f}" if v is not None else "" for v in (got, want)]
        ratio = f"{got / want:.3f}" if got is not None and want else ""
        lines.append(f"| {what} | {mib[0]} | {mib[1]} | {ratio} |")
    return "\n".join(lines)
