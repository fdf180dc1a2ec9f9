"""Sharded checkpoints (Trainer.parallelism = 'fsdp'): exact resume at the same process count, resharded resume
onto 1 and 4 processes, the data position across process counts, and the consolidated weights that generate
and export read.

A 6-step run on 2 processes, checkpointed at steps 3 and 6, is the reference. Its step-3 checkpoint resumed on
2 processes ends bitwise where the reference ends; resumed on 1 and on 4 processes, the losses of steps 4-6
agree with the reference's to rel 1e-5 (the same rows, other reduction orders).
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from standins import make_trainer, torchrun, train_records

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, load_model_state, verify_checkpoint
from codex_ml.data.batches import BatchIterator
from codex_ml.training.resume import reshard_data_state

OPTIONS = {"max_steps": 6, "batch_size": 4, "dropout": 0.0, "checkpoint_every": 3, "model": "gpt",
           "parallelism": "fsdp"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reshard") / "reference"
    proc = torchrun(run_dir, OPTIONS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _from_step_3(reference, run_dir):
    """A copy of the reference run directory as it was after step 3 (its newest checkpoint is step 3's)."""
    shutil.copytree(reference, run_dir)
    for step, path in list_checkpoints(run_dir):
        if step > 3:
            shutil.rmtree(path)
    assert latest_valid_checkpoint(run_dir).name == "step_00000003"
    return run_dir


def test_resume_on_the_same_process_count_is_exact(reference, tmp_path):
    run_dir = _from_step_3(reference, tmp_path / "resumed")
    proc = torchrun(run_dir, OPTIONS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Resumed from" in proc.stdout
    expected, resumed = train_records(reference), train_records(run_dir)
    assert [resumed[s]["loss"] for s in (4, 5, 6)] == [expected[s]["loss"] for s in (4, 5, 6)]
    a, b = load_model_state(latest_valid_checkpoint(reference)), load_model_state(latest_valid_checkpoint(run_dir))
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("nproc", [1, 4])
def test_resharded_resume_continues_the_run(reference, tmp_path, nproc):
    run_dir = _from_step_3(reference, tmp_path / f"on{nproc}")
    if nproc == 1:
        result = make_trainer(run_dir, **OPTIONS).fit(resume="auto")
        assert result.status == "finished" and sorted(result.train_losses) == [4, 5, 6]
    else:
        proc = torchrun(run_dir, OPTIONS, nproc=nproc, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert sorted(re.findall(r"STATUS finished 6 rank=(\d)\n", proc.stdout)) == [str(r) for r in range(nproc)]
    expected, resumed = train_records(reference), train_records(run_dir)
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
    manifest = verify_checkpoint(latest_valid_checkpoint(run_dir))
    assert manifest["world_size"] == nproc and manifest["step"] == 6
    assert len(json.loads((latest_valid_checkpoint(run_dir) / "data_state.json").read_text())["ranks"]) == nproc


def test_generate_and_export_read_a_sharded_run_directory(reference, tmp_path):
    from safetensors.torch import load_file

    from codex_ml.models.export import export_hf
    from codex_ml.models.native import load_native

    weights = load_model_state(latest_valid_checkpoint(reference))  # the 2 processes' shards, whole
    model, _ = load_native(reference)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    out = export_hf(reference, tmp_path / "exported")
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["model.embed_tokens.weight"], weights["embed.weight"])


def _epoch_sequences(iterators_by_rank):
    """The sequence start offsets each rank's iterator reads from its position to the end of the epoch."""
    seen = []
    for it in iterators_by_rank:
        while it.position < it.batches_per_epoch:
            seen.extend((next(it)["input_ids"][:, 0]).tolist())
    return seen


@pytest.mark.parametrize("new_world", [1, 4])
def test_data_position_maps_across_process_counts(new_world):
    """The real iterator: 2 processes read 5 global batches, the run continues on `new_world` processes from the
    saved positions; over the epoch every sequence is read exactly once."""
    length, seq_len, global_batch = 4000, 8, 8
    tokens = np.arange(length, dtype=np.int64)  # token value = its offset: a row's first token names its sequence

    def iterator(rank, world):
        return BatchIterator(tokens, split="train", batch_size=global_batch // world, seq_len=seq_len, seed=3,
                             rank=rank, world_size=world)

    old = [iterator(r, 2) for r in range(2)]
    read = [int(x) for it in old for _ in range(5) for x in next(it)["input_ids"][:, 0]]
    saved = [it.state_dict() for it in old]
    new = [iterator(r, new_world) for r in range(new_world)]
    for it in new:
        it.load_state_dict(reshard_data_state(saved, it.state_dict()))
        assert (it.epoch, it.position) == (0, 5)
    read += _epoch_sequences(new)
    num_sequences = (length - 1) // seq_len
    usable = num_sequences // global_batch * global_batch  # whole global batches of the epoch
    assert len(read) == len(set(read)) == usable
    assert all(start % seq_len == 0 for start in read)


def test_positions_that_differ_between_processes_are_refused():
    from codex_ml.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="saved data positions of the 2 processes differ"):
        reshard_data_state([{"epoch": 0, "position": 5, "rank": 0}, {"epoch": 0, "position": 4, "rank": 1}],
                           {"rank": 0, "world_size": 1, "batch_size": 8})
