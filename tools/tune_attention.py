"""Tries tile sizes and launch options of the Triton attention kernels (kernels/attention/triton.py) on a GPU.

    python3 tools/tune_attention.py [--quick] [--json=PATH]     (tools/gpu_check.sh runs it as stage tune_attention)

At the attention target's shape (B=8, H=32, T=4096, D=128, bf16, causal), forward and backward apart, each candidate
is first checked against torch's scaled_dot_product_attention on the same inputs (a fast but wrong config must not
win), then timed (median of repeats, CUDA events) beside SDPA in the same run. Rows: pass, block_m, block_n,
num_warps, num_stages, default (the config _config picks now), time_ms, tflops, sdpa_time_ms, ratio (SDPA's time /
ours), rel_err (max abs error over max abs of SDPA's result, worst of the outputs), status ("ok", "wrong" above
2e-2, "does not fit" where the kernel needs more shared memory or registers than the GPU has, or the error).
--quick: two configs at a tiny fp32 shape, in the Triton interpreter on the CPU (TRITON_INTERPRET=1), to test
this script without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from codex_ml.kernels.attention import triton as kernels
from codex_ml.kernels.bench import common, record

TOLERANCE = 2e-2
# (block_m, block_n, num_warps, num_stages) per pass; FA2-style sizes around the sm_80 and Hopper defaults.
FWD = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
       (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]
BWD = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2),
       (32, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3)]


def _config(pass_name: str, block_m: int, block_n: int, warps: int, stages: int, base: dict) -> dict:
    config = dict(base, **{pass_name: (block_m, block_n)})
    if base[f"{pass_name}_opts"]:  # the interpreter takes no launch options
        config[f"{pass_name}_opts"] = {"num_warps": warps, "num_stages": stages}
    return config


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape in the Triton interpreter (no GPU)")
    parser.add_argument("--json", default=None, help="write the result file (codex_ml/kernels/bench/record.py)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    results = record.ResultFile(args.json, "tune_attention", "quick" if args.quick else "gpu",
                                sys.argv[1:] if argv is None else argv)
    if args.quick:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--quick runs in the Triton interpreter: set TRITON_INTERPRET=1")
            return 2
        device, dtype, (b, h, t, d) = "cpu", torch.float32, (1, 2, 48, 16)
        candidates = {"fwd": [(32, 32, 4, 2), (16, 16, 4, 2)], "bwd": [(32, 32, 4, 2), (16, 32, 4, 2)]}
    else:
        if not torch.cuda.is_available():
            print("tune_attention needs a CUDA GPU (or --quick with TRITON_INTERPRET=1)")
            return 2
        device, dtype, (b, h, t, d) = "cuda", torch.bfloat16, (8, 32, 4096, 128)
        candidates = {"fwd": FWD, "bwd": BWD}
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    scale = d ** -0.5
    ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad_out = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad_out, retain_graph=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    _, lse = kernels.attention_forward(qd, kd, vd, True, scale, 0)
    out = ref_out.detach().contiguous()  # the backward reads o only through delta = rowsum(o * do)
    default = kernels._config(qd)
    sdpa = {"fwd": common.time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), args.repeats),
            "bwd": common.time_ms(lambda: torch.autograd.grad(ref_out, (q, k, v), grad_out, retain_graph=True),
                                  args.repeats)}
    flops = {"fwd": 2 * b * h * t * t * d, "bwd": 5 * b * h * t * t * d}  # causal: half of 4 and 10 B H T^2 D
    rows = []
    for pass_name, configs in candidates.items():
        for block_m, block_n, warps, stages in configs:
            config = _config(pass_name, block_m, block_n, warps, stages, default)
            if pass_name == "fwd":
                def run(config=config):
                    return kernels.attention_forward(qd, kd, vd, True, scale, 0, config)
            else:
                def run(config=config):
                    return kernels.attention_backward(grad_out, qd, kd, vd, out, lse, True, scale, 0, config)
            row = {"pass": pass_name, "block_m": block_m, "block_n": block_n, "num_warps": warps,
                   "num_stages": stages, "default": config == default, "time_ms": None, "tflops": None,
                   "sdpa_time_ms": sdpa[pass_name], "ratio": None, "rel_err": None}
            try:
                result = run()
                wanted = (ref_out,) if pass_name == "fwd" else ref_grads
                row["rel_err"] = max(_rel_err(ours, ref) for ours, ref in zip(result, wanted))
                if row["rel_err"] > TOLERANCE:
                    row["status"] = "wrong"
                else:
                    row["time_ms"] = common.time_ms(run, args.repeats)
                    row["tflops"] = flops[pass_name] / row["time_ms"] / 1e9
                    row["ratio"] = sdpa[pass_name] / row["time_ms"]
                    row["status"] = "ok"
            except Exception as err:  # noqa: BLE001  (a config that does not compile or fit only loses its row)
                name = type(err).__name__
                row["status"] = "does not fit" if name in ("OutOfResources", "OutOfMemoryError") else f"{name}: {err}"
            rows.append(row)
            results.write(rows)  # the rows so far: a run stopped at its limit keeps them
    rows.sort(key=lambda r: (r["pass"] != "fwd", r["time_ms"] is None, r["time_ms"] or 0.0))
    common.print_table(rows)
    results.write(rows, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
