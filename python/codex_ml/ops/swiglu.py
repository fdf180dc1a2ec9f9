"""swiglu(gate, up) = silu(gate) * up, the gated activation of a Llama-style MLP, as one custom op.

The backward recomputes sigmoid(gate) from the saved gate and up (nothing else is saved):
d_gate = g * up * s * (1 + gate * (1 - s)), d_up = g * gate * s, with s = sigmoid(gate). Implementations,
chosen by codex_ml.ops.dispatch (docs/kernels.md):
- "cpu" (default on CPU tensors): the C++ kernel kernels/swiglu/swiglu.cc (fp32 arithmetic, AVX2 exp where the
  CPU has it), one pass each way.
- "triton" (default on CUDA tensors; on CPU tensors in the Triton interpreter): the elementwise kernels of
  codex_ml.kernels.swiglu.triton.
- "torch": the eager formula F.silu(gate) * up, on any device: the fallback where Triton is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codex_ml.ops.dispatch import choose_impl, run_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu expects gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate is {gate.dtype} but up is {up.dtype}: pass both in one dtype")
    if gate.dtype not in DTYPES:
        raise ValueError(f"gate and up have dtype {gate.dtype}: swiglu supports fp32, bf16 and fp16")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device} but up is on {up.device}: move them to one device")


def _forward_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate) * up).contiguous()


def _backward_torch(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, u, dy = gate.float(), up.float(), grad.float()  # no copies for fp32
    d_gate = torch.ops.aten.silu_backward(dy * u, g)
    return d_gate.to(gate.dtype).contiguous(), (dy * F.silu(g)).to(up.dtype).contiguous()


@torch.library.custom_op("codex_ml::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, impl: str) -> torch.Tensor:
    """silu(gate) * up, contiguous, in gate's dtype."""
    return run_kernel(impl, "swiglu", "swiglu", "swiglu_forward", _forward_torch, gate, up)


@_swiglu_op.register_fake
def _(gate, up, impl):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("codex_ml::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up), contiguous, sigmoid(gate) recomputed."""
    return run_kernel(impl, "swiglu", "swiglu_backward", "swiglu_backward", _backward_torch, grad, gate, up)


@_swiglu_backward_op.register_fake
def _(grad, gate, up, impl):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, impl = inputs
    ctx.save_for_backward(gate, up)
    ctx.impl = impl


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _swiglu_backward_op(grad, gate, up, ctx.impl)
    return d_gate, d_up, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape and dtype (fp32, bf16, fp16); returns that shape and dtype.

    Differentiable in both; fp32 arithmetic inside the CPU and Triton kernels.
    """
    _check(gate, up)
    return _swiglu_op(gate, up, choose_impl("swiglu", gate.device, impl))
