"""TrainerConfig: every setting of the training loop, validated once, when it is made.

Gin binds it under the name `Trainer` (training/gin_config.py), so configs write `Trainer.max_steps = 50`.
What a setting must fit outside itself is checked where that is known: the machine by setup_process()
(device, process count), the model and data by the Trainer (seq_len vs max_seq_len, the val split).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from codex_ml.eval import get_metric
from codex_ml.tracking.trackers import TRACKER_NAMES
from codex_ml.training.optim import LRSchedule, check_optimizer

PRECISIONS = ("fp32", "bf16", "fp16")
# The settings a resume may change when Trainer.allow_changed names them (each change is recorded in the run's
# metrics); a resume refuses any other change of what it checks (training/resume.py).
RESUME_CHANGEABLE = ("learning_rate", "schedule", "warmup_steps", "min_lr_ratio", "grad_accum_steps",
                     "clip_grad_norm")
NAN_POLICIES = ("skip", "stop")
PARALLELISMS = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A mistake in the configuration or the command line that the user must fix (the CLI exits with 2)."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Trains a causal language model: forward(input_ids, targets) -> (logits, loss).

    `batch_size` is the global batch of one micro-step: under torchrun each of the N processes reads
    batch_size / N rows of it. One optimizer step uses `grad_accum_steps` micro-steps. `seed` is
    `train.seed` (gin binds it there, not here). `allow_changed` names the settings of RESUME_CHANGEABLE that
    may differ from the checkpoint a run resumes from, e.g. ('learning_rate',); each change is recorded.

    Scale-out: `parallelism` is how torchrun processes share the model: "ddp" (each keeps a full copy) or "fsdp"
    (FSDP2: parameters, gradients and optimizer state sharded across processes, per transformer block; sharded
    checkpoints). `activation_checkpointing` recomputes each transformer block's activations in the backward pass
    instead of keeping them (less memory, about one more forward of compute). `fsdp_cpu_offload` keeps the sharded
    parameters and optimizer state in CPU memory (GPU training under FSDP). `collective_timeout_s` bounds how long a
    process waits for the others in a collective: a process that died brings the others down after that long.

    Tracking: `trackers` selects the backends beside metrics.ndjson and metrics.csv, any of "mlflow",
    "tensorboard" and "wandb" (offline). `mlflow = False` turns MLflow off whatever `trackers` says (the older
    switch, kept so that existing configs mean what they meant); `tracking_uri` is the MLflow store (default: the
    run's own sqlite:///<run_dir>/mlflow.db; one store shared by several runs, e.g. a sweep, compares them).
    """

    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    max_steps: int = 100
    optimizer: str = "adamw"
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    betas: Sequence[float] = (0.9, 0.95)
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0
    precision: str = "fp32"
    compile: bool = False
    deterministic: bool = False
    keep_freed_memory: bool = True
    nan_policy: str = "skip"
    max_consecutive_nonfinite: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    metrics: Sequence[str] = ("loss", "perplexity", "token_accuracy")
    checkpoint_every: int = 0
    keep_last: int = 3
    keep_best: int = 1
    log_every: int = 10
    system_metrics_every: int = 50
    device: str = "auto"
    mlflow: bool = True
    trackers: Sequence[str] = ("mlflow",)
    tracking_uri: str | None = None
    peak_flops_per_device: float | None = None
    allow_changed: Sequence[str] = ()
    parallelism: str = "ddp"
    activation_checkpointing: bool = False
    fsdp_cpu_offload: bool = False
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        validate(self)
        # Lists from gin become tuples: the config is frozen all the way down.
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "allow_changed", tuple(self.allow_changed))
        object.__setattr__(self, "trackers", tuple(self.trackers))

    def active_trackers(self) -> tuple[str, ...]:
        """The tracking backends this run writes to: `trackers`, without MLflow when `mlflow` is False."""
        return tuple(name for name in self.trackers if self.mlflow or name != "mlflow")

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(self.schedule, self.learning_rate, self.max_steps, self.warmup_steps, self.min_lr_ratio)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_seed(seed: Any) -> None:
    """NumPy's generators take no negative seed and torch's no more than 64 bits (each rank adds its rank)."""
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ConfigError(f"The seed (train.seed) must be an integer in [0, 2**63), got {seed!r}.")


def validate(config: TrainerConfig) -> None:
    """Every check of the settings on their own, each naming its binding: raises ConfigError at the first wrong
    one, before anything is built or written."""
    _check_choices_and_counts(config)
    check_seed(config.seed)
    _check_optimization(config)
    _check_evaluation(config)
    _check_resume(config)
    _check_tracking(config)
    _check_parallelism(config)


def _check_choices_and_counts(c: TrainerConfig) -> None:
    if c.precision not in PRECISIONS:
        raise ConfigError(f"Trainer.precision = {c.precision!r} is not one of {', '.join(PRECISIONS)}.")
    if c.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"Trainer.nan_policy = {c.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}.")
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"Trainer.{name} must be a positive integer, got {value!r}.")
    for name, zero in (("eval_every", "evaluate at the end only"), ("eval_batches", "no evaluation"),
                       ("checkpoint_every", "checkpoint at the end only"),
                       ("system_metrics_every", "no system metrics"),
                       ("max_consecutive_nonfinite", "stop at the first non-finite step")):
        value = getattr(c, name)
        if not _is_int(value) or value < 0:  # a negative value would act like its absolute value, or as 0
            raise ConfigError(f"Trainer.{name} = {value!r} must be an integer >= 0 (0: {zero}).")
    # The checkpoint manager's own rule, checked here so that a wrong value is found before anything is built.
    if not _is_int(c.keep_last) or c.keep_last < 1:
        raise ConfigError(f"Trainer.keep_last must be >= 1 (the newest checkpoint is always kept), got {c.keep_last}.")
    if not _is_int(c.keep_best) or c.keep_best < 0:
        raise ConfigError(f"Trainer.keep_best must be >= 0, got {c.keep_best}.")


