"""Optional tracking backends (TensorBoard, Weights & Biases offline) behind one small interface.

MLflow is not one of these modules: MetricsLogger mirrors the metrics files to it (logger.py), as it always has.
Trainer.trackers names the backends of a run in any combination; each is imported only when selected, and a
selected backend that is not installed is an error when the run is built, naming the wheel extra that brings it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

# name -> (module of codex_ml.tracking, the module it needs, the wheel extra that installs it)
BACKENDS = {
    "mlflow": ("logger", "mlflow", None),  # a requirement of the wheel, not an extra
    "tensorboard": ("tensorboard_tracker", "tensorboard", "tensorboard"),
    "wandb": ("wandb_tracker", "wandb", "wandb"),
}
TRACKER_NAMES = tuple(BACKENDS)


class TrackerUnavailable(RuntimeError):
    """A selected tracking backend cannot be imported: the message names the extra that installs it."""


class Tracker(Protocol):
    """What a tracking backend does. Metric names are "<split>/<name>" ("train/loss", "val/perplexity")."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def close(self, status: str) -> None: ...


def check_available(name: str) -> None:
    """Raises TrackerUnavailable, saying how to install it or turn it off, when backend `name` cannot be imported."""
    backend, module, extra = BACKENDS[name]
    # A backend may need its environment set before its package is first imported (W&B: offline, no reports).
    prepare = getattr(importlib.import_module(f"codex_ml.tracking.{backend}"), "prepare_environment", None)
    if prepare is not None:
        prepare()
    try:
        importlib.import_module(module)
    except ImportError as e:
        install = f"pip install 'codex_ml[{extra}]'" if extra else f"pip install {module}"
        raise TrackerUnavailable(
            f"Trainer.trackers selects {name!r} but {module} cannot be imported ({e}): install it ({install}), or "
            f"remove {name!r} from Trainer.trackers.") from e


def open_tracker(name: str, run_dir: Path, run_name: str) -> Tracker:
    """The tracker `name` writing under `run_dir` (TensorBoard: <run_dir>/tensorboard, W&B: <run_dir>/wandb)."""
    check_available(name)
    module = importlib.import_module(f"codex_ml.tracking.{BACKENDS[name][0]}")
    return module.open_tracker(run_dir, run_name)


class Trackers:
    """Several trackers as one; a backend that fails is reported once (`on_failure`) and dropped, so that a failing
    backend never stops training: the metrics files keep everything."""

    def __init__(self, trackers: Mapping[str, Tracker], on_failure: Callable[[str, Exception], None]):
        self._trackers = dict(trackers)
        self._on_failure = on_failure

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self._trackers.items()):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - whatever a backend raises, training goes on
                del self._trackers[name]
                self._on_failure(name, e)
                try:
                    tracker.close("FAILED")
                except Exception:  # noqa: BLE001 - the same failure again: nothing more to do
                    pass

    @property
    def names(self) -> list[str]:
        return list(self._trackers)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._each(lambda t: t.log_metrics(step, metrics))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each(lambda t: t.log_params(params))

    def log_text(self, text: str, name: str) -> None:
        self._each(lambda t: t.log_text(text, name))

    def close(self, status: str) -> None:
        self._each(lambda t: t.close(status))
        self._trackers.clear()
