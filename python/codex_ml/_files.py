"""Files that are never half-written: SHA-256 of a file, atomic fsynced writes, and flock-based lock files.

Shared by the data cache, the tokenizer and checkpoints (one copy of each helper).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """fsyncs a file, or a directory (so that a rename into it survives a power loss), by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer (process or thread) picks: .tmp-<name>-<pid>-<random>."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to a unique temporary beside `path`, fsyncs it, renames it over `path` and fsyncs the
    directory: readers see the old file or the whole new one, never a part. On any failure the temporary is
    removed and the error is raised (see `storage_error` for a message naming the fix)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


@contextmanager
def staged_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside `path`, to fill inside the block; renamed to `path` (and the parent
    fsynced) when the block completes, removed when it fails or is interrupted. `replace`: an existing `path`
    is deleted first (the caller holds the lock that makes it the only writer)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        fsync_path(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Removes the temporaries of `path` (see temporary_name) and returns them. Only for a caller that holds the
    lock every writer of `path` takes: any temporary it finds belongs to a writer that is gone."""
    path = Path(path)
    found = sorted(path.parent.glob(f"{TMP_PREFIX}{path.name}-*"))
    for tmp in found:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return found


def storage_error(err: OSError, directory: str | os.PathLike) -> str | None:
    """A message naming `directory` and the fix for a full or read-only disk, or None for other errors."""
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        return f"the disk holding {directory} is full ({err.strerror}): free space there or choose another directory"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{directory} is not writable ({err.strerror}): make it writable or choose another directory "
                "on a writable disk")
    return None


class LockHeld(RuntimeError):
    """Another live process holds a lock file; `holder` is what it wrote there (pid and host), if anything."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by {holder or 'another process'}")


class LockFile:
    """An exclusive fcntl.flock on `path`, holding "pid <pid> host <host>" while held.

    The kernel releases the lock when the process ends, however it ends (kill -9 included), so a stale lock file
    never blocks anyone: only a live holder does. Not reentrant within one process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> str:
        """What the holder wrote into the lock file ("pid 123 host h"), or "" when unknown."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self, blocking: bool = False) -> None:
        """Takes the lock; raises LockHeld when another process holds it (and not `blocking`)."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    raise LockHeld(self.path, self.holder()) from None
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """Whether another process (or another LockFile here) holds the lock now; False when there is no file.
        Probes without creating or writing the file."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Releases the lock (the file stays: removing it would race with a process opening it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
