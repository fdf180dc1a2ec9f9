"""codex_ml.ops.attention against a float64 reference softmax(q k^T * scale + mask) v.

Implementations: "cpu" (the CPU default, PyTorch's flash kernel), "torch" (blocked PyTorch) and "triton"
(our kernels, in the Triton interpreter here: TRITON_INTERPRET=1, so at T <= 129 and a subset of the grid).
Error bounds (relative L2 error of the output, the lse and dq, dk, dv): fp32 1e-5 (2e-5 for T=1000);
bf16 2e-2 (inputs and outputs rounded to bf16, softmax in fp32). CUDA-tensor runs of the Triton and CUDA
kernels in bf16/fp16 are in attention_gpu_test.py. Every allocation is poisoned with NaN (PyTorch's
fill_uninitialized_memory), so an output or gradient element a kernel leaves unwritten fails the checks.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from references import attention_reference as reference
from references import poison_uninitialized_memory, rel_err  # noqa: F401 (an autouse fixture)

from codex_ml.kernels.attention import triton as triton_attention
from codex_ml.ops import attention

BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}



def test_poisoning_is_active():
    assert torch.isnan(torch.empty(4)).all() and torch.isnan(torch.empty_like(torch.ones(2, 3))).all()


def check(impl, b, hq, hkv, t, d, causal, window, dtype=torch.float32):
    q = torch.randn(b, hq, t, d).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, t, d).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, t, d).to(dtype).requires_grad_()
    out = attention(q, k, v, causal=causal, window=window, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), [q, k, v])
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, causal=causal, window=window, scale=1 / math.sqrt(d))
    ref_grads = torch.autograd.grad((ref * grad_out.double()).sum(), ref_in)
    bound = BOUNDS[dtype] * (2 if t >= 1000 else 1)
    assert rel_err(out, ref) < bound
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all() and rel_err(g, r) < bound, (name, rel_err(g, r))


GRID = [
    # (T, D, Hq, Hkv, causal, window)
    (1, 64, 1, 1, True, None), (17, 64, 4, 1, True, None), (17, 128, 8, 8, False, None),
    (128, 64, 8, 4, True, None), (129, 128, 4, 4, False, None), (129, 64, 8, 1, True, 16),
    (129, 64, 4, 4, False, 9), (1000, 64, 4, 1, True, None), (1000, 128, 8, 4, True, 100),
    (600, 64, 4, 2, False, 50),  # a two-sided window over several of the CPU path's query blocks
    (300, 64, 6, 2, True, None),  # causal, 256 < T <= 768: the CPU path runs it as query blocks (window = T)
]


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("t,d,hq,hkv,causal,window", GRID)
def test_matches_float64_reference(impl, t, d, hq, hkv, causal, window):
    torch.manual_seed(t + d + hq)
    check(impl, 1 if t >= 1000 else 2, hq, hkv, t, d, causal, window)


# The interpreter runs ~10-100x slower than the CPU path: T <= 129, one batch row, a subset covering
# partial blocks, several key blocks with causal and window skipping, GQA, MQA and both head dims.
TRITON_GRID = [
    (1, 64, 1, 1, True, None), (17, 64, 4, 1, True, None), (17, 128, 8, 8, False, None),
    (128, 64, 4, 2, True, None), (129, 128, 2, 2, False, None), (129, 64, 4, 1, True, 16),
    (129, 64, 2, 2, False, 9), (100, 32, 2, 1, True, None), (45, 16, 4, 4, True, 7),
    (1, 128, 8, 1, False, None), (129, 128, 8, 1, True, 40), (65, 64, 8, 8, False, 100),
]


@pytest.mark.parametrize("t,d,hq,hkv,causal,window", TRITON_GRID)
def test_triton_kernels_match_float64_reference(t, d, hq, hkv, causal, window):
    torch.manual_seed(t + d + hq + 1)
    check("triton", 2 if t < 64 else 1, hq, hkv, t, d, causal, window)


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_bf16_inputs(impl):
    torch.manual_seed(1)
    check(impl, 1, 4, 2, 65, 64, True, None, dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_lse_is_the_row_logsumexp(impl):
    """The saved log-sum-exp (what the backward recomputes P from) is that of the masked, scaled scores."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 37, 32), torch.randn(1, 2, 37, 32), torch.randn(1, 2, 37, 32)
    for causal, window in ((True, None), (False, 6), (True, 5)):
        _, lse = torch.ops.codex_ml.attention(q, k, v, causal, 0.3, window or -1, impl)
        kk = k.double().repeat_interleave(2, 1)
        i = torch.arange(37)
        dist = i[:, None] - i[None, :]
        allowed = dist >= 0 if causal else torch.ones(37, 37, dtype=torch.bool)
        if window:
            allowed = allowed & ((dist < window) if causal else (dist.abs() < window))
        scores = (q.double() @ kk.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
        assert lse.dtype == torch.float32 and rel_err(lse, torch.logsumexp(scores, -1)) < 1e-6


def test_cpu_default_and_environment_override(monkeypatch):
    """CPU tensors run the "cpu" path unless CODEX_ML_ATTENTION_IMPL says otherwise (all give one answer)."""
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 1, 20, 16), torch.randn(1, 1, 20, 16)
    default = attention(q, k, v)
    monkeypatch.setenv("CODEX_ML_ATTENTION_IMPL", "torch")
    torch.testing.assert_close(attention(q, k, v), default, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("CODEX_ML_ATTENTION_IMPL", "bogus")
    with pytest.raises(ValueError, match="unknown implementation 'bogus'"):
        attention(q, k, v)


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_small_head_dims_for_tiny_models(impl):
    torch.manual_seed(2)
    for d in (16, 32):
        check(impl, 1, 2, 1, 33, d, True, None)


@pytest.mark.parametrize("make, message", [
    (lambda q, k, v: (q[0], k, v), "expects q"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "same shape"),
    (lambda q, k, v: (q, k[:, :, :7], v[:, :, :7]), "does not match"),
    (lambda q, k, v: (q[:, :3], k, v), "must divide"),
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head dim 48"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float64"),
    (lambda q, k, v: (q, k.half(), v.half()), "one dtype"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta")), "one device"),
])
def test_bad_input_gets_a_clear_error(make, message):
    q, k, v = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    with pytest.raises(ValueError, match=message):
        attention(*make(q, k, v))
    for window in (0, 2.5, True):  # 2.5 would be truncated to 2 by the kernels
        with pytest.raises(ValueError, match="window must be a positive whole number"):
            attention(q, k, v, window=window)
    for scale in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite positive"):
            attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_no_positions_give_an_empty_output(impl):
    """T = 0 (an empty prompt, a fully trimmed batch): an empty result with a gradient path, not a crash
    (PyTorch's CPU attention kernel dies with SIGFPE on it, which no try/except can catch)."""
    q = torch.randn(2, 4, 0, 64, requires_grad=True)
    k, v = torch.randn(2, 2, 0, 64), torch.randn(2, 2, 0, 64)
    out = attention(q, k, v, impl=impl)
    assert out.shape == (2, 4, 0, 64) and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_opcheck(impl):
    torch.manual_seed(3)
    q = torch.randn(1, 4, 19, 16, requires_grad=True)
    k = torch.randn(1, 2, 19, 16, requires_grad=True)
    v = torch.randn(1, 2, 19, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.attention.default, (q, k, v, True, 0.25, -1, impl))
    torch.library.opcheck(torch.ops.codex_ml.attention.default, (q, k, v, True, 0.25, 5, impl))
    if impl == "cpu":  # the CPU path reads the [B, T, H, D] -> [B, H, T, D] views models make, as they are
        qt, kt, vt = (torch.randn(1, 19, h, 16).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
        for window in (-1, 5, 300):
            torch.library.opcheck(torch.ops.codex_ml.attention.default, (qt, kt, vt, True, 0.25, window, impl))


def test_model_using_it_compiles_with_fullgraph():
    torch.manual_seed(4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 3 * 64)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, -1, 3, 4, 16).permute(2, 0, 3, 1, 4)
            return attention(q, k, v).sum()

    block, x = Block(), torch.randn(1, 21, 64)
    eager = block(x)
    eager.backward()
    eager_grad = block.qkv.weight.grad.clone()
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(block.qkv.weight.grad, eager_grad)


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_a_window_of_t_or_more_is_no_window(impl):
    """Including 2**31 - 1 ("no limit"), whose bounds would overflow the kernels' int32 arithmetic."""
    torch.manual_seed(17)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    for causal in (True, False):
        plain = attention(q, k, v, causal=causal, impl=impl)
        for window in (40, 1000, 2**31 - 1):
            torch.testing.assert_close(attention(q, k, v, causal=causal, window=window, impl=impl), plain)
        from codex_ml.kernels.attention.triton import attention_forward
        if impl == "triton":  # the kernel wrapper itself, as tools/tune_attention.py calls it
            out, _ = attention_forward(q, k, v, causal, 0.25, 2**31 - 1)
            torch.testing.assert_close(out, attention(q, k, v, causal=causal, scale=0.25, impl=impl))


# The Triton kernels split each block's partner blocks into unmasked ones (every pair exists and is allowed: no
# mask arithmetic, no masked loads) and masked ones (the causal diagonal, the window's edges, the tail past T).
@triton.jit
def _spans_probe(out_ptr, T, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, KEY_BLOCK: tl.constexpr,
                 BLOCK: tl.constexpr, OTHER: tl.constexpr):
    lo, full_lo, full_hi, hi = triton_attention._spans(tl.program_id(0) * BLOCK, T, WINDOW, CAUSAL, HAS_WINDOW,
                                                       KEY_BLOCK, BLOCK, OTHER)
    out = out_ptr + tl.program_id(0) * 4
    tl.store(out, lo)
    tl.store(out + 1, full_lo)
    tl.store(out + 2, full_hi)
    tl.store(out + 3, hi)


@pytest.mark.parametrize("block,other", [(32, 32), (16, 32), (32, 16), (128, 64)])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 5), (True, 40), (False, 7),
                                           (False, 50)])
