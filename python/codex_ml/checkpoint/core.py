"""Atomic checkpoint directories with a SHA-256 manifest, verification, discovery and retention."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from codex_ml._files import LockFile, LockHeld, file_sha256, fsync_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
_SHARDED_DIR = "sharded"  # a sharded checkpoint's weights and optimizer state (checkpoint/sharded.py)
CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = _TMP_PREFIX + "old-"  # a complete checkpoint moved aside while the same step is re-saved
_WRITER_PREFIX = _TMP_PREFIX + "writer-"  # the lock file of a save in progress
# .tmp-[old-]step_N-TOKEN (TOKEN: pid-random; earlier versions: pid) and .tmp-writer-TOKEN
_TEMPORARY = re.compile(r"^\.tmp-(?:(?P<old>old-)?(?P<name>step_\d+)|(?P<writer>writer))-(?P<token>.+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt, or could not be written."""


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint of `step`: step_XXXXXXXX (sortable)."""
    return f"step_{step:08d}"


def _write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs it, so a completed rename never points at unwritten blocks."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: Path, obj: Any) -> None:
    """torch.save straight into the file (no in-memory copy of the state), then fsync."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Writes a state_dict as safetensors, streamed from the tensors' memory (no serialized copy in RAM), then
    fsyncs it. Tensors sharing storage (tied embeddings) are stored as separate copies."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(key)
        tensors[name] = tensor
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # its I/O errors (a full disk) are reported like any other write's
        raise OSError(f"writing {path.name} failed: {e}") from e
    fsync_path(path)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of the source tree (or of the directory Bazel ran from), or None when unknown."""
    candidates = [Path(__file__).resolve().parent, os.environ.get("BUILD_WORKSPACE_DIRECTORY")]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            out = subprocess.run(
                ["git", "-C", str(candidate), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine what a checkpoint means."""
    import numpy

    import codex_ml

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    versions["codex_ml"] = codex_ml.__version__
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return versions


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any] | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    torch_states: Mapping[str, Any] | None = None,
    json_states: Mapping[str, Any] | None = None,
    operative_config: str | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint directory at `path` atomically and returns it.

    Files go to a temporary directory beside `path`; each is fsynced, then the directory is renamed into
    place and the parent fsynced. A failure at any point (a full disk included) removes the temporary
    directory, leaves every earlier checkpoint untouched and raises CheckpointError.

    Args:
      model_state: the model's state_dict, saved as model.safetensors.
      model_config: saved as model_config.json (for the native GPT: GPTConfig.to_dict() + architecture).
      tokenizer_path: a tokenizer model file, copied as tokenizer.model.
      torch_states: name -> plain tensors/containers, each saved as <name>.pt (optimizer, rng, ...).
      json_states: name -> JSON-able object, each saved as <name>.json (trainer_state, data_state, ...).
      operative_config: the operative gin config text, saved as operative_config.gin.
      manifest_extra: extra manifest fields (step, tokens, val_loss, tokenizer_sha256, ...).
    """
    path = Path(path)
    writer, tmp, token = _begin_save(path)
    try:
        _write_files(tmp, model_state=model_state, model_config=model_config, tokenizer_path=tokenizer_path,
                     torch_states=torch_states, json_states=json_states, operative_config=operative_config)
        _publish(tmp, path, token, manifest_extra)
    except (OSError, RuntimeError, ValueError) as e:
        _abandon(tmp, path, e)
    finally:
        _end_save(writer)
    return path


def _begin_save(path: Path) -> tuple[LockFile, Path, str]:
    """Takes a writer's lock beside `path` and makes its temporary directory; returns (lock, temporary, token).

    The writer's lock file (held for the whole save, holding its pid and host) and its temporaries share a
    token: remove_stale_temporaries removes a temporary only once its writer's lock is free, i.e. it is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    writer = LockFile(path.parent / f"{_WRITER_PREFIX}{token}")
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{token}"
    try:
        writer.acquire()
        tmp.mkdir()
    except (OSError, RuntimeError) as e:
        _end_save(writer)
        _abandon(tmp, path, e)
    return writer, tmp, token


