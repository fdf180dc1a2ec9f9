"""Checkpoints: atomic directories with a SHA-256 manifest, retention (last K + best K), verification.

Layout of one checkpoint (``<run_dir>/checkpoints/step_XXXXXXXX/``): model.safetensors, model_config.json,
tokenizer.model, optimizer.pt, scheduler.pt, scaler.pt (when a loss scaler is used), rng.pt,
data_state.json, operative_config.gin, trainer_state.json and manifest.json (written last; it lists every
other file with its SHA-256). Loading uses safetensors and ``torch.load(weights_only=True)`` only.
"""

from codex_ml.checkpoint.core import (
    CheckpointError,
    CheckpointManager,
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_state,
    load_state_file,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_state_file",
    "save_checkpoint",
    "verify_checkpoint",
]
