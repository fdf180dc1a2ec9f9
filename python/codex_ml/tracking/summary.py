"""What a run directory says about its run, read from its files alone: the gin bindings of operative_config.gin
and the last metrics, steps, tokens and training time of metrics.ndjson."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from codex_ml.tracking.plots import read_metrics

_BINDING = re.compile(r"^([A-Za-z_][\w.]*(?:/[\w.]+)*)\s*=\s*(.*)$")


def gin_bindings(config_text: str) -> dict[str, str]:
    """Every binding of an operative gin config, "Selector.param" -> its value as written (continuation lines of a
    long value joined into one line)."""
    bindings: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = None if line[:1].isspace() else _BINDING.match(line)
        if match:
            key = match.group(1)
            bindings[key] = match.group(2).strip()
        elif key is not None:
            bindings[key] += " " + line.strip()
    return bindings


@dataclass
class RunSummary:
    run_dir: Path
    bindings: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # "split/name" -> its last finite value
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # the sum over logged steps of their tokens / tokens_per_s
    events: list[str] = field(default_factory=list)


def summarize(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    config = run_dir / "operative_config.gin"
    summary = RunSummary(run_dir, gin_bindings(config.read_text()) if config.is_file() else {})
    previous = 0.0
    for record in read_metrics(run_dir):
        split = record.get("split")
        if split == "event":
            summary.events.append(str(record.get("event")))
            continue
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                summary.metrics[f"{split}/{name}"] = float(value)
        if split == "train":
            summary.step = int(record["step"])
            tokens = float(record.get("tokens", 0.0))
            if tokens > previous and record.get("tokens_per_s"):
                summary.train_seconds += (tokens - previous) / record["tokens_per_s"]
            summary.tokens, previous = int(tokens), tokens
    return summary


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.ndjson").is_file() or (path / "operative_config.gin").is_file()
