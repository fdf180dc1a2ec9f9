"""Kernel sources of codex_ml: Triton kernels (triton/), compiled CPU extensions and CUDA libraries.

Assembled by Bazel into `codex_ml.kernels`. Kernels know only tensors and pointers; the op API,
autograd and dispatch live in `codex_ml.ops`.
"""

# The compiled extensions link against libtorch: importing torch first loads those libraries, so an
# extension imports whichever site-packages torch lives in (the RUNPATH covers only the usual layout).
import torch  # noqa: E402, F401
