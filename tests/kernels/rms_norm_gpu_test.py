"""GPU tests of rms_norm: CUDA tensors through the Triton kernels against float64 references, as references.py
describes for every layer op."""

import pytest
import torch
from references import (  # noqa: F401 (an autouse fixture)
    check_against_reference,
    poison_uninitialized_memory,
    rms_norm_reference,
)

from codex_ml.ops import rms_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2048, 4096), (2, 1000, 5120), (8192, 384), (3, 7, 130), (5, 1)])
def test_rms_norm_triton_on_cuda_matches_float64(shape, dtype):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(dtype)

    def x_grad_scale(inputs, grad_out):
        x, w = inputs
        return {0: (torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * grad_out * w).norm().item()}

    out, _ = check_against_reference(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_reference(x, w, EPS),
                                     [x, weight], [0, 1], dtype, x_grad_scale)
    assert out.dtype == dtype


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_triton_on_cuda_with_an_fp32_weight_gives_fp32(x_dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 512, 2048, device="cuda").to(x_dtype)
    weight = 1 + 0.5 * torch.randn(2048, device="cuda")
    out = rms_norm(x, weight, EPS)
    x32 = x.float()
    eager = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * weight
    assert out.dtype == torch.float32
    # x * rstd is rounded to x's dtype before the weight: an rstd one ulp off (another fp32 summation order than
    # eager's) flips that rounding for a few of the 4M elements, by one unit of x's dtype.
    torch.testing.assert_close(out, eager, rtol=2 * torch.finfo(x_dtype).eps, atol=1e-5)


def test_default_on_cuda_is_triton():
    from codex_ml.ops.dispatch import choose_impl

    torch.manual_seed(2)
    assert choose_impl("rms_norm", torch.device("cuda")) == "triton"
    x, weight = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16), torch.rand(384, device="cuda") + 0.5
    torch.testing.assert_close(rms_norm(x, weight), rms_norm(x, weight, impl="triton"), rtol=0, atol=0)
