"""What the kernel tests share: float64 references, the relative error they are judged by, the check of an op's
output and gradients against float64, and the fixture that poisons every new allocation (so an element a kernel
leaves unwritten fails the checks).

The layer ops' tests (rms_norm, rotary, swiglu) all run the same way. <op>_test: impl "cpu" (the op's C++
kernel), "torch" (the eager formula) and "triton" (the Triton kernels in the interpreter, TRITON_INTERPRET=1, at
small shapes only: it is slow) against float64 references, forward and backward, on fresh random inputs with
poisoned outputs. <op>_gpu_test: CUDA tensors through the Triton kernels (the CUDA default) at the shapes of a
Llama-style model, fp32, bf16 and fp16, forward and backward against float64 references computed on the GPU;
skipped, with the reason, where there is no CUDA GPU. Both within LAYER_BOUNDS.
"""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty / empty_like return NaN-filled tensors for the duration of each test (import it into a test
    module to apply it there)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


def attention_reference(q, k, v, *, causal, window, scale):
    """softmax(q k^T * scale + mask) v with K/V heads repeated for grouped-query attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = q.shape[2]
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    allowed = dist >= 0 if causal else torch.ones(t, t, dtype=torch.bool)
    if window:
        allowed = allowed & ((dist < window) if causal else (dist.abs() < window))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def cross_entropy_reference(z, t, *, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss of logits z (before the softcap), as documented in codex_ml.ops.cross_entropy."""
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = t != ignore_index
    rows = F.cross_entropy(z, t.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    rows = torch.where(valid, rows + z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / valid.sum().clamp(min=1) if reduction == "mean" else rows.sum()


def rms_norm_reference(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_tables(t, d, device="cpu"):
    """As codex_ml.models.gpt.rope_tables: angles for the first half, duplicated into the second."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


# The layer ops' error bounds (relative L2 error of the output and of every input gradient against float64, inputs
# rounded to the tested dtype first): fp32 1e-5; fp16 2e-3 and bf16 1e-2 (the output and gradients are rounded to
# 11 and 8 significant bits; arithmetic is fp32 inside).
LAYER_BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def impl_shapes(shapes, triton_shapes):
    """(impl, shape) pairs: every shape for the C++ ("cpu") and eager ("torch") paths, the small ones for Triton
    (the interpreter is slow)."""
    return [(impl, shape) for impl in ("cpu", "torch") for shape in shapes] + [("triton", s) for s in triton_shapes]


def check_against_reference(fn, reference, inputs, grad_inputs, dtype, grad_scale=None):
    """fn(*inputs) and the gradients of grad_inputs (indices) against reference(*float64 inputs), within
    LAYER_BOUNDS[dtype].

    grad_scale(float64 inputs, grad_out) -> {index: norm}: a gradient's error is relative to at least that norm
    (for gradients that are differences of much larger terms).
    """
    for i in grad_inputs:
        inputs[i].requires_grad_()
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, [inputs[i] for i in grad_inputs], grad_out)
    ref_inputs = [t.detach().double().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
    ref = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in grad_inputs], grad_out.double())
    scales = grad_scale(ref_inputs, grad_out.double()) if grad_scale else {}
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < LAYER_BOUNDS[dtype], ("output", rel_err(out, ref))
    for i, g, r in zip(grad_inputs, grads, ref_grads):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert torch.isfinite(g).all(), f"grad of input {i}"
        error = (g.double() - r).norm().item() / max(r.norm().item(), scales.get(i, 0.0))
        assert error < LAYER_BOUNDS[dtype], (f"grad of input {i}", error)
    return out, grads


def rel_err(actual, expected):
    """Relative L2 error (on the CPU, in float64); absolute where the reference is exactly zero (dk when T = 1)."""
    diff, norm = (actual.detach().double().cpu() - expected.double().cpu()).norm().item(), expected.norm().item()
    return diff / norm if norm > 0 else diff


def onednn_runs_fp32() -> bool:
    """Whether PyTorch's oneDNN matmul takes fp32 on this CPU (kernels/common/cpu_gemm.h): it needs AVX-512
    (F, BW, VL, DQ), which is what /proc/cpuinfo is asked here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags)


def run_with_cpu_capability(capability: str, test_file: str, keyword: str) -> None:
    """Runs the tests of `test_file` selected by pytest's -k `keyword` in a fresh process with
    ATEN_CPU_CAPABILITY=capability, so the C++ kernels take their AVX2 ("avx2") or plain ("default") loops
    instead of the widest the CPU has. At least one test must run."""
    run_with_env({"ATEN_CPU_CAPABILITY": capability}, test_file, keyword)


def run_with_env(env_updates: dict[str, str], test_file: str, keyword: str) -> None:
    """Runs the tests of `test_file` selected by pytest's -k `keyword` in a fresh process whose environment has
    env_updates (settings the kernels read once per process). At least one test must run, and all must pass."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_updates, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0 and " passed" in result.stdout, f"{env_updates}:\n{output}"
