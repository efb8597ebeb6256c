r"""The memory of one rank under FSDP2, predicted term by term, in bytes.

For a Llama-shaped model (a ``config.json`` as a dict), an adapter method, rank r and W ranks,
:func:`predict` adds up what the rank holding the most (rank 0) keeps during a training step:

.. math::  M = \underbrace{B_{\text{shard}} / W + B_{\text{whole}} + U / W + 4 A / W}
                          _{\text{held all the time}}
           + \underbrace{L_{\text{run}} + L_{\text{next}} + U_{\text{root}} + G}
                        _{\text{gathered}}
           + \underbrace{\tfrac{T}{W} (a + 8 V)}_{\text{activations}} + R

Held all the time (``shard.local_bytes`` reports their sum, less the optimizer's 3 A / W):

- ``base_sharded``, :math:`B_{\text{shard}}`: the NF4 codes (4 bits per weight) and, with double
  quantization, the 8-bit scale codes: uint8 parameters, which FSDP2 shards on dim 0.
- ``base_whole``, :math:`B_{\text{whole}}`: buffers, which FSDP2 never shards: with double
  quantization the float32 nested scales (one per 256 scales) and a 4-byte offset per layer;
  without it the float32 scales themselves (32 / 64 bits per weight).
- ``unquantized``, :math:`U`: embeddings, output head and norms in their dtype, sharded on dim 0.
- ``rope``: RoPE's two tables of head_dim / 2 float32 frequencies, buffers on every rank.
- ``adapters``, :math:`4 A`: r (in + out) per layer (+ out for DoRA's magnitude), times 4: the
  parameters, their gradients and AdamW's two moments, all sharded like the parameters.

Gathered while they are used (not divided by W):

- ``gathered_layer``, :math:`L_{\text{run}}`: the largest adapted layer while it runs: its full
  NF4 bytes, its adapters and their gradients, and its weight dequantized to the compute dtype.
- ``prefetched_layer``, :math:`L_{\text{next}}`: the next layer's all-gather, which FSDP2 issues
  before the running one is freed.
- ``gathered_root``, :math:`U_{\text{root}}`: the root unit (embeddings, norms, head) unsharded,
  in the compute dtype: FSDP2 keeps the root gathered from its forward to its backward.
- ``gather_buffer``, :math:`G`: with W > 1, FSDP2's flat all-gather output for the root, alive
  beside the root's unsharded copy until the next unit is gathered (at W = 1 FSDP2 copies the
  shard directly). It comes and goes before any activation exists, so adding it to the rest
  makes the total an upper bound.

Per token, for the ``ceil(T / W)`` tokens of the rank's rows:

- ``activations``, :math:`a`: what autograd keeps (:func:`activation_bytes`, exact per token
  for transformers' Llama with SDPA).
- ``loss_gradients``, :math:`8 V`: at the start of backward, the gradients of the log-softmax
  and of the logits, two float32 [T, V] tensors.

And ``runtime``, :math:`R`: PyTorch itself (allocator, libraries, the CUDA context): measured on
the same device (a process's memory before the model), passed in, never predicted.

Every sharded tensor counts ``ceil(dim0 / W)`` rows: FSDP2 gives rank 0 the largest share (the
last ranks get fewer rows, or none). The NF4 sizes are those :class:`minidora.NF4Linear` stores
(see docs/format.md), per layer, partial blocks included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

import minidora

from .synthetic import count, is_quantized, tensor_shapes

__all__ = ["METHODS", "PARTS", "nf4_tensors", "nf4_rank_bytes", "activation_bytes",
           "predict", "extrapolate", "compare", "format_table"]

METHODS = ("qlora", "qdora", "lora", "dora")
PARTS = ("base_sharded", "base_whole", "unquantized", "rope", "adapters", "gathered_layer",
         "prefetched_layer", "gathered_root", "gather_buffer", "activations", "loss_gradients",
         "runtime")
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r, world = _positive("r", r), _positive("world", world)
    batch_tokens, runtime = _positive("batch_tokens", batch_tokens, 0), _positive("runtime",
                                                                                  runtime, 0)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 32
            or blocksize > 4096 or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
    stored, adapter = _bytes(dtype, "dtype"), _bytes(adapter_dtype, "adapter_dtype")
    compute = _bytes(compute_dtype or dtype, "compute_dtype")
    n = count(config)
    quantized = method in ("qlora", "qdora")
    dora = method in ("qdora", "dora")
    parts = dict.fromkeys(PARTS, 0)
    largest_layer, largest_gather = 0, 0
    for out, n_in in n["shapes"]:                                    # each adapted layer [out, in]
        if quantized:
            sharded, whole = nf4_rank_bytes(out, n_in, world, blocksize, double_quant)
            full = sum(k * s for k, s, sh in nf4_tensors(out, n_in, blocksize,
                                                         double_quant).values() if sh)
            dense = out * n_in * compute                             # dequantized while it runs
        else:
            sharded, whole = _shard(out, n_in * stored, world), 0    # frozen [out, in] weight
            full = out * n_in * stored
            dense = out * n_in * compute if compute != stored else 0  # a cast copy, if any
        parts["base_sharded"] += sharded
        parts["base_whole"] += whole
        # A [r, in], B [out, r], m [out]: param, grad, two AdamW moments, each sharded on dim 0
        own = _shard(r, n_in * adapter, world) + _shard(out, r * adapter, world)
        own += _shard(out, adapter, world) if dora else 0
        parts["adapters"] += 4 * own
        adapters_full = (r * (n_in + out) + (out if dora else 0)) * compute
        gather = full + 2 * adapters_full                            # gathered params + grads
        largest_layer = max(largest_layer, gather + dense)
        largest_gather = max(largest_gather, full + adapters_full)
    parts["gathered_layer"] = largest_layer            # the layer running now
    parts["prefetched_layer"] = largest_gather         # the next layer's all-gather, in flight
    for name, shape in tensor_shapes(config).items():                # sharded on dim 0
        if not is_quantized(name):                                   # embeddings, norms, head
            row = math.prod(shape[1:])
            parts["unquantized"] += _shard(shape[0], row * stored, world)
            if world > 1:                                            # W padded shards, flat
                parts["gather_buffer"] += world * _shard(shape[0], row * compute, world)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    parts["rope"] = 2 * (head_dim // 2) * 4            # inv_freq, original_inv_freq: float32
    unquantized = n["embeddings"] + n["norms"] + n["biases"]
    parts["gathered_root"] = unquantized * compute     # the root unit, unsharded for the step
    tokens = -(-batch_tokens // world)                               # the rank's share
    parts["activations"] = tokens * activation_bytes(config, method, r, compute_dtype or dtype)
    parts["loss_gradients"] = tokens * 2 * config["vocab_size"] * 4   # two float32 [T, V]
    parts["runtime"] = runtime
    return {**parts, "total": sum(parts.values())}


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
