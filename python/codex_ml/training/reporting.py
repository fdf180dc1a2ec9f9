"""What a run reports, from rank 0 only: messages, the metrics files and MLflow, the other tracking backends
(TensorBoard, W&B offline), system metrics, plots and the progress line.

The backends are opened in open() and closed in close(); a new backend is one module in codex_ml.tracking.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from typing import Any

import torch

from codex_ml._files import file_sha256
from codex_ml.checkpoint.core import git_commit
from codex_ml.tracking import MetricsLogger, Progress, SystemMonitor, import_mlflow, peak_flops
from codex_ml.tracking.plots import write_run_plots
from codex_ml.tracking.summary import gin_bindings
from codex_ml.tracking.trackers import Trackers, TrackerUnavailable, check_available, open_tracker
from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.setup import ProcessInfo
from codex_ml.training.step import StepOutcome

log = logging.getLogger(__name__)


def data_digest(data: Any) -> str | None:
    """The SHA-256 of the data's manifest (it lists every shard's digest), else of its tokenizer; None if unknown."""
    manifest = getattr(data, "manifest_path", None)
    if manifest is not None and Path(manifest).is_file():
        return file_sha256(manifest)
    return getattr(getattr(data, "tokenizer", None), "sha256", None)


class Reporter:
    """Rank 0 prints and writes; on the other ranks every method does nothing."""

    def __init__(self, config: TrainerConfig, process: ProcessInfo, run_dir: Path, flops_per_token: float | None,
                 data: Any = None):
        self.config, self.process, self.run_dir = config, process, run_dir
        self.trackers = config.active_trackers()
        # Found now, before anything is written, rather than when the run opens the backends.
        try:
            if "mlflow" in self.trackers:
                import_mlflow()
            for name in self.trackers:
                check_available(name)
        except (RuntimeError, TrackerUnavailable) as e:
            raise ConfigError(str(e)) from e
        self.data_digest = data_digest(data) if process.is_main else None
        self.flops_per_token = flops_per_token
        self.peak_flops = config.peak_flops_per_device
        if self.peak_flops is None and process.device.type == "cuda":
            self.peak_flops = peak_flops(torch.cuda.get_device_name(process.device))
        self._logger: MetricsLogger | None = None
        self._backends: Trackers | None = None
        self._monitor: SystemMonitor | None = None
        self._progress: Progress | None = None

    def say(self, text: str) -> None:
        if self.process.is_main:
            if self._progress is not None:
                self._progress.message(text)
            else:
                print(text, flush=True)

    def open(self, config_text: str, start_step: int) -> None:
        """Writes the operative config into the run directory and opens the metrics files and the trackers."""
        if not self.process.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "operative_config.gin").write_text(config_text)
        # Rows of steps after start_step were written before a crash and are about to be written again: removed.
        self._logger = MetricsLogger(self.run_dir, mlflow="mlflow" in self.trackers,
                                     tracking_uri=self.config.tracking_uri,
                                     resume_step=start_step)
        others = {}
        for name in self.trackers:
            if name != "mlflow":
                try:
                    others[name] = open_tracker(name, self.run_dir, self.run_dir.name)
                except Exception as e:  # noqa: BLE001 - a backend that cannot start is dropped, as one that fails
                    self._tracker_failed(name, e)
        self._backends = Trackers(others, self._tracker_failed)
        device = self.process.device
        gpu = None
        if device.type == "cuda":  # "cuda" without an index is the current device
            gpu = device.index if device.index is not None else torch.cuda.current_device()
        self._monitor = SystemMonitor(gpu)
        params = {"world_size": self.process.world_size, "seed": self.config.seed, "device": str(device),
                  "start_step": start_step, **gin_bindings(config_text)}
        self._logger.log_params(params)
        self._logger.set_tags(self.tags(config_text))
        self._logger.log_text(config_text, "operative_config.gin")
        self._backends.log_params(params)
        self._backends.log_text(config_text, "operative_config.gin")

    def tags(self, config_text: str) -> dict[str, str]:
        """What finds a run in a shared store: its commit, the digests of its config and data, the host."""
        return {"run_dir": str(self.run_dir), "host": socket.gethostname(),
                "config_digest": hashlib.sha256(config_text.encode()).hexdigest(),
                "git_commit": git_commit() or "unknown", "data_digest": self.data_digest or "unknown"}

    def _tracker_failed(self, name: str, error: Exception) -> None:
        log.warning("Tracker %s failed (%s: %s); continuing without it.", name, type(error).__name__, error)
        if self._logger is not None:
            self._logger.event(-1, "tracker_disabled", f"{name}: {type(error).__name__}: {error}")

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

    def train(self, step: int, tokens: int, outcome: StepOutcome, peak_memory_mb: list[float] | None = None) -> None:
        """The step's metrics, once for the run (rank 0): tokens_per_s counts every process's tokens (the global
        batch), tokens_per_s_per_process and mfu divide by the process count. `peak_memory_mb`: each process's
        peak memory (rank order), logged as their maximum and, with several processes, one column per rank."""
        if not self.process.is_main:
            return
        tokens_per_s, world_size = outcome.tokens_per_s, self.process.world_size
        metrics = {"loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                   "tokens_per_s": tokens_per_s, "tokens": float(tokens)}
        if world_size > 1:
            metrics["tokens_per_s_per_process"] = tokens_per_s / world_size
        if self.flops_per_token and self.peak_flops:
            metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * world_size)
        if peak_memory_mb:
            metrics["peak_memory_mb"] = max(peak_memory_mb)
            if world_size > 1:
                metrics.update({f"peak_memory_mb_rank{rank}": mb for rank, mb in enumerate(peak_memory_mb)})
        every = self.config.system_metrics_every
        if every and step % every == 0:
            metrics.update(self._monitor.sample())
        # The backends get every log_every-th step: a database or event write per step would slow short steps.
        due = step % self.config.log_every == 0
        self._logger.log(step, "train", metrics, mlflow=due)
        if due:
            self._backends.log_metrics(step, {f"train/{k}": float(v) for k, v in metrics.items()})
        self._progress.update(step, outcome.loss, tokens_per_s, outcome.lr)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.process.is_main:
            self._logger.log(step, "val", metrics)
            self._backends.log_metrics(step, {f"val/{k}": float(v) for k, v in metrics.items()})
            self.say(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def event(self, step: int, name: str, text: Any) -> None:
        if self.process.is_main:
            self._logger.event(step, name, str(text))
            if name == "checkpoint":
                self._plot()

    def _plot(self) -> list[Path]:
        """plots/loss.png and plots/throughput.png; a plot that cannot be drawn is a warning, never a failed run."""
        try:
            return write_run_plots(self.run_dir)
        except Exception as e:  # noqa: BLE001 - matplotlib missing, a full disk...: the metrics files stay
            log.warning("Could not draw the plots of %s (%s: %s); the metrics are in metrics.ndjson.",
                        self.run_dir, type(e).__name__, e)
            return []

    def close(self, status: str) -> None:
        """`status` is the run's: "finished", "interrupted", "stopped_nonfinite" or "failed"."""
        if not self.process.is_main:
            return
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        outcome = "FINISHED" if status in ("finished", "interrupted") else "FAILED"
        if self._logger is not None:
            for plot in self._plot():
                self._logger.log_artifact(plot, "plots")
        if self._backends is not None:
            self._backends.close(outcome)
            self._backends = None
        if self._logger is not None:
            self._logger.close(outcome)
            if self._logger.incomplete is not None:
                self.say(f"Warning: metrics.ndjson and metrics.csv in {self.run_dir} are incomplete (a write failed "
                         f"at {self._logger.incomplete}); the checkpoints are not affected.")
