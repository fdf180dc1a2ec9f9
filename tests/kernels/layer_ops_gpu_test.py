"""GPU tests of rms_norm, swiglu and rotary: CUDA tensors through the Triton kernels (the CUDA default) at the
shapes of a Llama-style model, fp32, bf16 and fp16, forward and backward against float64 references (computed on
the GPU). Skipped, with the reason, where there is no CUDA GPU.

Error bounds (relative L2 error of the output and of every input gradient, inputs rounded to the tested dtype
first), as in layer_ops_test.py: fp32 1e-5; fp16 2e-3 and bf16 1e-2 (outputs and gradients rounded to 11 and 8
significant bits, fp32 arithmetic inside). Every allocation is poisoned with NaN (fill_uninitialized_memory), so
unwritten elements fail.
"""

import pytest
import torch
import torch.nn.functional as F
from references import poison_uninitialized_memory, rel_err  # noqa: F401 (an autouse fixture)

from codex_ml.ops import rms_norm, rotary, swiglu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(BOUNDS)
EPS = 1e-5


def rms_norm_reference(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_tables(t, d):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32, device="cuda"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def check(fn, reference, inputs, dtype, grad_scale=None):
    """fn(*inputs) (the Triton kernels) and the gradients of every input against reference(*float64 inputs).

    grad_scale(float64 inputs, grad_out) -> {index: norm}: a gradient's error is relative to at least that norm.
    """
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    scales = grad_scale(ref_inputs, grad_out.double()) if grad_scale else {}
    assert torch.isfinite(out).all() and rel_err(out, ref) < BOUNDS[dtype], ("output", rel_err(out, ref))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape and torch.isfinite(g).all()
        error = (g.double() - r).norm().item() / max(r.norm().item(), scales.get(i, 0.0))
        assert error < BOUNDS[dtype], (f"grad of input {i}", error)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2048, 4096), (2, 1000, 5120), (8192, 384), (3, 7, 130), (5, 1)])
def test_rms_norm_triton_on_cuda_matches_float64(shape, dtype):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(dtype)

    def x_grad_scale(inputs, grad_out):
        x, w = inputs
        return {0: (torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * grad_out * w).norm().item()}

    out, _ = check(lambda x, w: rms_norm(x, w, EPS), rms_norm_reference, [x, weight], dtype, x_grad_scale)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2048, 11008), (2, 1000, 5632), (3, 17, 1000), (1,)])
def test_swiglu_triton_on_cuda_matches_float64(shape, dtype):
    torch.manual_seed(sum(shape))
    gate = torch.randn(shape, device="cuda") * 4
    gate.view(-1)[::97] = 60.0  # saturated sigmoids, both ways
    gate.view(-1)[1::97] = -60.0
    out, _ = check(swiglu, lambda g, u: F.silu(g) * u, [gate.to(dtype), torch.randn(shape, device="cuda").to(dtype)],
                   dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,h,d", [(4, 2048, 32, 128), (2, 1000, 8, 64), (2, 129, 3, 96), (1, 17, 4, 2)])
def test_rotary_triton_on_cuda_matches_float64_and_keeps_strides(b, t, h, d, dtype):
    """q = proj(x).view(B, T, H, D).transpose(1, 2) as in the model: output and gradient keep x's strides."""
    torch.manual_seed(t + d)
    x = torch.randn(b, t, h, d, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = rope_tables(t, d)
    out, (grad,) = check(lambda x: rotary(x, cos, sin), lambda x: rotary_reference(x, cos.double(), sin.double()),
                         [x], dtype)
    assert out.dtype == dtype and out.stride() == x.stride() and grad.stride() == x.stride()


def test_default_on_cuda_is_triton():
    from codex_ml.ops.dispatch import choose_layer_impl

    torch.manual_seed(2)
    assert choose_layer_impl("rms_norm", torch.device("cuda"), None) == "triton"
    x, weight = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16), torch.rand(384, device="cuda") + 0.5
    torch.testing.assert_close(rms_norm(x, weight), rms_norm(x, weight, impl="triton"), rtol=0, atol=0)
