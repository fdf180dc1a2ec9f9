"""Triton kernels: FlashAttention-2 style softmax attention, forward and backward.

Layout: q, o, do [B, Hq, T, D] and k, v [B, Hkv, T, D], all contiguous; query head h reads K/V
head h // (Hq / Hkv) (grouped-query attention). Masks: causal (key j <= query i) and an optional
window (causal: i - j < WINDOW; otherwise |i - j| < WINDOW); blocks entirely outside them are skipped.

- Block ranges (_spans): a query block meets the key blocks [lo, hi); inside, [full_lo, full_hi) are
  the blocks where every (query, key) pair exists and is allowed. Those run without any mask arithmetic
  or masked loads (the main part: for causal attention, everything below the diagonal); only the blocks
  crossing the diagonal or the window's edge, and the ragged tail past T, are masked. The same split, seen
  from a key block, gives its query blocks in the backward.
- Forward: one program per (query block, batch * head); keys in BLOCK_N tiles with an online
  softmax (running max m, running sum l, accumulator rescaled by exp(m_old - m_new)), all in fp32
  (base-2 exponentials, scale folded with log2(e)). Stores o and the log-sum-exp lse (natural log).
- Backward: delta = rowsum(dO * O) (preprocess kernel); then one program per key block loops over the
  query blocks of every query head sharing its K/V head and does FlashAttention-2's five products per
  tile: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q, and dQ += dS K added atomically to an
  fp32 buffer (P = exp(S - lse) recomputed once per tile; nothing T x T is ever stored). Under
  torch.use_deterministic_algorithms(True) the dQ product moves to a kernel of its own, one program per query
  block, which recomputes S and P (seven products, no atomics, a run-to-run identical dQ).

Matrix products accumulate in fp32. On the GPU, bf16/fp16 operands go to the tensor cores as they are
(P and dS are rounded to the input dtype first, as in FlashAttention); with DOT_FP32 (fp32 inputs, and
every dtype in the CPU interpreter, whose bf16 tl.dot is wrong) the operands are upcast and multiplied
in exact fp32 ("ieee", not tf32). Softmax, masking and scaling are always fp32.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _spans(start, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, KEY_BLOCK: tl.constexpr,
           BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """The blocks of OTHER keys that the query block [start, start + BLOCK) meets (of OTHER queries, for a
    key block with KEY_BLOCK): [lo, hi), and inside it [full_lo, full_hi), those needing no mask.

    lo, full_lo and full_hi are multiples of OTHER; [lo, full_lo) and [full_hi, hi) are the masked blocks.
    """
    # The allowed query - key offsets are [d_lo, d_hi] (T: no limit); seen from a key block they change sign.
    d_lo = -T
    d_hi = T
    if CAUSAL:
        d_lo = 0
    if HAS_WINDOW:
        d_hi = WINDOW - 1
        if not CAUSAL:
            d_lo = 1 - WINDOW
    if KEY_BLOCK:
        d_lo, d_hi = -d_hi, -d_lo
    lo = tl.maximum(0, start - d_hi) // OTHER * OTHER
    hi = tl.minimum(T, start + BLOCK - d_lo)
    # A block [x, x + OTHER) is unmasked when x >= start + BLOCK - 1 - d_hi and x + OTHER <= start + 1 - d_lo,
    # all of it before T, and this block too lies before T.
    full_lo = tl.minimum(tl.cdiv(tl.maximum(0, start + BLOCK - 1 - d_hi), OTHER) * OTHER, hi)
    full_hi = tl.maximum(full_lo, tl.minimum(T, start + 1 - d_lo) // OTHER * OTHER)
    full_hi = tl.where(start + BLOCK <= T, full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _allowed(qi, kj, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Mask of the (query qi, key kj) pairs that exist and pass the causal/window masks. qi and kj broadcast:
    qi[:, None] and kj[None, :] give [queries, keys], qi[None, :] and kj[:, None] its transpose (built as such,
    not transposed: a bool tl.trans is not supported everywhere)."""
    ok = (qi < T) & (kj < T)
    dist = qi - kj
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
def _load(ptr, ok, MASKED: tl.constexpr):
    """A tile; with MASKED, zero where not ok (rows past T). Unmasked tiles lie wholly inside the tensor."""
    if MASKED:
        return tl.load(ptr, mask=ok, other=0.0)
    return tl.load(ptr)


