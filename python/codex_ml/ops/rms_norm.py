"""rms_norm(x, weight, eps): RMSNorm over the last dim, as one custom op with a fused backward.

y = (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype) * weight, in torch.promote_types(x.dtype, weight.dtype):
the formula of Llama's RMSNorm (codex_ml.models.gpt.RMSNorm calls this op). The forward keeps
rstd = rsqrt(mean(x^2) + eps) (fp32, one per row) for the backward. Implementations, chosen by
codex_ml.ops.dispatch (docs/kernels.md):
- "cpu" (default on CPU tensors): the C++ kernel kernels/rms_norm/rms_norm.cc, one pass over x each way.
- "triton" (default on CUDA tensors; on CPU tensors in the Triton interpreter): the kernels of
  codex_ml.kernels.rms_norm.triton, one row per tile (H <= 65536).
- "torch": the eager PyTorch formula, on any device: the fallback where Triton is missing.
"""

from __future__ import annotations

import math

import torch

from codex_ml.ops.dispatch import choose_impl, run_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() < 1 or weight.dim() != 1:
        raise ValueError(f"rms_norm expects x [..., H] and weight [H]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight has {weight.shape[0]}: "
                         "weight must be [H] for x [..., H]")
    if x.shape[-1] == 0:
        raise ValueError("rms_norm needs at least one feature (H = 0)")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}: rms_norm supports fp32, bf16 and fp16")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}: move them to one device")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = (x32 * rstd).to(x.dtype) * weight
    return y.contiguous(), rstd.reshape(-1)


def _backward_torch(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.float() * rstd.view(*x.shape[:-1], 1)
    g = grad.float()
    gn = g * weight.float()
    gx = rstd.view(*x.shape[:-1], 1) * (gn - n * (gn * n).mean(-1, keepdim=True))
    gw = (g * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return gx.to(x.dtype).contiguous(), gw.to(weight.dtype)


@torch.library.custom_op("codex_ml::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., H] contiguous in promote(x, weight), rstd [rows] fp32)."""
    return run_kernel(impl, "rms_norm", "rms_norm", "rms_norm_forward", _forward_torch, x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps, impl):
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(math.prod(x.shape[:-1]), dtype=torch.float32)


@torch.library.custom_op("codex_ml::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x like x, contiguous; grad_weight like weight), the weight gradient summed in fp32."""
    return run_kernel(impl, "rms_norm", "rms_norm_backward", "rms_norm_backward", _backward_torch, grad, x, weight,
                      rstd)


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, impl):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps, impl = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.impl = impl


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _rms_norm_backward_op(grad_y, x, weight, rstd, ctx.impl)
    return grad_x, grad_weight, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, impl: str | None = None) -> torch.Tensor:
    """RMSNorm of x [..., H] with weight [H]: (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) * weight.

    fp32 arithmetic inside; returns [..., H] in torch.promote_types(x.dtype, weight.dtype), as the eager
    Llama's RMSNorm does. Differentiable in x and weight.
    """
    _check(x, weight, eps)
    y, _ = _rms_norm_op(x, weight, float(eps), choose_impl("rms_norm", x.device, impl))
    return y
