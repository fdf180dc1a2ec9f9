"""What a run reports, from rank 0 only: messages, the metrics files and MLflow, system metrics, the progress line.

The tracking backends are opened in open() and closed in close(); a new backend is one more here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from codex_ml.tracking import MetricsLogger, Progress, SystemMonitor, import_mlflow, peak_flops
from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.setup import ProcessInfo
from codex_ml.training.step import StepOutcome


class Reporter:
    """Rank 0 prints and writes; on the other ranks every method does nothing."""

    def __init__(self, config: TrainerConfig, process: ProcessInfo, run_dir: Path, flops_per_token: float | None):
        self.config, self.process, self.run_dir = config, process, run_dir
        if config.mlflow:  # found now, before anything is written, rather than when the run opens the logger
            try:
                import_mlflow()
            except RuntimeError as e:
                raise ConfigError(str(e)) from e
        self.flops_per_token = flops_per_token
        self.peak_flops = config.peak_flops_per_device
        if self.peak_flops is None and process.device.type == "cuda":
            self.peak_flops = peak_flops(torch.cuda.get_device_name(process.device))
        self._logger: MetricsLogger | None = None
        self._monitor: SystemMonitor | None = None
        self._progress: Progress | None = None

    def say(self, text: str) -> None:
        if self.process.is_main:
            if self._progress is not None:
                self._progress.message(text)
            else:
                print(text, flush=True)

    def open(self, config_text: str, start_step: int) -> None:
        """Writes the operative config into the run directory and opens the metrics files and MLflow."""
        if not self.process.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "operative_config.gin").write_text(config_text)
        # Rows of steps after start_step were written before a crash and are about to be written again: removed.
        self._logger = MetricsLogger(self.run_dir, mlflow=self.config.mlflow, tracking_uri=self.config.tracking_uri,
                                     resume_step=start_step)
        device = self.process.device
        gpu = None
        if device.type == "cuda":  # "cuda" without an index is the current device
            gpu = device.index if device.index is not None else torch.cuda.current_device()
        self._monitor = SystemMonitor(gpu)
        self._logger.log_params({"world_size": self.process.world_size, "seed": self.config.seed,
                                 "device": str(device), "start_step": start_step})
        self._logger.log_text(config_text, "operative_config.gin")

    def resumed(self, step: int, checkpoint: Path, changes: list[tuple[str, Any, Any]]) -> None:
        """Records where the run resumed (an event row and an MLflow parameter) and each setting it changed under
        Trainer.allow_changed (old -> new)."""
        if not self.process.is_main:
            return
        dropped = self._logger.dropped
        note = f"; {dropped} metrics row(s) of later steps, from before the run stopped, removed" if dropped else ""
        self._logger.event(step, "resumed", f"from {checkpoint} at step {step}{note}")
        params = {"resumed_from": str(checkpoint)}
        for binding, old, new in changes:
            text = f"{binding} {old!r} -> {new!r}"
            self.say(f"Resuming with a changed setting (Trainer.allow_changed): {text}.")
            self._logger.event(step, "resume_changed", f"{text} (Trainer.allow_changed)")
            params[f"resume_changed/{binding}"] = f"{old!r} -> {new!r}"
        self._logger.log_params(params)

    def start_progress(self, step: int) -> None:
        if self.process.is_main:
            self._progress = Progress(self.config.max_steps, step, self.config.log_every)

    def train(self, step: int, tokens: int, outcome: StepOutcome) -> None:
        if not self.process.is_main:
            return
        tokens_per_s = outcome.tokens_per_s
        metrics = {"loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                   "tokens_per_s": tokens_per_s, "tokens": float(tokens)}
        if self.flops_per_token and self.peak_flops:
            metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.process.world_size)
        every = self.config.system_metrics_every
        if every and step % every == 0:
            metrics.update(self._monitor.sample())
        self._logger.log(step, "train", metrics, mlflow=step % self.config.log_every == 0)
        self._progress.update(step, outcome.loss, tokens_per_s, outcome.lr)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.process.is_main:
            self._logger.log(step, "val", metrics)
            self.say(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def event(self, step: int, name: str, text: Any) -> None:
        if self.process.is_main:
            self._logger.event(step, name, str(text))

    def close(self, status: str) -> None:
        """`status` is the run's: "finished", "interrupted", "stopped_nonfinite" or "failed"."""
        if not self.process.is_main:
            return
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._logger is not None:
            self._logger.close("FINISHED" if status in ("finished", "interrupted") else "FAILED")
            if self._logger.incomplete is not None:
                self.say(f"Warning: metrics.ndjson and metrics.csv in {self.run_dir} are incomplete (a write failed "
                         f"at {self._logger.incomplete}); the checkpoints are not affected.")
