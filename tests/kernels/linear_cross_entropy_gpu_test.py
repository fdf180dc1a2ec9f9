"""GPU tests of the losses: CUDA tensors through the Triton path (the CUDA default), fp32 and bf16, against
a float64 reference on the CPU. Skipped, with the reason, where there is no CUDA GPU.

Error bounds (relative, max-abs error over max-abs reference): fp32 2e-4, bf16 2e-2 (bf16 inputs keep 8
mantissa bits; the kernels compute in fp32).
"""

import pytest
import torch
import torch.nn.functional as F

from codex_ml.ops.loss import cross_entropy, linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,h,v", [(7, 64, 1000), (1000, 768, 32003)])
def test_linear_cross_entropy_on_cuda_matches_float64(dtype, reduction, n, h, v):
    hidden = (torch.randn(n, h) / h ** 0.5).to(dtype)
    weight = torch.randn(v, h).to(dtype)
    bias = torch.randn(v).to(dtype)
    target = torch.randint(0, v, (n,))
    target[::3] = -100
    ref_args = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = F.cross_entropy(F.linear(*ref_args[:2], ref_args[2]), target, reduction=reduction, label_smoothing=0.1)
    grad_out = torch.rand_like(ref)
    ref.backward(grad_out)
    args = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(args[0], args[1], target.cuda(), bias=args[2], reduction=reduction,
                                label_smoothing=0.1)
    loss.backward(grad_out.to(loss.dtype).cuda())
    tol = TOLERANCE[dtype]
    assert rel_err(loss, ref.detach()) < tol
    for ours, theirs in zip(args, ref_args):
        assert torch.isfinite(ours.grad).all()
        assert rel_err(ours.grad, theirs.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_cuda_matches_float64(dtype):
    logits = (torch.randn(300, 32003) * 5).to(dtype)
    target = torch.randint(0, 32003, (300,))
    ref_logits = logits.double().requires_grad_()
    ref = F.cross_entropy(ref_logits, target)
    ref.backward()
    ours_logits = logits.cuda().requires_grad_()
    loss = cross_entropy(ours_logits, target.cuda())
    loss.backward()
    assert rel_err(loss, ref.detach()) < TOLERANCE[dtype]
    assert rel_err(ours_logits.grad, ref_logits.grad) < TOLERANCE[dtype]
