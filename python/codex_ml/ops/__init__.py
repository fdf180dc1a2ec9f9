"""The one op API of codex_ml. Models call these; each dispatches to Triton, CUDA or C++ CPU kernels."""

from codex_ml.ops.attention import attention
from codex_ml.ops.loss import cross_entropy, linear_cross_entropy

__all__ = ["attention", "cross_entropy", "linear_cross_entropy"]
