"""attention(q, k, v): softmax attention with GQA, causal and sliding-window masks, as one custom op.

The op returns the output and keeps the log-sum-exp of each query row for the backward pass, which
recomputes the probabilities from it (never storing the T x T matrix). Implementations, chosen by
codex_ml.ops.dispatch (see docs/kernels.md, "Attention"):
- "triton" (default on CUDA tensors; on CPU tensors in the Triton interpreter): the FlashAttention-2
  kernels of codex_ml.kernels.attention.triton.
- "cuda": the tensor-core kernels of kernels/attention/attention.cu (libcodex_attention.so, through ctypes);
  bf16/fp16 only.
- "cpu" (default on CPU tensors): PyTorch's fused flash-attention kernel for CPU (the fastest correct
  CPU path measured, see docs/kernels.md); grouped K/V heads are broadcast to the query heads and their
  gradients summed back.
- "torch": a blocked PyTorch implementation for any device: query blocks of 128 rows, so memory is
  O(128 x T) per head, never T x T.
"""

from __future__ import annotations

import math

import torch

from codex_ml.ops.dispatch import choose_impl

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 128


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q [B, Hq, T, D] and k, v [B, Hkv, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head dim")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"the number of K/V heads ({k.shape[1]}) must divide the number of query heads ({hq})")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported: use one of {HEAD_DIMS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}: attention supports fp32, bf16 and fp16")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}: "
                             "pass q, k and v with one dtype on one device")
    # An integer: a fractional window would be truncated by the kernels, away from the documented j > i - window.
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive whole number of positions, got {window!r}")