def _check_optimization(c: TrainerConfig) -> None:
    # Checked here with the binding named, rather than by torch at the first step with its own text (or not at
    # all: a negative clip norm or learning rate silently turns descent into ascent).
    if not _is_finite_number(c.learning_rate) or c.learning_rate < 0:
        raise ConfigError(f"Trainer.learning_rate = {c.learning_rate!r} must be a finite number >= 0 (the peak "
                          "learning rate), e.g. 3e-4.")
    if not _is_finite_number(c.min_lr_ratio) or not 0 <= c.min_lr_ratio <= 1:
        raise ConfigError(f"Trainer.min_lr_ratio = {c.min_lr_ratio!r} must be a number in [0, 1]: the final "
                          "learning rate as a fraction of Trainer.learning_rate.")
    if not _is_finite_number(c.weight_decay) or c.weight_decay < 0:
        raise ConfigError(f"Trainer.weight_decay = {c.weight_decay!r} must be a finite number >= 0 (0: no "
                          "weight decay).")
    if not (isinstance(c.betas, (list, tuple)) and len(c.betas) == 2
            and all(_is_finite_number(b) and 0 <= b < 1 for b in c.betas)):
        raise ConfigError(f"Trainer.betas = {c.betas!r} must be two numbers in [0, 1) (AdamW's beta1 and beta2), "
                          "e.g. (0.9, 0.95).")
    if not _is_finite_number(c.momentum) or not 0 <= c.momentum < 1:
        raise ConfigError(f"Trainer.momentum = {c.momentum!r} must be a number in [0, 1) (SGD's momentum; 0: "
                          "none).")
    if c.clip_grad_norm is not None and not (isinstance(c.clip_grad_norm, (int, float))
                                             and not isinstance(c.clip_grad_norm, bool) and c.clip_grad_norm >= 0):
        raise ConfigError(f"Trainer.clip_grad_norm = {c.clip_grad_norm!r} must be None or a number >= 0 (0 or "
                          "None: no clipping); a negative norm would reverse the gradients.")
    try:
        check_optimizer(c.optimizer)
        c.lr_schedule()
    except ValueError as e:
        raise ConfigError(f"Trainer: {e}") from e


def _check_evaluation(c: TrainerConfig) -> None:
    if c.peak_flops_per_device is not None and not (_is_finite_number(c.peak_flops_per_device)
                                                    and c.peak_flops_per_device > 0):
        raise ConfigError(f"Trainer.peak_flops_per_device = {c.peak_flops_per_device!r} must be None (looked up "
                          "from the GPU's name) or the FLOP/s of one device, > 0.")
    if c.eval_batches > 0 and not c.metrics:
        raise ConfigError("Trainer.metrics is empty but evaluation is on: name at least one metric, e.g. "
                          "('loss',), or set Trainer.eval_batches = 0.")
    for name in c.metrics:  # checked now: evaluate() would otherwise fail only at the first evaluation
        try:
            get_metric(name)
        except ValueError as e:
            raise ConfigError(f"Trainer.metrics: {e}") from e


def _check_resume(c: TrainerConfig) -> None:
    if isinstance(c.allow_changed, str) or any(name not in RESUME_CHANGEABLE for name in c.allow_changed):
        raise ConfigError(f"Trainer.allow_changed = {c.allow_changed!r}: a resume may change only "
                          f"{', '.join(RESUME_CHANGEABLE)}; give a list of those names, e.g. ['learning_rate'].")


def _check_tracking(c: TrainerConfig) -> None:
    names = c.trackers
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"Trainer.trackers = {names!r} must be a list of names, e.g. ['mlflow', 'tensorboard'].")
    unknown = [n for n in names if n not in TRACKER_NAMES]
    if unknown:
        raise ConfigError(f"Trainer.trackers: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKER_NAMES)}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"Trainer.trackers = {list(names)!r} names a tracker twice.")
    if c.tracking_uri is not None and (not isinstance(c.tracking_uri, str) or not c.tracking_uri.strip()):
        raise ConfigError(f"Trainer.tracking_uri = {c.tracking_uri!r} must be None (the run's own store) or an "
                          "MLflow tracking URI, e.g. 'sqlite:////abs/path/mlflow.db'.")


def _check_parallelism(c: TrainerConfig) -> None:
    if c.parallelism not in PARALLELISMS:
        raise ConfigError(f"Trainer.parallelism = {c.parallelism!r} is not one of {', '.join(PARALLELISMS)} ('ddp': "
                          "a full model copy per process; 'fsdp': parameters and optimizer state sharded).")
    for name in ("activation_checkpointing", "fsdp_cpu_offload"):
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(f"Trainer.{name} = {getattr(c, name)!r} must be True or False.")
    if c.fsdp_cpu_offload and c.parallelism != "fsdp":
        raise ConfigError("Trainer.fsdp_cpu_offload = True offloads FSDP's shards: set Trainer.parallelism = 'fsdp' "
                          "too, or turn the offload off.")
    if c.parallelism == "fsdp" and c.precision == "fp16":
        raise ConfigError("Trainer.precision = 'fp16' (a loss scaler) is not supported with Trainer.parallelism = "
                          "'fsdp': use 'bf16', which needs no scaler.")
    if not _is_finite_number(c.collective_timeout_s) or c.collective_timeout_s <= 0:
        raise ConfigError(f"Trainer.collective_timeout_s = {c.collective_timeout_s!r} must be a number of seconds > 0 "
                          "(how long a process waits for the others before the run stops), e.g. 1800.")
