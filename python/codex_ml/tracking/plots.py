"""Plots of a run from its metrics.ndjson, drawn headless (matplotlib's Agg backend): plots/loss.png (train and
validation loss against steps and tokens) and plots/throughput.png (tokens/s and, where known, MFU)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from codex_ml._files import atomic_write_bytes


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of <run_dir>/metrics.ndjson (the last line is skipped if a crash cut it short)."""
    path = Path(run_dir) / "metrics.ndjson"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict[str, Any]], split: str, name: str) -> dict[int, float]:
    """step -> value of `name` in `split` (a resumed run's later record of a step wins)."""
    out = {}
    for r in records:
        value = r.get(name)
        if r.get("split") == split and isinstance(value, (int, float)) and math.isfinite(value):
            out[int(r["step"])] = float(value)
    return dict(sorted(out.items()))


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Writes plots/loss.png and plots/throughput.png of the run; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train, val = _series(records, "train", "loss"), _series(records, "val", "loss")
    if not train:
        return []
    plt = pyplot()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    tokens = _series(records, "train", "tokens")
    tokens_per_step = (tokens[max(tokens)] / max(tokens)) if tokens else None
    written = []

    fig, axes = plt.subplots(1, 2 if tokens_per_step else 1, figsize=(11 if tokens_per_step else 6, 4),
                             squeeze=False)
    for ax, scale, xlabel in ((axes[0][0], 1.0, "step"), *(((axes[0][1], tokens_per_step, "tokens"),)
                                                            if tokens_per_step else ())):
        ax.plot([s * scale for s in train], list(train.values()), label="train", linewidth=1)
        if val:
            ax.plot([s * scale for s in val], list(val.values()), "o-", label="validation")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run_dir.name}: loss")
    fig.tight_layout()
    written.append(save_png(fig, out / "loss.png", plt))

    throughput, mfu = _series(records, "train", "tokens_per_s"), _series(records, "train", "mfu")
    fig, axes = plt.subplots(1, 2 if mfu else 1, figsize=(11 if mfu else 6, 4), squeeze=False)
    axes[0][0].plot(list(throughput), list(throughput.values()), linewidth=1)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("tokens/s")
    axes[0][0].grid(alpha=0.3)
    if mfu:
        axes[0][1].plot(list(mfu), [100 * v for v in mfu.values()], linewidth=1)
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("MFU (%)")
        axes[0][1].grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}: throughput")
    fig.tight_layout()
    written.append(save_png(fig, out / "throughput.png", plt))
    return written


def save_png(fig: Any, path: Path, plt: Any) -> Path:
    """Writes `fig` to `path` as a PNG, atomically, and closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())  # a reader never sees half a PNG
