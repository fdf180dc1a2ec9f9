"""The one op API of codex_ml. Models call these; each dispatches to Triton, CUDA or C++ CPU kernels."""

from codex_ml.ops.activation import swiglu
from codex_ml.ops.attention import attention
from codex_ml.ops.linear import linear
from codex_ml.ops.loss import cross_entropy, linear_cross_entropy
from codex_ml.ops.norm import rms_norm
from codex_ml.ops.rotary import rotary

__all__ = ["attention", "cross_entropy", "linear", "linear_cross_entropy", "rms_norm", "rotary", "swiglu"]
