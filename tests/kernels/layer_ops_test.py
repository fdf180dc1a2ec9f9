"""codex_ml.ops rms_norm, swiglu and rotary (impl "cpu" = the C++ kernels, "torch" = the eager formulas,
"triton" = the Triton kernels in the interpreter, TRITON_INTERPRET=1, at small shapes only: it is slow) against
float64 PyTorch references, forward and backward, on fresh random inputs with poisoned outputs.

Error bounds (relative L2 error of the output and of every input gradient against float64, inputs rounded to
the tested dtype first): fp32 1e-5; fp16 2e-3 and bf16 1e-2 (the output and gradients are rounded to 11 and 8
significant bits; arithmetic is fp32 inside).
"""

import pytest
import torch
import torch.nn.functional as F
from references import poison_uninitialized_memory, rel_err, run_with_cpu_capability  # noqa: F401 (autouse fixture)

from codex_ml.ops import rms_norm, rotary, swiglu

BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(BOUNDS)
IMPLS = ["cpu", "torch"]
ALL_IMPLS = IMPLS + ["triton"]
EPS = 1e-5


def impl_shapes(shapes, triton_shapes):
    """(impl, shape) pairs: every shape for the C++ and eager paths, the small ones for Triton (interpreter)."""
    return [(impl, shape) for impl in IMPLS for shape in shapes] + [("triton", shape) for shape in triton_shapes]


def rms_norm_reference(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def eager_rms_norm(x, weight, eps):
    """codex_ml.models.gpt.RMSNorm.forward."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_tables(t, d):
    """As codex_ml.models.gpt.rope_tables: angles for the first half, duplicated into the second."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def check_against_reference(fn, reference, inputs, grad_inputs, dtype, grad_scale=None):
    """fn(*inputs) and the gradients of grad_inputs (indices) against reference(*float64 inputs).

    grad_scale(float64 inputs, grad_out) -> {index: norm}: a gradient's error is relative to at least that norm
    (for gradients that are differences of much larger terms).
    """
    for i in grad_inputs:
        inputs[i].requires_grad_()
    out = fn(*inputs)
    grad_out = torch.randn(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, [inputs[i] for i in grad_inputs], grad_out)
    ref_inputs = [t.detach().double().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
    ref = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in grad_inputs], grad_out.double())
    scales = grad_scale(ref_inputs, grad_out.double()) if grad_scale else {}
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < BOUNDS[dtype], "output"
    for i, g, r in zip(grad_inputs, grads, ref_grads):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert torch.isfinite(g).all(), f"grad of input {i}"
        error = (g.double() - r).norm().item() / max(r.norm().item(), scales.get(i, 0.0))
        assert error < BOUNDS[dtype], f"grad of input {i}"
    return out, grads


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,shape", impl_shapes([(1,), (7, 3), (1000, 384), (3, 17, 1000)],
                                                   [(1,), (7, 3), (3, 17, 130)]))
