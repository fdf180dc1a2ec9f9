"""Sharded checkpoints in one process (the layout FSDP writes, without a process group): the atomic directory, a
manifest that covers every shard file, verification that names a changed or missing shard, and the whole weights
read back from the shards."""

import json

import pytest
import torch

from codex_ml.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_valid_checkpoint,
    load_model_state,
    verify_checkpoint,
)
from codex_ml.checkpoint.sharded import is_sharded_checkpoint, load_sharded_state


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"embed.weight": torch.randn(7, 5, generator=g), "norm.weight": torch.randn(5, generator=g)},
            "optimizer": {"state": {"embed.weight": {"exp_avg": torch.randn(7, 5, generator=g)}}}}


def _save(run_dir, step, state):
    return CheckpointManager(run_dir).save_sharded(step, is_main=True, sharded_state=state,
                                                   json_states={"trainer_state": {"step": step}})


def test_a_sharded_checkpoint_is_atomic_verified_and_reads_back(tmp_path):
    state = _state(0)
    path = _save(tmp_path, 3, state)
    manifest = verify_checkpoint(path)
    assert manifest["sharded"] is True and manifest["step"] == 3
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "trainer_state.json"} <= set(manifest["files"])
    assert is_sharded_checkpoint(path) and not list(path.parent.glob(".tmp-*"))
    assert torch.equal(load_model_state(path)["embed.weight"], state["model"]["embed.weight"])
    into = _state(1)
    load_sharded_state(path, into)
    assert torch.equal(into["optimizer"]["state"]["embed.weight"]["exp_avg"],
                       state["optimizer"]["state"]["embed.weight"]["exp_avg"])


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_changed_or_missing_shard_is_named_and_the_older_checkpoint_used(tmp_path, damage):
    older = _save(tmp_path, 3, _state(0))
    newer = _save(tmp_path, 6, _state(1))
    shard = newer / "sharded" / "__0_0.distcp"
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match=f"sharded/__0_0.distcp is {damage}"):
        verify_checkpoint(newer)
    assert latest_valid_checkpoint(tmp_path) == older


def test_a_sharded_checkpoint_without_its_manifest_is_partial(tmp_path):
    path = _save(tmp_path, 3, _state(0))
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json: it is partial"):
        verify_checkpoint(path)


def test_a_failed_shard_write_leaves_no_checkpoint_and_keeps_the_earlier_one(tmp_path):
    older = _save(tmp_path, 3, _state(0))
    with pytest.raises(CheckpointError, match="a process could not write its shards"):
        _save(tmp_path, 6, {"model": {"weight": lambda: 0}})  # DCP cannot serialize a lambda
    assert latest_valid_checkpoint(tmp_path) == older
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((older / "manifest.json").read_text())["step"] == 3
