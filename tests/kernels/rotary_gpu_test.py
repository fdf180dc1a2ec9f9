"""GPU tests of rotary: CUDA tensors through the Triton kernels against float64 references, as references.py
describes for every layer op."""

import pytest
import torch
from references import (  # noqa: F401 (an autouse fixture)
    check_against_reference,
    poison_uninitialized_memory,
    rope_tables,
    rotary_reference,
)

from codex_ml.ops import rotary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available here)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,h,d", [(4, 2048, 32, 128), (2, 1000, 8, 64), (2, 129, 3, 96), (1, 17, 4, 2)])
def test_rotary_triton_on_cuda_matches_float64_and_keeps_strides(b, t, h, d, dtype):
    """q = proj(x).view(B, T, H, D).transpose(1, 2) as in the model: output and gradient keep x's strides."""
    torch.manual_seed(t + d)
    x = torch.randn(b, t, h, d, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = rope_tables(t, d, device="cuda")
    out, (grad,) = check_against_reference(lambda x: rotary(x, cos, sin),
                                           lambda x: rotary_reference(x, cos.double(), sin.double()), [x], [0], dtype)
    assert out.dtype == dtype and out.stride() == x.stride() and grad.stride() == x.stride()
