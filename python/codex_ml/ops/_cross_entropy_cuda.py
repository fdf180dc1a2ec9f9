"""ctypes binding of libcodex_cross_entropy.so (kernels/cross_entropy/cross_entropy.cu): the CUDA row kernel.

Used by codex_ml.ops.cross_entropy (both losses) for impl="cuda" only, on each chunk of fp32 logits: the same
contract as the Triton row kernel (kernels/cross_entropy/triton.py): per-row (loss, lse), and with row_scale the
logits are overwritten by the gradient. The kernel runs on the current stream of the tensors' device.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from codex_ml.ops.dispatch import load_cuda_library


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the C signature of the entry point (also used on the CPU-emulated build in tests/kernels)."""
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.codex_cross_entropy_rows.argtypes = [ptr] * 5 + [i64] * 3 + [f32] * 3 + [ptr]
    lib.codex_cross_entropy_rows.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return declare(load_cuda_library("cross_entropy", "libcodex_cross_entropy.so",
                                     "impl='triton' (the default on CUDA tensors)"))


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor | None, *,
                       ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) of fp32 CUDA logits [N, V]; with row_scale [N], logits become d(sum scale * loss)/dlogits.

    Rows with target == ignore_index get loss 0, lse 0 and gradient 0; softcap <= 0 means no cap.
    """
    if logits.device.type != "cuda":
        raise ValueError(f"the CUDA cross-entropy kernel needs CUDA tensors, got logits on {logits.device}")
    with torch.cuda.device(logits.device):
        stream = ctypes.c_void_p(torch.cuda.current_stream(logits.device).cuda_stream)
        return rows_on(_library(), stream, logits, target, row_scale, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def rows_on(lib: ctypes.CDLL, stream: ctypes.c_void_p, logits: torch.Tensor, target: torch.Tensor,
            row_scale: torch.Tensor | None, *, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy_rows through `lib` on `stream`, tensors on the library's device (the CPU for the emulated
    build that tests/kernels/cuda_emu_test.py runs)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"the CUDA cross-entropy kernel takes fp32 logits [N, V], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if n == 0:
        return loss, lse
    # The kernel reads rows of exactly V floats; the gradient still lands in `logits` (copied back if needed).
    work = logits if logits.is_contiguous() else logits.contiguous()
    target = target.to(device=logits.device, dtype=torch.int64).contiguous()
    scale = None
    if row_scale is not None:
        scale = row_scale.to(device=logits.device, dtype=torch.float32).expand(n).contiguous()
    status = lib.codex_cross_entropy_rows(
        work.data_ptr(), target.data_ptr(), scale.data_ptr() if scale is not None else None, loss.data_ptr(),
        lse.data_ptr(), n, v, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap), stream)
    if status != 0:
        raise RuntimeError(f"CUDA cross-entropy rows failed with cudaError_t {status} (N={n}, V={v})")
    if row_scale is not None and work.data_ptr() != logits.data_ptr():
        logits.copy_(work)
    return loss, lse
