"""Training: the Trainer loop, optimizers and schedules, and the gin-configured experiment entry point."""

from codex_ml.training.optim import LRSchedule, build_optimizer
from codex_ml.training.trainer import (
    ConfigError,
    Trainer,
    TrainResult,
    init_distributed,
    seed_everything,
    shutdown_distributed,
)

__all__ = [
    "ConfigError",
    "LRSchedule",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "init_distributed",
    "seed_everything",
    "shutdown_distributed",
]
