"""The run directory: a fresh one that no other run can take, and the lock a run holds on it while it trains.

Rank 0 takes the lock (checkpoint.RunDirLock, an flock on <run_dir>/.lock naming its pid and host) and holds it
while the run trains; the other torchrun ranks write nothing into the run directory and take none. The kernel
releases it however the process ends (kill -9 included), so a crashed run never blocks its own resume, while a
second live run on the same directory is refused instead of deleting the first one's temporaries and pruning its
checkpoints.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from codex_ml._files import LockFile
from codex_ml.checkpoint import RunDirLock, RunDirLocked
from codex_ml.training.setup import ProcessInfo

# The locks this process holds, by directory: the CLI takes the lock before data preparation, and Trainer.fit
# inside it takes the same one again (a second flock on the same file from this process would be refused).
_held: dict[Path, RunDirLock] = {}


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike, process: ProcessInfo) -> Iterator[None]:
    """Rank 0 holds the lock on `run_dir` (created if missing) inside the block. When another live process holds
    it, every rank raises checkpoint.RunDirLocked naming that process (pid and host), so that no rank goes on to
    wait for the others. Nested use in one process shares the outer lock."""
    key = Path(run_dir).absolute()
    error, lock = None, None
    if process.is_main and key not in _held:
        try:
            lock = _held[key] = _acquire(key)
        except RunDirLocked as e:
            error = str(e)
    if process.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunDirLocked(error)
    try:
        yield
    finally:
        if lock is not None:
            del _held[key]
            lock.release()


def _acquire(run_dir: Path) -> RunDirLock:
    try:
        return RunDirLock(run_dir).acquire()
    except RunDirLocked:
        # The holder writes its pid and host just after it takes the lock: a refusal in between would name nobody.
        lock_file = LockFile(run_dir / RunDirLock.FILE)
        deadline = time.monotonic() + 2.0
        while not lock_file.holder() and time.monotonic() < deadline:
            time.sleep(0.05)
        return RunDirLock(run_dir).acquire()


def new_run_dir(parent: str | os.PathLike, name: str) -> Path:
    """Creates and returns <parent>/<name>-<YYYYmmdd-HHMMSS>-<random>: created exclusively, so two runs started in
    the same second (on one machine or several sharing the disk) never get the same directory."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