@pytest.mark.parametrize("key_block", [False, True])
def test_block_spans_are_exactly_the_unmasked_blocks(block, other, causal, window, key_block):
    """For every block: [lo, hi) holds every partner block with an allowed pair, [full_lo, full_hi) exactly those
    whose pairs all exist and are allowed; T = k * block, k * block + 1, k * block - 1 and below one block."""
    for t in (other - 1, 2 * block, 2 * block + 1, 3 * block - 1, 3 * other + 1, 200):
        if window is not None and window >= t:
            continue  # the kernels run such a window as none
        blocks = triton.cdiv(t, block)
        spans = torch.zeros(blocks, 4, dtype=torch.int32)
        _spans_probe[(blocks,)](spans, t, window or 0, CAUSAL=causal, HAS_WINDOW=window is not None,
                                KEY_BLOCK=key_block, BLOCK=block, OTHER=other)
        i = torch.arange(blocks * block + 2 * other)
        this, partner = i[:, None], i[None, :]
        query, key = (partner, this) if key_block else (this, partner)
        allowed = (query < t) & (key < t)
        if causal:
            allowed &= query >= key
        if window is not None:
            allowed &= (query - key < window) if causal else ((query - key).abs() < window)
        for b, (lo, full_lo, full_hi, hi) in enumerate(spans.tolist()):
            assert all(x % other == 0 or x == hi for x in (lo, full_lo, full_hi)), (t, b, spans[b])  # block starts
            assert lo <= full_lo <= full_hi <= hi <= t, (t, b, spans[b])
            rows = allowed[b * block:(b + 1) * block]
            for x in range(0, t, other):
                tile = rows[:, x:x + other]
                if tile.any():
                    assert lo <= x < hi, (t, b, x, spans[b])
                assert bool(tile.all()) == (full_lo <= x < full_hi), (t, b, x, spans[b])


