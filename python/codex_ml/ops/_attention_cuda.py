"""ctypes bindings of libcodex_attention.so (kernels/attention/attention.cu): the tensor-core attention kernels.

Used by codex_ml.ops.attention for impl="cuda" only; tensors are contiguous CUDA bf16/fp16, and the
kernels run on the current stream.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from codex_ml.ops.dispatch import load_cuda_library

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the C signatures of the entry points (also used on the CPU-emulated build in tests/kernels)."""
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.codex_attention_forward.argtypes = [i32] + [ptr] * 5 + [i32] * 5 + [f32, i32, i32, ptr]
    lib.codex_attention_forward.restype = i32
    lib.codex_attention_backward.argtypes = [i32] + [ptr] * 10 + [i32] * 5 + [f32, i32, i32, ptr]
    lib.codex_attention_backward.restype = i32
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return declare(load_cuda_library("attention", "libcodex_attention.so", "impl='triton'"))


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"CUDA attention {what} failed with cudaError_t {status}")


def _code(q: torch.Tensor) -> int:
    if q.dtype not in _DTYPE_CODES:
        raise ValueError(f"impl='cuda' attention runs bf16/fp16 only, got {q.dtype}: use impl='triton' for fp32")
    return _DTYPE_CODES[q.dtype]


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself when its data starts on 16 bytes (the kernels load 16-byte vectors), else an aligned copy."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _stream(q: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(q.device).cuda_stream)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
            window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse fp32) for contiguous CUDA q [B, H, T, D], k, v [B, Hkv, T, D]; window <= 0 means none."""
    return forward_on(_library(), _stream(q), q, k, v, causal, scale, window)


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float,
             window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for contiguous CUDA tensors, lse from forward()."""
    return backward_on(_library(), _stream(q), do, q, k, v, o, lse, causal, scale, window)


# forward and backward through `lib` on `stream`, tensors on the library's device (the CPU for the emulated build
# that tests/kernels/cuda_emu_test.py runs).
def forward_on(lib: ctypes.CDLL, stream: ctypes.c_void_p, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               causal: bool, scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    _check(lib.codex_attention_forward(
        _code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
        b, h, k.shape[1], t, d, scale, int(causal), window if 0 < window < t else 0, stream), "forward")
    return o, lse


def backward_on(lib: ctypes.CDLL, stream: ctypes.c_void_p, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    do, q, k, v, o = (_aligned(x) for x in (do, q, k, v, o))
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _check(lib.codex_attention_backward(
        _code(q), do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
        delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), b, h, k.shape[1], t, d, scale, int(causal),
        window if 0 < window < t else 0, stream), "backward")  # a window >= T masks nothing
    return dq, dk, dv
