"""Checkpoints: atomic directories with a SHA-256 manifest, retention (last K + best K), verification.

Layout of one checkpoint (``<run_dir>/checkpoints/step_XXXXXXXX/``): model.safetensors, model_config.json,
tokenizer.model, optimizer.pt, scheduler.pt, scaler.pt (when a loss scaler is used), rng.pt,
data_state.json, operative_config.gin, trainer_state.json and manifest.json (written last; it lists every
other file with its SHA-256, and "seq": the checkpoint's place in the run's write order). Loading uses safetensors
and ``torch.load(weights_only=True)`` only. A sharded checkpoint (FSDP; checkpoint/sharded.py) holds sharded/ (each
process's shards of the weights and optimizer state, torch.distributed.checkpoint) instead of model.safetensors
and optimizer.pt, and "sharded": true in its manifest.

Write order (which checkpoints are the last K, which one --resume=auto takes) follows "seq", one more than the
largest in the directory at each save, never a clock. Checkpoints of earlier versions, without "seq", come before
every checkpoint with one, in the order of their "saved_ns" (then step).

`RunDirLock` is the lock a training process holds on its run directory for its whole life; while a save is in
progress its writer holds .tmp-writer-<token> in checkpoints/, so that remove_stale_temporaries removes only the
temporaries of writers that are gone.
"""

from codex_ml.checkpoint.core import (
    CheckpointError,
    CheckpointManager,
    RunDirLock,
    RunDirLocked,
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
    "RunDirLock",
    "RunDirLocked",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_state_file",
    "save_checkpoint",
    "verify_checkpoint",
]
