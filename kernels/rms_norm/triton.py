"""Triton kernels: RMSNorm over the last dim, forward and backward (the formulas of kernels/rms_norm/rms_norm.cc).

    forward   y = (x * r).to(x.dtype) * w,  r = rsqrt(mean(x^2) + eps) per row (saved, fp32)
    backward  n = x * r,  dx = r * (g * w - n * mean(g * w * n)),  dw = sum over rows of g * n.to(x.dtype)

x [rows, H] contiguous in fp32, bf16 or fp16; y in promote(x, w), dx in x's dtype. Each row is one BLOCK_H =
next_power_of_2(H) tile held whole (masked past H), so H is at most MAX_H.
- Forward: one program per row.
- Backward: a fixed number of programs (the SM count on a GPU), each over a contiguous range of rows: dx row
  by row, and the weight gradient accumulated in registers as that program's fp32 partial sum, stored to
  row pid of a [programs, H] buffer that the caller sums over programs (no atomics, a deterministic result;
  as in Liger-Kernel's rms_norm).
Arithmetic is fp32 whatever the dtypes (the interpreter gets raw bf16 arithmetic wrong, and so would accuracy).
"""

import torch
import triton
import triton.language as tl

MAX_H = 65536  # one row per tile: beyond this a row no longer fits in registers


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, r)
    n = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype first, as the eager module does
    tl.store(y_ptr + row * H + cols, (n * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, H, rows_per_program,
                         BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    start = first.to(tl.int64) * H
    g_ptr += start
    x_ptr += start
    dx_ptr += start
    for row in range(first, last):
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + row)
        n = x * r
        gw = g * w
        c = tl.sum(gw * n, axis=0) / H  # mean(g * w * n)
        tl.store(dx_ptr + cols, (r * (gw - n * c)).to(dx_ptr.dtype.element_ty), mask=mask)
        dw += g * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        g_ptr += H
        x_ptr += H
        dx_ptr += H
    tl.store(dw_partial_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _block_and_warps(h: int) -> tuple[int, int]:
    """The row tile (next power of 2 of H) and the warps to spread it over (more for wider rows)."""
    if h > MAX_H:
        raise ValueError(f"the Triton rms_norm holds a row of H <= {MAX_H} features in one tile, got H = {h}: "
                         "use impl='torch' for wider rows")
    block = triton.next_power_of_2(h)
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., H] contiguous in promote(x, weight), rstd [rows] fp32) for x [..., H] and weight [H]."""
    h = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = xc.numel() // h
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block, warps = _block_and_warps(h)
    _rms_norm_fwd_kernel[(rows,)](xc, weight.contiguous(), y, rstd, h, eps, BLOCK_H=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, contiguous; dweight like weight, summed over rows in fp32) for grad [..., H] in y's dtype."""
    h = x.shape[-1]
    xc, gc = x.contiguous(), grad.contiguous()
    rows = xc.numel() // h
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block, warps = _block_and_warps(h)
    if x.device.type == "cuda":
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 4  # the interpreter runs programs one after another: a few suffice
    programs = min(programs, rows)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    dw_partial = torch.empty(programs, h, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](gc, xc, weight.contiguous(), rstd.contiguous(), dx, dw_partial, rows, h,
                                      rows_per_program, BLOCK_H=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs, options) that the build compiles for sm_80 and sm_90: x in fp32, bf16, fp16
    (y in x's dtype, and fp32 for a bf16/fp16 x with an fp32 weight), H up to 4096, with the launch's warps."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for w_dtype, y_dtype in [(dtype, dtype)] + ([("fp32", "fp32")] if dtype != "fp32" else []):
            fwd = {"x_ptr": f"*{dtype}", "w_ptr": f"*{w_dtype}", "y_ptr": f"*{y_dtype}", "rstd_ptr": "*fp32",
                   "H": "i32", "eps": "fp32", "BLOCK_H": "constexpr"}
            bwd = {"g_ptr": f"*{y_dtype}", "x_ptr": f"*{dtype}", "w_ptr": f"*{w_dtype}", "rstd_ptr": "*fp32",
                   "dx_ptr": f"*{dtype}", "dw_partial_ptr": "*fp32", "rows": "i32", "H": "i32",
                   "rows_per_program": "i32", "BLOCK_H": "constexpr"}
            for h in (1024, 4096):
                block, warps = _block_and_warps(h)
                specs.append((_rms_norm_fwd_kernel, fwd, {"BLOCK_H": block}, {"num_warps": warps}))
                specs.append((_rms_norm_bwd_kernel, bwd, {"BLOCK_H": block}, {"num_warps": warps}))
    return specs
