"""Benchmark of codex_ml.ops.attention against torch's scaled_dot_product_attention, in one run.

Presets: quick (seconds, CPU), cpu (B=1, H=8, T=2048, D=64, fp32: the "cpu" path = PyTorch's flash kernel
and the blocked "torch" path), gpu (bf16, D 64/128, T 512..16k, causal and not: the Triton and CUDA kernels,
plus a bf16 matmul peak row for scale).

Rows per shape, implementation and pass ("fwd", "bwd", "fwd+bwd"): time_ms (median), peak_mem_mb
(extra memory, see common.py), ref_time_ms and ref_peak_mem_mb for SDPA on the same inputs, and tflops
(useful FLOPs: 4*B*H*T*T*D for the forward, halved when causal; the backward counts 2.5x).

    tools/bazel run //kernels:bench_attention -- --preset=cpu --json=attention_cpu.json
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from codex_ml.kernels.bench import common
from codex_ml.ops import attention

PRESETS = {
    # (B, H, T, D, dtype, device, causal values, impls, repeats)
    "quick": [(1, 2, 256, 64, torch.float32, "cpu", (True,), ("cpu", "torch"), 2)],
    "cpu": [(1, 8, 2048, 64, torch.float32, "cpu", (True, False), ("cpu", "torch"), 3)],
    # First the target, B*H = 256 heads at T=4096, D=128 to fill the chip (a run stopped early keeps its rows),
    # then 16k tokens per batch at H=16 (B = 16384 / T).
    "gpu": [(8, 32, 4096, 128, torch.bfloat16, "cuda", (True, False), ("triton", "cuda"), 10)]
           + [(16384 // t, 16, t, d, torch.bfloat16, "cuda", (True, False), ("triton", "cuda"), 10)
              for d in (64, 128) for t in (512, 2048, 4096, 16384)],
}


def matmul_peak_row(repeats: int) -> dict:
    """A bf16 8192^3 matmul's throughput: the card's practical tensor-core peak, to put tflops in scale."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    time_ms = common.time_ms(lambda: a @ b, repeats)
    return {"kernel": "matmul_peak", "impl": "torch", "B": 1, "H": 1, "T": n, "D": n, "dtype": "bfloat16",
            "causal": False, "pass": "fwd", "time_ms": time_ms, "peak_mem_mb": None, "ref_time_ms": time_ms,
            "ref_peak_mem_mb": None, "tflops": 2 * n**3 / time_ms / 1e9}


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


def run_case(b, h, t, d, dtype, device, causal, impls, repeats) -> Iterator[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops_fwd = 4 * b * h * t * t * d / (2 if causal else 1)
    flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
    ref = _callables(_sdpa, q, k, v, causal)
    for impl in impls:
        ours = _callables(lambda q, k, v, c, impl=impl: attention(q, k, v, causal=c, impl=impl), q, k, v, causal)
        for pass_name in ("fwd", "bwd", "fwd+bwd"):
            time_ms, ref_time_ms = common.time_pair_ms(ours[pass_name], ref[pass_name], repeats)
            yield {
                "kernel": "attention", "impl": impl, "B": b, "H": h, "T": t, "D": d,
                "dtype": str(dtype).removeprefix("torch."), "causal": causal, "pass": pass_name,
                "time_ms": time_ms, "peak_mem_mb": common.peak_mem_mb(ours[pass_name], device),
                "ref_time_ms": ref_time_ms,
                "ref_peak_mem_mb": common.peak_mem_mb(ref[pass_name], device),
                "tflops": flops[pass_name] / time_ms / 1e9,
            }


def main() -> None:
    args = common.parse_args(__doc__)
    rows = [matmul_peak_row(args.repeats or 10)] if args.preset == "gpu" and torch.cuda.is_available() else []
    cases = (run_case(b, h, t, d, dtype, common.needs_device(device, args.preset), causal, impls,
                      args.repeats or repeats)
             for b, h, t, d, dtype, device, causals, impls, repeats in PRESETS[args.preset] for causal in causals)
    common.record(common.result_file("bench_attention", args), cases, rows)


if __name__ == "__main__":
    main()
