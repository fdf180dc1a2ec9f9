"""The float64 attention reference shared by attention_test.py and attention_gpu_test.py."""

import torch


def reference(q, k, v, *, causal, window, scale):
    """softmax(q k^T * scale + mask) v with K/V heads repeated for grouped-query attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = q.shape[2]
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    allowed = dist >= 0 if causal else torch.ones(t, t, dtype=torch.bool)
    if window:
        allowed = allowed & ((dist < window) if causal else (dist.abs() < window))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def rel_err(actual, expected):
    """Relative L2 error (on the CPU, in float64); absolute where the reference is exactly zero (dk when T = 1)."""
    diff, norm = (actual.double().cpu() - expected).norm().item(), expected.norm().item()
    return diff / norm if norm > 0 else diff
