"""The one dispatch rule: which implementation (Triton, CUDA, C++ CPU, PyTorch) runs an op.

Every op answers the same question the same way, first match wins:

1. `impl=` passed to the op: binding.
2. CODEX_ML_<OP>_IMPL (e.g. CODEX_ML_RMS_NORM_IMPL, the op's name in capitals): binding.
3. CODEX_ML_IMPL: a preference for every op. It applies to the ops that have that implementation and can run
   these inputs with it; the others choose automatically (step 4). E.g. CODEX_ML_IMPL=cpu with a bf16 model:
   linear's C++ kernel takes only fp32, so linear goes to F.linear while the other ops run their CPU kernels.
4. Automatic: on CPU tensors the op's "cpu" implementation where it has one that takes the inputs, else "torch";
   on CUDA tensors "triton" where the op has Triton kernels and triton is importable, else "torch"; on any other
   device "torch". The CUDA kernels ("cuda") and the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) run
   only when chosen by 1-3.

A binding choice (1 or 2) the op cannot run is an error naming the choice, where it came from and what to use;
so is a value that names no implementation, wherever it is set. "auto" (or an empty variable) means step 4.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

IMPLS = ("triton", "cuda", "cpu", "torch")

# The implementations each op has. "cpu" is the op's CPU path: a C++ kernel, except for attention (PyTorch's
# fused flash kernel for the CPU) and cross_entropy (the chunked PyTorch rows on CPU tensors).
BACKENDS = {
    "attention": ("triton", "cuda", "cpu", "torch"),
    "cross_entropy": ("triton", "cuda", "cpu", "torch"),
    "linear": ("cpu", "torch"),
    "linear_cross_entropy": ("triton", "cuda", "cpu", "torch"),
    "rms_norm": ("triton", "cpu", "torch"),
    "rotary": ("triton", "cpu", "torch"),
    "swiglu": ("triton", "cpu", "torch"),
}


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only in its interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _requested(op: str, impl: str | None) -> tuple[str | None, str, bool]:
    """(the choice, or None for automatic; where it came from; whether it is binding)."""
    variable = f"CODEX_ML_{op.upper()}_IMPL"
    for value, name, binding in ((impl, "impl", True), (os.environ.get(variable), variable, True),
                                 (os.environ.get("CODEX_ML_IMPL"), "CODEX_ML_IMPL", False)):
        if value in (None, ""):
            continue
        source = f"impl={value!r}" if name == "impl" else f"{name}={value}"
        if value == "auto":
            return None, source, binding
        if value not in IMPLS:
            raise ValueError(f"unknown implementation {value!r} for {op}: choose one of "
                             f"{', '.join(map(repr, BACKENDS[op]))} or 'auto' ({source})")
        return value, source, binding
    return None, "", False


def _listing(op: str) -> str:
    names = [repr(b) for b in BACKENDS[op]]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _problem(choice: str, device: torch.device, unfit: Callable[[str], str | None]) -> str | None:
    """Why `choice` cannot run these inputs, as "<requirement>, got <what>", or None: first the requirement every
    op shares (the implementation runs on the tensors' device), then the op's own (`unfit`)."""
    if choice == "cpu" and device.type != "cpu":
        return f"needs CPU tensors, got tensors on {device}"
    if choice == "cuda" and device.type != "cuda":
        return f"needs CUDA tensors, got tensors on {device}"
    if choice == "triton" and not triton_available(device):
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and triton installed, got {device}"
    return unfit(choice)


def choose_impl(op: str, device: torch.device, impl: str | None = None,
                unfit: Callable[[str], str | None] = lambda choice: None) -> str:
    """The implementation that runs `op` on tensors on `device`, by the rule of this module.

    unfit(choice): why that implementation cannot take these inputs beyond their device (e.g. linear's C++
    kernel takes only fp32 outside autocast), as "<requirement>, got <what>", or None. An impossible binding
    choice raises ValueError "<op>: <choice and where it came from> <requirement>, got <what>".
    """
    choice, source, binding = _requested(op, impl)
    if choice is None:
        return _automatic(op, device, unfit)
    if choice not in BACKENDS[op]:
        if binding:
            alternatives = f"{_listing(op)} ({source} asks for it)"
            raise ValueError(f"{op} has no {choice} kernel: use impl={alternatives}")
        return _automatic(op, device, unfit)  # CODEX_ML_IMPL applies to the ops that have that implementation
    problem = _problem(choice, device, unfit)
    if problem is None:
        return choice
    if binding:
        raise ValueError(f"{op}: {source} {problem}")
    return _automatic(op, device, unfit)  # ... and can run these inputs with it


def _automatic(op: str, device: torch.device, unfit: Callable[[str], str | None]) -> str:
    backends = BACKENDS[op]
    if device.type == "cpu" and "cpu" in backends and unfit("cpu") is None:
        return "cpu"
    if device.type == "cuda" and "triton" in backends and triton_available(device) and unfit("triton") is None:
        return "triton"
    return "torch"


@functools.lru_cache(maxsize=None)
def load_extension(op: str):
    """Imports the compiled CPU extension of `op`, codex_ml.kernels.<op>.cpu (registering its torch ops)."""
    module = f"codex_ml.kernels.{op}.cpu"
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(
            f"the compiled kernel {module} is missing or failed to load ({err}); "
            "build it with `tools/bazel build //python:codex_ml` or reinstall the wheel"
        ) from err


def load_cuda_library(op: str, filename: str, fallback: str) -> ctypes.CDLL:
    """Loads codex_ml/kernels/<op>/<filename> (a plain CUDA library made by tools/cuda.bzl) with ctypes; a missing
    or broken library is an error that names the build command and the `fallback` implementation."""
    import codex_ml.kernels

    path = Path(codex_ml.kernels.__file__).parent / op / filename
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise RuntimeError(f"the CUDA {op} library {path} is missing or failed to load ({err}); build it with "
                           f"`tools/bazel build //kernels/{op}:{filename}` (needs nvcc) or use {fallback}") from err
