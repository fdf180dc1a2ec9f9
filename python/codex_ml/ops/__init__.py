"""The one op API of codex_ml. Models call these; each dispatches to Triton, CUDA or C++ CPU kernels by the rule of
codex_ml.ops.dispatch. One module per op, named as its kernel folder (kernels/<op>/)."""

from codex_ml.ops.attention import attention
from codex_ml.ops.cross_entropy import cross_entropy, linear_cross_entropy
from codex_ml.ops.linear import linear
from codex_ml.ops.rms_norm import rms_norm
from codex_ml.ops.rotary import rotary
from codex_ml.ops.swiglu import swiglu

__all__ = ["attention", "cross_entropy", "linear", "linear_cross_entropy", "rms_norm", "rotary", "swiglu"]
