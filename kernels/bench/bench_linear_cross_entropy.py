"""Benchmark of codex_ml.ops.linear_cross_entropy against F.linear + F.cross_entropy.

For each shape and implementation it reports, forward only ("fwd") and forward + backward ("fwd+bwd"):
time_ms (median of the repeats), peak_mem_mb (extra memory over the inputs, see kernels/bench/common.py
for how it is measured), the same for the PyTorch reference (ref_*) and its torch.compile'd version
(compiled_ref_time_ms, None where it does not compile), and floor_time_ms: the matrix products alone
(logits for "fwd"; logits, grad hidden and grad weight for "fwd+bwd"), which no implementation can beat: the
faster of ATen's products (floor_aten_time_ms) and, on fp32 CPU tensors, those of the GEMM backend codex_ml's
CPU kernels use (kernels/common/cpu_gemm.h; oneDNN on AVX-512 CPUs that are not Intel's, where MKL is slower).
impl "triton+input_accum" is the Triton path summing grad_weight in the inputs' dtype (accum_dtype), which
saves its fp32 accumulator. On CUDA, where the liger-kernel package is importable (tools/gpu_wheels.sh fetches
it for the GPU machine; it is no dependency of codex_ml), Liger-Kernel's fused linear cross-entropy gets rows
too (impl "liger").

The strongest references a user would pick instead get rows of their own (impl), measured like codex_ml's:
- "torch_chunked": PyTorch's chunked torch.nn.functional.linear_cross_entropy (LinearCrossEntropyOptions) with
  its best chunking at the shape: each of its documented choices (CHUNKINGS: chunking_method "aspect_ratio",
  "aspect_ratio:2", which "auto" picks for fp32, or a fixed batch_chunk_size) runs fwd+bwd once, the fastest is
  used for both passes and named in the rows' "chunking" field (None in the other rows);
- "cce_compile": Cut Cross-Entropy's torch.compile implementation (cut_cross_entropy.linear_cross_entropy with
  impl="torch_compile");
- "torch_compile": the reference under torch.compile (its time is compiled_ref_time_ms).
Compilation happens in an untimed warm-up call of each pass before the timing and the memory measurement. Every
row says how many timed runs its medians come from ("repeats"). Where codex_ml's CPU products are ATen's (Intel
CPUs), the floor is timed once, not once per backend.

    tools/bazel run //kernels:bench_linear_cross_entropy -- --preset=cpu --json=lce_cpu.json
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from codex_ml.kernels.bench import common
from codex_ml.ops.cross_entropy import linear_cross_entropy
from codex_ml.ops.dispatch import load_extension

REFERENCES = ("torch_chunked", "cce_compile", "torch_compile")
# LinearCrossEntropyOptions' documented ways to chunk: a chunking_method ("auto" resolves to "aspect_ratio:2" for
# fp32) or, with chunking_method=None, a fixed batch_chunk_size (rows per chunk).
CHUNKINGS = ("aspect_ratio", "aspect_ratio:2", "batch_chunk_size=1024", "batch_chunk_size=4096")

PRESETS = {
    # (N, H, V, dtype, device, impls, repeats)
    "quick": [(512, 256, 4096, torch.float32, "cpu", ("cpu", *REFERENCES), 3)],
    "cpu": [(8192, 1024, 32768, torch.float32, "cpu", ("cpu", *REFERENCES), 3)],
    # The GPU shape: 16k tokens of a Llama-3-sized head (vocabulary 128256), bf16.
    "gpu": [(16384, 4096, 128256, torch.bfloat16, "cuda", ("triton", "triton+input_accum", "cuda", "liger"), 10)],
}


def _reference(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight).float(), target)


def _floor(hidden, weight, backward: bool):
    logits = hidden @ weight.t()
    if backward:  # the two gradient products, with the logits standing in for their gradient
        _ = logits @ weight
        _ = logits.t() @ hidden


def _floor_cpu_gemm(hidden, weight, backward: bool):
    """The same three products with the backend of codex_ml's CPU kernels (kernels/common/cpu_gemm.h: oneDNN
    or ATen's MKL, by CPU vendor), through codex_ml.ops.linear's kernels."""
    logits = torch.ops.codex_ml_cpu.linear(hidden, weight, None)
    if backward:
        torch.ops.codex_ml_cpu.linear_backward(logits, hidden, weight, [True, True, False])


def _floor_ms(hidden, weight, backward: bool, repeats: int) -> tuple[float, float]:
    """(floor, floor with ATen's products): the floor is the faster of ATen's products and, for fp32 CPU
    tensors, those of codex_ml's CPU GEMM backend, so that no implementation's products beat it."""
    hidden, weight = hidden.detach(), weight.detach()
    aten = common.time_ms(lambda: _floor(hidden, weight, backward), repeats)
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return aten, aten
    load_extension("linear")
    if not torch.ops.codex_ml_cpu.cpu_gemm_onednn():  # the backend is ATen's: the same products, timed already
        return aten, aten
    return min(aten, common.time_ms(lambda: _floor_cpu_gemm(hidden, weight, backward), repeats)), aten


def _passes(loss_fn, hidden, weight, target):
    """(fwd, fwd+bwd) callables of loss_fn(hidden, weight, target)."""
    def fwd():
        with torch.no_grad():
            loss_fn(hidden, weight, target)

    def fwd_bwd():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, target).backward()

    return fwd, fwd_bwd


def _compiled_reference():
    try:
        return torch.compile(_reference)
    except Exception as err:  # noqa: BLE001  (reported as "did not compile", the bench goes on)
        print(f"torch.compile of the reference failed: {err}")
        return None


def _torch_chunked(chunking: str):
    """PyTorch's chunked op with one of CHUNKINGS."""
    name, _, rows = chunking.partition("=")
    if name == "batch_chunk_size":
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=int(rows))
    else:
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=chunking)
    return lambda hidden, weight, target: F.linear_cross_entropy(hidden, weight, target, options=options)


