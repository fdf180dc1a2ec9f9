"""GPU tests of the losses on CUDA tensors, for both row kernels: the Triton one (impl="triton", the CUDA default)
and the plain-CUDA one (impl="cuda", libcodex_cross_entropy.so), fp32, bf16 and fp16, forward and backward,
against a float64 reference on the CPU. Skipped, with the reason, where there is no CUDA GPU; the CUDA row kernel
itself also runs on the CPU, in an emulator, in tests/kernels/cuda_emu_test.py.

Error bounds (relative, max-abs error over max-abs reference): fp32 2e-4, fp16 1e-2, bf16 2e-2 (the inputs
keep 11 or 8 mantissa bits and the outputs are rounded to them; the kernels compute in fp32). Every allocation
is poisoned with NaN (fill_uninitialized_memory), so a loss, lse or gradient element never written fails.
"""

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from references import cross_entropy_reference as reference
from references import poison_uninitialized_memory  # noqa: F401 (an autouse fixture)

from codex_ml.ops import _cross_entropy_cuda, cross_entropy, linear_cross_entropy

# The module (codex_ml.ops.cross_entropy, as an attribute of codex_ml.ops, is the function).
loss_module = importlib.import_module("codex_ml.ops.cross_entropy")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

IMPLS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}





def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.detach().double().cpu() - expected).abs().max()
    return (diff / expected.abs().max().clamp(min=1e-12)).item()


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.cpu()).abs().max().item()


@functools.lru_cache(maxsize=4)
def linear_case(n, h, v, dtype, reduction, options):
    """Inputs and the float64 reference (loss, grads) of one case, shared by both impls (computed once)."""
    opts = dict(options)
    gen = torch.Generator().manual_seed(n + h + v)
    hidden = (torch.randn(n, h, generator=gen) / h ** 0.5).to(dtype)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    target[::3] = -100
    ref_args = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference(F.linear(*ref_args), target, reduction=reduction, **opts)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), ref_args)
    return (hidden, weight, bias, target, grad_out), (ref.detach(), ref_grads)


SHAPES = [(5, 8, 3), (7, 64, 1000), (33, 48, 2049), (1000, 768, 32003)]


