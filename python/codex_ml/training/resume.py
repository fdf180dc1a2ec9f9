"""Which checkpoint a run continues from, and whether it may: a resume that would not continue the same run
(another model, tokenizer, optimizer, data layout or process count) is refused with the difference named.

A setting that decides how a run continues is recorded in trainer_state.json by the Trainer (`resume_state`)
and compared here; a new one is a line in `_LAYOUT` (or a check of its own when it needs its own advice).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from codex_ml.checkpoint import CheckpointError, latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.setup import ProcessInfo

# trainer_state.json key -> the binding that sets it. The data iterator's saved position fits only these values.
_LAYOUT = (("seed", "train.seed"), ("batch_size", "Trainer.batch_size"), ("seq_len", "Trainer.seq_len"))


def resume_state(config: TrainerConfig) -> dict[str, Any]:
    """The settings a checkpoint records so that a resume can be checked against them."""
    return {"seed": config.seed, "batch_size": config.batch_size, "seq_len": config.seq_len,
            "optimizer": config.optimizer}


def resolve_resume(resume: str | os.PathLike | None, run_dir: Path, process: ProcessInfo,
                   say: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from ("auto", "never", a checkpoint or a run directory), or None to start afresh;
    refuses where starting afresh would overwrite the checkpoints already in run_dir (a save replaces a directory
    of the same step). Rank 0 decides and tells the others."""
    never = resume is None or str(resume) == "never"
    path = None
    if process.is_main:
        existing = list_checkpoints(run_dir)  # step_* directories (an interrupted save leaves a .tmp-*)
        if never and existing:
            raise ConfigError(
                f"--resume=never: {run_dir} holds checkpoints of an earlier run (newest step "
                f"{existing[-1][0]}), which starting afresh would overwrite. Choose another --run_dir, or "
                f"delete {run_dir / 'checkpoints'} to start over there."
            )
        if str(resume) == "auto":
            path = latest_valid_checkpoint(run_dir, report=say)
            if path is None and existing:
                raise CheckpointError(
                    f"--resume=auto: {run_dir} holds {len(existing)} checkpoint(s) but none verifies (the "
                    "reasons are printed above), and starting afresh would overwrite them. Fix or restore one "
                    "(e.g. from a backup), or start afresh in another --run_dir."
                )
        elif not never:
            path = _named_checkpoint(Path(resume), say)
    if never:
        return None
    if process.world_size > 1:
        box = [str(path) if path else None]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0]) if box[0] else None
    return path


def _named_checkpoint(path: Path, say: Callable[[str], None]) -> Path:
    """--resume=PATH: that checkpoint, or a run directory's (or its checkpoints/') newest that verifies."""
    if path.is_dir() and not (path / "manifest.json").exists() and list_checkpoints(path):
        found = latest_valid_checkpoint(path, report=say)
        if found is None:
            raise CheckpointError(f"--resume={path}: no checkpoint in this run directory verifies (the "
                                  "reasons are printed above). Fix or restore one, or resume from "
                                  "another checkpoint.")
        path = found
    verify_checkpoint(path)
    return path


def _describe_difference(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys)


def check_compatible(path: Path, *, now: dict[str, Any], model_config: dict[str, Any] | None,
                     tokenizer_sha256: str | None, world_size: int) -> None:
    """Refuses checkpoint `path` when it holds another model shape, tokenizer, optimizer, data layout or process
    count than this run (`now` is resume_state() of this run's config), with the difference named."""
    manifest = json.loads((path / "manifest.json").read_text())
    saved_config_file = path / "model_config.json"
    if model_config is not None and saved_config_file.is_file():
        saved = json.loads(saved_config_file.read_text())
        if saved != json.loads(json.dumps(model_config)):
            raise ConfigError(
                f"Cannot resume from {path}: it holds a model of another configuration "
                f"({_describe_difference(saved, model_config)}). Use the configuration of that run, "
                "or start afresh in another --run_dir."
            )
    saved_tok = manifest.get("tokenizer_sha256")
    if saved_tok and tokenizer_sha256 and saved_tok != tokenizer_sha256:
        raise ConfigError(
            f"Cannot resume from {path}: it was trained with another tokenizer (SHA-256 {saved_tok[:12]}... vs "
            f"{tokenizer_sha256[:12]}... now). Point the data config at that run's tokenizer.model, or "
            "start afresh in another --run_dir."
        )
    state_file = path / "trainer_state.json"
    _check_state(path, json.loads(state_file.read_text()) if state_file.is_file() else {}, now)
    saved_world = manifest.get("world_size", 1)
    if saved_world != world_size:
        raise ConfigError(
            f"Cannot resume from {path}: it was written by {saved_world} process(es) and this run has "
            f"{world_size}; each process's data position is stored, so resume with the same "
            "--nproc_per_node."
        )


def _check_state(path: Path, state: dict[str, Any], now: dict[str, Any]) -> None:
    saved_optimizer = state.get("optimizer")
    if saved_optimizer is not None and saved_optimizer != now["optimizer"]:
        raise ConfigError(
            f"Cannot resume from {path}: it was trained with Trainer.optimizer = {saved_optimizer!r} and this "
            f"run has {now['optimizer']!r}, whose state is another. Resume with "
            f"Trainer.optimizer = {saved_optimizer!r}, or start afresh in another --run_dir."
        )
    layout = [(binding, state[key], now[key]) for key, binding in _LAYOUT if key in state and state[key] != now[key]]
    if layout:
        saved = ", ".join(f"{binding} = {value!r}" for binding, value, _ in layout)
        current = ", ".join(f"{binding} = {value!r}" for binding, _, value in layout)
        raise ConfigError(
            f"Cannot resume from {path}: it was trained with {saved} and this run has {current}; its data position "
            f"is valid only with those values. Keep {saved}, or start afresh in another --run_dir."
        )
