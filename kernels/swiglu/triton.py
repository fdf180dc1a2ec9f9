"""Triton kernels: SwiGLU, silu(gate) * up, forward and backward (the formulas of kernels/swiglu/swiglu.cc).

    forward   out = gate * s * up,  s = sigmoid(gate)
    backward  d_gate = g * up * s * (1 + gate * (1 - s)),  d_up = g * gate * s

Elementwise over gate and up (one shape and dtype: fp32, bf16 or fp16), both taken as flat contiguous
arrays: one program per BLOCK elements, masked past the end. The backward recomputes s from gate (nothing
else is saved). Arithmetic is fp32 whatever the dtype (the interpreter gets raw bf16 arithmetic wrong).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) from e = exp(-|x|) <= 1, which never overflows (as the C++ kernel computes it)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (gate * _sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(gate)
    gs = gate * s
    tl.store(d_up_ptr + offs, (g * gs).to(d_up_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gate_ptr + offs, (g * up * (s + gs * (1.0 - s))).to(d_gate_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, contiguous, in gate's dtype, for gate and up of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
    return out


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up), contiguous, in gate's dtype, for grad of the output (gate's shape and dtype)."""
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad, gate, up, d_gate, d_up, n, BLOCK=BLOCK)
    return d_gate, d_up


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) triples that the build compiles for sm_80 and sm_90: fp32, bf16, fp16."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        ptr = f"*{dtype}"
        specs.append((_swiglu_fwd_kernel, {"gate_ptr": ptr, "up_ptr": ptr, "out_ptr": ptr, "N": "i64",
                                           "BLOCK": "constexpr"}, {"BLOCK": BLOCK}))
        specs.append((_swiglu_bwd_kernel, {"grad_ptr": ptr, "gate_ptr": ptr, "up_ptr": ptr, "d_gate_ptr": ptr,
                                           "d_up_ptr": ptr, "N": "i64", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}))
    return specs