def _mask(t_q: torch.Tensor, t_k: torch.Tensor, causal: bool, window: int) -> torch.Tensor | None:
    """Boolean [len(t_q), len(t_k)] of allowed (query, key) pairs, or None when all are allowed."""
    if not causal and window < 0:
        return None
    dist = t_q[:, None] - t_k[None, :]
    allowed = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if window > 0:
        allowed = allowed & (dist < window) if causal else allowed & (dist.abs() < window)
    return allowed


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return grad
    b, h, t, d = grad.shape
    return grad.view(b, h // groups, groups, t, d).sum(2)


# Sliding-window attention on the CPU runs the flash kernel on blocks of queries, each against only the keys
# its window can reach, so the additive mask is [block, block + window] instead of [T, T].
_CPU_WINDOW_BLOCK = 256


def _window_blocks(t: int, causal: bool, window: int):
    """(query slice, key slice) pairs covering [0, t) for a sliding window: every key a query may see is in
    its block's key slice, so each block's softmax is exact on its own."""
    for s in range(0, t, _CPU_WINDOW_BLOCK):
        e = min(t, s + _CPU_WINDOW_BLOCK)
        lo = max(0, s - window + 1)
        hi = e if causal else min(t, e + window - 1)
        yield slice(s, e), slice(lo, hi)


def _window_mask(qs: slice, ks: slice, causal: bool, window: int, dtype: torch.dtype, device) -> torch.Tensor:
    allowed = _mask(torch.arange(qs.start, qs.stop, device=device), torch.arange(ks.start, ks.stop, device=device),
                    causal, window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


# PyTorch's CPU flash kernel splits the keys in blocks of 512 and skips those above the diagonal, so up to
# about 768 positions a causal call computes (nearly) the whole square. In that range the query blocks of the
# window path, each against the keys it reaches, are no slower: 0.7-0.85x the time of fwd+bwd at T = 512,
# about the same at T = 384 and 640-768 on the development machine; at T >= 1024 the kernel's own skipping
# wins (1.1-1.3x).
_CPU_CAUSAL_SPLIT = (_CPU_WINDOW_BLOCK, 768)


def _cpu_window(t: int, causal: bool, window: int) -> int:
    """The window the CPU path runs: a causal attention without one in the range above gets window = t."""
    if causal and window < 0 and _CPU_CAUSAL_SPLIT[0] < t <= _CPU_CAUSAL_SPLIT[1]:
        return t
    return window


def _forward_cpu(q, k, v, causal, scale, window):
    """PyTorch's flash kernel: K/V heads shared natively (GQA), strided inputs read in place."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    window = _cpu_window(q.shape[2], causal, window)
    if window < 0:
        out, lse = flash(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float().contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for qs, ks in _window_blocks(q.shape[2], causal, window):
        mask = _window_mask(qs, ks, causal, window, q.dtype, q.device)
        block_out, block_lse = flash(q[:, :, qs], k[:, :, ks], v[:, :, ks], 0.0, False, attn_mask=mask, scale=scale)
        out[:, :, qs], lse[:, :, qs] = block_out, block_lse.float()
    return out, lse


def _backward_cpu(grad_out, q, k, v, out, lse, causal, scale, window):
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    grad_out = _last_dim_dense(grad_out)
    window = _cpu_window(q.shape[2], causal, window)
    if window < 0:
        return flash_backward(grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)
    dq = torch.empty_like(q)
    # Blocks overlap in keys: accumulate in fp32, laid out as k and v (as the op's fake says).
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    for qs, ks in _window_blocks(q.shape[2], causal, window):
        mask = _window_mask(qs, ks, causal, window, q.dtype, q.device)
        g_q, g_k, g_v = flash_backward(_last_dim_dense(grad_out[:, :, qs]), q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                       out[:, :, qs], lse[:, :, qs].contiguous(), 0.0, False, attn_mask=mask,
                                       scale=scale)
        dq[:, :, qs] = g_q
        dk[:, :, ks] += g_k
        dv[:, :, ks] += g_v
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _forward_blocked(q, k, v, causal, scale, window):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand(k, groups).float(), _expand(v, groups).float()
    t = q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    pos = torch.arange(t, device=q.device)
    for s in range(0, t, _BLOCK):
        qb = q[:, :, s:s + _BLOCK].float()
        scores = qb @ k.transpose(-1, -2) * scale
        allowed = _mask(pos[s:s + _BLOCK], pos, causal, window)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)
        out[:, :, s:s + _BLOCK] = torch.exp(scores - block_lse[..., None]) @ v
        lse[:, :, s:s + _BLOCK] = block_lse
    return out.to(q.dtype), lse


def _backward_blocked(grad_out, q, k, v, out, lse, causal, scale, window):
    groups = q.shape[1] // k.shape[1]
    kf, vf = _expand(k, groups).float(), _expand(v, groups).float()
    t = q.shape[2]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O)
    pos = torch.arange(t, device=q.device)
    for s in range(0, t, _BLOCK):
        qb, dob = q[:, :, s:s + _BLOCK].float(), grad_out[:, :, s:s + _BLOCK].float()
        scores = qb @ kf.transpose(-1, -2) * scale
        allowed = _mask(pos[s:s + _BLOCK], pos, causal, window)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.exp(scores - lse[:, :, s:s + _BLOCK, None])
        dv += p.transpose(-1, -2) @ dob
        ds = p * (dob @ vf.transpose(-1, -2) - delta[:, :, s:s + _BLOCK, None]) * scale
        dq[:, :, s:s + _BLOCK] = ds @ kf
        dk += ds.transpose(-1, -2) @ qb
    return dq.to(q.dtype), _fold(dk, groups).to(k.dtype), _fold(dv, groups).to(v.dtype)


@torch.library.custom_op("codex_ml::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, window: int,
                  impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, Hq, T, D], log-sum-exp [B, Hq, T] in fp32); window < 0 means no window."""
    if impl == "cpu":
        return _forward_cpu(q, k, v, causal, scale, window)
    if impl == "triton":
        from codex_ml.kernels.attention.triton import attention_forward
        return attention_forward(q, k, v, causal, scale, window)
    if impl == "cuda":
        from codex_ml.ops import _attention_cuda
        return _attention_cuda.forward(q, k, v, causal, scale, window)
    return _forward_blocked(q, k, v, causal, scale, window)


@_attention_op.register_fake
def _(q, k, v, causal, scale, window, impl):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("codex_ml::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, window: int,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), the probabilities recomputed from lse."""
    if impl == "cpu":
        return _backward_cpu(grad_out, q, k, v, out, lse, causal, scale, window)
    if impl == "triton":
        from codex_ml.kernels.attention.triton import attention_backward
        return attention_backward(grad_out.contiguous(), q, k, v, out, lse, causal, scale, window)
    if impl == "cuda":
        from codex_ml.ops import _attention_cuda
        return _attention_cuda.backward(grad_out.contiguous(), q, k, v, out, lse, causal, scale, window)
    return _backward_blocked(grad_out, q, k, v, out, lse, causal, scale, window)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale, window, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window, impl = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (causal, scale, window, impl)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _unfit(choice: str, q: torch.Tensor) -> str | None:
    if choice == "cuda" and q.dtype == torch.float32:
        return "runs bf16/fp16 tensor cores only, got fp32: pass bf16/fp16 tensors or use impl='triton' for fp32"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, Hq, T, D] and k, v [B, Hkv, T, D] (Hkv divides Hq).

    causal: query i sees keys j <= i. window: additionally only the `window` most recent keys
    (j > i - window); without causal, keys with |i - j| < window. scale defaults to 1/sqrt(D).
    Returns [B, Hq, T, D] in q's dtype (fp32 softmax inside).
    """
    _check(q, k, v, window)
    chosen = choose_impl("attention", q.device, impl, lambda choice: _unfit(choice, q))
    if q.shape[2] == 0:  # no positions; PyTorch's CPU attention kernel would divide by zero (SIGFPE)
        return q * 0.0
    if window is not None and window >= q.shape[2]:
        window = None  # a window of T or more masks nothing
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not 0.0 < scale < math.inf:
        raise ValueError(f"attention scale must be a finite positive number, got {scale} (None: 1/sqrt(D))")
    # The CPU kernel reads any layout whose last dimension is dense (e.g. the [B, T, H, D] -> [B, H, T, D]
    # transpose models make); the GPU kernels index contiguous [B, H, T, D].
    dense = _last_dim_dense if chosen == "cpu" else torch.Tensor.contiguous
    out, _ = _attention_op(dense(q), dense(k), dense(v), causal, scale, -1 if window is None else int(window),
                           chosen)
    return out
