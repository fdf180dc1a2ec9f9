"""Evaluation of a language model over a number of batches with registered metrics."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from codex_ml.eval.metrics import get_metric


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    num_batches: int,
    metrics: Sequence[str] = ("loss", "perplexity", "token_accuracy"),
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Computes each metric over up to `num_batches` batches ({"input_ids", "targets"}: int64 [B, T]).

    The model is called as `model(input_ids)` and must return `(logits [B, T, V], _)`. Under
    torch.distributed the totals are summed across processes, so every rank returns the same values.
    The model's train/eval mode is restored afterwards.
    """
    chosen = [get_metric(name) for name in metrics]
    device = torch.device(device)
    totals = torch.zeros(len(chosen), 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(batches, num_batches):  # takes no batch beyond the last one used
            inputs = batch["input_ids"].to(device, non_blocking=True)
            targets = batch["targets"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, _ = model(inputs)
            logits = logits.float()
            for row, metric in enumerate(chosen):
                total, count = metric.fn(logits, targets)
                totals[row, 0] += total.double()
                totals[row, 1] += count.double()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    results = {}
    for row, metric in enumerate(chosen):
        total, count = totals[row].tolist()
        value = total / count if count else float("nan")
        results[metric.name] = metric.transform(value) if metric.transform else value
    return results
