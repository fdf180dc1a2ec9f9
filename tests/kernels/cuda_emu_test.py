"""The plain-CUDA kernels themselves (kernels/attention/attention.cu, kernels/cross_entropy/cross_entropy.cu), run on
the CPU by cuda_emu (tools/cuda_emu): the same sources and C entry points that libcodex_*.so exports on a GPU,
compiled for the host with the emulator's stand-in CUDA headers. The emulator shuffles the order of threads and
warps between barriers, poisons shared memory, and checks wmma alignment, shared-memory bounds and warp-collective
use, so missing barriers and layout bugs fail here, not first on a GPU (tests/kernels/*_gpu_test.py run the real
libraries there).

Against float64 references on fresh random inputs. Every input sits between NaN margins (an out-of-bounds read
turns a result into NaN), every output starts as NaN between sentinel margins (an unwritten element fails, and so
does a write out of bounds). Error bounds, relative L2: attention fp16 2e-3 and bf16 1.6e-2 (P and dS are rounded
to the input dtype before their products, as in FlashAttention-2: about 4 units of the dtype's rounding, 2^-11
and 2^-8), lse within 1e-4 absolute (fp32 arithmetic on exact inputs); cross-entropy rows (fp32) 1e-5.
"""

import ctypes
import importlib
import math
from pathlib import Path

import pytest
import torch
from references import attention_reference, cross_entropy_reference, rel_err

from codex_ml.ops import _attention_cuda, _cross_entropy_cuda

LIBRARIES = Path("kernels")  # in the runfiles: kernels/<op>/lib<name>_emu.so
MARGIN = 64  # elements each side: keeps a 16-bit view 128-byte aligned, as the kernels' 16-byte loads need
SENTINEL = -12352.0  # exactly representable in fp32, fp16 and bf16

ATTENTION_BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def _load(name: str) -> ctypes.CDLL:
    path = LIBRARIES / name
    assert path.exists(), f"{path} was not built (kernels/<op>/BUILD.bazel, cuda_emu_library)"
    return ctypes.CDLL(str(path.resolve()))


# The signatures are the ones codex_ml's bindings declare for the CUDA libraries.
@pytest.fixture(scope="module")
def attention_lib():
    return _attention_cuda.declare(_load("attention/libcodex_attention_emu.so"))


@pytest.fixture(scope="module")
def cross_entropy_lib():
    return _cross_entropy_cuda.declare(_load("cross_entropy/libcodex_cross_entropy_emu.so"))


class Guarded:
    """A contiguous tensor inside a larger buffer: `margin_value` on both sides, checked by `margins_intact`."""

    def __init__(self, shape, dtype, margin_value, offset=0):
        numel = math.prod(shape)
        self.buffer = torch.full((numel + 2 * MARGIN + offset,), margin_value, dtype=dtype)
        self.start = MARGIN + offset
        self.end = self.start + numel
        self.tensor = self.buffer[self.start:self.end].view(shape)
        self.margin_value = margin_value

    def margins_intact(self) -> bool:
        outside = torch.cat([self.buffer[: self.start], self.buffer[self.end:]])
        if isinstance(self.margin_value, float) and math.isnan(self.margin_value):
            return bool(outside.isnan().all())
        return bool((outside == self.margin_value).all())


def guarded_input(values: torch.Tensor, offset=0) -> Guarded:
    margin = float("nan") if values.dtype.is_floating_point else torch.iinfo(values.dtype).min
    g = Guarded(values.shape, values.dtype, margin, offset)
    g.tensor.copy_(values)
    return g


def guarded_output(shape, dtype, offset=0) -> Guarded:
    g = Guarded(shape, dtype, SENTINEL, offset)
    g.tensor.fill_(float("nan"))
    return g


# ---- attention ------------------------------------------------------------------------------------------------

