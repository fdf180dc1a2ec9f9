"""Loading of native checkpoints (written by codex_ml.checkpoint) into a GPT."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codex_ml.checkpoint.core import CheckpointError, latest_valid_checkpoint, load_model_state, verify_checkpoint
from codex_ml.models.gpt import GPT

ARCHITECTURE = "codex_ml.GPT"


def read_model_config(path: Path) -> dict:
    """model_config.json of a verified checkpoint. Verified, it is what save_checkpoint wrote, unless the manifest
    was edited along with it: that is reported, not a traceback."""
    try:
        config = json.loads((path / "model_config.json").read_text())
    except ValueError:  # (UnicodeDecodeError too)
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"Checkpoint {path}: model_config.json is not a JSON object, so the checkpoint was "
                              "edited or not written by codex_ml.")
    return config


def load_native(path: str | os.PathLike, device: str = "cpu", *, manifest: dict | None = None):
    """(GPT, Tokenizer | None) of a checkpoint directory, or of the newest valid checkpoint of a run directory.

    manifest: what verify_checkpoint(path) returned, where the caller has just verified this checkpoint (it is
    not verified twice). Raises CheckpointError naming a missing or corrupt file, another architecture or another
    tokenizer.
    """
    path = Path(path)
    if not (path / "manifest.json").exists() and (path / "checkpoints").is_dir():
        newest = latest_valid_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"Run directory {path} holds no valid checkpoint under checkpoints/.")
        path = newest
    manifest = manifest if manifest is not None else verify_checkpoint(path)
    if "model_config.json" not in manifest["files"]:
        raise CheckpointError(f"Checkpoint {path}: no model_config.json, so it is not a native model checkpoint.")
    config = read_model_config(path)
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"Checkpoint {path} holds architecture {config.get('architecture')!r}, "
                              f"not {ARCHITECTURE!r}: use codex_ml.models.hf for Hugging Face folders.")
    model = GPT.from_config_dict(config)
    result = model.load_state_dict(load_model_state(path, device), strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    if missing or result.unexpected_keys:  # a tied lm_head may be stored once, under embed.weight
        raise CheckpointError(f"Checkpoint {path}: model.safetensors does not match model_config.json "
                              f"(missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}).")
    model.to(device).eval()
    tokenizer = None
    if (path / "tokenizer.model").is_file():
        from codex_ml.tokenization import Tokenizer

        tokenizer = Tokenizer.load(path / "tokenizer.model")
        expected = manifest.get("tokenizer_sha256")
        if expected is not None and tokenizer.sha256 != expected:
            raise CheckpointError(f"Checkpoint {path}: tokenizer.model differs from the tokenizer it was trained "
                                  "with (tokenizer_sha256 in the manifest).")
    return model, tokenizer
