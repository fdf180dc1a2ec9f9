"""A decoder-only transformer (Llama-style): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Attention and the loss go through codex_ml.ops, so training runs on the fused kernels and never holds
the [tokens, vocabulary] logits. Initialization: every weight ~ N(0, init_std), with the output
projections of attention and MLP scaled by 1/sqrt(2 * n_layer) (GPT-2's residual scaling); norms at 1.
Rotary embeddings use the rotate-half layout of Hugging Face's Llama, so weights export unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from codex_ml import ops
from codex_ml.ops.attention import HEAD_DIMS


class GPTConfigError(ValueError):
    """A GPTConfig that no GPT can be built from; the message names the field and the fix."""


@dataclass
class GPTConfig:
    """Sizes of the native GPT (vocab_size is set from the tokenizer by the trainer)."""

    vocab_size: int = 8000
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 256
    ffn_hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len", "ffn_hidden"):
            if name == "ffn_hidden" and self.ffn_hidden is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise GPTConfigError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.init_std > 0 or not self.norm_eps > 0 or not self.rope_theta > 0:
            raise GPTConfigError(f"GPTConfig init_std, norm_eps and rope_theta must be positive, got "
                                 f"{self.init_std}, {self.norm_eps} and {self.rope_theta}")
        if self.d_model % self.n_head:
            raise GPTConfigError(f"GPTConfig.d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise GPTConfigError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim not in HEAD_DIMS:  # found here, not at the first forward pass
            raise GPTConfigError(f"GPTConfig d_model / n_head = {self.head_dim} is not a head dim the attention "
                                 f"kernels run ({', '.join(map(str, HEAD_DIMS))}): change d_model or n_head")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x * rsqrt(mean(x^2) + eps)).type_as(x) * weight, fused (codex_ml.ops.rms_norm).
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose product is codex_ml.ops.linear: on the CPU, the GEMM
    backend that is faster on this CPU's vendor; elsewhere F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, head_dim] for rotate-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, H, T, D] by position; cos/sin are [T, D]: x * cos + rotate_half(x) * sin, fused
    (codex_ml.ops.rotary), keeping x's strides."""
    return ops.rotary(x, cos, sin)


class KVCache:
    """Keys and values of past positions, per layer, for incremental decoding."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.k_proj = Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = Linear(config.n_head * self.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = ops.attention(q, k, v, causal=True)
        else:
            k, v = cache.update(layer, k, v)
            # The new queries sit at positions start..start+t-1 of the cached keys: mask by position.
            positions = torch.arange(start + t, device=x.device)
            allowed = positions[None, :] <= positions[start:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The decoder-only transformer; forward(idx, targets) -> (logits, loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_config_dict(cls, d: dict) -> GPT:
        """A freshly initialized GPT from GPTConfig.to_dict() output (unknown keys such as "architecture" ignored)."""
        return cls(GPTConfig.from_dict(d))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                      sparse_embedding_grad: bool = False) -> torch.Tensor:
        """Final-norm hidden states [B, T, d_model] of tokens idx [B, T] (after `cache.length` cached ones).

        sparse_embedding_grad: the embedding's gradient is a sparse tensor (only for a weight that also gets a
        dense gradient, which autograd then adds it to; see forward)."""
        start = cache.length if cache is not None else 0
        t = idx.shape[1]
        if start + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than the model's context "
                             f"max_seq_len={self.config.max_seq_len}: shorten the prompt")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = F.embedding(idx, self.embed.weight, sparse=sparse_embedding_grad)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, start)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits [B, T, V], None) without targets; (None, mean loss over targets != -100) with them."""
        # Tied weights: the output layer's gradient is dense, and autograd adds a sparse embedding gradient to it
        # (one copy of [V, d_model]; PyTorch's input buffers add a sparse gradient to a dense one out of place),
        # instead of a zero-filled [V, d_model] embedding gradient plus a full add (eager only: inductor has no
        # sparse tensors).
        tied = self.lm_head.weight is self.embed.weight
        sparse = targets is not None and tied and self.embed.weight.requires_grad and not torch.compiler.is_compiling()
        h = self.hidden_states(idx, cache, sparse_embedding_grad=sparse)
        if targets is None:
            return self.lm_head(h), None
        loss = ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        return None, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter plus attention (PaLM appendix B)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:  # the shared weight was excluded above, but as the output projection it does matmul work
            n += c.vocab_size * c.d_model
        return 6.0 * n + 12.0 * c.n_layer * c.d_model * seq_len