GRID = [
    # (B, T, D, Hq, Hkv, causal, window): T not a multiple of the 64-row tiles, one tile, GQA/MQA, windows.
    (1, 1, 64, 1, 1, True, None), (2, 17, 64, 4, 1, True, None), (1, 17, 128, 2, 2, False, None),
    (1, 64, 64, 2, 1, True, None), (1, 129, 64, 4, 2, True, None), (1, 129, 128, 2, 2, False, None),
    (1, 129, 64, 4, 1, True, 16), (1, 150, 64, 2, 2, False, 9), (1, 77, 16, 4, 2, True, None),
    (1, 77, 32, 4, 2, False, 20), (1, 200, 128, 2, 1, True, 100), (1, 1000, 64, 2, 1, True, 128),
]


def run_attention(lib, q, k, v, do, causal, window):
    """Forward and backward through the C entry points; returns o, lse, dq, dk, dv after checking every margin."""
    b, h, t, d = q.shape
    code, scale, win = DTYPE_CODES[q.dtype], 1 / math.sqrt(d), window or 0
    gq, gk, gv, gdo = (guarded_input(x) for x in (q, k, v, do))
    go, glse = guarded_output(q.shape, q.dtype), guarded_output((b, h, t), torch.float32)
    status = lib.codex_attention_forward(code, gq.tensor.data_ptr(), gk.tensor.data_ptr(), gv.tensor.data_ptr(),
                                         go.tensor.data_ptr(), glse.tensor.data_ptr(), b, h, k.shape[1], t, d,
                                         scale, int(causal), win, None)
    assert status == 0, f"forward: cudaError_t {status}"
    gdelta = guarded_output((b, h, t), torch.float32)
    gdq, gdk, gdv = (guarded_output(x.shape, x.dtype) for x in (q, k, v))
    status = lib.codex_attention_backward(code, gdo.tensor.data_ptr(), gq.tensor.data_ptr(), gk.tensor.data_ptr(),
                                          gv.tensor.data_ptr(), go.tensor.data_ptr(), glse.tensor.data_ptr(),
                                          gdelta.tensor.data_ptr(), gdq.tensor.data_ptr(), gdk.tensor.data_ptr(),
                                          gdv.tensor.data_ptr(), b, h, k.shape[1], t, d, scale, int(causal), win,
                                          None)
    assert status == 0, f"backward: cudaError_t {status}"
    for name, g in zip(["q", "k", "v", "do", "o", "lse", "delta", "dq", "dk", "dv"],
                       [gq, gk, gv, gdo, go, glse, gdelta, gdq, gdk, gdv]):
        assert g.margins_intact(), f"{name}: written out of bounds"
    return go.tensor, glse.tensor, gdq.tensor, gdk.tensor, gdv.tensor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b,t,d,hq,hkv,causal,window", GRID)
def test_attention_kernels_match_float64(attention_lib, b, t, d, hq, hkv, causal, window, dtype):
    torch.manual_seed(1000 * t + d + hq)
    q, k, v = (torch.randn(b, h, t, d).to(dtype) for h in (hq, hkv, hkv))
    do = torch.randn(b, hq, t, d).to(dtype)
    o, lse, dq, dk, dv = run_attention(attention_lib, q, k, v, do, causal, window)

    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    scale = 1 / math.sqrt(d)
    ref = attention_reference(*ref_in, causal=causal, window=window, scale=scale)
    ref_grads = torch.autograd.grad((ref * do.double()).sum(), ref_in)
    bound = ATTENTION_BOUNDS[dtype]
    assert torch.isfinite(o).all() and rel_err(o, ref) < bound, rel_err(o, ref)
    for name, g, r in zip("qkv", (dq, dk, dv), ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < bound, (name, rel_err(g, r))

    # lse (natural log) of the scaled, masked scores: what the backward pass recomputes P from.
    groups = hq // hkv
    scores = ref_in[0].detach() @ ref_in[1].detach().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    allowed = dist >= 0 if causal else torch.ones(t, t, dtype=torch.bool)
    if window:
        allowed = allowed & ((dist < window) if causal else (dist.abs() < window))
    ref_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert (lse.double() - ref_lse).abs().max() < 1e-4


def test_attention_rejects_what_it_does_not_run(attention_lib):
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, 8), float("nan"))

    def forward(dtype_code=0, h=2, hkv=2, t=8, d=64):
        return attention_lib.codex_attention_forward(dtype_code, q.data_ptr(), q.data_ptr(), q.data_ptr(),
                                                     o.data_ptr(), lse.data_ptr(), 1, h, hkv, t, d, 0.125, 1, 0,
                                                     None)

    invalid = 1  # cudaErrorInvalidValue
    assert forward(dtype_code=2) == invalid  # no fp32 kernel: impl="triton" runs fp32
    assert forward(d=48) == invalid and forward(d=256) == invalid
    assert forward(hkv=3, h=4) == invalid  # Hkv must divide H
    assert forward(t=0) == invalid
    assert o.isnan().all() and lse.isnan().all()  # nothing was launched
    assert forward() == 0 and torch.isfinite(o).all()


