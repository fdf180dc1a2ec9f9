"""Weights & Biases, strictly offline: the run is written to <run_dir>/wandb/ and nothing leaves the machine.

Upload it later, from a machine with network access, with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Read by wandb when it is imported and when its service starts: offline, no error reports, no usage statistics,
# no cloud metadata probes, no code or git capture.
OFFLINE_ENVIRONMENT = {
    "WANDB_MODE": "offline",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_SILENT": "true",
    "WANDB_X_DISABLE_STATS": "true",
    "WANDB_X_DISABLE_MACHINE_INFO": "true",
    "WANDB_X_DISABLE_META": "true",
}


def prepare_environment() -> None:
    """Sets OFFLINE_ENVIRONMENT, before wandb is imported (the tracker's construction checks that it can be)."""
    os.environ.update(OFFLINE_ENVIRONMENT)


class WandbTracker:
    """One offline W&B run per training run; metrics go to its history with the step as W&B's step."""

    def __init__(self, run_dir: Path, run_name: str):
        prepare_environment()
        import wandb

        settings = wandb.Settings(mode="offline", silent=True, console="off", disable_code=True, disable_git=True,
                                  save_code=False, x_disable_stats=True, x_disable_machine_info=True,
                                  x_disable_meta=True)
        self._run = wandb.init(dir=str(run_dir), project="codex_ml", name=run_name, mode="offline",
                               settings=settings, reinit="create_new")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._run.config.update({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                 for k, v in params.items()}, allow_val_change=True)

    def log_text(self, text: str, name: str) -> None:
        path = Path(self._run.dir) / name
        path.write_text(text)
        self._run.save(str(path), base_path=self._run.dir, policy="now")

    def close(self, status: str) -> None:
        self._run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_tracker(run_dir: Path, run_name: str) -> WandbTracker:
    return WandbTracker(run_dir, run_name)
