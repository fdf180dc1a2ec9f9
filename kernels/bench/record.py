"""The result file every benchmark writes with --json=PATH: its rows and what they were measured on.

One JSON object, rewritten (atomically) after every finished row (bench_train: after each settings), so a run cut
off still leaves the rows it finished:

    {
      "meta": {
        "bench": "bench_train",                 # or bench_linear_cross_entropy, bench_attention, bench_layers
        "preset": "cpu",                        # quick, cpu or gpu
        "argv": ["--preset=cpu", "--json=..."], # the command-line arguments
        "commit": "<git sha>[+dirty]",          # of the source tree, or null; +dirty: tracked files modified
        "date": "2026-12-02T09:30:00Z",         # UTC, when the run started
        "machine": {"cpu": "AMD EPYC ...", "cores": 2, "gpu": null, "hostname_hash": null},
        "load_avg": [start_1m, end_1m],         # 1-minute load average at the start and at the last rewrite
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "triton": null, "transformers": "5.24.0",
                     "codex_ml": "0.1.0"}       # null: not installed
      },
      "rows": [{...}, ...]                      # the benchmark's rows (fields in its docstring)
    }

The source tree is BUILD_WORKSPACE_DIRECTORY under `bazel run`, else the tree this file lies in (a wheel has
none: commit null). gpu is the name of CUDA device 0 when CUDA is available; hostname_hash is always null (the
file names no machine).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def _git(directory: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit() -> str | None:
    """The git commit of the source tree the benchmark runs from, with "+dirty" when tracked files differ from it."""
    here = Path(__file__).resolve()
    directories = [os.environ.get("BUILD_WORKSPACE_DIRECTORY")]
    top = _git(str(here.parent), "rev-parse", "--show-toplevel")
    if top and Path(top, "kernels", "bench", here.name).resolve() == here:  # codex_ml's tree, not one around a wheel
        directories.append(top)
    for directory in filter(None, directories):
        commit = _git(directory, "rev-parse", "HEAD")
        if commit:
            dirty = _git(directory, "status", "--porcelain", "--untracked-files=no")
            return commit + ("+dirty" if dirty else "")
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, logical cores, CUDA device 0's name (or None)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "hostname_hash": None}


def versions() -> dict[str, str | None]:
    """Python's and the benchmarked libraries' versions (None: not installed)."""
    import codex_ml

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "codex_ml": codex_ml.__version__}


class ResultFile:
    """The result file of one benchmark run at `path` (None: write nothing); the metadata is taken at creation."""

    def __init__(self, path: str | None, bench: str, preset: str, argv: list[str]):
        self.path = path
        self.meta = {
            "bench": bench, "preset": preset, "argv": list(argv), "commit": source_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(), "load_avg": [round(os.getloadavg()[0], 2)] * 2, "versions": versions(),
        }

    def write(self, rows: list[dict[str, Any]], quiet: bool = True) -> None:
        """Rewrites the file with `rows` (atomically: a reader never sees half a file) and the current load."""
        if self.path is None:
            return
        self.meta["load_avg"][1] = round(os.getloadavg()[0], 2)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".part", "w") as out:
            json.dump({"meta": self.meta, "rows": rows}, out, indent=2)
        os.replace(self.path + ".part", self.path)
        if not quiet:
            print(f"wrote {len(rows)} rows to {self.path}")
