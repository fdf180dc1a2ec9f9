"""A registry of evaluation metrics. Register a function by name; select it by name from gin.

A metric function takes `logits` [B, T, V] (float) and `targets` [B, T] (int64, -100 = ignored) and returns
`(total, count)` tensors; the reported value is `transform(sum of totals / sum of counts)` over all batches
(and processes), so metrics aggregate exactly however the data is split. Example:

    @register_metric("top5_accuracy")
    def top5_accuracy(logits, targets):
        mask = targets != IGNORE_INDEX
        hit = (logits.topk(5, dim=-1).indices == targets.unsqueeze(-1)).any(-1) & mask
        return hit.sum(), mask.sum()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MetricFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    transform: Callable[[float], float] | None = None


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, transform: Callable[[float], float] | None = None) -> Callable[[MetricFn], MetricFn]:
    """Decorator: registers `fn(logits, targets) -> (total, count)` as the metric `name`."""

    def decorator(fn: MetricFn) -> MetricFn:
        if name in _METRICS and _METRICS[name].fn is not fn:
            raise ValueError(f"A metric named {name!r} is already registered ({_METRICS[name].fn.__qualname__}).")
        _METRICS[name] = Metric(name, fn, transform)
        return fn

    return decorator


def get_metric(name: str) -> Metric:
    """The registered metric `name`; a clear error listing the valid names otherwise."""
    if name not in _METRICS:
        raise ValueError(f"Unknown metric {name!r}; registered metrics: {', '.join(sorted(_METRICS))}.")
    return _METRICS[name]


def registered_metrics() -> list[str]:
    return sorted(_METRICS)


def _token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return losses, (targets != IGNORE_INDEX).sum()


@register_metric("loss")
def loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy (nats)."""
    return _token_cross_entropy_sum(logits, targets)


def _safe_exp(x: float) -> float:
    return math.exp(min(x, 700.0))


@register_metric("perplexity", transform=_safe_exp)
def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(mean token cross-entropy)."""
    return _token_cross_entropy_sum(logits, targets)


@register_metric("token_accuracy")
def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of tokens whose argmax prediction is the target."""
    mask = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) & mask).sum(), mask.sum()
