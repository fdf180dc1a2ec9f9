"""Kernel sources of codex_ml: Triton kernels (triton/), compiled CPU extensions and CUDA libraries.

Assembled by Bazel into `codex_ml.kernels`. Kernels know only tensors and pointers; the op API,
autograd and dispatch live in `codex_ml.ops`.
"""