def test_swiglu_matches_float64(impl, dtype, shape):
    torch.manual_seed(sum(shape))
    gate = torch.randn(shape) * 4
    gate.view(-1)[::97] = 60.0  # saturated sigmoids, both ways
    gate.view(-1)[1::97] = -60.0
    gate, up = gate.to(dtype), torch.randn(shape).to(dtype)
    out, _ = check_against_reference(lambda g, u: swiglu(g, u, impl=impl), swiglu_reference, [gate, up], [0, 1],
                                     dtype)
    assert out.dtype == dtype and out.shape == gate.shape


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_swiglu_extreme_gates_stay_finite(impl):
    gate = torch.tensor([-1e38, -1e30, -1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 1e4, 1e30] * 2,
                        requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = swiglu(gate, up, impl=impl)
    d_gate, d_up = torch.autograd.grad(out.sum(), (gate, up))
    torch.testing.assert_close(out, F.silu(gate.detach()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_up, F.silu(gate.detach()), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(d_gate).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,shape", impl_shapes(
    [(1, 1, 1, 2), (2, 3, 17, 64), (1, 2, 129, 128), (3, 2, 1, 128), (1, 4, 129, 2)],
    [(1, 1, 1, 2), (2, 3, 17, 64), (1, 2, 17, 6), (3, 2, 1, 128), (1, 4, 17, 2)]))
def test_rotary_matches_float64(impl, dtype, shape):
    torch.manual_seed(sum(shape))
    t, d = shape[2], shape[3]
    x = torch.randn(shape).to(dtype)
    cos, sin = torch.randn(t, d), torch.randn(t, d)  # general tables: every (i, i + D/2) coefficient differs
    out, _ = check_against_reference(lambda x: rotary(x, cos, sin, impl=impl),
                                     lambda x: rotary_reference(x, cos.double(), sin.double()), [x], [0], dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reads_a_transposed_view_in_place_and_keeps_its_strides(impl, dtype):
    """q = proj(x).view(B, T, H, D).transpose(1, 2) as in the model: output and gradient keep x's strides."""
    torch.manual_seed(5)
    b, t, h, d = 2, 17, 3, 64
    x = torch.randn(b, t, h, d).to(dtype).transpose(1, 2)
    cos, sin = rope_tables(t, d)
    out, (grad,) = check_against_reference(lambda x: rotary(x, cos, sin, impl=impl),
                                           lambda x: rotary_reference(x, cos.double(), sin.double()), [x], [0], dtype)
    assert out.stride() == x.stride() and grad.stride() == x.stride()


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rotary_takes_a_gradient_with_other_strides(impl):
    torch.manual_seed(6)
    x = torch.randn(2, 9, 3, 8).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(9, 8)
    out = rotary(x, cos, sin, impl=impl)
    grad = torch.randn(2, 3, 8, 9).transpose(-1, -2)  # last dim strided: copied first
    (gx,) = torch.autograd.grad(out, x, grad)
    xd = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(rotary_reference(xd, cos.double(), sin.double()), xd, grad.double())
    assert gx.stride() == x.stride() and rel_err(gx, ref) < BOUNDS[torch.float32]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rotary_reads_rows_with_gaps_in_place(impl):
    """Rows of a wider tensor (stride(-1) == 1, not dense): read in place, output and gradient dense."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 32)[..., :16]
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    out, (grad,) = check_against_reference(lambda x: rotary(x, cos, sin, impl=impl),
                                           lambda x: rotary_reference(x, cos.double(), sin.double()), [x], [0],
                                           torch.float32)
    assert out.is_contiguous() and grad.is_contiguous()


def test_rotary_copies_an_input_whose_last_dim_is_strided():
    torch.manual_seed(7)
    x = torch.randn(1, 2, 5, 16)[..., ::2]
    cos, sin = rope_tables(5, 8)
    assert x.stride(-1) != 1
    torch.testing.assert_close(rotary(x, cos, sin), rotary_reference(x, cos, sin), rtol=1e-6, atol=1e-6)


def test_cpu_and_torch_impls_agree_on_the_model_shapes():
    torch.manual_seed(8)
    x, weight = torch.randn(4, 64, 384), torch.rand(384) + 0.5
    gate, up = torch.randn(4, 64, 1024), torch.randn(4, 64, 1024)
    q = torch.randn(4, 64, 6, 64).transpose(1, 2)
    cos, sin = rope_tables(64, 64)
    torch.testing.assert_close(rms_norm(x, weight, impl="cpu"), rms_norm(x, weight, impl="torch"))
    torch.testing.assert_close(swiglu(gate, up, impl="cpu"), swiglu(gate, up, impl="torch"))
    torch.testing.assert_close(rotary(q, cos, sin, impl="cpu"), rotary(q, cos, sin, impl="torch"))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_opcheck(impl):
    torch.manual_seed(9)
    x = torch.randn(5, 3, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.rms_norm.default, (x, weight, EPS, impl))
    torch.library.opcheck(torch.ops.codex_ml.rms_norm.default, (x.detach().bfloat16(), weight, EPS, impl))
    gate, up = torch.randn(7, 33, requires_grad=True), torch.randn(7, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.swiglu.default, (gate, up, impl))
    q = torch.randn(2, 7, 3, 16).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(7, 16)
    torch.library.opcheck(torch.ops.codex_ml.rotary.default, (q, cos, sin, impl))
    q_strided = torch.randn(2, 3, 16, 7).transpose(2, 3).requires_grad_()  # last dim strided: copied first
    torch.library.opcheck(torch.ops.codex_ml.rotary.default, (q_strided, cos, sin, impl))
    grad = torch.randn(2, 3, 7, 16)
    torch.library.opcheck(torch.ops.codex_ml.rotary_backward.default, (grad, cos, sin, list(q.stride()), impl))


def test_block_using_all_three_compiles_with_fullgraph():
    torch.manual_seed(10)
    b, t, h, d = 2, 11, 4, 16

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.Parameter(torch.rand(h * d) + 0.5)
            self.q = torch.nn.Linear(h * d, h * d, bias=False)
            self.gate = torch.nn.Linear(h * d, 96, bias=False)
            self.up = torch.nn.Linear(h * d, 96, bias=False)

        def forward(self, x, cos, sin):
            x = rms_norm(x, self.norm)
            q = rotary(self.q(x).view(b, t, h, d).transpose(1, 2), cos, sin)
            return swiglu(self.gate(x), self.up(x)).sum() + (q * q).sum()

    block, x = Block(), torch.randn(b, t, h * d)
    cos, sin = rope_tables(t, d)
    eager = block(x, cos, sin)
    eager.backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, cos, sin)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(block.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


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

    with pytest.raises(ValueError, match="gate and up of one shape"):
        swiglu(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="pass both in one dtype"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="move them to one device"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        swiglu(torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta"), impl="cpu")

    q = torch.randn(1, 2, 5, 8)
    cos, sin = rope_tables(5, 8)
    with pytest.raises(ValueError, match="expects x \\[B, H, T, D\\]"):
        rotary(q[0], cos, sin)
    with pytest.raises(ValueError, match="even head dim"):
        rotary(torch.randn(1, 2, 5, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cos must be \\[T, D\\] = \\[5, 8\\]"):
        rotary(q, *rope_tables(6, 8))
    with pytest.raises(ValueError, match="sin must be \\[T, D\\]"):
        rotary(q, cos, sin[:, :4])
    with pytest.raises(ValueError, match="move them to one device"):
        rotary(q, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="no gradient for cos and sin"):
        rotary(q, cos.requires_grad_(), sin)


def test_default_impl_is_the_cpu_kernel_on_cpu_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    from codex_ml.ops import dispatch
    from codex_ml.ops.dispatch import choose_layer_impl

    assert choose_layer_impl("rms_norm", torch.device("cpu"), None) == "cpu"
    assert choose_layer_impl("rms_norm", torch.device("cuda"), None) == "triton"
    assert choose_layer_impl("rms_norm", torch.device("meta"), None) == "torch"
    assert choose_layer_impl("swiglu", torch.device("cpu"), "torch") == "torch"
    assert choose_layer_impl("swiglu", torch.device("cpu"), "triton") == "triton"  # the interpreter, asked for
    monkeypatch.setenv("CODEX_ML_IMPL", "cuda")  # asked for every op: no CUDA kernel here, the default stands in
    assert choose_layer_impl("rotary", torch.device("cuda"), None) == "triton"
    assert choose_layer_impl("rotary", torch.device("cpu"), None) == "cpu"
    monkeypatch.setenv("CODEX_ML_IMPL", "triton")
    assert choose_layer_impl("rotary", torch.device("cpu"), None) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        choose_layer_impl("rotary", torch.device("cpu"), None)
    monkeypatch.delenv("CODEX_ML_IMPL")
    monkeypatch.setattr(dispatch, "triton_available", lambda device: False)  # triton not installed
    assert choose_layer_impl("rotary", torch.device("cuda"), None) == "torch"


def test_plain_cpu_loops_match_the_reference():
    """This machine takes the AVX2 loops; the plain ones run in a subprocess with ATEN_CPU_CAPABILITY=default."""
    run_with_cpu_capability("default", __file__, "cpu and not plain_cpu_loops and (matches_float64 or extreme_gates "
                                                 "or model_shapes)")
