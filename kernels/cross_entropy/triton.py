"""Triton kernel: softmax cross-entropy of logit rows, with the gradient written over the logits in place.

One program per row, two passes over the vocabulary in BLOCK-wide tiles: the first keeps a running
max and sum (online softmax) for the log-sum-exp, the second writes d(scale * loss)/dlogit. Used by
codex_ml.ops.cross_entropy on each chunk of logits (the matrix products stay in cuBLAS). Arithmetic is fp32
whatever the logits' dtype (the interpreter gets raw bf16 arithmetic wrong, and so would accuracy).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, stride, target_ptr, scale_ptr, loss_ptr, lse_ptr,
    V, ignore_index, smoothing, z_loss, softcap,
    HAS_GRAD: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    t = tl.load(target_ptr + row)
    if t == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(base + cols, tl.zeros([BLOCK], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < V)
        return
    m = -float("inf")
    s = 0.0
    zsum = 0.0
    zt = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_CAP:
            z = softcap * (2.0 / (1.0 + tl.exp(-2.0 * z / softcap)) - 1.0)  # softcap * tanh(z / softcap)
            z = tl.where(mask, z, -float("inf"))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would be NaN.
        shift = tl.where(new_m == -float("inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = new_m
        zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        zt += tl.sum(tl.where(cols == t, z, 0.0), axis=0)
    lse = m + tl.log(s)
    # The smoothing term only where there is smoothing: 0 * zsum is NaN when a logit is -inf (masked).
    loss = lse - (1.0 - smoothing) * zt + z_loss * lse * lse - tl.where(smoothing > 0.0, smoothing * zsum / V, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if HAS_GRAD:
        scale = tl.load(scale_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = softcap * (2.0 / (1.0 + tl.exp(-2.0 * z / softcap)) - 1.0)
            g = scale * (1.0 + 2.0 * z_loss * lse) * tl.exp(z - lse) - scale * smoothing / V
            g = tl.where(cols == t, g - scale * (1.0 - smoothing), g)
            if HAS_CAP:
                g = g * (1.0 - (z / softcap) * (z / softcap))
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor | None, *,
                       ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                       block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) of logits [N, V] (contiguous rows); with row_scale, logits become the gradient."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows needs logits with contiguous rows")
    target = target.contiguous()  # the kernel reads target[row] at stride 1
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    scale = row_scale.float().contiguous() if row_scale is not None else loss  # unused without HAS_GRAD
    block = min(block, triton.next_power_of_2(v))
    _cross_entropy_rows_kernel[(n,)](
        logits, logits.stride(0), target, scale, loss, lse, v, ignore_index, label_smoothing, z_loss, softcap,
        HAS_GRAD=row_scale is not None, HAS_CAP=softcap > 0, BLOCK=block,
    )
    return loss, lse


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) triples that the build compiles for sm_80 and sm_90."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for has_grad in (True, False):
            signature = {
                "logits_ptr": f"*{dtype}", "stride": "i64", "target_ptr": "*i64", "scale_ptr": "*fp32",
                "loss_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "ignore_index": "i64", "smoothing": "fp32",
                "z_loss": "fp32", "softcap": "fp32", "HAS_GRAD": "constexpr", "HAS_CAP": "constexpr",
                "BLOCK": "constexpr",
            }
            constexprs = {"HAS_GRAD": has_grad, "HAS_CAP": True, "BLOCK": 1024}
            specs.append((_cross_entropy_rows_kernel, signature, constexprs))
    return specs
