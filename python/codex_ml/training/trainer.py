"""The training loop: composes data, model, optimizer, evaluation, checkpoints and tracking."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from codex_ml.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_state,
    load_state_file,
    verify_checkpoint,
)
from codex_ml.data import DataError
from codex_ml.eval import evaluate, get_metric
from codex_ml.models.hf import resolve_device
from codex_ml.tracking import MetricsLogger, Progress, SystemMonitor, import_mlflow, peak_flops
from codex_ml.training.optim import LRSchedule, build_optimizer
from codex_ml.training.signals import GracefulStop

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("skip", "stop")


class ConfigError(ValueError):
    """A mistake in the configuration or the command line that the user must fix (the CLI exits with 2)."""


@dataclass
class TrainResult:
    """What a call to Trainer.fit() achieved."""

    status: str  # "finished", "interrupted" (signal) or "stopped_nonfinite"
    step: int
    tokens: int
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps run in this call
    val_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_seed(seed: Any) -> None:
    """NumPy's generators take no negative seed and torch's no more than 64 bits (each rank adds its rank)."""
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ConfigError(f"The seed (train.seed) must be an integer in [0, 2**63), got {seed!r}.")


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's (all devices) random generators from one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> None:
    """Joins the torchrun process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1; a no-op otherwise."""
    rank, local_rank, world_size = _distributed_env()
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
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def shutdown_distributed() -> None:
    """Leaves the process group (exiting without it makes gloo abort the process). All ranks meet at a barrier
    first, so no rank tears down its connections while another still uses them (under load that raced and
    aborted a rank at exit: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":  # one that gives up (a rank killed, failed) instead of waiting forever
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # a rank already gone: leave anyway
            pass
        dist.destroy_process_group()


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


def _describe_difference(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys)


class Trainer:
    """Trains a causal language model: forward(input_ids, targets) -> (logits, loss).

    `data` provides `batches(split, *, batch_size, seq_len, seed, rank, world_size)`, iterators of
    {"input_ids", "targets"} (int64 [B, T]) with state_dict()/load_state_dict(), and optionally a
    `tokenizer` (sha256, model_path). `batch_size` is the global batch of one micro-step: under torchrun
    each of the N processes reads batch_size / N rows of it. One optimizer step uses
    `grad_accum_steps` micro-steps.

    Run directory: operative_config.gin, metrics.ndjson, metrics.csv, mlflow.db and
    checkpoints/step_XXXXXXXX/ (see codex_ml.checkpoint). Only rank 0 writes there.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: torch.nn.Module,
        data: Any,
        *,
        seed: int = 0,
        batch_size: int = 8,
        seq_len: int = 128,
        max_steps: int = 100,
        optimizer: str = "adamw",
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        momentum: float = 0.9,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = 1.0,
        precision: str = "fp32",
        compile: bool = False,
        deterministic: bool = False,
        keep_freed_memory: bool = True,
        nan_policy: str = "skip",
        max_consecutive_nonfinite: int = 10,
        eval_every: int = 0,
        eval_batches: int = 4,
        metrics: Sequence[str] = ("loss", "perplexity", "token_accuracy"),
        checkpoint_every: int = 0,
        keep_last: int = 3,
        keep_best: int = 1,
        log_every: int = 10,
        system_metrics_every: int = 50,
        device: str = "auto",
        mlflow: bool = True,
        tracking_uri: str | None = None,
        peak_flops_per_device: float | None = None,
        operative_config: str | Callable[[], str] = "",
        model_config: dict[str, Any] | None = None,
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"Trainer.precision = {precision!r} is not one of {', '.join(PRECISIONS)}.")
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"Trainer.nan_policy = {nan_policy!r} is not one of {', '.join(NAN_POLICIES)}.")
        for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("seq_len", seq_len),
                            ("grad_accum_steps", grad_accum_steps), ("log_every", log_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Trainer.{name} must be a positive integer, got {value!r}.")
        for name, value, zero in (("eval_every", eval_every, "evaluate at the end only"),
                                  ("eval_batches", eval_batches, "no evaluation"),
                                  ("checkpoint_every", checkpoint_every, "checkpoint at the end only"),
                                  ("system_metrics_every", system_metrics_every, "no system metrics"),
                                  ("max_consecutive_nonfinite", max_consecutive_nonfinite,
                                   "stop at the first non-finite step")):
            if not _is_int(value) or value < 0:  # a negative value would act like its absolute value, or as 0
                raise ConfigError(f"Trainer.{name} = {value!r} must be an integer >= 0 (0: {zero}).")
        check_seed(seed)
        # Checked here with the binding named, rather than by torch at the first step with its own text (or not at
        # all: a negative clip norm or learning rate silently turns descent into ascent).
        if not _is_finite_number(learning_rate) or learning_rate < 0:
            raise ConfigError(f"Trainer.learning_rate = {learning_rate!r} must be a finite number >= 0 (the peak "
                              "learning rate), e.g. 3e-4.")
        if not _is_finite_number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"Trainer.min_lr_ratio = {min_lr_ratio!r} must be a number in [0, 1]: the final "
                              "learning rate as a fraction of Trainer.learning_rate.")
        if not _is_finite_number(weight_decay) or weight_decay < 0:
            raise ConfigError(f"Trainer.weight_decay = {weight_decay!r} must be a finite number >= 0 (0: no "
                              "weight decay).")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_is_finite_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"Trainer.betas = {betas!r} must be two numbers in [0, 1) (AdamW's beta1 and beta2), "
                              "e.g. (0.9, 0.95).")
        if not _is_finite_number(momentum) or not 0 <= momentum < 1:
            raise ConfigError(f"Trainer.momentum = {momentum!r} must be a number in [0, 1) (SGD's momentum; 0: "
                              "none).")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float))
                                               and not isinstance(clip_grad_norm, bool) and clip_grad_norm >= 0):
            raise ConfigError(f"Trainer.clip_grad_norm = {clip_grad_norm!r} must be None or a number >= 0 (0 or "
                              "None: no clipping); a negative norm would reverse the gradients.")
        if peak_flops_per_device is not None and not (_is_finite_number(peak_flops_per_device)
                                                      and peak_flops_per_device > 0):
            raise ConfigError(f"Trainer.peak_flops_per_device = {peak_flops_per_device!r} must be None (looked up "
                              "from the GPU's name) or the FLOP/s of one device, > 0.")
        if eval_batches > 0 and not metrics:
            raise ConfigError("Trainer.metrics is empty but evaluation is on: name at least one metric, e.g. "
                              "('loss',), or set Trainer.eval_batches = 0.")
        for name in metrics:  # checked now: evaluate() would otherwise fail only at the first evaluation
            try:
                get_metric(name)
            except ValueError as e:
                raise ConfigError(f"Trainer.metrics: {e}") from e
        max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
        if max_len is None:  # HFCausalLM keeps it on the model (its HFModelConfig has none)
            max_len = getattr(model, "max_seq_len", None)
        if isinstance(max_len, int) and seq_len > max_len:
            raise ConfigError(f"Trainer.seq_len = {seq_len} exceeds the model's max_seq_len = {max_len}; lower "
                              "seq_len or raise the model's max_seq_len.")
        self.run_dir = Path(run_dir)
        self.rank, self.local_rank, self.world_size = _distributed_env()
        if batch_size % self.world_size:
            raise ConfigError(
                f"Trainer.batch_size = {batch_size} (the global batch) must be divisible by the number of "
                f"processes ({self.world_size}); change batch_size or --nproc_per_node."
            )
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        try:
            self.device = resolve_device(device, error=ConfigError)
        except ConfigError as e:  # "device='cuda' but no CUDA device is available: ...": a Trainer binding
            raise ConfigError(f"Trainer.{e}") from e
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"Trainer.device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto.")
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("Trainer.precision = 'fp16' needs a GPU (it uses a loss scaler); use 'bf16' on the CPU.")
        self.is_main = self.rank == 0
        self.model, self.data, self.seed = model, data, seed
        self.batch_size, self.seq_len, self.max_steps = batch_size, seq_len, max_steps
        self.grad_accum_steps, self.clip_grad_norm = grad_accum_steps, clip_grad_norm
        self.precision, self.nan_policy = precision, nan_policy
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.eval_every, self.eval_batches, self.metrics = eval_every, eval_batches, tuple(metrics)
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.system_metrics_every = system_metrics_every
        self.operative_config = operative_config
        self.mlflow, self.tracking_uri = mlflow, tracking_uri
        if mlflow:  # found now, before anything is written, rather than when fit() opens the logger
            try:
                import_mlflow()
            except RuntimeError as e:
                raise ConfigError(str(e)) from e
        if eval_batches > 0:  # found now rather than at the first evaluation, after the training it would lose
            try:
                next(iter(self._batches("val")))
            except (DataError, StopIteration) as e:
                reason = str(e) or "the val split gives no batch"
                raise DataError(f"Evaluation is on (Trainer.eval_batches = {eval_batches}) but {reason}; or give the "
                                "val split a larger share (prepare_data.splits), or set Trainer.eval_batches = 0 to "
                                "train without evaluation.") from e
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        if keep_freed_memory and self.device.type == "cpu":
            keep_freed_cpu_memory()
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        init_distributed()

        self.model.to(self.device)
        self.optimizer_name = optimizer
        try:
            self.optimizer = build_optimizer(self.model, optimizer, learning_rate=learning_rate,
                                             weight_decay=weight_decay, betas=betas, momentum=momentum)
            self.schedule = LRSchedule(schedule, learning_rate, max_steps, warmup_steps, min_lr_ratio)
        except ValueError as e:
            raise ConfigError(f"Trainer: {e}") from e
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        step_model: torch.nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            step_model = DistributedDataParallel(self.model, device_ids=ids)
        self.step_model = torch.compile(step_model) if compile else step_model
        self.ddp = step_model if self.world_size > 1 else None

        self.model_config = model_config if model_config is not None else self._model_config_of(model)
        try:
            self.checkpoints = CheckpointManager(self.run_dir, keep_last=keep_last, keep_best=keep_best)
        except ValueError as e:  # "keep_last must be >= 1 ...": a Trainer binding
            raise ConfigError(f"Trainer.{e}") from e
        tokenizer = getattr(data, "tokenizer", None)
        self.tokenizer_sha256 = getattr(tokenizer, "sha256", None)
        self.tokenizer_path = getattr(tokenizer, "model_path", None)
        flops_fn = getattr(model, "flops_per_token", None)
        self.flops_per_token = float(flops_fn(seq_len)) if callable(flops_fn) else None
        if peak_flops_per_device is None and self.device.type == "cuda":
            peak_flops_per_device = peak_flops(torch.cuda.get_device_name(self.device))
        self.peak_flops = peak_flops_per_device
        self.step = 0
        self.tokens = 0
        self.best_val_loss = math.inf
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0  # skipped updates in a row (checkpointed: a resume does not reset it)

    @staticmethod
    def _model_config_of(model: torch.nn.Module) -> dict[str, Any] | None:
        config = getattr(model, "config", None)
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict):
            return None
        return {**to_dict(), "architecture": f"codex_ml.{type(model).__name__}"}

    # ----------------------------------------------------------------------------------------- helpers
    def _say(self, text: str) -> None:
        if self.is_main:
            if getattr(self, "_progress", None) is not None:
                self._progress.message(text)
            else:
                print(text, flush=True)

    def _config_text(self) -> str:
        return self.operative_config() if callable(self.operative_config) else self.operative_config

    def _batches(self, split: str):
        return self.data.batches(split, batch_size=self.batch_size // self.world_size, seq_len=self.seq_len,
                                 seed=self.seed, rank=self.rank, world_size=self.world_size)

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, train_iter: Any, val_loss: float | None) -> Path | None:
        """Writes a checkpoint of the current step (rank 0 writes; every rank contributes its RNG/data state)."""
        rng_states = self._gather(_rng_state())
        data_states = self._gather(train_iter.state_dict())
        error, path = None, None
        if self.is_main:
            torch_states = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, **self.schedule.state_dict()},
                "rng": {"ranks": rng_states},
            }
            if self.scaler is not None:
                torch_states["scaler"] = self.scaler.state_dict()
            trainer_state = {"step": self.step, "tokens": self.tokens, "world_size": self.world_size,
                             "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                             "nonfinite_skipped": self.nonfinite_skipped,
                             "consecutive_nonfinite": self.consecutive_nonfinite, "seed": self.seed,
                             "batch_size": self.batch_size, "seq_len": self.seq_len,
                             "optimizer": self.optimizer_name}
            extra = {"tokens": self.tokens, "tokenizer_sha256": self.tokenizer_sha256, "world_size": self.world_size}
            if val_loss is not None and math.isfinite(val_loss):
                extra["val_loss"] = val_loss
            try:
                path = self.checkpoints.save(
                    self.step, model_state=self.model.state_dict(), model_config=self.model_config,
                    tokenizer_path=self.tokenizer_path, torch_states=torch_states,
                    json_states={"trainer_state": trainer_state, "data_state": {"ranks": data_states}},
                    operative_config=self._config_text(), manifest_extra=extra,
                )
            except CheckpointError as e:
                error = str(e)
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise CheckpointError(error)
        if self.is_main:
            self._logger.event(self.step, "checkpoint", str(path))
        return path

    def _resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from, or None to start afresh; refuses where starting afresh would overwrite
        the checkpoints already in run_dir (save_checkpoint replaces a directory of the same step)."""
        never = resume is None or str(resume) == "never"
        path = None
        if self.is_main:
            existing = list_checkpoints(self.run_dir)  # step_* directories (an interrupted save leaves a .tmp-*)
            if never and existing:
                raise ConfigError(
                    f"--resume=never: {self.run_dir} holds checkpoints of an earlier run (newest step "
                    f"{existing[-1][0]}), which starting afresh would overwrite. Choose another --run_dir, or "
                    f"delete {self.run_dir / 'checkpoints'} to start over there."
                )
            if str(resume) == "auto":
                path = latest_valid_checkpoint(self.run_dir, report=self._say)
                if path is None and existing:
                    raise CheckpointError(
                        f"--resume=auto: {self.run_dir} holds {len(existing)} checkpoint(s) but none verifies (the "
                        "reasons are printed above), and starting afresh would overwrite them. Fix or restore one "
                        "(e.g. from a backup), or start afresh in another --run_dir."
                    )
            elif not never:
                path = Path(resume)
                if path.is_dir() and not (path / "manifest.json").exists() and list_checkpoints(path):
                    # A run directory (or its checkpoints/): its newest checkpoint that verifies.
                    found = latest_valid_checkpoint(path, report=self._say)
                    if found is None:
                        raise CheckpointError(f"--resume={path}: no checkpoint in this run directory verifies (the "
                                              "reasons are printed above). Fix or restore one, or resume from "
                                              "another checkpoint.")
                    path = found
                verify_checkpoint(path)
        if never:
            return None
        if self.world_size > 1:
            box = [str(path) if path else None]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] else None
        return path

    def _check_compatible(self, path: Path) -> None:
        """Refuses a checkpoint of another model shape, tokenizer, optimizer, data layout or process count, with the
        difference named."""
        manifest = json.loads((path / "manifest.json").read_text())
        saved_config_file = path / "model_config.json"
        if self.model_config is not None and saved_config_file.is_file():
            saved = json.loads(saved_config_file.read_text())
            if saved != json.loads(json.dumps(self.model_config)):
                raise ConfigError(
                    f"Cannot resume from {path}: it holds a model of another configuration "
                    f"({_describe_difference(saved, self.model_config)}). Use the configuration of that run, "
                    "or start afresh in another --run_dir."
                )
        saved_tok = manifest.get("tokenizer_sha256")
        if saved_tok and self.tokenizer_sha256 and saved_tok != self.tokenizer_sha256:
            raise ConfigError(
                f"Cannot resume from {path}: it was trained with another tokenizer (SHA-256 {saved_tok[:12]}... vs "
                f"{self.tokenizer_sha256[:12]}... now). Point the data config at that run's tokenizer.model, or "
                "start afresh in another --run_dir."
            )
        state_file = path / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        saved_optimizer = state.get("optimizer")
        if saved_optimizer is not None and saved_optimizer != self.optimizer_name:
            raise ConfigError(
                f"Cannot resume from {path}: it was trained with Trainer.optimizer = {saved_optimizer!r} and this "
                f"run has {self.optimizer_name!r}, whose state is another. Resume with "
                f"Trainer.optimizer = {saved_optimizer!r}, or start afresh in another --run_dir."
            )
        # The data iterator's saved position fits only the same layout; checked here to name the bindings.
        layout = [(binding, state[key], now) for key, binding, now in (
            ("seed", "train.seed", self.seed), ("batch_size", "Trainer.batch_size", self.batch_size),
            ("seq_len", "Trainer.seq_len", self.seq_len)) if key in state and state[key] != now]
        if layout:
            saved = ", ".join(f"{binding} = {value!r}" for binding, value, _ in layout)
            now = ", ".join(f"{binding} = {value!r}" for binding, _, value in layout)
            raise ConfigError(
                f"Cannot resume from {path}: it was trained with {saved} and this run has {now}; its data position "
                f"is valid only with those values. Keep {saved}, or start afresh in another --run_dir."
            )
        saved_world = manifest.get("world_size", 1)
        if saved_world != self.world_size:
            raise ConfigError(
                f"Cannot resume from {path}: it was written by {saved_world} process(es) and this run has "
                f"{self.world_size}; each process's data position is stored, so resume with the same "
                "--nproc_per_node."
            )

    def _load_checkpoint(self, path: Path, train_iter: Any) -> None:
        self._check_compatible(path)
        try:
            self.model.load_state_dict(load_model_state(path, self.device))
        except RuntimeError as e:
            raise ConfigError(f"Cannot resume from {path}: its weights do not fit this model ({e}).") from e
        try:
            self.optimizer.load_state_dict(load_state_file(path, "optimizer"))
        except (KeyError, TypeError, ValueError) as e:  # a checkpoint from before the optimizer was recorded
            raise ConfigError(
                f"Cannot resume from {path}: its optimizer state does not fit Trainer.optimizer = "
                f"{self.optimizer_name!r} ({type(e).__name__}: {e}). Resume with the optimizer of that run, or "
                "start afresh in another --run_dir."
            ) from e
        if self.scaler is not None and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(load_state_file(path, "scaler"))
        state = load_state_file(path, "trainer_state")
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.consecutive_nonfinite = state.get("consecutive_nonfinite", 0)
        train_iter.load_state_dict(load_state_file(path, "data_state")["ranks"][self.rank])
        _set_rng_state(load_state_file(path, "rng")["ranks"][self.rank])
        self._say(f"Resumed from {path} at step {self.step} ({self.tokens:,} tokens).")
        if self.step >= self.max_steps:
            self._say(f"Nothing to train: the checkpoint is at step {self.step} and Trainer.max_steps = "
                      f"{self.max_steps}; raise Trainer.max_steps to train further.")

    # -------------------------------------------------------------------------------------------- loop
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over `eval_batches` batches of the "val" split (the same batches every time)."""
        return evaluate(self.model, self._batches("val"), num_batches=self.eval_batches, metrics=self.metrics,
                        device=self.device, autocast_dtype=self.autocast_dtype)

    def _train_step(self, train_iter: Any) -> tuple[float, float, bool]:
        """One optimizer step over grad_accum_steps micro-batches. Returns (mean loss, grad norm, finite).

        A non-finite loss or gradient norm skips the update (with fp16 the loss scaler itself skips
        updates whose gradients overflowed, so only the loss is checked then)."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum_steps):
            batch = next(train_iter)
            inputs = batch["input_ids"].to(self.device, non_blocking=True)
            targets = batch["targets"].to(self.device, non_blocking=True)
            last = micro == self.grad_accum_steps - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    _, loss = self.step_model(inputs, targets)
                scaled = loss.float() / self.grad_accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        mean_loss = loss_sum / self.grad_accum_steps
        if self.world_size > 1:
            dist.all_reduce(mean_loss)  # A sum: gloo has no average.
            mean_loss /= self.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.clip_grad_norm if self.clip_grad_norm else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        loss_value, norm_value = mean_loss.item(), float(grad_norm)
        finite = math.isfinite(loss_value) and (self.scaler is not None or math.isfinite(norm_value))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, finite

    def fit(self, resume: str | os.PathLike | None = "auto") -> TrainResult:
        """Trains up to max_steps. `resume`: "auto" (newest valid checkpoint in run_dir, if any), "never", or a
        checkpoint path; neither starts afresh over checkpoints already in run_dir (a refusal changes nothing
        there). Returns when done, on SIGTERM/SIGINT (after a checkpoint), or on a non-finite loss with
        nan_policy="stop" (the last good checkpoint stays the newest)."""
        self._progress = None
        seed_everything(self.seed + self.rank)
        train_iter = self._batches("train")
        if self.is_main:  # a complete checkpoint moved aside by an interrupted re-save goes back before resolving
            self.checkpoints.remove_stale_temporaries()
        checkpoint = self._resolve_resume(resume)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint, train_iter)
        # Only once the resume is accepted is anything written: a refusal leaves the run directory as it was.
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "operative_config.gin").write_text(self._config_text())
            self._logger = MetricsLogger(self.run_dir, mlflow=self.mlflow, tracking_uri=self.tracking_uri)
            gpu = None
            if self.device.type == "cuda":  # "cuda" without an index is the current device
                gpu = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._monitor = SystemMonitor(gpu)
        status = "failed"
        try:
            if self.is_main:
                self._logger.log_params({"world_size": self.world_size, "seed": self.seed, "device": str(self.device),
                                         "start_step": self.step})
                self._logger.log_text(self._config_text(), "operative_config.gin")
            result = self._loop(train_iter)
            status = result.status
            return result
        finally:
            if self.is_main:
                if self._progress is not None:
                    self._progress.close()
                self._logger.close("FINISHED" if status in ("finished", "interrupted") else "FAILED")

    def _loop(self, train_iter: Any) -> TrainResult:
        result = TrainResult(status="finished", step=self.step, tokens=self.tokens)
        tokens_per_step = self.batch_size * self.seq_len * self.grad_accum_steps
        if self.is_main:
            self._progress = Progress(self.max_steps, self.step, self.log_every)
        self.model.train()
        with GracefulStop(report=self._say) as stop:
            while self.step < self.max_steps:
                started = time.perf_counter()
                loss, grad_norm, finite = self._train_step(train_iter)
                elapsed = time.perf_counter() - started
                lr = self.schedule(self.step)
                self.step += 1
                self.tokens += tokens_per_step
                if not finite:
                    self.nonfinite_skipped += 1
                    self.consecutive_nonfinite += 1
                    message = f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}"
                    if self.nan_policy == "stop" or self.consecutive_nonfinite > self.max_consecutive_nonfinite:
                        self._say(f"{message}: stopping (nan_policy={self.nan_policy!r}); the last good "
                                  f"checkpoint is {latest_valid_checkpoint(self.run_dir) if self.is_main else ''}.")
                        if self.is_main:
                            self._logger.event(self.step, "nonfinite_stop", message)
                        result.status = "stopped_nonfinite"
                        break
                    self._say(f"{message}: update skipped ({self.nonfinite_skipped} so far).")
                    if self.is_main:
                        self._logger.event(self.step, "nonfinite_skip", message)
                else:
                    self.consecutive_nonfinite = 0
                result.train_losses[self.step] = loss
                if self.is_main:
                    self._log_train(loss, grad_norm, lr, tokens_per_step / max(elapsed, 1e-9))

                done = self.step >= self.max_steps
                interrupted = self._any_rank(stop.requested)
                val_loss = None
                if self.eval_batches > 0 and (done or (self.eval_every and self.step % self.eval_every == 0)):
                    result.val_metrics = self.evaluate()
                    val_loss = result.val_metrics.get("loss")
                    if val_loss is not None and val_loss < self.best_val_loss:
                        self.best_val_loss = val_loss
                    if self.is_main:
                        self._logger.log(self.step, "val", result.val_metrics)
                        self._say(f"step {self.step} validation: " + ", ".join(
                            f"{k} {v:.4f}" for k, v in result.val_metrics.items()))
                if done or interrupted or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                    result.last_checkpoint = self.save_checkpoint(train_iter, val_loss)
                if interrupted and not done:  # a signal during the last step: the run is complete all the same
                    self._say(f"Stopped by signal after step {self.step}; checkpoint {result.last_checkpoint}. "
                              "Run the same command again to resume.")
                    if self.is_main:
                        self._logger.event(self.step, "interrupted", str(result.last_checkpoint))
                    result.status = "interrupted"
                    break
        result.step, result.tokens = self.step, self.tokens
        return result

    def _log_train(self, loss: float, grad_norm: float, lr: float, tokens_per_s: float) -> None:
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                   "tokens": float(self.tokens)}
        if self.flops_per_token and self.peak_flops:
            metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        if self.system_metrics_every and self.step % self.system_metrics_every == 0:
            metrics.update(self._monitor.sample())
        self._logger.log(self.step, "train", metrics, mlflow=self.step % self.log_every == 0)
        self._progress.update(self.step, loss, tokens_per_s, lr)