SPLIT_CASES = [
    # (T, causal, window): T = k * 32 (the interpreter's tile), k * 32 + 1, below one tile, windows on and off it
    (64, True, None), (65, True, None), (31, True, None), (64, False, None), (97, False, 20), (96, True, 33),
]


def _check_kernels(t, causal, window, config, hq=4, hkv=2, d=16):
    q = torch.randn(1, hq, t, d, dtype=torch.float64)
    k, v = torch.randn(1, hkv, t, d, dtype=torch.float64), torch.randn(1, hkv, t, d, dtype=torch.float64)
    do = torch.randn(1, hq, t, d)
    scale = d ** -0.5
    ins = [x.float() for x in (q, k, v)]
    out, lse = triton_attention.attention_forward(*ins, causal, scale, window or 0, config)
    grads = triton_attention.attention_backward(do, *ins, out, lse, causal, scale, window or 0, config)
    ref_in = [x.requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, causal=causal, window=window, scale=scale)
    ref_grads = torch.autograd.grad((ref * do.double()).sum(), ref_in)
    assert rel_err(out, ref) < BOUNDS[torch.float32]
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert rel_err(g, r) < BOUNDS[torch.float32], (name, rel_err(g, r))


@pytest.mark.parametrize("fwd,bwd", [((32, 32), (32, 32)), ((16, 32), (32, 16)), ((32, 16), (16, 32))])
@pytest.mark.parametrize("t,causal,window", SPLIT_CASES)
def test_triton_main_and_diagonal_blocks_match_float64(fwd, bwd, t, causal, window):
    """Square and non-square tiles (the GPU's are 128 x 64 and 64 x 128), dQ summed atomically in the dK/dV kernel."""
    torch.manual_seed(t + fwd[0] + bwd[0])
    config = {"fwd": fwd, "bwd": bwd, "dot_fp32": True, "fwd_opts": {}, "bwd_opts": {}}
    _check_kernels(t, causal, window, config)


@pytest.mark.parametrize("t,causal,window", SPLIT_CASES[1:5])
def test_triton_deterministic_backward_matches_float64(t, causal, window):
    """Under torch.use_deterministic_algorithms(True) dQ comes from its own kernel, not from atomic adds."""
    torch.manual_seed(t + 3)
    torch.use_deterministic_algorithms(True)  # the poisoning fixture restores the setting
    config = {"fwd": (32, 32), "bwd": (16, 32), "dot_fp32": True, "fwd_opts": {}, "bwd_opts": {}}
    _check_kernels(t, causal, window, config)
