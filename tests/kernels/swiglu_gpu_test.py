"""GPU tests of swiglu: CUDA tensors through the Triton kernels against float64 references, as references.py
describes for every layer op."""

import pytest
import torch
import torch.nn.functional as F
from references import check_against_reference, poison_uninitialized_memory  # noqa: F401 (an autouse fixture)

from codex_ml.ops import swiglu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2048, 11008), (2, 1000, 5632), (3, 17, 1000), (1,)])
def test_swiglu_triton_on_cuda_matches_float64(shape, dtype):
    torch.manual_seed(sum(shape))
    gate = torch.randn(shape, device="cuda") * 4
    gate.view(-1)[::97] = 60.0  # saturated sigmoids, both ways
    gate.view(-1)[1::97] = -60.0
    out, _ = check_against_reference(swiglu, lambda g, u: F.silu(g) * u,
                                     [gate.to(dtype), torch.randn(shape, device="cuda").to(dtype)], [0, 1], dtype)
    assert out.dtype == dtype
