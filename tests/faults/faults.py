"""What the fault-injection tests share: a tiny training command, the fault shim, and snapshots of committed files.

A run here is the real command line (`python -m codex_ml.cli.train`) with configs/smoke.gin made smaller by
bindings: a corpus of a few standard-library packages, 12 steps, a checkpoint every 3. Faults come from outside
the process: signals, kill -9, a second process, or libfault_shim.so (LD_PRELOAD) that makes one directory full,
read-only or slow to fsync (see fault_shim.c).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

HERE = Path(__file__).absolute().parent
SHIM = HERE / "libfault_shim.so"
STDLIB = Path(json.__file__).absolute().parents[1]
SOURCES = [str(STDLIB / name) for name in ("email", "json", "logging", "concurrent")]
STEPS = 12
TIMEOUT = 240


def bindings(cache: Path, **overrides: str) -> list[str]:
    """--gin_bindings for a small run with its data cache in `cache`; `overrides` (name -> value text) win."""
    values = {
        "train.cache_dir": repr(str(cache)),
        "train.sample_prompt": "None",
        "prepare_data.sources": repr(SOURCES),
        "prepare_data.max_documents": "None",
        "Trainer.mlflow": "False",
        "Trainer.max_steps": str(STEPS),
        "Trainer.checkpoint_every": "3",
        "Trainer.keep_last": "100",
        "Trainer.eval_every": "0",
        "Trainer.eval_batches": "1",
        "Trainer.log_every": "1",
        **overrides,
    }
    return [f"--gin_bindings={name} = {value}" for name, value in values.items()]


def environment(faults: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, codex_ml importable, with the shim preloaded when `faults` (the
    FAULT_* variables of fault_shim.c) are given."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    if faults:
        env.update(faults, LD_PRELOAD=str(SHIM))
    return env


def command(run_dir: Path, cache: Path, *args: str, **overrides: str) -> list[str]:
    return [sys.executable, "-m", "codex_ml.cli.train", "--gin_file=configs/smoke.gin", f"--run_dir={run_dir}",
            *bindings(cache, **overrides), *args]


def start(cwd: Path, run_dir: Path, cache: Path, *args: str, faults: Mapping[str, str] | None = None,
          **overrides: str) -> subprocess.Popen:
    """Starts a training run in the background (stdout and stderr to files in `cwd`, read by `finish`)."""
    name = f"{run_dir.name}-{time.monotonic_ns()}"
    stdout, stderr = open(cwd / f"{name}.out", "w+"), open(cwd / f"{name}.err", "w+")
    proc = subprocess.Popen(command(run_dir, cache, *args, **overrides), cwd=cwd, env=environment(faults),
                            stdout=stdout, stderr=stderr, text=True)
    proc.logs = (stdout, stderr)
    return proc


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Waits for a run started by `start`: (exit status, stdout, stderr)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    texts = []
    for log in proc.logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return proc.returncode, texts[0], texts[1]


def train(cwd: Path, run_dir: Path, cache: Path, *args: str, faults: Mapping[str, str] | None = None,
          **overrides: str) -> tuple[int, str, str]:
    """Runs a training run to its end: (exit status, stdout, stderr)."""
    return finish(start(cwd, run_dir, cache, *args, faults=faults, **overrides))


def prepared_cache(tmp: Path) -> Path:
    """A data cache in `tmp` holding the tokenizer and shards of the small run (built by a two-step run)."""
    rc, out, err = train(tmp, tmp / "run", tmp / "cache", **{"Trainer.max_steps": "2"})
    assert rc == 0, out[-2000:] + err[-4000:]
    return tmp / "cache"


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = TIMEOUT,
             interval: float = 0.002) -> bool:
    """Polls `condition` until it holds (True) or `proc` has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(interval)
    raise TimeoutError(f"condition not reached in {timeout} s")


def temporaries(directory: Path) -> list[Path]:
    """Temporaries (`.tmp-*`) anywhere under `directory`."""
    return sorted(directory.rglob(".tmp-*")) if directory.exists() else []


def train_steps(run_dir: Path) -> list[int]:
    """The steps of the training records in metrics.ndjson, in file order."""
    path = run_dir / "metrics.ndjson"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r["split"] == "train"]


def committed(*roots: Path) -> dict[str, str]:
    """SHA-256 of every committed file under `roots`: checkpoints (checkpoints/step_*) and data cache entries
    (tokenizers/<key>/, shards/<key>/), by absolute path. Temporaries, locks and files being appended to (metrics)
    are not committed."""
    found = {}
    for root in roots:
        for pattern in ("checkpoints/step_*/*", "tokenizers/*/*", "shards/*/*"):
            for path in sorted(root.glob(pattern)):
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def entries(directory: Path) -> list[str]:
    """The names of the cache entries in `directory` (not their locks or temporaries)."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_kept(before: dict[str, str], *roots: Path) -> None:
    """Every file committed before is still there, byte for byte."""
    after = committed(*roots)
    lost = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not lost and not changed, f"lost: {lost}, changed: {changed}"


def one_paragraph_error(stderr: str) -> str:
    """The error paragraph of a refused run (asserting there is no traceback)."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr[-4000:]
    return lines[-1]