def _write_files(tmp: Path, *, model_state: Mapping[str, torch.Tensor] | None = None,
                 model_config: Mapping[str, Any] | None = None, tokenizer_path: str | os.PathLike | None = None,
                 torch_states: Mapping[str, Any] | None = None, json_states: Mapping[str, Any] | None = None,
                 operative_config: str | None = None) -> None:
    """Writes (and fsyncs) the files of a checkpoint into its temporary directory (see save_checkpoint)."""
    if model_state is not None:
        _write_safetensors(tmp / MODEL_FILE, model_state)
    if model_config is not None:
        _write_bytes(tmp / "model_config.json", json.dumps(dict(model_config), indent=2).encode())
    if tokenizer_path is not None:
        _write_bytes(tmp / "tokenizer.model", Path(tokenizer_path).read_bytes())
    for name, obj in (torch_states or {}).items():
        _write_torch(tmp / f"{name}.pt", obj)
    for name, obj in (json_states or {}).items():
        _write_bytes(tmp / f"{name}.json", json.dumps(obj, indent=2).encode())
    if operative_config is not None:
        _write_bytes(tmp / "operative_config.gin", operative_config.encode())


def _publish(tmp: Path, path: Path, token: str, manifest_extra: Mapping[str, Any] | None) -> None:
    """Writes the manifest (the SHA-256 of every file under `tmp`, subdirectories included) last, then renames
    `tmp` to `path` and fsyncs the parent: the checkpoint appears complete or not at all."""
    files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": 1,
        "files": files,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Write order (retention and auto-resume): one more than any checkpoint beside it, never a clock.
        "seq": _next_sequence(path.parent),
        **dict(manifest_extra or {}),
    }
    _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    for directory in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, reverse=True):
        fsync_path(directory)
    if path.exists():  # Re-saving the same step: move the old one aside only once the new one is complete.
        old = path.parent / f"{_OLD_PREFIX}{path.name}-{token}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)  # the old checkpoint goes back (after a crash: remove_stale_temporaries)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_path(path.parent)


def _abandon(tmp: Path, path: Path, error: BaseException) -> None:
    """Removes the temporary of a failed save and raises the CheckpointError that says so."""
    shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"Could not write checkpoint {path}: {error}. Earlier checkpoints are intact; free disk space or "
        "choose another --run_dir, then resume with --resume=auto."
    ) from error


def _end_save(writer: LockFile) -> None:
    if writer.held:
        writer.path.unlink(missing_ok=True)  # before the release: a free lock then always means a dead writer
        writer.release()


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of a checkpoint against its manifest and returns the manifest.

    Raises CheckpointError naming the missing or corrupt file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a directory.")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if not (path / MODEL_FILE).exists() and not (path / _SHARDED_DIR).is_dir():  # never a checkpoint: "partial"
            # would send the user looking for a crash
            what = "is empty" if not any(path.iterdir()) else f"has neither {MANIFEST} nor {MODEL_FILE}"
            raise CheckpointError(f"Checkpoint {path} {what}: not a checkpoint. Give a checkpoint directory "
                                  f"(RUN/{CHECKPOINTS_SUBDIR}/step_N) or a run directory.")
        raise CheckpointError(f"Checkpoint {path} has no {MANIFEST}: it is partial (interrupted while written).")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest.get("files") if isinstance(manifest, dict) else None
        # A hand-edited manifest: anything but {name: digest} would fail below with a traceback.
        valid = isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
        problem = None if valid else 'no "files" mapping of file name to SHA-256'
    except ValueError as e:  # (UnicodeDecodeError too)
        problem = str(e)
    if problem is not None:
        raise CheckpointError(f"Checkpoint {path}: {MANIFEST} is corrupt ({problem}).")
    if MODEL_FILE not in files and f"{_SHARDED_DIR}/.metadata" not in files:  # the weights: one file, or shards
        raise CheckpointError(f"Checkpoint {path}: the manifest lists no {MODEL_FILE}.")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path}: {name} is missing.")
        if file_sha256(file) != digest:
            raise CheckpointError(f"Checkpoint {path}: {name} is corrupt (SHA-256 differs from the manifest).")
    return manifest


