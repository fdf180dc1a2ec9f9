"""The one dispatch point: which implementation (Triton, CUDA, C++ CPU, PyTorch) runs an op.

Chosen by the tensor's device and what is available, overridable per call (`impl=`) or per
process with the environment variable CODEX_ML_IMPL (all ops) or CODEX_ML_<OP>_IMPL (one op,
e.g. CODEX_ML_ATTENTION_IMPL=cuda).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
from pathlib import Path

import torch

IMPLS = ("triton", "cuda", "cpu", "torch")


def requested_impl(op: str, impl: str | None = None) -> str | None:
    """The implementation asked for by argument or environment, validated; None means auto."""
    choice = impl or os.environ.get(f"CODEX_ML_{op.upper()}_IMPL") or os.environ.get("CODEX_ML_IMPL")
    if choice in (None, "", "auto"):
        return None
    if choice not in IMPLS:
        raise ValueError(f"unknown implementation {choice!r} for {op}: choose one of {', '.join(IMPLS)} or 'auto'")
    return choice


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """Imports the compiled CPU extension codex_ml.kernels.<name> (registering its torch ops)."""
    try:
        return importlib.import_module(f"codex_ml.kernels.{name}")
    except ImportError as err:
        raise RuntimeError(
            f"the compiled kernel codex_ml.kernels.{name} is missing or failed to load ({err}); "
            "build it with `tools/bazel build //python:codex_ml` or reinstall the wheel"
        ) from err


def load_cuda_library(filename: str, what: str, fallback: str) -> ctypes.CDLL:
    """Loads codex_ml/kernels/<filename> (a plain CUDA library made by tools/cuda.bzl) with ctypes; a missing or
    broken library is an error that names the build command and the `fallback` implementation."""
    import codex_ml.kernels

    path = Path(codex_ml.kernels.__file__).with_name(filename)
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise RuntimeError(f"the CUDA {what} library {path} is missing or failed to load ({err}); build it with "
                           f"`tools/bazel build //kernels:{filename}` (needs nvcc) or use {fallback}") from err


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only in its interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_impl(op: str, device: torch.device, impl: str | None, default_cuda: str = "triton") -> str:
    """Returns the implementation to run `op` on `device`, raising a clear error if impossible."""
    choice = requested_impl(op, impl)
    if choice is None:
        return default_cuda if device.type == "cuda" else "cpu"
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: impl='cuda' needs CUDA tensors, got tensors on {device}")
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: impl='cpu' needs CPU tensors, got tensors on {device}")
    if choice == "triton" and not triton_available(device):
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    return choice


def choose_layer_impl(op: str, device: torch.device, impl: str | None) -> str:
    """The implementation ("triton", "cpu" or "torch") of an elementwise layer op: rms_norm, swiglu, rotary.

    By default "cpu" on CPU tensors, "triton" on CUDA tensors where triton is importable, and "torch" (the
    eager formulas) everywhere else. "triton" on CPU tensors only when asked for, under TRITON_INTERPRET=1.
    They have no CUDA kernel: impl="cuda" passed to the op is an error; asked for by CODEX_ML_IMPL or
    CODEX_ML_<OP>_IMPL (for every op), the default stands in.
    """
    if impl == "cuda":
        raise ValueError(f"{op} has no cuda kernel: use impl='triton' (the default on CUDA tensors), 'torch' or "
                         "'cpu' (the default on CPU tensors)")
    choice = requested_impl(op, impl)
    if choice in (None, "cuda"):
        if device.type == "cpu":
            return "cpu"
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    return choose_impl(op, device, choice)


def choose_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, impl: str | None) -> str:
    """"cpu" (the C++ kernel) or "torch" (F.linear) for these inputs. impl="cpu" on inputs the kernel cannot
    take is an error that says why; asked for by the environment (CODEX_ML_IMPL, CODEX_ML_LINEAR_IMPL), only
    "torch" is binding and the rest leave the default standing."""
    if impl in ("triton", "cuda"):
        raise ValueError(f"linear has no {impl} kernel: on CUDA tensors it is F.linear (cuBLAS); use impl='torch' "
                         "or 'cpu' (the default for fp32 CPU tensors)")
    tensors = [t for t in (x, weight, bias) if t is not None]
    fits = (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))
    if impl == "cpu" and not fits:
        raise ValueError("linear: impl='cpu' takes fp32 CPU tensors outside autocast, got "
                         f"{', '.join(f'{t.dtype} on {t.device}' for t in tensors)}; use impl='torch'")
    if requested_impl("linear", impl) == "torch":
        return "torch"
    # Auto, or any other choice made for every op by the environment (CODEX_ML_IMPL=cpu included: inputs the
    # kernel cannot take, such as a bf16 model's, go to F.linear rather than fail).
    return "cpu" if fits else "torch"
