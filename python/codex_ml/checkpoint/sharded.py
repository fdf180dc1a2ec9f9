"""Sharded checkpoints: each process writes its own shards of the model and optimizer state
(torch.distributed.checkpoint, DCP) into the same atomic directory as a single-process checkpoint.

Layout: step_XXXXXXXX/sharded/ holds one __R_0.distcp file per process R and .metadata (which tensor pieces are
where); the other files (model_config.json, rng.pt, data_state.json, ...) and the manifest are those of
save_checkpoint. The protocol: rank 0 makes the temporary directory and takes the writer's lock, every process
writes and fsyncs its shards there, and once all have finished rank 0 writes the manifest (SHA-256 of every file,
each process's shards included) and renames the directory into place. A process that dies during the save leaves
only the temporary, which the next run removes; the checkpoints before it are untouched.

DCP stores every tensor with its global shape, so a checkpoint loads at any process count (resharding): each
process reads the pieces of its new shards, and load_model_state() reads whole tensors in one process (generate,
export).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from codex_ml.checkpoint.core import _SHARDED_DIR as SHARDED_DIR
from codex_ml.checkpoint.core import (
    CheckpointError,
    _abandon,
    _begin_save,
    _end_save,
    _publish,
    _write_files,
)

SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _agree(value: Any) -> Any:
    """Rank 0's `value`, on every process."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(error: str | None) -> str | None:
    """The first error among all processes (in rank order), on every process; None if none failed."""
    if not _distributed():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it is "assuming the intent is to save/load in a single process": it
    is (one process, or generate/export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def save_sharded_checkpoint(path: str | os.PathLike, *, sharded_state: Mapping[str, Any], **files: Any) -> Path:
    """Writes a sharded checkpoint directory at `path` atomically and returns it. Collective: every process calls it
    with its own `sharded_state` (e.g. {"model": ..., "optimizer": ...} from get_state_dict(), DTensors under FSDP);
    `files` are save_checkpoint's other arguments (model_config, torch_states, json_states, operative_config,
    manifest_extra, tokenizer_path), used on rank 0. A failure on any process removes the temporary directory and
    raises CheckpointError on every process."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    manifest_extra = files.pop("manifest_extra", None)
    main = not _distributed() or dist.get_rank() == 0
    begun: dict[str, str] = {}
    if main:
        try:
            writer, tmp, token = _begin_save(path)
            begun = {"tmp": tmp.name}
        except CheckpointError as e:
            begun = {"error": str(e)}
    begun = _agree(begun)
    if "error" in begun:
        raise CheckpointError(begun["error"])
    tmp = path.parent / begun["tmp"]
    error = None
    try:
        # Every process writes its shards and fsyncs them; DCP gathers what each wrote, then rank 0 writes .metadata.
        with _single_process_quiet():
            dcp_save(dict(sharded_state), storage_writer=FileSystemWriter(tmp / SHARDED_DIR, sync_files=True),
                     no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException (a BaseException)
        error = f"{type(e).__name__}: {str(e)[:2000]}"  # carries each rank's error; others: I/O, serialization
    error = _first_error(error)
    if main:
        try:
            if error is not None:
                raise RuntimeError(f"a process could not write its shards ({error})")
            _write_files(tmp, **files)
            _publish(tmp, path, token, {**dict(manifest_extra or {}), "sharded": True})
            error = None
        except (OSError, RuntimeError, ValueError) as e:
            try:
                _abandon(tmp, path, e)
            except CheckpointError as raised:
                error = str(raised)
        finally:
            _end_save(writer)
    error = _agree(error if main else None)
    if error is not None:
        raise CheckpointError(error)
    return path


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint directory written by save_sharded_checkpoint."""
    return (Path(path) / SHARDED_METADATA).is_file()


def load_sharded_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Fills `state` (the structure this process saves, e.g. {"model": ..., "optimizer": ...} from get_state_dict(),
    at this run's process count) in place from a sharded checkpoint written at any process count. Collective."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    with _single_process_quiet():
        dcp_load(state, storage_reader=FileSystemReader(Path(path) / SHARDED_DIR), no_dist=not _distributed())


def load_sharded_model_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole model state_dict of a sharded checkpoint, read in this process alone (consolidated from every
    process's shards): what generate and export load, and what export writes as one safetensors file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(Path(path) / SHARDED_DIR)
    prefix = "model."
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"Checkpoint {path}: its shards hold no model weights.")
    with _single_process_quiet():
        dcp_load(state, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: tensor.to(device) for key, tensor in state.items()}