def _checkpoints_dir(run_dir: Path) -> Path:
    """Accepts a run directory or its checkpoints/ directory."""
    return run_dir if run_dir.name == CHECKPOINTS_SUBDIR else run_dir / CHECKPOINTS_SUBDIR


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every step_* directory under `run_dir` (or a checkpoints/ dir), oldest first."""
    directory = _checkpoints_dir(Path(run_dir))
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _read_manifest(path: Path) -> dict | None:
    """A checkpoint's manifest as a dict, or None where it is missing or unreadable (not verified)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_order(manifest: dict | None) -> tuple[int, int]:
    """The sort key of a checkpoint by write order: its "seq" (per run, counted by the writer); checkpoints of
    earlier versions without one come first, ordered by their "saved_ns" (the clock they recorded)."""
    manifest = manifest or {}
    seq, saved_ns = manifest.get("seq"), manifest.get("saved_ns", 0)
    if isinstance(seq, int) and not isinstance(seq, bool):
        return (1, seq)
    return (0, saved_ns if isinstance(saved_ns, int) else 0)


def _next_sequence(directory: Path) -> int:
    """One more than the largest "seq" among the checkpoints in `directory` (1 for the first)."""
    orders = [_write_order(_read_manifest(path)) for _, path in list_checkpoints(directory)]
    return max((seq for kind, seq in orders if kind == 1), default=0) + 1


