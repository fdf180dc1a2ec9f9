"""Triton kernel: rotary position embedding (rotate-half convention), forward and backward (the formulas of
kernels/rotary/rotary.cc), for x [B, H, T, D] with D even and tables cos, sin [T, D] (fp32, contiguous):

    forward   y[i] = x[i] cos[i] - x[i + D/2] sin[i],  y[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
    backward  gx[i] = g[i] cos[i] + g[i + D/2] sin[i + D/2],  gx[i + D/2] = g[i + D/2] cos[i + D/2] - g[i] sin[i]

(i < D/2), one kernel with BACKWARD choosing the rotation or its transpose, as the C++ template does. Input and
output are read and written through their own strides of the first three dims (the last must be 1): in the
model x is a transposed view of a projection, and the output and the gradient take x's strides, so neither
side is copied. One program per (b, h, block of BLOCK_T positions): a [BLOCK_T, BLOCK_HALF] tile of each half
of the rows, masked past T and D/2. Arithmetic is fp32 (the interpreter gets raw bf16 arithmetic wrong).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    in_ptr, out_ptr, cos_ptr, sin_ptr,
    in_sb, in_sh, in_st, out_sb, out_sh, out_st,
    H, T, HALF, T_BLOCKS,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = (pid // T_BLOCKS).to(tl.int64)
    b, h = bh // H, bh % H
    offs_t = (pid % T_BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < HALF)
    t64 = offs_t.to(tl.int64)[:, None]
    src = in_ptr + b * in_sb + h * in_sh + t64 * in_st + offs_d[None, :]
    dst = out_ptr + b * out_sb + h * out_sh + t64 * out_st + offs_d[None, :]
    table = t64 * (2 * HALF) + offs_d[None, :]
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    cos_lo = tl.load(cos_ptr + table, mask=mask, other=0.0)
    cos_hi = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0)
    sin_lo = tl.load(sin_ptr + table, mask=mask, other=0.0)
    sin_hi = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0)
    if BACKWARD:
        out_lo = lo * cos_lo + hi * sin_hi
        out_hi = hi * cos_hi - lo * sin_lo
    else:
        out_lo = lo * cos_lo - hi * sin_lo
        out_hi = hi * cos_hi + lo * sin_hi
    tl.store(dst, out_lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, out_hi.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(src: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """out = the rotation of src (backward: its transpose); both [B, H, T, D] with stride(-1) == 1."""
    b, h, t, d = src.shape
    if src.numel() == 0:
        return
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_t = min(triton.next_power_of_2(t), max(1, 2048 // block_half))  # tiles of about 2 x 2048 elements
    t_blocks = triton.cdiv(t, block_t)
    _rotary_kernel[(b * h * t_blocks,)](
        src, out, cos.contiguous(), sin.contiguous(), *src.stride()[:3], *out.stride()[:3], h, t, half, t_blocks,
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_HALF=block_half,
    )


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (x.stride(-1) == 1) rotated by fp32 tables cos, sin [T, D]; x's dtype and strides."""
    out = torch.empty_like(x)
    _rotate(x, out, cos, sin, backward=False)
    return out


def rotary_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """The gradient of x for grad [B, H, T, D] of the output, in grad's dtype, allocated with `strides`."""
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    gx = torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)
    _rotate(grad, gx, cos, sin, backward=True)
    return gx


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) triples that the build compiles for sm_80 and sm_90: fp32, bf16, fp16,
    forward and backward, D = 64 and 128."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        signature = {"in_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                     **{name: "i64" for name in ("in_sb", "in_sh", "in_st", "out_sb", "out_sh", "out_st")},
                     "H": "i32", "T": "i32", "HALF": "i32", "T_BLOCKS": "i32",
                     "BACKWARD": "constexpr", "BLOCK_T": "constexpr", "BLOCK_HALF": "constexpr"}
        for backward in (False, True):
            for block_half in (32, 64):
                specs.append((_rotary_kernel, signature,
                              {"BACKWARD": backward, "BLOCK_T": 2048 // block_half, "BLOCK_HALF": block_half}))
    return specs
