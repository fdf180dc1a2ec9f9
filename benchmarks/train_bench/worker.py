"""One training of bench_train in a fresh process (started by lockstep.py):

    python -m benchmarks.train_bench.worker IMPL TASK_JSON OUT_JSON GO_FD,DONE_FD

applies the process settings of its comparison (see bench_train.py), runs the implementation's runner in lockstep
with the other processes and writes its measurements to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.train_bench.runners import RUNNERS
from benchmarks.train_bench.spec import BenchSpec, SyntheticCorpus
from benchmarks.train_bench.step_clock import StepClock, rss_mb


def apply_allocator_setting(impl: str, settings: str, spec: BenchSpec, parallelism: str = "ddp") -> str:
    """glibc's settings as codex_ml's Trainer ships them (configure_cpu_allocator) for codex_ml and, in
    same_settings, for all three; the others as shipped keep glibc's defaults. Returns the setting in effect:
    "keep_freed", "return_freed" (FSDP) or "glibc_default"."""
    if spec.device.startswith("cuda") or (settings == "as_shipped" and impl != "codex_ml"):
        return "glibc_default"
    from codex_ml.training.setup import configure_cpu_allocator

    return configure_cpu_allocator(True, parallelism)


def cpu_gemm_backend(impl: str, spec: BenchSpec) -> str | None:
    """Where the implementation's fp32 CPU matrix products went: "onednn" or "aten" (ATen's, MKL in PyTorch's x86
    builds); None on CUDA. PyTorch's own layers always use ATen's; codex_ml's kernels report their choice
    (CODEX_CPU_GEMM, or by CPU vendor)."""
    if spec.device.startswith("cuda"):
        return None
    if impl != "codex_ml":
        return "aten"
    return "onednn" if torch.ops.codex_ml_cpu.cpu_gemm_onednn() else "aten"


def worker_main(impl: str, task_path: str, out_path: str, gate: tuple[int, int] | None = None) -> None:
    """Runs one implementation in this (fresh) process and writes its measurements as JSON to out_path."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    task = json.loads(Path(task_path).read_text())
    spec = BenchSpec(**{**task["spec"], "betas": tuple(task["spec"]["betas"])})
    torch.set_num_threads(spec.threads)
    base_rss = rss_mb("VmRSS")
    allocator = apply_allocator_setting(impl, task["settings"], spec)
    corpus = SyntheticCorpus(spec)
    init = torch.load(task["init_path"], map_location="cpu", weights_only=True)
    result = RUNNERS[impl](spec, corpus, init, task["run_dir"], gate)
    clock: StepClock = result.pop("clock")
    if clock.count != spec.steps:
        raise RuntimeError(f"{impl}: {clock.count} optimizer steps seen, expected {spec.steps}")
    step_s = clock.step_s[spec.timing_warmup - 1:]  # steps timing_warmup + 1 .. steps
    ranked, tokens = sorted(step_s), spec.batch * spec.seq_len
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None
    Path(out_path).write_text(json.dumps({
        **result, "impl": impl, "settings": task["settings"], "allocator": allocator,
        "cpu_gemm": cpu_gemm_backend(impl, spec), "tokens_per_s": tokens * len(step_s) / sum(step_s),
        "tokens_per_s_median": tokens / ranked[len(ranked) // 2], "tokens_per_s_best": tokens / ranked[0],
        "timed_s": sum(step_s), "step_s": step_s, "peak_rss_mb": rss_mb("VmHWM"),
        "train_peak_rss_mb": clock.train_peak_rss_mb, "base_rss_mb": base_rss, "peak_gpu_mb": peak_gpu,
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }))


if __name__ == "__main__":
    impl, task_path, out_path, fds = sys.argv[1:]
    worker_main(impl, task_path, out_path, tuple(int(fd) for fd in fds.split(",")))
