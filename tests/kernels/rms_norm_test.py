"""codex_ml.ops.rms_norm (the C++ kernel kernels/rms_norm/rms_norm.cc, the eager formula, the Triton kernels) against
float64 references, as references.py describes for every layer op."""

import pytest
import torch
from references import LAYER_BOUNDS as BOUNDS
from references import (  # noqa: F401 (autouse fixture)
    check_against_reference,
    impl_shapes,
    poison_uninitialized_memory,
    rel_err,
    rms_norm_reference,
    run_with_cpu_capability,
)

from codex_ml.ops import rms_norm

DTYPES = list(BOUNDS)
ALL_IMPLS = ["cpu", "torch", "triton"]
EPS = 1e-5


def eager_rms_norm(x, weight, eps):
    """codex_ml.models.gpt.RMSNorm.forward."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,shape", impl_shapes(
    [(1, 1), (7, 3), (1, 384), (1000, 384), (7, 1000), (1003, 3), (2, 17, 384)],
    [(1, 1), (7, 3), (1, 130), (64, 96), (2, 17, 130)]))
def test_rms_norm_matches_float64(impl, dtype, shape):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)

    def x_grad_scale(inputs, grad_out):
        """dx = rstd * (g w - n mean(g w n)) nearly cancels for small H (exactly, but for eps, at H = 1)."""
        x, w = inputs
        return {0: (torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * grad_out * w).norm().item()}

    out, _ = check_against_reference(lambda x, w: rms_norm(x, w, EPS, impl=impl),
                                     lambda x, w: rms_norm_reference(x, w, EPS), [x, weight], [0, 1], dtype,
                                     x_grad_scale)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
def test_rms_norm_mixed_dtypes_follow_the_eager_module(impl, x_dtype, w_dtype):
    """Output dtype promote(x, weight), the normalized x rounded to x's dtype first, as the eager module does."""
    torch.manual_seed(3)
    x = torch.randn(33, 96).to(x_dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(96)).to(w_dtype).requires_grad_()
    out = rms_norm(x, weight, EPS, impl=impl)
    eager = eager_rms_norm(x, weight, EPS)
    assert out.dtype == eager.dtype == torch.promote_types(x_dtype, w_dtype)
    # The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds): the rounded x * r may be an ulp off.
    rtol = 2 ** -7 if impl == "triton" and x_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, eager, rtol=rtol, atol=1e-5)
    grad = torch.randn(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, (x, weight), grad)
    eager_grads = torch.autograd.grad(eager, (x, weight), grad)
    for g, e in zip(grads, eager_grads):
        assert g.dtype == e.dtype
        assert rel_err(g, e) < 1e-2


def test_cpu_and_torch_impls_agree_on_the_model_shapes():
    torch.manual_seed(8)
    x, weight = torch.randn(4, 64, 384), torch.rand(384) + 0.5
    torch.testing.assert_close(rms_norm(x, weight, impl="cpu"), rms_norm(x, weight, impl="torch"))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_opcheck(impl):
    torch.manual_seed(9)
    x = torch.randn(5, 3, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.rms_norm.default, (x, weight, EPS, impl))
    torch.library.opcheck(torch.ops.codex_ml.rms_norm.default, (x.detach().bfloat16(), weight, EPS, impl))


def test_bad_inputs_get_a_clear_error():
    x, weight = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must be \\[H\\]"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="expects x \\[..., H\\] and weight \\[H\\]"):
        rms_norm(x, torch.randn(8, 1))
    with pytest.raises(ValueError, match="rms_norm supports fp32, bf16 and fp16"):
        rms_norm(x.double(), weight)
    with pytest.raises(ValueError, match="move them to one device"):
        rms_norm(x, weight.to("meta"))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, weight, -1.0)
    with pytest.raises(ValueError, match="no cuda kernel: use impl='triton'"):
        rms_norm(x, weight, impl="cuda")
    with pytest.raises(ValueError, match="H <= 65536 .* use impl='torch'"):
        rms_norm(torch.randn(1, 65537), torch.randn(65537), impl="triton")


def test_plain_cpu_loops_match_the_reference():
    """This machine takes the AVX2 loops; the plain ones run in a subprocess with ATEN_CPU_CAPABILITY=default."""
    run_with_cpu_capability("default", __file__, "cpu and not plain_cpu_loops and (matches_float64 or model_shapes)")
