"""GPU tests of attention: CUDA tensors through the Triton kernels (the CUDA default) and the CUDA tensor-core
kernels (impl="cuda", libcodex_attention.so), against a float64 reference on the CPU. Skipped, with the
reason, where there is no CUDA GPU; the CUDA kernels themselves also run on the CPU, in an emulator, in
tests/kernels/cuda_emu_test.py.

Error bounds (relative L2 error of the output and of dq, dk, dv): fp32 (Triton, exact fp32 products) 1e-4;
fp16 1e-2 and bf16 3e-2: P and dS are rounded to the input dtype before their products (as in
FlashAttention-2), so the error is a few units of the dtype's rounding (2^-11 fp16, 2^-8 bf16) grown by the
sums over keys. Every allocation is poisoned with NaN (fill_uninitialized_memory), so unwritten elements fail.
"""

import math
import os

import pytest
import torch
from references import attention_reference as reference
from references import poison_uninitialized_memory, rel_err  # noqa: F401 (an autouse fixture)

from codex_ml.ops import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

BOUNDS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}



def check(impl, b, hq, hkv, t, d, causal, window, dtype):
    q, k, v = (torch.randn(b, h, t, d, device="cuda").to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    out = attention(q, k, v, causal=causal, window=window, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), [q, k, v])
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, causal=causal, window=window, scale=1 / math.sqrt(d))
    ref_grads = torch.autograd.grad((ref * grad_out.cpu().double()).sum(), ref_in)
    assert rel_err(out, ref) < BOUNDS[dtype], rel_err(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all() and rel_err(g, r) < BOUNDS[dtype], (name, rel_err(g, r))


GRID = [
    # (B, T, D, Hq, Hkv, causal, window)
    (2, 1, 64, 1, 1, True, None), (2, 17, 64, 4, 1, True, None), (2, 17, 128, 8, 8, False, None),
    (2, 128, 64, 8, 4, True, None), (2, 129, 128, 4, 4, False, None), (2, 129, 64, 8, 1, True, 16),
    (2, 129, 64, 4, 4, False, 9), (1, 1000, 64, 4, 1, True, None), (1, 1000, 128, 8, 4, True, 100),
    (1, 1000, 128, 4, 4, False, None), (2, 77, 16, 4, 2, True, None), (2, 77, 32, 4, 2, False, 20),
    # T = 2 x 128 and 2 x 128 + 1: the Triton kernels' main (unmasked) and diagonal tiles at the GPU tile sizes
    (1, 256, 64, 4, 2, True, None), (1, 257, 128, 4, 2, False, 100),
]
# Each row compiles the Triton kernels anew (seconds apiece). tools/gpu_check.sh's tests stage sets
# CODEX_ML_GPU_CHECK_QUICK=1 and runs the Triton tests on these rows only, each code path once: T = 1, one partial
# tile with grouped heads, a window without causality, D = 16, D = 128 with causality and a window over many tiles,
# and the main and diagonal tiles at the GPU tile sizes. A plain pytest run takes every row.
QUICK_GRID = [GRID[i] for i in (0, 1, 6, 8, 10, 12, 13)]
TRITON_GRID = QUICK_GRID if os.environ.get("CODEX_ML_GPU_CHECK_QUICK") == "1" else GRID


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,t,d,hq,hkv,causal,window", TRITON_GRID)
def test_triton_on_cuda_matches_float64(b, t, d, hq, hkv, causal, window, dtype):
    torch.manual_seed(t + d)
    check("triton", b, hq, hkv, t, d, causal, window, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,d,hq,hkv,causal,window", GRID)
def test_cuda_kernel_matches_float64(b, t, d, hq, hkv, causal, window, dtype):
    torch.manual_seed(t + d + 1)
    check("cuda", b, hq, hkv, t, d, causal, window, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_deterministic_backward_is_repeatable(dtype):
    """Under torch.use_deterministic_algorithms(True) dQ comes from its own kernel (no atomic adds): correct, and
    bit-identical from run to run."""
    torch.manual_seed(11)
    torch.use_deterministic_algorithms(True)  # the poisoning fixture restores the setting
    check("triton", 1, 4, 2, 1000, 64, True, None, dtype)
    q, k, v = (torch.randn(1, h, 1000, 64, device="cuda", dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    grad_out = torch.randn_like(q)
    first, second = (torch.autograd.grad(attention(q, k, v, impl="triton"), (q, k, v), grad_out) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_default_on_cuda_is_triton_and_cuda_rejects_fp32():
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, impl="triton"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bf16/fp16"):
        attention(q.float(), k.float(), v.float(), impl="cuda")
