"""TensorBoard: event files in <run_dir>/tensorboard/ (view: tensorboard --logdir <run_dir>/tensorboard).

Scalars under their "<split>/<name>" tags, the operative config as text, and the run's parameters with its final
metrics in the HParams dashboard (written at close, when the final values are known).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._params: dict[str, Any] = {"run_name": run_name}
        self._last: dict[str, float] = {}

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=step)
                self._last[name] = value
        self._writer.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()})

    def log_text(self, text: str, name: str) -> None:
        # Indented four spaces: TensorBoard renders text as Markdown, and a gin file read as Markdown loses its lines.
        self._writer.add_text(name, "\n".join("    " + line for line in text.splitlines()))
        self._writer.flush()

    def close(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        final = {name: value for name, value in self._last.items() if name.endswith("/loss")}
        for summary in hparams({**self._params, "status": status}, final):
            self._writer.file_writer.add_summary(summary)
        self._writer.close()


def open_tracker(run_dir: Path, run_name: str) -> TensorBoardTracker:
    return TensorBoardTracker(run_dir, run_name)
