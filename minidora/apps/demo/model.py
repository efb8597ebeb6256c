"""A small decoder-only transformer, nanoGPT style, for the demo.

Pre-norm blocks of causal self-attention and a GELU MLP, learned position embeddings, and an
output head tied to the token embedding. Every linear layer inside a block is named as in Llama
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``up_proj``, ``down_proj``) and has no bias, so
``minidora.wrap(model, method, target_modules=GPTConfig.TARGETS)`` adapts exactly those.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 31
    block_size: int = 64      # context length T
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128         # C; the MLP is 4 C wide

    TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"GPTConfig: n_embd={cfg.n_embd} must be a multiple of "
                             f"n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.n_head
        q = self.q_proj(x).view(B, T, h, C // h).transpose(1, 2)     # [B, h, T, C/h]
        k = self.k_proj(x).view(B, T, h, C // h).transpose(1, 2)     # [B, h, T, C/h]
        v = self.v_proj(x).view(B, T, h, C // h).transpose(1, 2)     # [B, h, T, C/h]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, T, C/h]
        y = y.transpose(1, 2).reshape(B, T, C)                       # [B, T, C]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))               # [B, T, 4C] -> [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Character-level language model.

    Args:
        cfg: sizes; the defaults give about 0.4 M parameters (the demo's own, ``DEMO_MODEL`` in
            :mod:`minidora.apps.demo.train`, about 0.1 M).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections down
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [B, T] int64 token ids, T <= block_size -> logits [B, T, vocab_size]."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"GPT.forward: sequence length {T} exceeds "
                             f"block_size={self.cfg.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)                        # [B, T, V]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy. x, y: [B, T] int64 -> scalar; targets equal to -100
        (F.cross_entropy's ignore_index) are left out of the mean."""
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
