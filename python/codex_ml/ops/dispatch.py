"""The one dispatch rule: which implementation (Triton, CUDA, C++ CPU, PyTorch) runs an op.

Every op answers the same question the same way, first match wins:

1. `impl=` passed to the op: binding.
2. CODEX_ML_<OP>_IMPL (e.g. CODEX_ML_RMS_NORM_IMPL, the op's name in capitals): binding.
3. CODEX_ML_IMPL: a preference for every op. It applies to the ops that have that implementation and can run
   these inputs with it; the others choose automatically (step 4). E.g. CODEX_ML_IMPL=cpu with a bf16 model:
   linear's C++ kernel takes only fp32, so linear goes to F.linear while the other ops run their CPU kernels.
4. Automatic: on CPU tensors the op's "cpu" implementation where it has one that takes the inputs (and, for a C++
   kernel, whose compiled extension loads under the installed torch), else "torch";
   on CUDA tensors "triton" where the op has Triton kernels and triton is importable, else "torch"; on any other
   device "torch". The CUDA kernels ("cuda") and the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) run
   only when chosen by 1-3.

A binding choice (1 or 2) the op cannot run is an error naming the choice, where it came from and what to use;
so is a value that names no implementation, wherever it is set. "auto" (or an empty variable) means step 4.

A compiled extension that does not load (built for another torch, a library missing) never stops `import codex_ml`:
the ops it serves run their PyTorch path, and one warning per process says which extension, why and how to get
the fast path back.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# The ops whose "cpu" implementation is a C++ kernel -> its extension, codex_ml.kernels.<extension>.cpu.
EXTENSIONS = {
    "linear": "linear",
    "linear_cross_entropy": "cross_entropy",
    "rms_norm": "rms_norm",
    "rotary": "rotary",
    "swiglu": "swiglu",
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


def _problem(op: str, choice: str, device: torch.device, unfit: Callable[[str], str | None]) -> str | None:
    """Why `choice` cannot run these inputs, as "<requirement>, got <what>", or None: first the requirement every
    op shares (the implementation runs on the tensors' device), then the op's own (`unfit`)."""
    if choice == "cpu" and device.type != "cpu":
        return f"needs CPU tensors, got tensors on {device}"
    if choice == "cpu" and op in EXTENSIONS and (error := extension_error(EXTENSIONS[op])) is not None:
        return f"needs its compiled kernel, but {error}; {FAST_PATH_HINT}, or use impl='torch'"
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
    problem = _problem(op, choice, device, unfit)
    if problem is None:
        return choice
    if binding:
        raise ValueError(f"{op}: {source} {problem}")
    return _automatic(op, device, unfit)  # ... and can run these inputs with it


def _automatic(op: str, device: torch.device, unfit: Callable[[str], str | None]) -> str:
    backends = BACKENDS[op]
    if device.type == "cpu" and "cpu" in backends and _problem(op, "cpu", device, unfit) is None:
        return "cpu"
    if device.type == "cuda" and "triton" in backends and triton_available(device) and unfit("triton") is None:
        return "triton"
    return "torch"


FAST_PATH_HINT = ("for the compiled kernels install torch within the wheel's Requires-Dist range "
                  "(docs/using-the-wheel.md), or build codex_ml against this torch with "
                  "`tools/bazel build //python:wheel`")


@functools.lru_cache(maxsize=None)
def _import_extension(name: str) -> tuple[object | None, str | None]:
    """(module, None) or (None, why it does not load): codex_ml.kernels.<name>.cpu, imported once per process."""
    try:
        return importlib.import_module(f"codex_ml.kernels.{name}.cpu"), None
    except (ImportError, OSError, RuntimeError) as err:  # ABI mismatch, missing library, failed registration
        return None, str(err)


def _unloadable() -> str:
    """The extensions that do not load and the first reason, e.g. "codex_ml.kernels.{linear, swiglu}.cpu do not
    load under torch 2.14.1 (...)", or "" where all load."""
    failed = {name: error for name in sorted(set(EXTENSIONS.values())) if (error := _import_extension(name)[1])}
    if not failed:
        return ""
    return (f"codex_ml.kernels.{{{', '.join(failed)}}}.cpu do not load under torch {torch.__version__} "
            f"({next(iter(failed.values()))})")


@functools.lru_cache(maxsize=None)
def _warn_unloadable() -> None:
    """The one warning of a process about extensions that do not load: names them all (they usually fail together)."""
    warnings.warn(f"{_unloadable()}: the ops run their PyTorch implementations instead; {FAST_PATH_HINT}",
                  RuntimeWarning, stacklevel=2)


# Under torch.compile the answer is a constant of the trace: Dynamo calls this instead of tracing the import.
@torch.compiler.assume_constant_result
def extension_error(name: str) -> str | None:
    """Why the compiled extension codex_ml.kernels.<name>.cpu does not load, or None where it does; the first
    failure in a process warns once."""
    error = _import_extension(name)[1]
    if error is None:
        return None
    _warn_unloadable()
    return f"codex_ml.kernels.{name}.cpu does not load under torch {torch.__version__} ({error})"


def load_extension(name: str):
    """Imports the compiled CPU extension codex_ml.kernels.<name>.cpu (registering its torch ops); one that does not
    load is a RuntimeError saying why and how to get it."""
    module, error = _import_extension(name)
    if module is None:
        raise RuntimeError(f"{extension_error(name)}; {FAST_PATH_HINT}")
    return module


def run_kernel(impl: str, op: str, cpu: str, triton: str, reference: Callable[..., Any], *args: Any) -> Any:
    """One kernel of `op` on the backend `impl` chose: "cpu" runs the C++ op torch.ops.codex_ml_cpu.<cpu>,
    "triton" the function codex_ml.kernels.<op>.triton.<triton>, anything else `reference` (PyTorch)."""
    if impl == "cpu":
        load_extension(op)
        return getattr(torch.ops.codex_ml_cpu, cpu)(*args)
    if impl == "triton":
        return getattr(importlib.import_module(f"codex_ml.kernels.{op}.triton"), triton)(*args)
    return reference(*args)


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


# The plain CUDA libraries of the package (tools/cuda.bzl), by op folder; built only where nvcc exists.
CUDA_LIBRARIES = {"attention": "libcodex_attention.so", "common": "libcodex_cuda_device.so",
                  "cross_entropy": "libcodex_cross_entropy.so"}


def backends() -> dict[str, str]:
    """Which backends this process can run, as {name: state in words} (what `python -m codex_ml --version` shows)."""
    import codex_ml.kernels

    unloadable = _unloadable()
    cpu = (f"loaded ({', '.join(sorted(set(EXTENSIONS.values())))})" if not unloadable else
           f"not loaded, the ops run their PyTorch implementations: {unloadable}")
    try:
        import triton
        triton_state = f"importable ({triton.__version__})"
    except ImportError:
        triton_state = "not installed"
    folder = Path(codex_ml.kernels.__file__).parent
    present = [op for op, filename in CUDA_LIBRARIES.items() if (folder / op / filename).is_file()]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"torch": torch.__version__, "C++ CPU kernels": cpu, "Triton": triton_state,
            "CUDA libraries": f"present ({', '.join(present)})" if present else "absent", "GPU": gpu}
