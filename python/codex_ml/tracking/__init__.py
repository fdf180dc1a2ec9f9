"""Tracking: metrics files (NDJSON, CSV), MLflow, the optional backends (trackers.py: TensorBoard, W&B offline),
plots, run summaries, system metrics and the progress display."""

from codex_ml.tracking.logger import MetricsLogger, import_mlflow
from codex_ml.tracking.progress import Progress
from codex_ml.tracking.system import SystemMonitor, peak_flops

__all__ = ["MetricsLogger", "Progress", "SystemMonitor", "import_mlflow", "peak_flops"]