@triton.jit
def _scores(q, k_ptr, start_n, offs_m, offs_d, qk_scale, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """Key tile [start_n, start_n + BLOCK_N): (offs_n, kv_ok, K^T [D, BLOCK_N], S = Q K^T * qk_scale); with MASKED,
    S is -inf at the pairs the masks forbid."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < T
    k_t = _load(k_ptr + offs_n[None, :] * D + offs_d[:, None], kv_ok[None, :], MASKED)
    s = _dot(q, k_t, DOT_FP32).to(tl.float32) * qk_scale
    if MASKED:
        s = tl.where(_allowed(offs_m[:, None], offs_n[None, :], T, WINDOW, CAUSAL, HAS_WINDOW), s, float("-inf"))
    return offs_n, kv_ok, k_t, s


@triton.jit
def _fwd_tiles(acc, row_sum, m, q, k_ptr, v_ptr, offs_m, offs_d, lo, hi, qk_scale, T, WINDOW,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over the key blocks [lo, hi); MASKED: blocks that need the causal/window/length mask."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, kv_ok, _, s = _scores(q, k_ptr, start_n, offs_m, offs_d, qk_scale, T, WINDOW, CAUSAL, HAS_WINDOW, D,
                                      BLOCK_N, DOT_FP32, MASKED)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        if MASKED:
            # A row with no allowed key so far keeps m = -inf: shift by 0 there so that exp2 gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            shift = m_new  # every score here is finite
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = _load(v_ptr + offs_n[:, None] * D + offs_d[None, :], kv_ok[:, None], MASKED)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32).to(tl.float32)
        m = m_new
    return acc, row_sum, m


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
    lo, full_lo, full_hi, hi = _spans(start_m, T, WINDOW, CAUSAL, HAS_WINDOW, False, BLOCK_M, BLOCK_N)
    # Main part first (no masks), then the blocks on the diagonal / window edges and the tail past T.
    acc, row_sum, m = _fwd_tiles(acc, row_sum, m, q, k_ptr, v_ptr, offs_m, offs_d, full_lo, full_hi, qk_scale, T,
                                 WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, False)
    acc, row_sum, m = _fwd_tiles(acc, row_sum, m, q, k_ptr, v_ptr, offs_m, offs_d, lo, full_lo, qk_scale, T,
                                 WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, True)
    acc, row_sum, m = _fwd_tiles(acc, row_sum, m, q, k_ptr, v_ptr, offs_m, offs_d, full_hi, hi, qk_scale, T,
                                 WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, True)
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
def _bwd_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, offs_n, offs_d, lo, hi, scale, T, WINDOW,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               DOT_FP32: tl.constexpr, ACCUMULATE_DQ: tl.constexpr, MASKED: tl.constexpr):
    """dK, dV of one key block over the query blocks [lo, hi) of one query head; with ACCUMULATE_DQ also adds
    dS K * scale to the fp32 dQ. Tiles are held transposed ([keys, queries]) so that S^T = K Q^T needs no trans."""
    qk_scale = scale * 1.4426950408889634
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q_t = _load(q_ptr + offs_m[None, :] * D + offs_d[:, None], row_ok[None, :], MASKED)
        lse = _load(lse_ptr + offs_m, row_ok, MASKED) * 1.4426950408889634
        s_t = _dot(k, q_t, DOT_FP32).to(tl.float32) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_allowed(offs_m[None, :], offs_n[:, None], T, WINDOW, CAUSAL, HAS_WINDOW), p_t, 0.0)
        do = _load(do_ptr + offs_m[:, None] * D + offs_d[None, :], row_ok[:, None], MASKED)
        dv += _dot(p_t.to(do.dtype), do, DOT_FP32).to(tl.float32)
        delta = _load(delta_ptr + offs_m, row_ok, MASKED)
        dp_t = _dot(v, tl.trans(do), DOT_FP32).to(tl.float32)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk += _dot(ds_t, tl.trans(q_t), DOT_FP32).to(tl.float32)
        if ACCUMULATE_DQ:
            dq = _dot(tl.trans(ds_t), k, DOT_FP32).to(tl.float32) * scale
            dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
    scale, T, H, GROUPS, WINDOW,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
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
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo, full_lo, full_hi, hi = _spans(start_n, T, WINDOW, CAUSAL, HAS_WINDOW, True, BLOCK_N, BLOCK_M)
    for g in range(0, GROUPS):  # every query head reading this K/V head
        bh = (bkv // hkv) * H + (bkv % hkv) * GROUPS + g
        q_g, do_g, dq_g = q_ptr + bh * T * D, do_ptr + bh * T * D, dq_ptr + bh * T * D
        lse_g, delta_g = lse_ptr + bh * T, delta_ptr + bh * T
        dk, dv = _bwd_tiles(dk, dv, k, v, q_g, do_g, lse_g, delta_g, dq_g, offs_n, offs_d, full_lo, full_hi, scale,
                            T, WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_M, DOT_FP32, ACCUMULATE_DQ, False)
        dk, dv = _bwd_tiles(dk, dv, k, v, q_g, do_g, lse_g, delta_g, dq_g, offs_n, offs_d, lo, full_lo, scale,
                            T, WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_M, DOT_FP32, ACCUMULATE_DQ, True)
        dk, dv = _bwd_tiles(dk, dv, k, v, q_g, do_g, lse_g, delta_g, dq_g, offs_n, offs_d, full_hi, hi, scale,
                            T, WINDOW, CAUSAL, HAS_WINDOW, D, BLOCK_M, DOT_FP32, ACCUMULATE_DQ, True)
    tl.store(dk_ptr + bkv * T * D + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(dv_ptr + bkv * T * D + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, offs_m, offs_d, lo, hi, qk_scale, T, WINDOW,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """dQ of one query block over the key blocks [lo, hi) (the deterministic path)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, kv_ok, k_t, s = _scores(q, k_ptr, start_n, offs_m, offs_d, qk_scale, T, WINDOW, CAUSAL, HAS_WINDOW, D,
                                        BLOCK_N, DOT_FP32, MASKED)
        p = tl.exp2(s - lse[:, None])  # 0 where masked (s = -inf)
        v_t = _load(v_ptr + offs_n[None, :] * D + offs_d[:, None], kv_ok[None, :], MASKED)
        dp = _dot(do, v_t, DOT_FP32).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), DOT_FP32).to(tl.float32)
    return dq


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
    lo, full_lo, full_hi, hi = _spans(start_m, T, WINDOW, CAUSAL, HAS_WINDOW, False, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, offs_m, offs_d, full_lo, full_hi, qk_scale, T, WINDOW,
                   CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, False)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, offs_m, offs_d, lo, full_lo, qk_scale, T, WINDOW,
                   CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, True)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, offs_m, offs_d, full_hi, hi, qk_scale, T, WINDOW,
                   CAUSAL, HAS_WINDOW, D, BLOCK_N, DOT_FP32, True)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tensor_core_config(hopper: bool, d: int) -> dict:
    """bf16/fp16 tiles and launch options for head dim d, on Hopper (sm_90 and newer) or on sm_80.

    Hopper: 8 warps, 3 pipeline stages; forward 128 x 128 tiles where they fit the registers (D <= 64; at D = 128,
    128 x 128 would spill, 128 x 64 does not), backward 32 query x 128 key tiles (32 x 64 at D = 128, where the
    fp32 dK and dV fill the registers). sm_80 keeps FlashAttention-2's 128 x 64 forward and 64 x 64 backward
    tiles with 2 stages. docs/kernels.md has the shared-memory and register figures; tools/tune_attention.py
    times the alternatives on a GPU.
    """
    if hopper:
        opts = {"num_warps": 8, "num_stages": 3}
        return {"fwd": (128, 128) if d <= 64 else (128, 64), "bwd": (32, 128) if d <= 64 else (32, 64),
                "dot_fp32": False, "fwd_opts": opts, "bwd_opts": opts}
    opts = {"num_warps": 8 if d >= 128 else 4, "num_stages": 2}
    return {"fwd": (128, 64), "bwd": (64, 64), "dot_fp32": False, "fwd_opts": opts, "bwd_opts": opts}


