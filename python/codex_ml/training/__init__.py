"""Training: the Trainer and its config, process setup, optimizers and schedules, and the experiment entry point."""

from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.optim import LRSchedule, build_optimizer
from codex_ml.training.setup import (
    ProcessGroupError,
    ProcessInfo,
    init_distributed,
    seed_everything,
    setup_process,
    shutdown_distributed,
)
from codex_ml.training.trainer import Trainer, TrainResult

__all__ = [
    "ConfigError",
    "LRSchedule",
    "ProcessGroupError",
    "ProcessInfo",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "build_optimizer",
    "init_distributed",
    "seed_everything",
    "setup_process",
    "shutdown_distributed",
]
