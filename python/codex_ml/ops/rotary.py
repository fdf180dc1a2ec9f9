"""rotary(x, cos, sin): rotary position embeddings (rotate-half convention) as one custom op.

y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]), for x [B, H, T, D]
and position tables cos, sin [T, D] (halves duplicated, as codex_ml.models.gpt.rope_tables makes them): the
formula of Llama's rotary embedding (codex_ml.models.gpt.apply_rope calls this op). In the model x is a
transposed view (q = proj(x).view(B, T, H, D).transpose(1, 2)); any x whose last dim is contiguous is read in
place, and the output and the gradient of x are allocated with x's strides, so no copy is made either way.
Only x gets a gradient (cos and sin are tables). Implementations, chosen by
codex_ml.ops.dispatch (docs/kernels.md):
- "cpu" (default on CPU tensors): the C++ kernel kernels/rotary/rotary.cc.
- "triton" (default on CUDA tensors; on CPU tensors in the Triton interpreter): the kernel of
  codex_ml.kernels.rotary.triton, strided like the C++ one.
- "torch": the eager formula, on any device: the fallback where Triton is missing.
"""

from __future__ import annotations

import torch

from codex_ml.ops.dispatch import choose_impl, run_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"rotary expects x [B, H, T, D], got shape {tuple(x.shape)}")
    t, d = x.shape[2], x.shape[3]
    if d % 2:
        raise ValueError(f"rotary needs an even head dim D (it rotates pairs (i, i + D/2)), got D = {d}")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (t, d):
            raise ValueError(f"{name} must be [T, D] = [{t}, {d}] for x {tuple(x.shape)}, got {tuple(table.shape)}: "
                             "slice the tables to the positions of x (e.g. rope_cos[start:start + T])")
        if table.device != x.device:
            raise ValueError(f"{name} is on {table.device} but x is on {x.device}: move them to one device")
        if not table.is_floating_point():
            raise ValueError(f"{name} has dtype {table.dtype}: the tables must be floating point (fp32)")
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}: rotary supports fp32, bf16 and fp16")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rotary has no gradient for cos and sin (position tables): pass tables that do not "
                         "require grad (buffers, or .detach() them)")


def _with_strides(y: torch.Tensor, strides: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """y in dtype with the given strides (those the fake implementations promise): y itself when it has them."""
    if y.dtype == dtype and y.stride() == tuple(strides):
        return y
    return y.new_empty_strided(y.shape, strides, dtype=dtype).copy_(y)


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return _with_strides(x * cos + rotated * sin, torch.empty_like(x, device="meta").stride(), x.dtype)


def _rotate_backward_torch(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           strides: list[int]) -> torch.Tensor:
    half = grad.shape[-1] // 2
    g = grad.float()
    lo, hi = g[..., :half], g[..., half:]
    gx = torch.cat([lo * cos[:, :half] + hi * sin[:, half:], hi * cos[:, half:] - lo * sin[:, :half]], -1)
    return _with_strides(gx, tuple(strides), grad.dtype)


@torch.library.custom_op("codex_ml::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str) -> torch.Tensor:
    """x rotated by position, with x's strides and dtype (x made contiguous first where x.stride(-1) != 1, as
    the fake says), cos/sin fp32 [T, D]."""
    x = _last_dim_dense(x)
    return run_kernel(impl, "rotary", "rotary", "rotary_forward", _rotate_torch, x, cos, sin)


@_rotary_op.register_fake
def _(x, cos, sin, impl):
    return torch.empty_like(_last_dim_dense(x))


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension with stride 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("codex_ml::rotary_backward", mutates_args=())
def _rotary_backward_op(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strides: list[int],
                        impl: str) -> torch.Tensor:
    """The gradient of x (the transposed rotation of grad), allocated with `strides` (the forward output's)."""
    return run_kernel(impl, "rotary", "rotary_backward", "rotary_backward", _rotate_backward_torch, grad, cos, sin,
                      strides)


@_rotary_backward_op.register_fake
def _(grad, cos, sin, strides, impl):
    return grad.new_empty_strided(grad.shape, strides)


def _setup_context(ctx, inputs, output):
    x, cos, sin, impl = inputs
    ctx.save_for_backward(cos, sin)
    ctx.strides, ctx.impl = list(output.stride()), impl


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return _rotary_backward_op(grad, cos, sin, ctx.strides, ctx.impl), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """x [B, H, T, D] (D even) rotated by the tables cos, sin [T, D]: x * cos + rotate_half(x) * sin.

    Returns [B, H, T, D] in x's dtype with x's strides when x.stride(-1) == 1 (otherwise x is made contiguous
    first); fp32 arithmetic inside. Tables in another floating dtype are used in fp32. Differentiable in x only.
    """
    _check(x, cos, sin)
    cos, sin = cos.float(), sin.float()
    return _rotary_op(x, cos, sin, choose_impl("rotary", x.device, impl))
