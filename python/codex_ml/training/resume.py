"""Which checkpoint a run continues from, and whether it may: a resume that would not continue the same run
(another model, tokenizer, shard set, optimizer or schedule, data layout or process count) is refused with what
changed named (old -> new) and the fix.

A setting that decides how a run continues is recorded in trainer_state.json by the Trainer (`resume_state`)
and compared here; a new one is a line in one of the tables below. The settings of RESUME_CHANGEABLE may change
on resume when Trainer.allow_changed names them: the Trainer then records each change (old -> new) in the run's
metrics and MLflow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from codex_ml.checkpoint import CheckpointError, latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from codex_ml.training.config import RESUME_CHANGEABLE, ConfigError, TrainerConfig
from codex_ml.training.setup import ProcessInfo

# trainer_state.json keys. The data iterator's saved position fits only these values:
_LAYOUT = ("seed", "batch_size", "seq_len")
# Kept in the optimizer's saved state, which a resume restores (the old values would silently win):
_OPTIMIZER_STATE = ("optimizer", "betas", "weight_decay", "momentum")
# A data iterator's state that belongs to its process rather than to the run's place in the data:
_PER_RANK = ("rank", "world_size", "batch_size")


def _binding(key: str) -> str:
    return "train.seed" if key == "seed" else f"Trainer.{key}"


def resume_state(config: TrainerConfig) -> dict[str, Any]:
    """The settings a checkpoint records so that a resume can be checked against them (JSON values)."""
    keys = (*_LAYOUT, *_OPTIMIZER_STATE, *RESUME_CHANGEABLE)
    return json.loads(json.dumps({key: getattr(config, key) for key in keys}))


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
                     tokenizer_sha256: str | None, world_size: int, data_now: dict[str, Any] | None = None,
                     rank: int = 0, allow_changed: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """Refuses checkpoint `path` when it holds another model shape, tokenizer, shard set, optimizer or schedule,
    data layout or process count than this run (`now` is resume_state() of this run's config, `data_now` the
    state_dict() of this rank's fresh training iterator), with what changed named. Returns the changes of the
    settings that `allow_changed` lets through: (binding, old, new)."""
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
    changes = _check_state(path, json.loads(state_file.read_text()) if state_file.is_file() else {}, now,
                           allow_changed)
    saved_world = manifest.get("world_size", 1)
    if saved_world != world_size and not manifest.get("sharded"):  # sharded checkpoints reshard
        raise ConfigError(
            f"Cannot resume from {path}: it was written by {saved_world} process(es) and this run has "
            f"{world_size}; each process's data position is stored, so resume with the same "
            "--nproc_per_node."
        )
    if data_now is not None and (path / "data_state.json").is_file():
        ranks = json.loads((path / "data_state.json").read_text()).get("ranks") or [{}]
        _check_data(path, ranks[rank] if rank < len(ranks) else {}, data_now)
    return changes


def reshard_data_state(saved: Sequence[dict[str, Any]], now: dict[str, Any]) -> dict[str, Any]:
    """This rank's data position from the positions saved by a run with another process count (resharding).

    The processes split each global batch (Trainer.batch_size, which a resume keeps) between them, and each
    iterator's position counts global batches of the epoch: after position p the run has read the first p global
    batches of the epoch's order, whatever the process count. So every rank continues at the saved (epoch,
    position), with its own rank, process count and per-process batch (`now`: the state_dict() of this rank's
    fresh iterator): no sequence of the epoch is read twice or skipped."""
    positions = {json.dumps({k: v for k, v in state.items() if k not in _PER_RANK}, sort_keys=True)
                 for state in saved}
    if len(positions) != 1:
        raise CheckpointError(f"The saved data positions of the {len(saved)} processes differ ({sorted(positions)}): "
                              "the checkpoint was edited or not written by codex_ml; resume from another one.")
    return {**saved[0], **{key: now[key] for key in _PER_RANK if key in now}}


def _check_data(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The saved position indexes one order of one shard set's sequences: another set (sources, max_documents,
    splits, tokenizer changed) would silently read other data from it."""
    changed = [f"{key} {saved[key]!r} -> {now[key]!r}" for key in ("shards_sha256", "num_sequences")
               if key in saved and key in now and saved[key] != now[key]]
    if changed:
        raise ConfigError(
            f"Cannot resume from {path}: its data position belongs to another shard set of the training data "
            f"({', '.join(changed)}): the corpus or its preparation changed (prepare_data sources, "
            "max_documents, splits or tokenizer). Restore the data settings of that run, or start afresh in "
            "another --run_dir."
        )


def _check_state(path: Path, state: dict[str, Any], now: dict[str, Any],
                 allow_changed: Sequence[str]) -> list[tuple[str, Any, Any]]:
    def changed(keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
        return [(_binding(k), state[k], now[k]) for k in keys if k in state and k in now and state[k] != now[k]]

    def listed(items: list[tuple[str, Any, Any]]) -> str:
        return ", ".join(f"{binding} {old!r} -> {new!r}" for binding, old, new in items)

    layout = changed(_LAYOUT)
    if layout:
        raise ConfigError(
            f"Cannot resume from {path}: the data layout changed ({listed(layout)}); its data position is valid "
            f"only with the old values. Restore them ({', '.join(f'{b} = {old!r}' for b, old, _ in layout)}), or "
            "start afresh in another --run_dir."
        )
    optimizer = changed(_OPTIMIZER_STATE)
    if optimizer:
        raise ConfigError(
            f"Cannot resume from {path}: the optimizer changed ({listed(optimizer)}); its saved optimizer state "
            f"holds the old settings. Restore them ({', '.join(f'{b} = {old!r}' for b, old, _ in optimizer)}), or "
            "start afresh in another --run_dir."
        )
    schedule = changed(RESUME_CHANGEABLE)
    refused = [(b, old, new) for b, old, new in schedule if b.split(".", 1)[1] not in allow_changed]
    if refused:
        names = [b.split(".", 1)[1] for b, _, _ in refused]
        raise ConfigError(
            f"Cannot resume from {path}: the optimization settings changed ({listed(refused)}), which changes how "
            f"the run continues. Restore the old values, or, to continue with the new ones (the change is recorded "
            f"in the run's metrics and MLflow), set Trainer.allow_changed = {names!r}; or start afresh in another "
            "--run_dir."
        )
    return schedule