def _best_chunking(hidden, weight, target) -> str:
    """The chunking of CHUNKINGS with which PyTorch's chunked op runs fwd+bwd fastest on these inputs: one call
    each, without a warm-up call (the op compiles nothing and keeps no cache between calls on the CPU; the choice
    is only a choice, its time is measured afterwards like every other row's)."""
    times = {}
    for chunking in CHUNKINGS:
        fwd_bwd = _passes(_torch_chunked(chunking), hidden, weight, target)[1]
        times[chunking] = common.time_ms(fwd_bwd, repeats=1, warmup=0)
        print(f"torch_chunked, {chunking}: fwd+bwd {times[chunking]:.1f} ms")
    return min(times, key=times.get)


def _cce_compile(hidden, weight, target):
    from cut_cross_entropy import linear_cross_entropy as cce  # embeddings, classifier, targets

    return cce(hidden, weight, target, impl="torch_compile")


def run_case(n: int, h: int, v: int, dtype: torch.dtype, device: str, impls: tuple[str, ...],
             repeats: int) -> Iterator[dict]:
    """The rows of one shape, each yielded as soon as it is measured."""
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) / h ** 0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, h, device=device).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    ref = dict(zip(("fwd", "fwd+bwd"), _passes(_reference, hidden, weight, target)))
    compiled = _compiled_reference()
    compiled_passes = dict(zip(("fwd", "fwd+bwd"), _passes(compiled, hidden, weight, target))) if compiled else {}
    functional = common.liger_functional() if "liger" in impls else None
    chunking = _best_chunking(hidden, weight, target) if "torch_chunked" in impls else None
    others = {
        "liger": functional.liger_fused_linear_cross_entropy if functional else None,
        "torch_chunked": _torch_chunked(chunking) if chunking else None,
        "cce_compile": _cce_compile,
        "torch_compile": compiled,
    }
    for pass_name in ("fwd", "fwd+bwd"):
        ref_time = common.time_ms(ref[pass_name], repeats)
        ref_mem = common.peak_mem_mb(ref[pass_name], device)
        backward = pass_name == "fwd+bwd"
        floor, floor_aten = _floor_ms(hidden, weight, backward, repeats)
        compiled_time = None
        if compiled_passes:
            try:
                compiled_time = common.time_ms(compiled_passes[pass_name], repeats)
            except Exception as err:  # noqa: BLE001
                print(f"the compiled reference failed to run ({pass_name}): {err}")
                compiled_passes = {}
        for impl in impls:
            def ours(hd, wt, tg, impl=impl):
                base, _, accum = impl.partition("+")
                return linear_cross_entropy(hd, wt, tg, impl=base,
                                            accum_dtype=hd.dtype if accum == "input_accum" else torch.float32)

            loss_fn = others[impl] if impl in others else ours
            if loss_fn is None:
                continue
            # Ours fail only with our clear errors; whatever another library raises only drops its rows.
            failures = Exception if impl in others else (ValueError, RuntimeError)
            try:
                fn = dict(zip(("fwd", "fwd+bwd"), _passes(loss_fn, hidden, weight, target)))[pass_name]
                if impl == "torch_compile" and compiled_time is not None:  # timed above
                    time_ms = compiled_time
                else:
                    time_ms = common.time_ms(fn, repeats)  # its warm-up call compiles
                mem = common.peak_mem_mb(fn, device)
            except failures as err:
                print(f"impl {impl} unavailable: {err}")
                continue
            yield {
                "kernel": "linear_cross_entropy", "impl": impl, "N": n, "H": h, "V": v,
                "dtype": str(dtype).removeprefix("torch."), "pass": pass_name, "time_ms": time_ms,
                "peak_mem_mb": mem, "ref_time_ms": ref_time, "ref_peak_mem_mb": ref_mem,
                "floor_time_ms": floor, "floor_aten_time_ms": floor_aten, "compiled_ref_time_ms": compiled_time,
                "chunking": chunking if impl == "torch_chunked" else None, "repeats": repeats,
            }


def main() -> None:
    args = common.parse_args(__doc__)
    cases = (run_case(n, h, v, dtype, common.needs_device(device, args.preset), impls, args.repeats or repeats)
             for n, h, v, dtype, device, impls, repeats in PRESETS[args.preset])
    common.record(common.result_file("bench_linear_cross_entropy", args), cases)


if __name__ == "__main__":
    main()