def test_attention_bindings_on_the_emulated_kernels(attention_lib):
    """codex_ml.ops._attention_cuda's calls (argument order, 16-byte alignment copies, window convention) against
    the same kernels, with a misaligned q and window -1 (none) as codex_ml.ops.attention passes them."""
    torch.manual_seed(11)
    b, hq, hkv, t, d = 1, 4, 2, 70, 64
    q = torch.randn(b * hq * t * d + 1).to(torch.bfloat16)[1:].view(b, hq, t, d)  # data 2 bytes off 16
    assert q.data_ptr() % 16 != 0
    k, v, do = torch.randn(b, hkv, t, d).bfloat16(), torch.randn(b, hkv, t, d).bfloat16(), torch.randn_like(q)
    stream = ctypes.c_void_p(None)
    for causal, window in ((True, -1), (False, 12)):
        o, lse = _attention_cuda.forward_on(attention_lib, stream, q, k, v, causal, 0.125, window)
        dq, dk, dv = _attention_cuda.backward_on(attention_lib, stream, do, q, k, v, o, lse, causal, 0.125, window)
        ref_in = [x.double().requires_grad_() for x in (q, k, v)]
        ref = attention_reference(*ref_in, causal=causal, window=window if window > 0 else None, scale=0.125)
        ref_grads = torch.autograd.grad((ref * do.double()).sum(), ref_in)
        assert rel_err(o, ref) < ATTENTION_BOUNDS[torch.bfloat16]
        for g, r in zip((dq, dk, dv), ref_grads):
            assert rel_err(g, r) < ATTENTION_BOUNDS[torch.bfloat16]
    with pytest.raises(ValueError, match="bf16/fp16"):
        _attention_cuda.forward_on(attention_lib, stream, q.float(), k.float(), v.float(), True, 0.125, -1)


# ---- cross-entropy rows ---------------------------------------------------------------------------------------

