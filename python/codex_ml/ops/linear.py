"""linear(x, weight, bias) = x @ weight^T + bias, the projections of the model, as one custom op on the CPU.

Why an op for what F.linear does: PyTorch sends fp32 CPU products to MKL, which picks its kernels by CPU vendor
and runs a slower generic path on AMD CPUs. The C++ kernel kernels/linear/linear.cc sends them to
kernels/common/cpu_gemm.h instead: oneDNN (also inside libtorch) on x86-64 CPUs with AVX-512 that are not
Intel's, ATen's MKL elsewhere, CODEX_CPU_GEMM=aten|onednn to choose. The backward computes grad_x = g @ weight and
grad_weight = g^T @ x with the same backend, and only the gradients autograd asks for; a backward that builds a
graph (create_graph=True) uses differentiable ATen products instead, so higher-order gradients work. No
forward-mode AD (jvp), like the other custom ops. Implementations, chosen
by codex_ml.ops.dispatch (docs/kernels.md):
- "cpu" (default on fp32 CPU tensors outside autocast): the C++ kernel.
- "torch": F.linear, everywhere else (CUDA tensors, bf16/fp16, under autocast, which F.linear follows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from codex_ml.ops.dispatch import choose_impl, load_extension


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"linear expects x [..., H] and weight [V, H]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight [V, H] has H = {weight.shape[1]}: "
                         "weight must be [out_features, in_features]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [{weight.shape[0]}] for weight "
                         f"{tuple(weight.shape)}")
    tensors = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"linear takes floating-point tensors, got {name} of dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move them to one device")
        # Under autocast F.linear casts the operands itself; outside it they must agree, as for F.linear.
        if t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}: pass them in one dtype (or run under "
                             "torch.autocast)")


@torch.library.custom_op("codex_ml::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, H] @ weight [V, H]^T + bias [V] -> [N, V] contiguous, fp32 CPU tensors."""
    load_extension("linear")
    return torch.ops.codex_ml_cpu.linear(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("codex_ml::linear_backward", mutates_args=())
def _linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x like x, grad_weight like weight, grad_bias [V]) contiguous; 0-element tensors where mask is False."""
    load_extension("linear")
    return torch.ops.codex_ml_cpu.linear_backward(grad, x, weight, mask)


@_linear_backward_op.register_fake
def _(grad, x, weight, mask):
    def shaped(wanted: bool, shape) -> torch.Tensor:
        return x.new_empty(shape if wanted else (0,))
    return shaped(mask[0], x.shape), shaped(mask[1], weight.shape), shaped(mask[2], (weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    wants_x, wants_w, wants_b = ctx.needs_input_grad
    mask = [wants_x, wants_w, wants_b and ctx.has_bias]
    if torch.is_grad_enabled():
        # backward(create_graph=True): the same products as differentiable ATen ops, so that higher-order
        # gradients exist (the C++ backward has no formula of its own).
        return (grad @ weight if mask[0] else None, grad.t() @ x if mask[1] else None,
                grad.sum(0) if mask[2] else None)
    grad_x, grad_w, grad_b = _linear_backward_op(grad.contiguous(), x, weight, mask)
    return grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _unfit(choice: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why `choice` cannot take these inputs beyond their device, or None: the C++ kernel computes fp32 products
    (autocast's would be in half precision; ATen's bf16 products are oneDNN's already)."""
    if choice != "cpu":
        return None
    tensors = [t for t in (x, weight, bias) if t is not None]
    if all(t.dtype == torch.float32 for t in tensors) and not torch.is_autocast_enabled("cpu"):
        return None
    return (f"takes fp32 CPU tensors outside autocast, got {', '.join(f'{t.dtype} on {t.device}' for t in tensors)}"
            f"{' under autocast' if torch.is_autocast_enabled('cpu') else ''}; use impl='torch'")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           impl: str | None = None) -> torch.Tensor:
    """x [..., H] @ weight[V, H]^T (+ bias [V]) -> [..., V], as F.linear; differentiable in all three."""
    _check(x, weight, bias)
    if choose_impl("linear", x.device, impl, lambda choice: _unfit(choice, x, weight, bias)) == "torch":
        return F.linear(x, weight, bias)
    y = _linear_op(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
