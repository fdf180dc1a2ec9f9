"""Benchmark of codex_ml.ops rms_norm, swiglu, rotary and linear against the eager PyTorch formulas, in one run.

Presets: quick (seconds, CPU, small shapes), cpu (the shapes of our benchmark model, fp32 and bf16: RMSNorm on
[4, 512, 384], SwiGLU on [4, 512, 1024], rotary on q [4, 6, 512, 64] + k [4, 2, 512, 64] as transposed views
of [B, T, H, D] projections, as in the model; linear as the MLP's up projection, [4, 512, 384] x [1024, 384],
whose C++ kernel takes fp32 only: its bf16 rows are F.linear against itself), gpu (bf16 on CUDA: the Triton
kernels and the "torch" path, and Liger-Kernel's kernels for the first three ops, impl "liger", where liger-kernel
is importable: tools/gpu_wheels.sh fetches it for the GPU machine; it is no dependency of codex_ml).

Rows per kernel, implementation, dtype and pass ("fwd", "fwd+bwd", the backward giving the gradients of every
differentiable input): time_ms (median), peak_mem_mb (extra memory, see common.py), ref_time_ms and
ref_peak_mem_mb for the eager formula (codex_ml.models.gpt's) on the same inputs, and ratio = ref_time_ms /
time_ms (above 1: faster than eager).

    tools/bazel run //kernels:bench_layers -- --preset=cpu --json=layers_cpu.json
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from codex_ml.kernels.bench import common
from codex_ml.ops import linear, rms_norm, rotary, swiglu

EPS = 1e-5

PRESETS = {
    # (rms_norm x shape, swiglu shape, rotary (B, Hq, Hkv, T, D), dtypes, device, impls, repeats)
    "quick": [((2, 64, 96), (2, 64, 256), (2, 4, 2, 64, 32), (torch.float32,), "cpu", ("cpu", "torch"), 3)],
    "cpu": [((4, 512, 384), (4, 512, 1024), (4, 6, 2, 512, 64), (torch.float32, torch.bfloat16), "cpu",
             ("cpu", "torch"), 20)],
    "gpu": [((16, 2048, 2048), (16, 2048, 5632), (16, 16, 4, 2048, 128), (torch.bfloat16,), "cuda",
             ("triton", "torch", "liger"), 20)],
}


def eager_rms_norm(x, weight):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * weight


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).type_as(x)


def _rope_tables(t, d, device):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _callables(fn, inputs, grad_inputs):
    """fwd and fwd+bwd of fn(*inputs) -> list of outputs; the backward differentiates w.r.t. grad_inputs."""
    outputs = fn(*inputs)
    grads = [torch.randn_like(o) for o in outputs]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), grad_inputs, grads)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


# Each op as impl's function of the differentiable inputs, returning a list of outputs. Liger's RMSNorm runs out
# of place: in place, its backward would overwrite the output gradient the repeats share. Its rope rotates q and k
# in place (its design, kept): the shared inputs stay random-like (a rotation keeps their norms), so the other
# rows' timings are unaffected.
def _rms_norm_fn(impl, liger):
    if impl == "liger":
        return lambda x, w: [liger.liger_rms_norm(x, w, EPS, in_place=False)]
    return lambda x, w: [rms_norm(x, w, EPS, impl=impl)]


def _swiglu_fn(impl, liger):
    if impl == "liger":
        return lambda g, u: [liger.liger_swiglu(g, u)]
    return lambda g, u: [swiglu(g, u, impl=impl)]


def _rotary_fn(impl, liger, cos, sin):
    if impl == "liger":  # tables [1, T, D], broadcast over the heads (unsqueeze_dim=1)
        return lambda q, k: list(liger.liger_rope(q, k, cos[None], sin[None]))
    return lambda q, k: [rotary(q, cos, sin, impl=impl), rotary(k, cos, sin, impl=impl)]


def _linear_fn(impl, liger):
    if impl not in ("cpu", "torch"):  # no Triton or Liger kernel: F.linear (cuBLAS) on CUDA tensors
        return None
    return lambda x, w: [linear(x, w, impl=impl if x.dtype == torch.float32 else "torch")]


def _cases(rms_shape, swiglu_shape, rotary_shape, dtype, device):
    """(kernel, shape text, fn(impl, liger) -> op, reference fn, inputs, differentiable inputs) per kernel."""
    x = torch.randn(rms_shape, device=device, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(rms_shape[-1], device=device)).to(dtype).requires_grad_()
    yield ("rms_norm", str(list(rms_shape)), _rms_norm_fn, lambda x, w: [eager_rms_norm(x, w)], (x, weight),
           (x, weight))

    gate, up = (torch.randn(swiglu_shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    yield ("swiglu", str(list(swiglu_shape)), _swiglu_fn, lambda g, u: [eager_swiglu(g, u)], (gate, up), (gate, up))

    b, hq, hkv, t, d = rotary_shape
    # Transposed views of [B, T, H, D] projections, as the model passes them.
    q = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hkv, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    cos, sin = _rope_tables(t, d, device)
    yield ("rotary", f"q{list(q.shape)}+k{list(k.shape)}",
           lambda impl, liger: _rotary_fn(impl, liger, cos, sin),
           lambda q, k: [eager_rotary(q, cos, sin), eager_rotary(k, cos, sin)], (q, k), (q, k))

    x = torch.randn(rms_shape, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(swiglu_shape[-1], rms_shape[-1], device=device) / rms_shape[-1] ** 0.5).to(dtype)
    w.requires_grad_()
    yield ("linear", f"{list(rms_shape)}x{list(w.shape)}", _linear_fn, lambda x, w: [F.linear(x, w)], (x, w),
           (x, w))


def run_case(rms_shape, swiglu_shape, rotary_shape, dtypes, device, impls, repeats) -> Iterator[dict]:
    torch.manual_seed(0)
    liger = common.liger_functional() if "liger" in impls else None
    for dtype in dtypes:
        for kernel, shape, op_for, reference, inputs, grad_inputs in _cases(rms_shape, swiglu_shape, rotary_shape,
                                                                           dtype, device):
            ref = _callables(reference, inputs, grad_inputs)
            for impl in impls:
                if impl == "liger" and liger is None:
                    continue
                # Ours fail only with our clear errors; whatever the other library raises only drops its rows.
                failures = Exception if impl == "liger" else ()
                op = op_for(impl, liger)
                if op is None:
                    continue
                try:
                    ours = _callables(op, inputs, grad_inputs)
                    for pass_name in ("fwd", "fwd+bwd"):
                        time_ms, ref_time_ms = common.time_pair_ms(ours[pass_name], ref[pass_name], repeats)
                        yield {
                            "kernel": kernel, "impl": impl, "shape": shape,
                            "dtype": str(dtype).removeprefix("torch."), "pass": pass_name, "time_ms": time_ms,
                            "peak_mem_mb": common.peak_mem_mb(ours[pass_name], device),
                            "ref_time_ms": ref_time_ms,
                            "ref_peak_mem_mb": common.peak_mem_mb(ref[pass_name], device),
                            "ratio": ref_time_ms / time_ms,
                        }
                except failures as err:
                    print(f"impl {impl} failed on {kernel} {shape}: {err}")


def main() -> None:
    args = common.parse_args(__doc__)
    cases = (run_case(rms_shape, swiglu_shape, rotary_shape, dtypes, common.needs_device(device, args.preset), impls,
                      args.repeats or repeats)
             for rms_shape, swiglu_shape, rotary_shape, dtypes, device, impls, repeats in PRESETS[args.preset])
    common.record(common.result_file("bench_layers", args), cases)


if __name__ == "__main__":
    main()
