"""Losses: interim PyTorch implementation, replaced by the fused-kernel ops (issue 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits [N, V] against target [N]."""
    return F.cross_entropy(
        logits.float(), target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of F.linear(hidden [N, H], weight [V, H], bias) against target [N]."""
    return cross_entropy(
        F.linear(hidden, weight, bias), target, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
