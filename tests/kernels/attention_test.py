"""codex_ml.ops.attention against a float64 reference softmax(q k^T * scale + mask) v.

Error bounds (relative L2 error of the output and of dq, dk, dv): fp32 1e-5 (2e-5 for T=1000);
bf16 2e-2 (inputs and outputs rounded to bf16, softmax in fp32). bf16/fp16 on the GPU path are in
attention_gpu_test.py.
"""

import math

import pytest
import torch

from codex_ml.ops import attention

BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, *, causal, window, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = q.shape[2]
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    allowed = dist >= 0 if causal else torch.ones(t, t, dtype=torch.bool)
    if window:
        allowed = allowed & ((dist < window) if causal else (dist.abs() < window))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def rel_err(actual, expected):
    """Relative L2 error; absolute where the reference is exactly zero (e.g. dk when T = 1)."""
    diff, norm = (actual.double() - expected).norm().item(), expected.norm().item()
    return diff / norm if norm > 0 else diff


def check(impl, b, hq, hkv, t, d, causal, window, dtype=torch.float32):
    q = torch.randn(b, hq, t, d).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, t, d).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, t, d).to(dtype).requires_grad_()
    out = attention(q, k, v, causal=causal, window=window, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    for x in (q, k, v):  # poisoned: any gradient element left unwritten fails the finiteness check
        x.grad = torch.full_like(x, float("nan"))
    grads = torch.autograd.grad((out * grad_out).sum(), [q, k, v])
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, causal=causal, window=window, scale=1 / math.sqrt(d))
    ref_grads = torch.autograd.grad((ref * grad_out.double()).sum(), ref_in)
    bound = BOUNDS[dtype] * (2 if t >= 1000 else 1)
    assert rel_err(out, ref) < bound
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < bound


GRID = [
    # (T, D, Hq, Hkv, causal, window)
    (1, 64, 1, 1, True, None), (17, 64, 4, 1, True, None), (17, 128, 8, 8, False, None),
    (128, 64, 8, 4, True, None), (129, 128, 4, 4, False, None), (129, 64, 8, 1, True, 16),
    (129, 64, 4, 4, False, 9), (1000, 64, 4, 1, True, None), (1000, 128, 8, 4, True, 100),
]


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("t,d,hq,hkv,causal,window", GRID)
def test_matches_float64_reference(impl, t, d, hq, hkv, causal, window):
    torch.manual_seed(t + d + hq)
    check(impl, 1 if t >= 1000 else 2, hq, hkv, t, d, causal, window)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_bf16_inputs(impl):
    torch.manual_seed(1)
    check(impl, 1, 4, 2, 65, 64, True, None, dtype=torch.bfloat16)


def test_small_head_dims_for_tiny_models():
    torch.manual_seed(2)
    for d in (16, 32):
        check("cpu", 1, 2, 1, 33, d, True, None)


@pytest.mark.parametrize("make, message", [
    (lambda q, k, v: (q[0], k, v), "expects q"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "same shape"),
    (lambda q, k, v: (q, k[:, :, :7], v[:, :, :7]), "does not match"),
    (lambda q, k, v: (q[:, :3], k, v), "must divide"),
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head dim 48"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float64"),
    (lambda q, k, v: (q, k.half(), v.half()), "one dtype"),
])
def test_bad_input_gets_a_clear_error(make, message):
    q, k, v = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    with pytest.raises(ValueError, match=message):
        attention(*make(q, k, v))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_opcheck(impl):
    torch.manual_seed(3)
    q = torch.randn(1, 4, 19, 16, requires_grad=True)
    k = torch.randn(1, 2, 19, 16, requires_grad=True)
    v = torch.randn(1, 2, 19, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.attention.default, (q, k, v, True, 0.25, -1, impl))
    torch.library.opcheck(torch.ops.codex_ml.attention.default, (q, k, v, True, 0.25, 5, impl))


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
