"""Triton kernels: FlashAttention-2 style softmax attention, forward and backward.

Layout: q, o, do [B, Hq, T, D] and k, v [B, Hkv, T, D], all contiguous; query head h reads K/V
head h // (Hq / Hkv) (grouped-query attention). Masks: causal (key j <= query i) and an optional
window (causal: i - j < WINDOW; otherwise |i - j| < WINDOW); blocks entirely outside them are skipped.

- Forward: one program per (query block, batch * head); keys in BLOCK_N tiles with an online
  softmax (running max m, running sum l, accumulator rescaled by exp(m_old - m_new)), all in fp32
  (base-2 exponentials, scale folded with log2(e)). Stores o and the log-sum-exp lse (natural log).
- Backward: delta = rowsum(dO * O) (preprocess kernel); one program per key block accumulates dK, dV
  over the query blocks of every query head sharing that K/V head (no atomics); one program per
  query block accumulates dQ. Both recompute P = exp(S - lse) from the saved lse: nothing T x T is
  ever stored.

Matrix products accumulate in fp32. On the GPU, bf16/fp16 operands go to the tensor cores as they are
(P and dS are rounded to the input dtype first, as in FlashAttention); with DOT_FP32 (fp32 inputs, and
every dtype in the CPU interpreter, whose bf16 tl.dot is wrong) the operands are upcast and multiplied
in exact fp32 ("ieee", not tf32). Softmax, masking and scaling are always fp32. Plain pointer
arithmetic with masks for T not a multiple of the block.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _key_range(start_m, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys the query rows [start_m, start_m + BLOCK_M) may see, lo a multiple of BLOCK_N."""
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    elif HAS_WINDOW:
        hi = tl.minimum(T, start_m + BLOCK_M + WINDOW - 1)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - WINDOW + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the query rows that may see keys [start_n, start_n + BLOCK_N), lo a multiple of BLOCK_M."""
    lo = 0
    hi = T
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        lo = tl.maximum(0, start_n - WINDOW + 1) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(T, start_n + BLOCK_N + WINDOW - 1)
    return lo, hi


@triton.jit
def _allowed(offs_m, offs_n, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the (query, key) pairs that exist and pass the causal/window masks."""
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
    dist = offs_m[:, None] - offs_n[None, :]
    if CAUSAL:
        ok = ok & (dist >= 0)
        if HAS_WINDOW:
            ok = ok & (dist < WINDOW)
    elif HAS_WINDOW:
        ok = ok & (dist < WINDOW) & (dist > -WINDOW)
    return ok


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; DOT_FP32: with fp32 operands in exact (ieee, not tf32) precision."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    scale, T, H, GROUPS, WINDOW,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    bkv = (bh // H) * (H // GROUPS) + (bh % H) // GROUPS
    q_ptr += bh * T * D
    o_ptr += bh * T * D
    k_ptr += bkv * T * D
    v_ptr += bkv * T * D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q = tl.load(q_ptr + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo, hi = _key_range(start_m, T, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < T
        k = tl.load(k_ptr + offs_n[None, :] * D + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        s = _dot(q, k, DOT_FP32).to(tl.float32) * qk_scale
        s = tl.where(_allowed(offs_m, offs_n, T, WINDOW, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no allowed key so far keeps m = -inf: shift by 0 there so that exp2 gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32).to(tl.float32)
        m = m_new
    l_safe = tl.where(row_sum == 0.0, 1.0, row_sum)  # only rows past T can have no key at all; they are not stored
    out = acc / l_safe[:, None]
    tl.store(o_ptr + offs_m[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * T + offs_m, (m + tl.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, T, D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = bh * T * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
    row_ok = offs_m < T
    o = tl.load(o_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * T + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    scale, T, H, GROUPS, WINDOW,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1).to(tl.int64)  # b * (H / GROUPS) + kv head
    hkv = H // GROUPS
    k_ptr += bkv * T * D
    v_ptr += bkv * T * D

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_ok = offs_n < T
    kv_offs = offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_ok[:, None], other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo, hi = _query_range(start_n, T, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, GROUPS):  # every query head reading this K/V head
        bh = (bkv // hkv) * H + (bkv % hkv) * GROUPS + g
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            # Transposed tiles ([D, BLOCK_M], [BLOCK_M] along columns) so that S^T = K Q^T needs no tl.trans.
            q_t = tl.load(q_ptr + bh * T * D + offs_m[None, :] * D + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            s_t = _dot(k, q_t, DOT_FP32).to(tl.float32) * qk_scale
            allowed_t = tl.trans(_allowed(offs_m, offs_n, T, WINDOW, CAUSAL, HAS_WINDOW))
            p_t = tl.where(allowed_t, tl.exp2(s_t - lse[None, :]), 0.0)
            do = tl.load(do_ptr + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            dv += _dot(p_t.to(do.dtype), do, DOT_FP32).to(tl.float32)
            delta = tl.load(delta_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
            dp_t = _dot(v, tl.trans(do), DOT_FP32).to(tl.float32)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), DOT_FP32).to(tl.float32)
    tl.store(dk_ptr + bkv * T * D + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(dv_ptr + bkv * T * D + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    scale, T, H, GROUPS, WINDOW,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // GROUPS) + (bh % H) // GROUPS
    k_ptr += bkv * T * D
    v_ptr += bkv * T * D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_offs = bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + q_offs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    lo, hi = _key_range(start_m, T, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < T
        k_t = tl.load(k_ptr + offs_n[None, :] * D + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        v_t = tl.load(v_ptr + offs_n[None, :] * D + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        s = _dot(q, k_t, DOT_FP32).to(tl.float32) * qk_scale
        p = tl.where(_allowed(offs_m, offs_n, T, WINDOW, CAUSAL, HAS_WINDOW), tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, v_t, DOT_FP32).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), DOT_FP32).to(tl.float32)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _config(q: torch.Tensor) -> dict:
    """Tile sizes and launch options. The interpreter runs small tiles fastest; on the GPU, FA2's usual sizes."""
    if q.device.type != "cuda":
        return {"fwd": (32, 32), "bwd": (32, 32), "dot_fp32": True, "opts": {}}
    if q.dtype == torch.float32:
        return {"fwd": (64, 32), "bwd": (32, 32), "dot_fp32": True, "opts": {"num_warps": 4, "num_stages": 2}}
    warps = 8 if q.shape[-1] >= 128 else 4
    return {"fwd": (128, 64), "bwd": (64, 64), "dot_fp32": False, "opts": {"num_warps": warps, "num_stages": 2}}


def _window(window: int, t: int) -> int:
    """The window the kernels run: 0 (none) for window <= 0 or >= T, where it masks nothing (and where the
    kernels' int32 bounds, start + BLOCK + window, could overflow)."""
    return window if 0 < window < t else 0


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      window: int, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32) for contiguous q [B, Hq, T, D], k, v [B, Hkv, T, D].

    window <= 0 means no window. config: tile sizes and launch options in _config's form (tools/tune_attention.py
    tries several); by default _config's.
    """
    b, h, t, d = q.shape
    window = _window(window, t)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    cfg = config or _config(q)
    block_m, block_n = cfg["fwd"]
    _attn_fwd_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, o, lse, scale, t, h, h // k.shape[1], max(window, 0),
        CAUSAL=causal, HAS_WINDOW=window > 0, D=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=cfg["dot_fp32"],
        **cfg["opts"],
    )
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, scale: float, window: int,
                       config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes; all tensors contiguous, lse from attention_forward; config as there."""
    b, h, t, d = q.shape
    window = _window(window, t)
    hkv = k.shape[1]
    cfg = config or _config(q)
    block_m, block_n = cfg["bwd"]
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(t, block_m), b * h)](o, do, delta, t, D=d, BLOCK_M=block_m)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, HAS_WINDOW=window > 0, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                  DOT_FP32=cfg["dot_fp32"], **cfg["opts"])
    _attn_bwd_dkdv_kernel[(triton.cdiv(t, block_n), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, scale, t, h, h // hkv, max(window, 0), **common)
    _attn_bwd_dq_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, do, lse, delta, dq, scale, t, h, h // hkv, max(window, 0), **common)
    return dq, dk, dv


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) triples that the build compiles for sm_80 and sm_90: bf16/fp16, D 64/128."""
    specs = []
    for dtype in ("bf16", "fp16"):
        for d in (64, 128):
            block_m, block_n = 128, 64
            scalars = {"scale": "fp32", "T": "i32", "H": "i32", "GROUPS": "i32", "WINDOW": "i32"}
            flags = {"CAUSAL": True, "HAS_WINDOW": True, "D": d, "DOT_FP32": False}
            constexpr_sig = {name: "constexpr"
                             for name in ("CAUSAL", "HAS_WINDOW", "D", "BLOCK_M", "BLOCK_N", "DOT_FP32")}
            fwd = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}",
                   "lse_ptr": "*fp32", **scalars, **constexpr_sig}
            specs.append((_attn_fwd_kernel, fwd, {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n}))
            block_m = block_n = 64
            specs.append((_attn_bwd_delta_kernel,
                          {"o_ptr": f"*{dtype}", "do_ptr": f"*{dtype}", "delta_ptr": "*fp32", "T": "i32",
                           "D": "constexpr", "BLOCK_M": "constexpr"}, {"D": d, "BLOCK_M": block_m}))
            inputs = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "do_ptr": f"*{dtype}",
                      "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
            bwd_flags = {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n}
            specs.append((_attn_bwd_dkdv_kernel, {**inputs, "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}", **scalars,
                                                  **constexpr_sig}, bwd_flags))
            specs.append((_attn_bwd_dq_kernel, {**inputs, "dq_ptr": f"*{dtype}", **scalars, **constexpr_sig},
                          bwd_flags))
    return specs
