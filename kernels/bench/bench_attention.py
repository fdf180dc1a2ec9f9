"""Benchmark of codex_ml.ops.attention against torch's scaled_dot_product_attention, in one run.

Rows per shape, implementation and pass ("fwd", "bwd", "fwd+bwd"): time_ms (median), peak_mem_mb
(extra memory, see common.py), ref_time_ms and ref_peak_mem_mb for SDPA on the same inputs, and tflops
(useful FLOPs: 4*B*H*T*T*D for the forward, halved when causal; the backward counts 2.5x).

    tools/bazel run //kernels:bench_attention -- --preset=cpu --json=attention_cpu.json
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this file

import common  # noqa: E402

from codex_ml.ops import attention  # noqa: E402

PRESETS = {
    # (B, H, T, D, dtype, device, causal values, impls, repeats)
    "quick": [(1, 2, 256, 64, torch.float32, "cpu", (True,), ("cpu", "torch"), 2)],
    "cpu": [(1, 8, 2048, 64, torch.float32, "cpu", (True, False), ("cpu", "torch"), 3)],
    "gpu": [(b, 16, t, d, torch.bfloat16, "cuda", (True, False), ("torch",), 10)
            for d in (64, 128) for t, b in ((512, 32), (4096, 4), (16384, 1))],
}


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _callables(fn, q, k, v, causal):
    def fwd():
        with torch.no_grad():
            fn(q, k, v, causal)

    out = fn(q, k, v, causal)
    grad = torch.randn_like(out)

    def bwd():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def run_case(b, h, t, d, dtype, device, causal, impls, repeats) -> list[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops_fwd = 4 * b * h * t * t * d / (2 if causal else 1)
    flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
    ref = _callables(_sdpa, q, k, v, causal)
    rows = []
    for impl in impls:
        ours = _callables(lambda q, k, v, c, impl=impl: attention(q, k, v, causal=c, impl=impl), q, k, v, causal)
        for pass_name in ("fwd", "bwd", "fwd+bwd"):
            time_ms = common.time_ms(ours[pass_name], repeats)
            rows.append({
                "kernel": "attention", "impl": impl, "B": b, "H": h, "T": t, "D": d,
                "dtype": str(dtype).removeprefix("torch."), "causal": causal, "pass": pass_name,
                "time_ms": time_ms, "peak_mem_mb": common.peak_mem_mb(ours[pass_name], device),
                "ref_time_ms": common.time_ms(ref[pass_name], repeats),
                "ref_peak_mem_mb": common.peak_mem_mb(ref[pass_name], device),
                "tflops": flops[pass_name] / time_ms / 1e9,
            })
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    rows = []
    for b, h, t, d, dtype, device, causals, impls, repeats in PRESETS[args.preset]:
        if device == "cuda" and not torch.cuda.is_available():
            sys.exit(f"preset {args.preset!r} needs a CUDA GPU and none is available")
        for causal in causals:
            rows += run_case(b, h, t, d, dtype, device, causal, impls, args.repeats or repeats)
    common.print_table(rows)
    common.write_json(rows, args.json)


if __name__ == "__main__":
    main()
