"""Process-wide settings, made once per process before a Trainer is built: the distributed process group, the
device, the glibc allocator, determinism; and the random generators (seeding, saving, restoring).

    config = TrainerConfig(...)
    process = setup_process(config)   # the CLI does this; so must any program that builds a Trainer itself
    trainer = Trainer(config, model=..., data=..., run_dir=..., process=process)
    ...
    shutdown_distributed()
"""

from __future__ import annotations

import ctypes
import datetime
import os
import random
import resource
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from codex_ml.models.hf import resolve_device
from codex_ml.training.config import ConfigError, TrainerConfig

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Under FSDP: at 1 MiB the activations of a few hundred tokens (256 x 768 floats: 768 KiB) stayed in the heap, and
# gathered blocks and gradients then landed in the holes they left: the heap grew by about 300 MB over a few steps
# (200 MB of it free) and kept it. From 256 KiB the heap stays as it was after setup.
FSDP_MMAP_THRESHOLD = 256 << 10


class ProcessGroupError(RuntimeError):
    """Another process of a multi-process run died or stopped answering (a collective failed or timed out): the
    run stops on every process; the checkpoints written before are intact."""


_process_group_failed = False  # set by process_group_failure(): leaving then skips the barrier no one would join


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone or silent (torch's DistError;
    gloo reports a dead peer as a RuntimeError naming itself)."""
    text = str(error).lower()
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                                 and ("gloo" in text or "nccl" in text or "timed out" in text))


def process_group_failure(error: BaseException, process: ProcessInfo, run_dir: os.PathLike) -> ProcessGroupError:
    """The one error every surviving process reports when another is lost (`error`: what torch raised)."""
    global _process_group_failed
    _process_group_failed = True
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return ProcessGroupError(
        f"Process {process.rank} of {process.world_size}: another process of this run died or stopped answering "
        f"({first_line}), so the run stopped. Its own output (or torchrun's summary) says why it ended. The "
        f"checkpoints in {run_dir} are intact: run the same command again, and --resume=auto continues from the "
        "newest. Trainer.collective_timeout_s bounds how long a process waits for a silent one."
    )


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process trains: its rank among `world_size` torchrun processes and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0


def setup_process(config: TrainerConfig) -> ProcessInfo:
    """Checks the settings that depend on this machine and process count, then applies the process-wide ones:
    the glibc allocator (keep_freed_memory, CPU only), deterministic algorithms, and the torchrun process group.
    Raises ConfigError naming the binding when the machine cannot do what the config asks."""
    rank, local_rank, world_size = distributed_env()
    if config.batch_size % world_size:
        raise ConfigError(
            f"Trainer.batch_size = {config.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({world_size}); change batch_size or --nproc_per_node."
        )
    device = _resolve_device(config.device, local_rank)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("Trainer.precision = 'fp16' needs a GPU (it uses a loss scaler); use 'bf16' on the CPU.")
    if config.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError("Trainer.fsdp_cpu_offload = True moves FSDP's shards from the GPU to CPU memory: on the CPU "
                          "there is nothing to offload; turn it off.")
    if device.type == "cpu":
        configure_cpu_allocator(config.keep_freed_memory, config.parallelism)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    init_distributed(config.collective_timeout_s)
    return ProcessInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        resolved = resolve_device(device, error=ConfigError)
    except ConfigError as e:  # "device='cuda' but no CUDA device is available: ...": a Trainer binding
        raise ConfigError(f"Trainer.{e}") from e
    if resolved.type not in ("cpu", "cuda"):  # meta trains nothing; mps, xpu: untested, the kernels have no path
        raise ConfigError(f"Trainer.device={device!r}: training runs on cpu, cuda, cuda:N or auto.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"Trainer.device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto.")
    return resolved


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(timeout_s: float | None = None) -> None:
    """Joins the torchrun process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1; a no-op otherwise.
    `timeout_s` (Trainer.collective_timeout_s): how long a collective waits for the other processes before it
    fails (default: torch's)."""
    rank, local_rank, world_size = distributed_env()
    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:  # torchrun sets them; without them init_process_group fails with a bare ValueError
            raise ConfigError(
                f"WORLD_SIZE={world_size} and RANK={rank} are set but {' and '.join(missing)} not: launch "
                f"multi-process training with torchrun (torchrun --nproc_per_node={world_size} -m "
                "codex_ml.cli.train ...), or unset WORLD_SIZE and RANK to train in one process."
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


def shutdown_distributed() -> None:
    """Leaves the process group (exiting without it makes gloo abort the process). All ranks meet at a barrier
    first, so no rank tears down its connections while another still uses them (under load that raced and
    aborted a rank at exit: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if _process_group_failed:  # another process is gone: a barrier would wait for it
            dist.destroy_process_group()
            return
        try:
            if dist.get_backend() == "gloo":  # one that gives up (a rank killed, failed) instead of waiting forever
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # a rank already gone: leave anyway
            pass
        dist.destroy_process_group()


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory in MiB: the most CUDA memory its tensors held on a GPU (max_memory_allocated),
    its peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def configure_cpu_allocator(keep_freed: bool, parallelism: str = "ddp") -> str:
    """glibc's malloc settings for training on the CPU; returns the one in effect: "keep_freed", "return_freed" or
    "glibc_default".

    Unsharded training allocates the same activations and gradients every step: freed blocks are kept for reuse
    (keep_freed_cpu_memory). FSDP gathers each block's parameters and frees them again within the step; kept, those
    blocks stay in the heap and the resident set grows back towards an unsharded copy, undoing what sharding saves.
    So under FSDP blocks of FSDP_MMAP_THRESHOLD and more go back to the system when freed
    (return_freed_cpu_memory); they are page-faulted in again at their next use, which costs time."""
    if parallelism == "fsdp":
        return "return_freed" if return_freed_cpu_memory() else "glibc_default"
    if keep_freed:
        return "keep_freed" if keep_freed_cpu_memory() else "glibc_default"
    return "glibc_default"


def return_freed_cpu_memory(threshold_bytes: int = FSDP_MMAP_THRESHOLD) -> bool:
    """Asks glibc's malloc to serve blocks of `threshold_bytes` and more with mmap, so that freeing them returns
    them to the system (a fixed threshold: glibc's default one rises up to 32 MiB as large blocks are freed).
    Process-wide; returns whether the allocator took the setting."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def keep_freed_cpu_memory(limit_bytes: int = 1 << 30) -> bool:
    """Asks glibc's malloc to keep freed blocks of up to `limit_bytes` for reuse instead of unmapping them.

    By default glibc serves blocks over 32 MiB with mmap and unmaps them on free, so a CPU training step
    that allocates the same activations and gradients every step page-faults them in again each time
    (about 200 MB, 50,000 faults, 4% of a step of the bench_train model). Process-wide; returns whether
    the allocator took the settings (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's (all devices) random generators from one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as plain tensors and tuples, loadable with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
