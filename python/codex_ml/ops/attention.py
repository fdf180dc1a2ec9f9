"""attention(q, k, v): interim PyTorch implementation, replaced by the fused-kernel op (issue 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Softmax attention. q [B, Hq, T, D], k and v [B, Hkv, T, D] with Hkv dividing Hq; returns [B, Hq, T, D]."""
    t = q.shape[-2]
    mask = None
    if window is not None:
        i = torch.arange(t, device=q.device)
        dist = i[:, None] - i[None, :]
        mask = (dist >= 0) & (dist < window) if causal else dist.abs() < window
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