def cross_entropy_rows_reference(logits, target, row_scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss, lse of the capped logits and d(sum row_scale * loss)/dlogits, in float64."""
    z = logits.double().requires_grad_()
    rows = cross_entropy_reference(z, target, reduction="none", ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap or None)
    capped = softcap * torch.tanh(z / softcap) if softcap else z
    lse = torch.where(target != ignore_index, capped.logsumexp(-1), 0.0)
    grad = torch.autograd.grad((rows * row_scale.double()).sum(), z)[0] if row_scale is not None else None
    return rows.detach(), lse.detach(), grad


# V: one warp per row up to 2048, a 256-thread block up to 16384, 512 threads above; none a multiple of the
# vector width except where noted, with row starts at every 4-byte offset from a 16-byte boundary.
VOCABS = [1, 2, 3, 1000, 2048, 2049, 16384, 16385, 20001]
OPTIONS = [
    # (label_smoothing, z_loss, softcap)
    (0.0, 0.0, 0.0), (0.1, 1e-3, 0.0), (0.0, 0.0, 30.0),
]


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing+z", "softcap"])
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("n,offset", [(1, 0), (7, 1), (33, 3)])
def test_cross_entropy_rows_match_float64(cross_entropy_lib, n, offset, v, options):
    label_smoothing, z_loss, softcap = options
    torch.manual_seed(n * 100003 + v)
    values = torch.randn(n, v) * 4
    target = torch.randint(0, v, (n,))
    target[::3] = -100  # ignored rows
    row_scale = torch.rand(n) + 0.5
    rows, lse_ref, grad_ref = cross_entropy_rows_reference(values, target, row_scale, ignore_index=-100,
                                                           label_smoothing=label_smoothing, z_loss=z_loss,
                                                           softcap=softcap)
    for scale in (None, row_scale):
        logits = guarded_input(values, offset)
        targets, scales = guarded_input(target), guarded_input(row_scale)
        loss, lse = guarded_output((n,), torch.float32), guarded_output((n,), torch.float32)
        scale_ptr = scales.tensor.data_ptr() if scale is not None else None
        status = cross_entropy_lib.codex_cross_entropy_rows(
            logits.tensor.data_ptr(), targets.tensor.data_ptr(), scale_ptr, loss.tensor.data_ptr(),
            lse.tensor.data_ptr(), n, v, -100, label_smoothing, z_loss, softcap, None)
        assert status == 0, f"cudaError_t {status}"
        assert all(g.margins_intact() for g in (logits, loss, lse)), "written out of bounds"
        assert rel_err(loss.tensor, rows) < 1e-5, rel_err(loss.tensor, rows)
        assert rel_err(lse.tensor, lse_ref) < 1e-5, rel_err(lse.tensor, lse_ref)
        if scale is None:
            assert torch.equal(logits.tensor, values), "logits changed without row_scale"
        else:
            assert rel_err(logits.tensor, grad_ref) < 1e-5, rel_err(logits.tensor, grad_ref)
            assert (logits.tensor[target == -100] == 0).all()


@pytest.mark.parametrize("v", [5, 3000, 20001])
def test_cross_entropy_rows_large_logits(cross_entropy_lib, v):
    """Logits of magnitude 1e4 stay finite and right. The fp32 inputs carry 2^-10 of absolute rounding there, so the
    loss (lse - z_t, ~1e4 - ~1e4) is judged by absolute error and the gradient (exp(z - lse)) by 1e-3 relative."""
    torch.manual_seed(v)
    n = 9
    values = torch.randn(n, v) * 4 + 1e4
    values[:, 1] += 8.0  # one clear winner per row
    target = torch.randint(0, v, (n,))
    row_scale = torch.ones(n)
    rows, lse_ref, grad_ref = cross_entropy_rows_reference(values, target, row_scale, ignore_index=-100,
                                                           label_smoothing=0.0, z_loss=0.0, softcap=0.0)
    logits = values.clone()
    loss, lse = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    status = cross_entropy_lib.codex_cross_entropy_rows(logits.data_ptr(), target.data_ptr(), row_scale.data_ptr(),
                                                        loss.data_ptr(), lse.data_ptr(), n, v, -100, 0.0, 0.0, 0.0,
                                                        None)
    assert status == 0
    assert torch.isfinite(loss).all() and torch.isfinite(logits).all()
    assert (loss.double() - rows).abs().max() < 4e-3, (loss.double() - rows).abs().max()
    assert (lse.double() - lse_ref).abs().max() < 4e-3
    assert rel_err(logits, grad_ref) < 1e-3, rel_err(logits, grad_ref)


def test_cross_entropy_bindings_on_the_emulated_kernel(cross_entropy_lib):
    """codex_ml.ops._cross_entropy_cuda.rows_on (what impl="cuda" calls per chunk): non-contiguous logits get the
    gradient copied back, int32 targets and a scalar row scale are converted, and wrong logits are refused."""
    torch.manual_seed(12)
    n, v = 6, 301
    values = torch.randn(v, n).t()  # a non-contiguous [n, v] view
    target = torch.randint(0, v, (n,), dtype=torch.int32)
    rows, lse_ref, grad_ref = cross_entropy_rows_reference(values, target.long(), torch.full((n,), 0.5),
                                                           ignore_index=-100, label_smoothing=0.05, z_loss=1e-4,
                                                           softcap=0.0)
    logits = values.clone().t().contiguous().t()
    assert not logits.is_contiguous()
    loss, lse = _cross_entropy_cuda.rows_on(cross_entropy_lib, ctypes.c_void_p(None), logits, target, torch.tensor(0.5),
                                   ignore_index=-100, label_smoothing=0.05, z_loss=1e-4, softcap=0.0)
    assert rel_err(loss, rows) < 1e-5 and rel_err(lse, lse_ref) < 1e-5 and rel_err(logits, grad_ref) < 1e-5
    with pytest.raises(ValueError, match="fp32 logits"):
        _cross_entropy_cuda.rows_on(cross_entropy_lib, None, values.double(), target, None, ignore_index=-100,
                           label_smoothing=0.0, z_loss=0.0, softcap=0.0)


def test_cross_entropy_rows_edge_cases(cross_entropy_lib):
    lib = cross_entropy_lib
    logits = torch.randn(4, 10)
    target = torch.tensor([1, 10, -5, -100])  # in range, == V, negative, ignored
    loss, lse = torch.full((4,), float("nan")), torch.full((4,), float("nan"))
    status = lib.codex_cross_entropy_rows(logits.data_ptr(), target.data_ptr(), None, loss.data_ptr(),
                                          lse.data_ptr(), 4, 10, -100, 0.0, 0.0, 0.0, None)
    assert status == 0
    # A target outside [0, V) gets a NaN loss (codex_ml.ops.cross_entropy validates targets before it gets here).
    assert torch.isfinite(loss[0]) and loss[1:3].isnan().all() and loss[3] == 0 and lse[3] == 0
    assert torch.isclose(loss[0], torch.logsumexp(logits[0], 0) - logits[0, 1])
    invalid = 1  # cudaErrorInvalidValue
    args = (target.data_ptr(), None, loss.data_ptr(), lse.data_ptr())
    assert lib.codex_cross_entropy_rows(logits.data_ptr(), *args, 4, 0, -100, 0.0, 0.0, 0.0, None) == invalid
    assert lib.codex_cross_entropy_rows(None, *args, 4, 10, -100, 0.0, 0.0, 0.0, None) == invalid
    assert lib.codex_cross_entropy_rows(None, *args, 0, 10, -100, 0.0, 0.0, 0.0, None) == 0  # nothing to do
    misaligned = logits.view(torch.uint8).flatten()[1:].data_ptr()
    assert lib.codex_cross_entropy_rows(misaligned, *args, 4, 9, -100, 0.0, 0.0, 0.0, None) == 716


# ---- the emulator itself: each check it claims, on a kernel with that bug and on its fixed twin ---------------

@pytest.fixture(scope="module")
def cases():
    lib = _load("../tests/kernels/libcuda_emu_cases.so")
    for name in ("emu_neighbour", "emu_warp_neighbour", "emu_overwrite", "emu_shuffle", "emu_wmma", "emu_smem",
                 "emu_deadlock", "emu_uninitialized"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("function,threads,expected", [
    ("emu_neighbour", 128, lambda i: (i + 1) % 128),      # missing __syncthreads before reading another's write
    ("emu_warp_neighbour", 32, lambda i: (i + 1) % 32),   # missing __syncwarp
    ("emu_overwrite", 128, lambda i: 1.0),                # missing __syncthreads before overwriting what others read
])
def test_emulator_catches_missing_barriers(cases, function, threads, expected):
    want = torch.tensor([float(expected(i)) for i in range(threads)])
    for barrier in (1, 0):
        out = torch.full((threads,), float("nan"))
        assert getattr(cases, function)(ctypes.c_void_p(out.data_ptr()), barrier) == 0
        assert torch.equal(out, want) == bool(barrier), (function, barrier, out)


def test_emulator_shuffles_and_tensor_core_products(cases):
    out = torch.full((32,), float("nan"))
    assert cases.emu_shuffle(ctypes.c_void_p(out.data_ptr())) == 0
    assert (out == sum(range(32))).all()
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    c = torch.full((16, 16), float("nan"))
    assert cases.emu_wmma(ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr()), ctypes.c_void_p(c.data_ptr()),
                          0, 0) == 0
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)


def test_emulator_reports_misuse(cases):
    a, b, c = torch.zeros(16, 16).half(), torch.zeros(16, 16).half(), torch.zeros(16, 16)
    ptrs = [ctypes.c_void_p(x.data_ptr()) for x in (a, b, c)]
    misaligned = 716
    assert cases.emu_wmma(*ptrs, 8, 0) == misaligned  # a tile 16 bytes past a 32-byte boundary
    assert cases.emu_wmma(*ptrs, 0, 4) == misaligned  # ldm of 20 halves: not a multiple of 16 bytes
    invalid, illegal_address, launch_failure = 1, 700, 719
    assert cases.emu_smem(64 * 1024, 0, 0) == invalid  # over 48 KB without cudaFuncSetAttribute
    assert cases.emu_smem(64 * 1024, 64 * 1024, 0) == 0
    assert cases.emu_smem(200 * 1024, 200 * 1024, 0) == invalid  # over sm_80's 163 KB
    assert cases.emu_smem(1024, 0, 1) == illegal_address  # a write past the end of dynamic shared memory
    assert cases.emu_smem(1024, 0, 0) == 0
    assert cases.emu_deadlock() == launch_failure  # reported, not hung
    out = torch.zeros(32)
    assert cases.emu_uninitialized(ctypes.c_void_p(out.data_ptr())) == 0
    assert out.isnan().all()  # shared memory starts poisoned



def test_cuda_path_fp16_gradients_do_not_underflow(cross_entropy_lib, monkeypatch):
    """linear_cross_entropy(impl="cuda") with the emulated row kernel on fp16 inputs whose gradient is scaled by
    2^-12 per row (a loss normalized by the tokens of many steps): the rows' gradient, rounded to fp16 for the
    products, must not carry that scale (about 4e-9 per logit, below fp16's smallest subnormal); the products apply
    it. The case and bound of tests/kernels/cross_entropy_test.py's fp16 gradient tests: hidden and weight carry a
    shared offset (the softmax is unchanged; a softmax part rounded to 0 shows as a large error), 3e-3 relative."""
    loss_module = importlib.import_module("codex_ml.ops.cross_entropy")

    def emulated_rows(logits, target, row_scale, **options):
        return _cross_entropy_cuda.rows_on(cross_entropy_lib, None, logits, target, row_scale, **options)

    monkeypatch.setattr(_cross_entropy_cuda, "cross_entropy_rows", emulated_rows)
    monkeypatch.setattr(loss_module, "choose_impl", lambda op, device, impl: "cuda")
    torch.manual_seed(3)
    n, h, v, grad_scale = 16, 32, 16384, 2.0 ** -12
    hidden = (torch.randn(n, h) + 1).half().requires_grad_()
    weight = ((torch.randn(v, h) + 1) / h ** 0.5).half().requires_grad_()
    target = torch.randint(0, v, (n,))
    loss = loss_module.linear_cross_entropy(hidden, weight, target, reduction="none", impl="cuda")
    grads = torch.autograd.grad(loss.float().sum() * grad_scale, [hidden, weight])
    ref_params = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref = cross_entropy_reference(ref_params[0] @ ref_params[1].t(), target, reduction="none")
    ref_grads = torch.autograd.grad(ref.sum() * grad_scale, ref_params)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 3e-3, rel_err(g, r)