def checkpoints_by_write_order(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """list_checkpoints() ordered by when each was written, oldest first (by step among equals): by the manifest's
    "seq", never by a clock (which may differ between the machines a requeued run lands on).

    Not the same as step order once a run resumed from an older checkpoint than its newest: the new branch's
    checkpoints are the newest, whatever their steps."""
    return sorted(list_checkpoints(run_dir), key=lambda e: (_write_order(_read_manifest(e[1])), e[0]))


def latest_valid_checkpoint(
    run_dir: str | os.PathLike, report: Callable[[str], None] | None = None
) -> Path | None:
    """The most recently written checkpoint under `run_dir` that verifies, or None.

    Corrupt or partial checkpoints are reported (through `report`, default: the logging warning) and skipped.
    """
    report = report or log.warning
    for _, path in reversed(checkpoints_by_write_order(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            report(f"Skipping checkpoint: {e}")
            continue
        return path
    return None


def load_model_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model state_dict of a checkpoint directory (from model.safetensors; from a sharded checkpoint, its
    shards consolidated into whole tensors in this process)."""
    from safetensors.torch import load_file

    if not (Path(path) / MODEL_FILE).exists() and (Path(path) / _SHARDED_DIR).is_dir():
        from codex_ml.checkpoint.sharded import load_sharded_model_state

        return load_sharded_model_state(path, device)
    return load_file(str(Path(path) / MODEL_FILE), device=str(device))


def load_state_file(path: str | os.PathLike, name: str) -> Any:
    """Loads <name>.pt (torch.load with weights_only=True) or <name>.json from a checkpoint directory."""
    path = Path(path)
    if (path / f"{name}.json").is_file():
        return json.loads((path / f"{name}.json").read_text())
    file = path / f"{name}.pt"
    if not file.is_file():
        raise CheckpointError(f"Checkpoint {path}: {name}.pt is missing.")
    return torch.load(file, map_location="cpu", weights_only=True)


class RunDirLocked(CheckpointError):
    """Another live process holds the run directory's lock; the message names it (pid and host)."""


class RunDirLock:
    """The lock on a run directory (an fcntl.flock on <run_dir>/.lock, holding "pid N host H"), held for the life
    of the process that trains into it: a second run on the same directory is refused, naming the first, instead
    of deleting its temporaries and pruning its checkpoints. The kernel releases it however the holder ends
    (kill -9 included), so a crashed run never blocks its own resume.

        with RunDirLock(run_dir):
            ...train...
    """

    FILE = ".lock"

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._lock = LockFile(self.run_dir / self.FILE)

    def acquire(self) -> RunDirLock:
        """Takes the lock (creating the run directory), or raises RunDirLocked naming the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except LockHeld as held:
            holder = held.holder or "a process that has not written its pid yet"
            raise RunDirLocked(
                f"The run directory {self.run_dir} is in use by another run ({holder}): two runs in one directory "
                "would delete each other's checkpoints. Wait for that run to end or stop it, or choose another "
                "--run_dir.") from None
        return self

    def release(self) -> None:
        self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.held

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class CheckpointManager:
    """Saves checkpoints of one run and prunes them: keeps the last `keep_last` written and the best `keep_best`.

    "Last" is by write order, not step (after resuming from an older checkpoint the new ones are the last),
    and the checkpoint just saved is always kept. "Best" means lowest validation loss among checkpoints that
    recorded one (manifest field "val_loss"); a best checkpoint is never pruned while it stays among the best
    `keep_best`.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, keep_best: int = 1):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}.")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}.")
        self.directory = Path(run_dir) / CHECKPOINTS_SUBDIR
        self.keep_last = keep_last
        self.keep_best = keep_best

    def remove_stale_temporaries(self) -> None:
        """Removes the temporaries of writers that are gone (a save interrupted by a crash or kill -9); a live
        writer's (its lock file still locked: another process saving into this directory) are kept. A complete
        checkpoint that a dead writer had moved aside to re-save its step goes back in place when that step's
        directory is missing."""
        if not self.directory.is_dir():
            return
        live = set()
        for child in self.directory.iterdir():
            if child.name.startswith(_WRITER_PREFIX) and LockFile(child).held_elsewhere():
                live.add(child.name[len(_WRITER_PREFIX):])
        for child in sorted(self.directory.iterdir()):
            match = _TEMPORARY.match(child.name)
            if match is None or match["token"] in live:
                continue
            if match["writer"]:
                child.unlink(missing_ok=True)
                continue
            original = self.directory / match["name"]
            if match["old"] and not original.exists():
                log.warning("Restoring checkpoint %s from %s (a re-save of it was interrupted).", original, child)
                os.rename(child, original)
                continue
            log.warning("Removing partial checkpoint %s left by an interrupted run.", child)
            shutil.rmtree(child, ignore_errors=True)

    def save(self, step: int, **kwargs: Any) -> Path:
        """save_checkpoint() into checkpoints/step_XXXXXXXX, then prunes. Returns the checkpoint path."""
        extra = dict(kwargs.pop("manifest_extra", None) or {})
        extra.setdefault("step", step)
        path = save_checkpoint(self.directory / step_dir_name(step), manifest_extra=extra, **kwargs)
        self.prune(keep=path)
        return path

    def save_sharded(self, step: int, *, is_main: bool, **kwargs: Any) -> Path:
        """save_sharded_checkpoint() (collective: every process calls it) into checkpoints/step_XXXXXXXX; then the
        main process (`is_main`, rank 0) prunes. Returns the checkpoint path."""
        from codex_ml.checkpoint.sharded import save_sharded_checkpoint

        extra = dict(kwargs.pop("manifest_extra", None) or {})
        extra.setdefault("step", step)
        path = save_sharded_checkpoint(self.directory / step_dir_name(step), manifest_extra=extra, **kwargs)
        if is_main:
            self.prune(keep=path)
        return path

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Deletes checkpoints that are neither among the last K written nor the best K, nor `keep`. Returns what
        was deleted."""
        order = []  # (write order, step, path, val_loss): each manifest read once
        for step, path in list_checkpoints(self.directory):
            manifest = _read_manifest(path)
            if manifest is None:
                continue  # Unreadable ones are left for a human: latest_valid_checkpoint skips them.
            order.append((_write_order(manifest), step, path, manifest.get("val_loss")))
        entries = [(step, path, val_loss) for _, step, path, val_loss in sorted(order, key=lambda e: e[:2])]  # written
        kept = {path for _, path, _ in entries[-self.keep_last :]}
        if keep is not None:
            kept.add(Path(keep))
        scored = [e for e in entries if isinstance(e[2], (int, float)) and math.isfinite(e[2])]
        kept |= {path for _, path, _ in sorted(scored, key=lambda e: (e[2], -e[0]))[: self.keep_best]}
        removed = []
        for _, path, _ in entries:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed
