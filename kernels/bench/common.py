"""Shared helpers of the kernel benchmarks: flags, timing, peak memory, a table and the result file (record.py).

Memory is measured as the peak *extra* memory a call needs over what was allocated before it:
- CUDA: torch.cuda peak allocator statistics (max_memory_allocated after reset_peak_memory_stats,
  minus memory_allocated before the call).
- CPU: the process's resident-set high-water mark (VmHWM in /proc/self/status), reset before the call
  by writing "5" to /proc/self/clear_refs (Linux >= 4.0), minus the resident set before the call. Large
  tensors are mmap'ed by the allocator and returned to the system when freed, so this measures the
  call's own peak; it is page-granular and includes anything else the process touches meanwhile.
  For that, importing this module fixes glibc's mmap threshold at 1 MiB (mallopt): otherwise glibc
  raises the threshold after frees and serves later large tensors from heap pages already resident,
  which would hide them from the measurement.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch
from absl import flags

from codex_ml.cli.common import enter_working_directory, parse_flags
from codex_ml.kernels.bench.record import ResultFile

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _fix_mmap_threshold() -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except OSError:  # not glibc: the CPU figures may then under-count reused heap memory
        pass


_fix_mmap_threshold()


def define_flags(fv: flags.FlagValues) -> None:
    """Flags every benchmark takes: --preset=quick|cpu|gpu, --json=PATH, --repeats=N."""
    flags.DEFINE_enum("preset", "quick", ["quick", "cpu", "gpu"],
                      "shape set: quick (seconds, for a smoke run), cpu (the CPU figures), gpu (CUDA)", flag_values=fv)
    flags.DEFINE_string("json", None, "write the result file (record.py: the rows and the run's metadata) here",
                        flag_values=fv)
    flags.DEFINE_integer("repeats", None, "timed repeats per case (median reported)", flag_values=fv)


def parse_args(description: str, argv: list[str] | None = None) -> flags.FlagValues:
    """The benchmark's flags (define_flags) from argv (default: sys.argv[1:]), parsed as every codex_ml command parses
    its flags (codex_ml.cli.common).

    Under `bazel run` the working directory is then set to BUILD_WORKING_DIRECTORY, so a relative --json path
    resolves where the user ran bazel.
    """
    argv = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0]).removesuffix(".py")  # bench_NAME, or "codex-bench NAME"
    args, _ = parse_flags(prog, description, define_flags, argv)
    enter_working_directory()
    return args


def result_file(bench: str, args: flags.FlagValues) -> ResultFile:
    """The result file of this run (--json; none without it), its metadata taken now."""
    return ResultFile(args.json, bench, args.preset, sys.argv[1:])


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def time_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median time of fn() in milliseconds over `repeats` runs, after `warmup` untimed runs.

    Once CUDA is in use, each run is timed with CUDA events on the current stream (the device's time from the
    first launch to the last, free of the host's synchronization latency, which would swamp a kernel of tens
    of microseconds); otherwise with the host's clock.
    """
    for _ in range(warmup):
        fn()
    _sync()
    cuda = _cuda_in_use()
    return statistics.median(_time_once(fn, cuda) for _ in range(repeats))


def time_pair_ms(fn: Callable[[], object], ref: Callable[[], object], repeats: int = 5,
                 warmup: int = 1) -> tuple[float, float]:
    """Median times (ms) of fn() and ref(), run alternately (fn, ref, fn, ref, ...), as time_ms times each.

    Alternating puts both under the same load on a shared machine, so their ratio is steadier than that of two
    separate medians (which can sit minutes apart on a machine whose speed drifts).
    """
    for _ in range(warmup):
        fn()
        ref()
    _sync()
    cuda = _cuda_in_use()
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_time_once(fn, cuda))
        theirs.append(_time_once(ref, cuda))
    return statistics.median(ours), statistics.median(theirs)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_mem_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak extra memory (MiB) of one fn() call over what was allocated before it (see module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current resident set
        clear.write("5")
    fn()
    return max(0, _rss_kib("VmHWM") - before) / 1024


def print_table(rows: list[dict]) -> None:
    """Prints rows (dicts with the same keys) as an aligned text table; floats with 2 decimals."""
    if not rows:
        print("(no rows)")
        return
    keys = list(rows[0].keys())

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return "-" if value is None else str(value)

    cells = [[fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def needs_device(device: str, preset: str) -> str:
    """`device`, once it is known to exist: a preset that needs a CUDA GPU on a machine without one stops here."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"preset {preset!r} needs a CUDA GPU and none is available")
    return device


def record(results: ResultFile, cases: Iterable[Iterable[dict]], rows: list[dict] | None = None) -> None:
    """Runs every case (each yields rows), writing the result file after each row, so that a run stopped midway
    keeps the rows it finished; then prints the table."""
    rows = list(rows or [])
    for case in cases:
        for row in case:
            rows.append(row)
            results.write(rows)  # the rows so far
    print_table(rows)
    results.write(rows, quiet=False)


def liger_functional():
    """liger_kernel.transformers.functional (for comparison rows only: no dependency of codex_ml), or None where
    liger-kernel is not importable; tools/gpu_wheels.sh fetches it for the GPU machine."""
    try:
        from liger_kernel.transformers import functional
    except Exception as err:  # noqa: BLE001  (any failure to import it only drops its rows)
        print(f"impl liger unavailable: liger-kernel is not importable ({err}); tools/gpu_wheels.sh fetches it")
        return None
    return functional
