"""Per-step timing and the lockstep gate, hooked into each training's optimizer."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from benchmarks.train_bench.spec import BenchSpec


def rss_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: the high-water mark) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """Optimizer step hook: times every step, records the RSS high-water mark after the last one, and hands the
    turn back to the driver after each step, waiting for the next (the gate: file descriptors to read and write).

    step_s[i] is the duration of step i + 2 (1-based), from the moment this process got its turn after step i + 1
    to the end of optimizer step i + 2: forward, backward, clipping, the optimizer and whatever the framework
    does between steps. Step 1 is never timed (it starts with the setup)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: BenchSpec, gate: tuple[int, int] | None):
        self.step_s: list[float] = []
        self.count, self.train_peak_rss_mb = 0, float("nan")
        self.steps, self.cuda, self.gate = spec.steps, spec.device.startswith("cuda"), gate
        self._start: float | None = None
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.count += 1
        if self._start is not None:
            self.step_s.append(end - self._start)
        if self.count == self.steps:
            self.train_peak_rss_mb = rss_mb("VmHWM")
        if self.gate is not None:
            os.write(self.gate[1], b".")
            if os.read(self.gate[0], 1) != b".":
                raise RuntimeError("the benchmark driver went away")
        self._start = time.perf_counter()