def check_linear_case(impl, n, h, v, dtype, reduction, autocast=None):
    """linear_cross_entropy with label_smoothing 0.1 on CUDA copies of linear_case's inputs against its float64
    reference: loss and the gradients of hidden, weight and bias, finite, in the expected dtypes, within the
    bound of the dtype the products run in (torch.autocast's when given: then the loss and gradients are fp32)."""
    (hidden, weight, bias, target, grad_out), (ref, ref_grads) = linear_case(
        n, h, v, dtype, reduction, (("label_smoothing", 0.1),))
    args = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = linear_cross_entropy(args[0], args[1], target.cuda(), bias=args[2], reduction=reduction,
                                    label_smoothing=0.1, impl=impl)
    assert loss.dtype == dtype and torch.isfinite(loss).all()
    grads = torch.autograd.grad((loss * grad_out.to(loss.dtype).cuda()).sum(), args)
    tol = TOLERANCE[autocast or dtype]
    assert rel_err(loss, ref) < tol
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert ours.dtype == dtype and torch.isfinite(ours).all(), name
        assert rel_err(ours, theirs) < tol, (name, rel_err(ours, theirs))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_linear_cross_entropy_on_cuda_matches_float64(impl, dtype, reduction, n, h, v):
    check_linear_case(impl, n, h, v, dtype, reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_on_cuda(monkeypatch, impl, dtype, reduction):
    """300-row chunks (the last one partial): grad_weight accumulated in fp32 across chunks by cuBLAS products
    with half operands and an fp32 result written over their own input (addmm out_dtype, out=)."""
    monkeypatch.setattr(loss_module, "_chunk_size", lambda v, device: 300)
    check_linear_case(impl, 1000, 768, 32003, dtype, reduction)
    assert not loss_module._HALF_ADDMM_FAILED  # the half-operand, fp32-result product ran, not its fallback


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_on_cuda(impl, reduction):
    """fp32 parameters under torch.autocast(bf16), as in mixed-precision training: bf16 products, fp32 loss and
    fp32 gradients, within the bf16 bound of float64."""
    check_linear_case(impl, 1000, 768, 32003, torch.float32, reduction, autocast=torch.bfloat16)


OPTIONS = [
    (("z_loss", 1e-3),),
    (("softcap", 5.0),),
    (("label_smoothing", 0.2), ("z_loss", 1e-2), ("softcap", 30.0)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(k for k, _ in o))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_options(impl, dtype, options, reduction):
    (hidden, weight, bias, target, grad_out), (ref, ref_grads) = linear_case(65, 96, 20011, dtype, reduction, options)
    opts = dict(options)
    args = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(args[0], args[1], target.cuda(), bias=args[2], reduction=reduction,
                                label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
                                logit_softcap=opts.get("softcap"), impl=impl)
    grads = torch.autograd.grad((loss * grad_out.to(loss.dtype).cuda()).sum(), args)
    tol = TOLERANCE[dtype]
    assert rel_err(loss, ref) < tol
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(ours).all() and rel_err(ours, theirs) < tol, (name, rel_err(ours, theirs))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_gradients(impl, reduction):
    hidden = torch.randn(9, 16, device="cuda", requires_grad=True)
    weight = torch.randn(4099, 16, device="cuda", requires_grad=True)
    target = torch.full((9,), -100, device="cuda")
    loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-3, impl=impl)
    grads = torch.autograd.grad((loss * torch.rand_like(loss)).sum(), [hidden, weight])
    assert torch.all(loss == 0)
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("v", [3, 1001, 32003])
def test_cross_entropy_on_cuda_matches_float64(impl, dtype, reduction, v):
    gen = torch.Generator().manual_seed(v)
    logits = (torch.randn(300, v, generator=gen) * 5).to(dtype)
    target = torch.randint(0, v, (300,), generator=gen)
    target[::4] = -100
    ref_logits = logits.double().requires_grad_()
    ref = reference(ref_logits, target, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((ref * grad_out).sum(), [ref_logits])
    ours_logits = logits.cuda().requires_grad_()
    loss = cross_entropy(ours_logits, target.cuda(), reduction=reduction, label_smoothing=0.1, z_loss=1e-3, impl=impl)
    (grad,) = torch.autograd.grad((loss * grad_out.to(loss.dtype).cuda()).sum(), [ours_logits])
    assert loss.dtype == dtype and grad.dtype == dtype
    assert rel_err(loss, ref.detach()) < TOLERANCE[dtype]
    assert torch.isfinite(grad).all() and rel_err(grad, ref_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_non_contiguous_logits_and_huge_values(impl):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(3001, 40, generator=gen) * 3e3).t()  # [40, 3001], logits ~1e4, not contiguous
    target = torch.randint(0, 3001, (40,), generator=gen)
    ref_logits = logits.double().requires_grad_()
    ref = reference(ref_logits, target, reduction="mean")
    (ref_grad,) = torch.autograd.grad(ref, [ref_logits])
    ours = logits.cuda().requires_grad_()
    assert not ours.is_contiguous()
    loss = cross_entropy(ours, target.cuda(), impl=impl)
    (grad,) = torch.autograd.grad(loss, [ours])
    assert torch.isfinite(loss) and rel_err(loss, ref.detach()) < 1e-5
    # fp32 rounds an lse of ~1e4 to within 5e-4, so the probabilities carry a relative error up to that.
    assert torch.isfinite(grad).all() and rel_err(grad, ref_grad) < 1e-3


# The CUDA row kernel by itself, against _chunk_rows in float64: V around the kernel's thresholds (a warp per
# row up to 2048, a 256-thread block up to 16384, 512 threads above), rows that start off 16-byte boundaries
# (the float4 path's scalar head and tail), every option, ignored rows, and the gradient in place. Errors are
# measured against the size of the terms (the lse for the loss, row_scale for the gradient): at V = 1 the loss
# and gradient are differences of equal terms (0 up to rounding).
@pytest.mark.parametrize("v", [1, 3, 4, 2047, 2048, 2049, 16383, 16384, 16385, 50001])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("label_smoothing,z_loss,softcap", [(0.0, 0.0, 0.0), (0.1, 1e-3, 0.0), (0.0, 0.0, 20.0),
                                                            (0.2, 1e-2, 30.0)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_cuda_row_kernel_matches_float64(v, offset, label_smoothing, z_loss, softcap, with_grad):
    n = 37
    gen = torch.Generator().manual_seed(v * 7 + offset)
    x = torch.randn(n, v, generator=gen) * 8
    target = torch.randint(0, v, (n,), generator=gen)
    target[::5] = -7  # ignore_index
    scale = torch.rand(n, generator=gen) + 0.5
    ref_loss, ref_lse, ref_grad = loss_module._chunk_rows(x.double(), target, scale if with_grad else None, -7,
                                                          label_smoothing, z_loss, softcap)
    flat = torch.full((n * v + offset,), float("nan"), device="cuda")
    logits = flat[offset:].view(n, v)
    logits.copy_(x)
    loss, lse = _cross_entropy_cuda.cross_entropy_rows(logits, target.cuda(), scale.cuda() if with_grad else None,
                                              ignore_index=-7, label_smoothing=label_smoothing, z_loss=z_loss,
                                              softcap=softcap)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    terms = max(ref_lse.abs().max().item(), ref_loss.abs().max().item(), 1.0)
    assert max_err(loss, ref_loss) < 1e-5 * terms and max_err(lse, ref_lse) < 1e-5 * terms
    assert torch.all(loss.cpu()[::5] == 0) and torch.all(lse.cpu()[::5] == 0)
    if with_grad:
        grad_terms = max(ref_grad.abs().max().item(), scale.max().item() * (1 + 2 * z_loss * terms))
        assert torch.isfinite(logits).all() and max_err(logits, ref_grad) < 1e-5 * grad_terms
        assert torch.all(logits.cpu()[::5] == 0)
    else:
        assert torch.equal(logits.cpu(), x)  # left unchanged
    assert torch.isnan(flat[:offset]).all()  # nothing written before the rows


def test_cuda_row_kernel_strides_over_more_rows_than_blocks():
    # 9M rows of V = 3: more than the kernel's 2^20 blocks of 8 rows, so blocks loop over rows.
    n, v = 9_000_000, 3
    x = torch.randn(n, v, device="cuda") * 4
    target = torch.randint(0, v, (n,), device="cuda")
    target[::11] = -100
    scale = torch.rand(n, device="cuda")
    ref_loss, ref_lse, ref_grad = loss_module._chunk_rows(x.double(), target, scale, -100, 0.1, 1e-3, 0.0)
    loss, lse = _cross_entropy_cuda.cross_entropy_rows(x, target, scale, ignore_index=-100, label_smoothing=0.1,
                                                       z_loss=1e-3, softcap=0.0)
    assert max_err(loss, ref_loss) < 1e-5 * ref_lse.abs().max().item()
    assert max_err(lse, ref_lse) < 1e-5 * ref_lse.abs().max().item()
    assert max_err(x, ref_grad) < 1e-5 * ref_grad.abs().max().item()


def test_default_on_cuda_is_triton_and_the_environment_selects_cuda(monkeypatch):
    calls = []
    real = _cross_entropy_cuda.cross_entropy_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cross_entropy_cuda, "cross_entropy_rows", spy)
    monkeypatch.delenv("CODEX_ML_IMPL", raising=False)
    monkeypatch.delenv("CODEX_ML_LINEAR_CROSS_ENTROPY_IMPL", raising=False)
    monkeypatch.delenv("CODEX_ML_CROSS_ENTROPY_IMPL", raising=False)
    hidden, weight = torch.randn(20, 32, device="cuda"), torch.randn(500, 32, device="cuda")
    target = torch.randint(0, 500, (20,), device="cuda")
    default = linear_cross_entropy(hidden, weight, target)
    assert not calls
    torch.testing.assert_close(default, linear_cross_entropy(hidden, weight, target, impl="triton"), rtol=0, atol=0)
    monkeypatch.setenv("CODEX_ML_LINEAR_CROSS_ENTROPY_IMPL", "cuda")
    by_env = linear_cross_entropy(hidden, weight, target)
    assert calls
    torch.testing.assert_close(by_env, default, rtol=1e-5, atol=1e-6)
    calls.clear()
    cross_entropy(hidden @ weight.t(), target)
    assert not calls  # each loss has its own variable
    monkeypatch.setenv("CODEX_ML_CROSS_ENTROPY_IMPL", "cuda")
    cross_entropy(hidden @ weight.t(), target)
    assert calls


def test_cuda_kernel_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="fp32"):
        _cross_entropy_cuda.cross_entropy_rows(torch.zeros(2, 3, device="cuda", dtype=torch.bfloat16),
                                      torch.zeros(2, dtype=torch.long, device="cuda"), None, ignore_index=-100,
                                      label_smoothing=0.0, z_loss=0.0, softcap=0.0)
