"""codex_ml.ops.swiglu (the C++ kernel kernels/swiglu/swiglu.cc, the eager formula, the Triton kernels) against
float64 references, as references.py describes for every layer op."""

import pytest
import torch
import torch.nn.functional as F
from references import LAYER_BOUNDS as BOUNDS
from references import (  # noqa: F401 (autouse fixture)
    check_against_reference,
    impl_shapes,
    poison_uninitialized_memory,
    run_with_cpu_capability,
)

from codex_ml.ops import swiglu

DTYPES = list(BOUNDS)
ALL_IMPLS = ["cpu", "torch", "triton"]


def swiglu_reference(gate, up):
    return F.silu(gate) * up


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


def test_cpu_and_torch_impls_agree_on_the_model_shapes():
    torch.manual_seed(8)
    gate, up = torch.randn(4, 64, 1024), torch.randn(4, 64, 1024)
    torch.testing.assert_close(swiglu(gate, up, impl="cpu"), swiglu(gate, up, impl="torch"))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_opcheck(impl):
    torch.manual_seed(9)
    gate, up = torch.randn(7, 33, requires_grad=True), torch.randn(7, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.swiglu.default, (gate, up, impl))


def test_bad_inputs_get_a_clear_error():
    with pytest.raises(ValueError, match="gate and up of one shape"):
        swiglu(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="pass both in one dtype"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="move them to one device"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        swiglu(torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta"), impl="cpu")


def test_plain_cpu_loops_match_the_reference():
    """This machine takes the AVX2 loops; the plain ones run in a subprocess with ATEN_CPU_CAPABILITY=default."""
    run_with_cpu_capability("default", __file__,
                            "cpu and not plain_cpu_loops and (matches_float64 or extreme_gates or model_shapes)")
