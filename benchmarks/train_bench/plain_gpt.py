"""The plain-loop baseline's model: a nanoGPT-style decoder written with plain PyTorch modules.

Its math and parameter names are codex_ml GPT's (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, no
biases, tied embedding), so a codex_ml GPT state dict loads into it as is. Attention is
F.scaled_dot_product_attention with enable_gqa; forward returns the full [B, T, V] logits, as a nanoGPT-style
`logits, loss = model(x, y)` loop holds them through the backward pass; hidden(idx) returns what enters the output
projection, for a loss that fuses the projection (F.linear_cross_entropy).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.train_bench.spec import BenchSpec


class _RMSNorm(nn.RMSNorm):
    """nn.RMSNorm's weight, with codex_ml's formula written out: normalized in fp32, cast back, then scaled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).type_as(x)


class _PlainAttention(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = s.n_head, s.n_kv_head, s.d_model // s.n_head
        self.q_proj = nn.Linear(s.d_model, s.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(s.d_model, s.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(s.d_model, s.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_head * self.head_dim, s.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class _PlainMLP(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.gate_proj = nn.Linear(s.d_model, s.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(s.d_model, s.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(s.ffn_hidden, s.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _PlainBlock(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.attn_norm, self.attn = _RMSNorm(s.d_model, s.norm_eps), _PlainAttention(s)
        self.mlp_norm, self.mlp = _RMSNorm(s.d_model, s.norm_eps), _PlainMLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """nanoGPT-style decoder with codex_ml GPT's math and parameter names (so its state dict loads as is);
    forward(idx) -> full logits [B, T, V]; hidden(idx) -> the final norm's output [B, T, d_model]."""

    def __init__(self, s: BenchSpec):
        super().__init__()
        self.embed = nn.Embedding(s.vocab_size, s.d_model)
        self.blocks = nn.ModuleList(_PlainBlock(s) for _ in range(s.n_layer))
        self.norm = _RMSNorm(s.d_model, s.norm_eps)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        head_dim = s.d_model // s.n_head
        inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(s.seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(idx))
