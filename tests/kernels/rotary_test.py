"""codex_ml.ops.rotary (the C++ kernel kernels/rotary/rotary.cc, the eager formula, the Triton kernels) against
float64 references, as references.py describes for every layer op."""

import pytest
import torch
from references import LAYER_BOUNDS as BOUNDS
from references import (  # noqa: F401 (autouse fixture)
    check_against_reference,
    impl_shapes,
    poison_uninitialized_memory,
    rel_err,
    rope_tables,
    rotary_reference,
    run_with_cpu_capability,
)

from codex_ml.ops import rotary

DTYPES = list(BOUNDS)
ALL_IMPLS = ["cpu", "torch", "triton"]


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
    q = torch.randn(4, 64, 6, 64).transpose(1, 2)
    cos, sin = rope_tables(64, 64)
    torch.testing.assert_close(rotary(q, cos, sin, impl="cpu"), rotary(q, cos, sin, impl="torch"))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_opcheck(impl):
    torch.manual_seed(9)
    q = torch.randn(2, 7, 3, 16).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(7, 16)
    torch.library.opcheck(torch.ops.codex_ml.rotary.default, (q, cos, sin, impl))
    q_strided = torch.randn(2, 3, 16, 7).transpose(2, 3).requires_grad_()  # last dim strided: copied first
    torch.library.opcheck(torch.ops.codex_ml.rotary.default, (q_strided, cos, sin, impl))
    grad = torch.randn(2, 3, 7, 16)
    torch.library.opcheck(torch.ops.codex_ml.rotary_backward.default, (grad, cos, sin, list(q.stride()), impl))


def test_bad_inputs_get_a_clear_error():
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


def test_plain_cpu_loops_match_the_reference():
    """This machine takes the AVX2 loops; the plain ones run in a subprocess with ATEN_CPU_CAPABILITY=default."""
    run_with_cpu_capability("default", __file__, "cpu and not plain_cpu_loops and (matches_float64 or model_shapes)")
