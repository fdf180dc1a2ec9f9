"""Token shards on disk: uint16/uint32 arrays with a manifest of SHA-256 digests.

A shard set lives in its own directory, named by the hash of everything that determines its
content, and is written to a temporary directory then renamed: a shard that a run is using is
never rewritten. Loading verifies every shard against the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from codex_ml._files import atomic_write_bytes, file_sha256, staged_directory
from codex_ml.data.corpus import SPLITS, DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_shards(
    directory: Path,
    split_tokens: dict[str, list[np.ndarray]],
    manifest: dict,
    *,
    dtype: np.dtype,
    shard_tokens: int,
) -> dict:
    """Writes each split's documents (token arrays, eos included) as shards and the manifest, every file fsynced,
    into a temporary directory renamed to `directory` once complete (removed if anything fails)."""
    manifest = dict(manifest, format_version=FORMAT_VERSION, dtype=dtype.name, splits={})
    with staged_directory(directory) as tmp:
        for split in SPLITS:
            docs = split_tokens.get(split, [])
            tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
            shards = []
            for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
                name = f"{split}_{index:05d}.bin"
                part = tokens[start:start + shard_tokens]
                with open(tmp / name, "wb") as f:
                    f.write(part.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
                shards.append({"file": name, "tokens": int(len(part)), "sha256": file_sha256(tmp / name)})
            manifest["splits"][split] = {"documents": len(docs), "tokens": int(len(tokens)), "shards": shards}
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def load_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path} is missing: {directory} is not a complete shard set; delete it to rebuild") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg}); delete {directory} to rebuild") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                        "delete it to rebuild")
    return manifest


def load_split(directory: Path, manifest: dict, split: str, *, verify: bool = True) -> np.ndarray:
    """The tokens of one split, memory-mapped (one shard) or concatenated; verified against the manifest."""
    if split not in manifest["splits"]:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(manifest['splits'])}")
    dtype = np.dtype(manifest["dtype"])
    arrays = []
    for shard in manifest["splits"][split]["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; delete {directory} to rebuild the shards")
        expected_bytes = shard["tokens"] * dtype.itemsize
        if path.stat().st_size != expected_bytes:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, the manifest says {expected_bytes}: "
                            f"it was truncated or edited; delete {directory} to rebuild")
        if verify and file_sha256(path) != shard["sha256"]:
            raise DataError(f"shard {path} does not match its SHA-256 in the manifest: it was modified; "
                            f"delete {directory} to rebuild")
        if shard["tokens"]:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    if not arrays:
        return np.zeros(0, dtype)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
