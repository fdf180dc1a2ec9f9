"""Metrics of a run: metrics.ndjson and metrics.csv in the run directory, and MLflow (local SQLite by default)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codex_ml._files import atomic_write_bytes

log = logging.getLogger(__name__)


def disable_telemetry() -> None:
    """Switches MLflow's usage telemetry off (unless the user set the variables): MLflow reads them when it is first
    imported, so this runs before any import of it, here and in import_mlflow()."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


disable_telemetry()  # at import of codex_ml.tracking: before anything (ours or a library's) imports mlflow


def import_mlflow() -> Any:
    """The mlflow module (its telemetry off), or RuntimeError saying how to install it or turn it off."""
    disable_telemetry()
    try:
        import mlflow
    except ImportError as e:
        raise RuntimeError(f"MLflow logging is on but mlflow cannot be imported ({e}): install mlflow, or turn it "
                           "off (Trainer.mlflow = False); metrics.ndjson and metrics.csv are written either "
                           "way.") from e
    return mlflow


class MetricsLogger:
    """Writes one NDJSON object per (step, split) and the same values to a long-format CSV; mirrors to MLflow.

    metrics.ndjson lines look like {"step": 10, "split": "train", "loss": 3.2, "lr": 0.0003, ...};
    metrics.csv has the columns step, split, name, value. Both are appended to, so a resumed run
    continues the same files; `resume_step` first removes the rows of later steps (written before a crash, and
    about to be written again) and any torn last line, so that each step appears once (`dropped` counts them).
    MLflow is imported only when enabled; its telemetry is switched off and, without `tracking_uri`, it writes
    to sqlite:///<run_dir>/mlflow.db and nowhere else. MLflow is a mirror: if it fails (a locked or unwritable
    database, a full disk), a warning says so once and the run goes on without it, its metrics still in the two
    files. If the files cannot be written (a full disk), a warning says so once, `incomplete` says why, and the
    run goes on: the files stop at that step, MLflow gets the rest and a tag saying so.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        mlflow: bool = True,
        tracking_uri: str | None = None,
        experiment_name: str = "codex_ml",
        run_name: str | None = None,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.incomplete: str | None = None  # why the files stopped being written, or None
        self.dropped = self._drop_after(resume_step) if resume_step is not None else 0
        self._ndjson = open(self.run_dir / "metrics.ndjson", "a", encoding="utf-8")
        csv_path = self.run_dir / "metrics.csv"
        new_csv = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_file = open(csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if new_csv:
            self._csv.writerow(["step", "split", "name", "value"])
        self._mlflow = None
        if mlflow:
            self._start_mlflow(tracking_uri, experiment_name, run_name or self.run_dir.name)

    def _start_mlflow(self, tracking_uri: str | None, experiment_name: str, run_name: str) -> None:
        try:
            mlflow = import_mlflow()
        except RuntimeError:
            self.close()
            raise
        uri = tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

        def start() -> None:
            mlflow.set_tracking_uri(uri)
            artifact_root = _artifact_root(tracking_uri, self.run_dir)
            if artifact_root is not None and mlflow.get_experiment_by_name(experiment_name) is None:
                # Artifacts would otherwise go to ./mlruns of whatever the current directory is.
                mlflow.create_experiment(experiment_name, artifact_location=artifact_root.resolve().as_uri())
            mlflow.set_experiment(experiment_name)
            mlflow.start_run(run_name=run_name)

        self._mlflow = mlflow
        if self._mirror(start):
            log.info("MLflow tracking at %s (view: mlflow ui --backend-store-uri %s)", uri, uri)

    def _mirror(self, call) -> bool:
        """Runs an MLflow call; on any failure warns once, stops using MLflow and returns False."""
        if self._mlflow is None:
            return False
        try:
            call()
            return True
        except Exception as e:  # noqa: BLE001 - whatever MLflow or its database raises, training goes on
            log.warning("MLflow failed (%s: %s); continuing without it, the metrics stay in %s and %s.",
                        type(e).__name__, e, self.run_dir / "metrics.ndjson", self.run_dir / "metrics.csv")
            if not self._ndjson.closed:
                self.event(-1, "mlflow_disabled", f"{type(e).__name__}: {e}")
            mlflow, self._mlflow = self._mlflow, None
            try:
                mlflow.end_run(status="FAILED")
            except Exception:  # noqa: BLE001 - the same failure again: nothing more to do
                pass
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Records run parameters (flattened, stringified) in MLflow."""
        flat = {key: str(value)[:500] for key, value in params.items()}
        self._mirror(lambda: self._mlflow.log_params(flat))

    def log_text(self, text: str, name: str) -> None:
        """Stores a text artifact (e.g. the operative config) in MLflow."""
        self._mirror(lambda: self._mlflow.log_text(text, name))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags the MLflow run (git commit, digests, host: what finds and groups runs in a shared store)."""
        self._mirror(lambda: self._mlflow.set_tags({key: str(value) for key, value in tags.items()}))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copies a file (a plot) into the MLflow run's artifacts."""
        self._mirror(lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def log(self, step: int, split: str, metrics: Mapping[str, float], *, mlflow: bool = True) -> None:
        """Records the metrics of one step for `split` ("train" or "val"); `mlflow=False` keeps them to the files
        (MLflow gets every log_every-th training step: a database write per step would slow short steps)."""
        values = {key: float(value) for key, value in metrics.items()}
        record = {"step": step, "split": split, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._write(step, record, [[step, split, key, repr(value)] for key, value in values.items()])
        if (mlflow or self.incomplete is not None) and self._mlflow is not None:
            finite = {f"{split}/{k}": v for k, v in values.items() if math.isfinite(v)}
            self._mirror(lambda: self._mlflow.log_metrics(finite, step=step))

    def event(self, step: int, kind: str, message: str) -> None:
        """Records a notable event (NaN skipped, checkpoint written, interrupted, resumed) in metrics.ndjson."""
        self._write(step, {"step": step, "split": "event", "event": kind, "message": message}, [])

    def _write(self, step: int, record: dict, csv_rows: list[list]) -> None:
        """Appends to both files; the first failure (a full disk) warns once and stops the file writes."""
        if self.incomplete is not None or self._ndjson.closed:
            return
        try:
            self._ndjson.write(json.dumps(record) + "\n")
            self._ndjson.flush()
            if csv_rows:
                self._csv.writerows(csv_rows)
                self._csv_file.flush()
        except OSError as e:
            self.incomplete = f"step {step}: {e.strerror or e}"
            log.warning("Cannot write the metrics files in %s (%s); training goes on, but metrics.ndjson and "
                        "metrics.csv are incomplete from step %d on (MLflow, if on, gets the rest). Free space there.",
                        self.run_dir, e.strerror or e, step)
            self._mirror(lambda: self._mlflow.set_tag("metrics_files_incomplete", self.incomplete))

    def _drop_after(self, step: int) -> int:
        """Removes the rows of steps after `step` (and a torn last line) from both files; returns how many NDJSON
        records went. Each file is replaced whole (atomically), or left as it was."""
        dropped = 0
        ndjson, csv_path = self.run_dir / "metrics.ndjson", self.run_dir / "metrics.csv"
        if ndjson.is_file():
            lines = ndjson.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
            dropped = len(lines) - len(kept)
            if dropped:
                atomic_write_bytes(ndjson, "".join(kept).encode())
        if csv_path.is_file():
            lines = csv_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            kept = lines[:1] + [line for line in lines[1:] if _row_step(line) is not None and _row_step(line) <= step]
            if len(kept) != len(lines):
                atomic_write_bytes(csv_path, "".join(kept).encode())
        return dropped

    def close(self, status: str = "FINISHED") -> None:
        """Ends the MLflow run and closes the files; never raises for a full disk (already reported)."""
        if self.incomplete is not None and not self._ndjson.closed:  # marked in the file too, if space came back
            marker = {"step": -1, "split": "event", "event": "metrics_incomplete",
                      "message": f"the metrics files miss rows from {self.incomplete}"}
            try:
                self._ndjson.write(json.dumps(marker) + "\n")
                self._ndjson.flush()
            except OSError:
                pass
        self._mirror(lambda: self._mlflow.end_run(status=status))
        self._mlflow = None
        for file in (self._ndjson, self._csv_file):
            try:
                file.close()
            except OSError:  # the data of a failed write, flushed again: reported when it first failed
                pass


def _record_step(line: str) -> int | None:
    """The step of a complete metrics.ndjson line, or None for a torn or foreign one."""
    if not line.endswith("\n"):
        return None
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _row_step(line: str) -> int | None:
    """The step of a complete metrics.csv row, or None for a torn one."""
    if not line.endswith("\n"):
        return None
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return None


def _artifact_root(tracking_uri: str | None, run_dir: Path) -> Path | None:
    """Where a new experiment keeps its artifacts: beside the SQLite store (the run's own, or a shared one given as
    sqlite:///PATH); None for another kind of store, which has its own default."""
    if tracking_uri is None:
        return run_dir / "mlartifacts"
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts"
    return None
