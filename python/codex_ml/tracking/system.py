"""System metrics: CPU and resident memory (psutil), GPU memory and utilization (NVML, when present)."""

from __future__ import annotations

import os
import threading

# Peak dense bf16 tensor throughput (FLOP/s) of common accelerators, for model FLOPs utilization.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def _nvml_index(cuda_index: int) -> int:
    """NVML's number of torch's CUDA device `cuda_index`: NVML counts every GPU of the machine and ignores
    CUDA_VISIBLE_DEVICES, torch counts the visible ones only."""
    import torch

    to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)  # a private helper: may go away
    return to_nvml(cuda_index) if to_nvml is not None else cuda_index


class SystemMonitor:
    """Samples CPU %, RSS and, where NVML answers, GPU memory and utilization of this process's GPU."""

    def __init__(self, gpu_index: int | None = None):
        import psutil

        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # The first call only sets the reference point.
        self._lock = threading.Lock()
        self._nvml_handle = None
        if gpu_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(gpu_index))
            except Exception:  # noqa: BLE001 - no NVML library or driver: GPU metrics are simply absent.
                self._nvml_handle = None

    def sample(self) -> dict[str, float]:
        """Current system metrics, keys prefixed "sys/"."""
        with self._lock:
            metrics = {
                "sys/cpu_percent": self._process.cpu_percent(None),
                "sys/rss_gib": self._process.memory_info().rss / 2**30,
            }
            if self._nvml_handle is not None:
                try:
                    memory = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                    util = self._nvml.nvmlDeviceGetUtilizationRates(self._nvml_handle)
                    metrics["sys/gpu_memory_gib"] = memory.used / 2**30
                    metrics["sys/gpu_util_percent"] = float(util.gpu)
                except Exception:  # noqa: BLE001 - a transient NVML error must not stop training.
                    pass
            return metrics