def _config(q: torch.Tensor) -> dict:
    """Tile sizes (block_m, block_n) per pass, DOT_FP32 and launch options per pass. The interpreter runs small
    tiles fastest; fp32 on the GPU multiplies exactly (no tensor cores) in small tiles; bf16/fp16 as above."""
    if q.device.type != "cuda":
        return {"fwd": (32, 32), "bwd": (32, 32), "dot_fp32": True, "fwd_opts": {}, "bwd_opts": {}}
    if q.dtype == torch.float32:
        opts = {"num_warps": 4, "num_stages": 2}
        return {"fwd": (64, 32), "bwd": (32, 32), "dot_fp32": True, "fwd_opts": opts, "bwd_opts": opts}
    return _tensor_core_config(torch.cuda.get_device_capability(q.device)[0] >= 9, q.shape[-1])


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
        q, k, v, o, lse, scale, t, h, h // k.shape[1], window,
        CAUSAL=causal, HAS_WINDOW=window > 0, D=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=cfg["dot_fp32"],
        **cfg["fwd_opts"],
    )
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, scale: float, window: int,
                       config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes; all tensors contiguous, lse from attention_forward; config as there.

    dQ is summed atomically in fp32 by the dK/dV kernel, or, under torch.use_deterministic_algorithms(True) (not
    warn_only), computed by a kernel of its own (equal up to the order of fp32 additions, identical run to run).
    """
    b, h, t, d = q.shape
    window = _window(window, t)
    hkv = k.shape[1]
    cfg = config or _config(q)
    block_m, block_n = cfg["bwd"]
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(t, block_m), b * h)](o, do, delta, t, D=d, BLOCK_M=block_m)
    # With warn_only, PyTorch's own ops keep their nondeterministic algorithms too.
    deterministic = (torch.are_deterministic_algorithms_enabled()
                     and not torch.is_deterministic_algorithms_warn_only_enabled())
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, HAS_WINDOW=window > 0, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                  DOT_FP32=cfg["dot_fp32"], **cfg["bwd_opts"])
    _attn_bwd_kernel[(triton.cdiv(t, block_n), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, dq, scale, t, h, h // hkv, window, ACCUMULATE_DQ=not deterministic,
        **common)
    if deterministic:
        _attn_bwd_dq_kernel[(triton.cdiv(t, block_m), b * h)](
            q, k, v, do, lse, delta, dq, scale, t, h, h // hkv, window, **common)
    return dq.to(q.dtype), dk, dv


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs, options) that the build compiles for sm_80 and sm_90: every kernel on the
    tensor-core path (DOT_FP32=False) with the tiles, warps and stages _config picks on sm_80 (bf16, D 64) and on
    Hopper (fp16, D 128). tests/kernels/attention_aot_test.py compiles both tables at D 64 and 128."""
    specs = []
    scalars = {"scale": "fp32", "T": "i32", "H": "i32", "GROUPS": "i32", "WINDOW": "i32"}
    flags = ("CAUSAL", "HAS_WINDOW", "D", "BLOCK_M", "BLOCK_N", "DOT_FP32")
    for hopper, dtype, d in ((False, "bf16", 64), (True, "fp16", 128)):
        cfg = _tensor_core_config(hopper, d)
        base = {"CAUSAL": True, "HAS_WINDOW": True, "D": d, "DOT_FP32": False}
        ptrs = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")}
        fwd = {**ptrs, "o_ptr": f"*{dtype}", "lse_ptr": "*fp32", **scalars, **{f: "constexpr" for f in flags}}
        block_m, block_n = cfg["fwd"]
        specs.append((_attn_fwd_kernel, fwd, {**base, "BLOCK_M": block_m, "BLOCK_N": block_n}, cfg["fwd_opts"]))
        block_m, block_n = cfg["bwd"]
        specs.append((_attn_bwd_delta_kernel,
                      {"o_ptr": f"*{dtype}", "do_ptr": f"*{dtype}", "delta_ptr": "*fp32", "T": "i32",
                       "D": "constexpr", "BLOCK_M": "constexpr"}, {"D": d, "BLOCK_M": block_m}))
        inputs = {**ptrs, "do_ptr": f"*{dtype}", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
        bwd = {**base, "BLOCK_M": block_m, "BLOCK_N": block_n}
        specs.append((_attn_bwd_kernel, {**inputs, "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}",
                                         "dq_ptr": "*fp32", **scalars, **{f: "constexpr" for f in flags},
                                         "ACCUMULATE_DQ": "constexpr"}, {**bwd, "ACCUMULATE_DQ": True},
                      cfg["bwd_opts"]))
        specs.append((_attn_bwd_dq_kernel, {**inputs, "dq_ptr": f"*{dtype}", **scalars,
                                            **{f: "constexpr" for f in flags}}, bwd, cfg["bwd_opts"]))
    return specs
