"""codex_ml: training and fine-tuning code language models, with fused Triton/CUDA/C++ kernels."""

import pkgutil

# In Bazel runfiles and in the wheel, codex_ml is one directory. In a source checkout the
# assembled kernels live under bazel-bin/python/codex_ml/kernels: let the package span both.
__path__ = pkgutil.extend_path(__path__, __name__)

from codex_ml._version import __version__  # generated from tools/version.bzl

__all__ = ["__version__"]
