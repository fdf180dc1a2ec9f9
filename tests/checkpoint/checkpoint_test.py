"""Checkpoint directories: atomic writes, verification, discovery of the newest valid one, retention."""

import json
import os
import subprocess
import sys

import pytest
import torch

from codex_ml.checkpoint import (
    CheckpointError,
    CheckpointManager,
    RunDirLock,
    RunDirLocked,
    core,
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_state,
    load_state_file,
    verify_checkpoint,
)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


def _model_state(seed=0):
    torch.manual_seed(seed)
    emb = torch.randn(11, 4)
    # A tied weight (same storage under two names), as GPT's embedding/lm_head.
    return {"embedding.weight": emb, "lm_head.weight": emb, "block.bias": torch.randn(5)}


def _save(manager, step, val_loss=None, seed=0):
    extra = {"val_loss": val_loss} if val_loss is not None else {}
    return manager.save(
        step,
        model_state=_model_state(seed),
        model_config={"n_layer": 1, "architecture": "codex_ml.GPT"},
        torch_states={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}},
        json_states={"trainer_state": {"step": step}},
        operative_config="Trainer.max_steps = 10\n",
        manifest_extra=extra,
    )


def test_round_trip_and_manifest_lists_every_file(run_dir):
    manager = CheckpointManager(run_dir, keep_last=2)
    path = _save(manager, 5)
    assert path.name == "step_00000005"
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert "torch" in manifest["versions"]
    state = load_model_state(path)
    for name, tensor in _model_state().items():
        assert torch.equal(state[name], tensor)
    optimizer = load_state_file(path, "optimizer")
    assert torch.equal(optimizer["state"][0]["exp_avg"], torch.ones(3))
    assert load_state_file(path, "trainer_state") == {"step": 5}
    assert (path / "operative_config.gin").read_text() == "Trainer.max_steps = 10\n"
    assert json.loads((path / "model_config.json").read_text())["architecture"] == "codex_ml.GPT"


def test_corrupt_file_is_named(run_dir):
    path = _save(CheckpointManager(run_dir), 1)
    with open(path / "optimizer.pt", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\xff")
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        verify_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        verify_checkpoint(path)


def test_partial_checkpoint_without_manifest_is_reported(run_dir):
    path = _save(CheckpointManager(run_dir), 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="partial"):
        verify_checkpoint(path)


def test_latest_valid_skips_corrupt_and_reports(run_dir):
    manager = CheckpointManager(run_dir, keep_last=5)
    _save(manager, 1)
    second = _save(manager, 2)
    third = _save(manager, 3)
    (third / "model.safetensors").write_bytes(b"garbage")
    reports = []
    assert latest_valid_checkpoint(run_dir, report=reports.append) == second
    assert len(reports) == 1 and "step_00000003" in reports[0] and "model.safetensors" in reports[0]
    assert latest_valid_checkpoint(run_dir / "checkpoints", report=reports.append) == second


def test_no_checkpoint_gives_none(run_dir):
    assert latest_valid_checkpoint(run_dir) is None


def test_disk_full_mid_write_leaves_previous_intact(run_dir, monkeypatch):
    manager = CheckpointManager(run_dir)
    first = _save(manager, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real_write = core._write_bytes
    calls = []

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(core, "_write_bytes", failing_write)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        _save(manager, 2)
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_valid_checkpoint(run_dir) == first


def test_disk_full_while_streaming_the_weights_leaves_previous_intact(run_dir, monkeypatch):
    """The weights are streamed to disk by safetensors (no copy in memory): its I/O errors count as a full disk."""
    from safetensors import SafetensorError
    from safetensors import torch as safetensors_torch

    manager = CheckpointManager(run_dir)
    first = _save(manager, 1)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        _save(manager, 2)
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert latest_valid_checkpoint(run_dir) == first


def test_resaving_a_step_replaces_it_atomically(run_dir):
    manager = CheckpointManager(run_dir)
    _save(manager, 4, seed=0)
    path = _save(manager, 4, seed=1)
    verify_checkpoint(path)
    assert torch.equal(load_model_state(path)["block.bias"], _model_state(1)["block.bias"])
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000004"]


def test_retention_keeps_last_k_and_best_k(run_dir):
    manager = CheckpointManager(run_dir, keep_last=2, keep_best=1)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.7}
    for step, loss in losses.items():
        _save(manager, step, val_loss=loss)
    # Last two (4, 5) and the best (2, val loss 1.0), which is never pruned.
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4, 5]


def test_stale_temporaries_are_removed(run_dir):
    manager = CheckpointManager(run_dir)
    _save(manager, 1)
    stale = run_dir / "checkpoints" / ".tmp-step_00000002-999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    manager.remove_stale_temporaries()
    assert not stale.exists()
    assert latest_valid_checkpoint(run_dir) is not None


def test_retention_and_auto_resume_follow_write_order_after_resuming_an_older_step(run_dir):
    """Resumed from step 2 while steps 6 and 8 exist: the new branch's step 3 is the newest, is kept, and is what
    --resume=auto picks; a keep_last=1 manager never deletes the checkpoint it has just written."""
    manager = CheckpointManager(run_dir, keep_last=3, keep_best=0)
    for step in (2, 6, 8):
        _save(manager, step)
    path = _save(manager, 3)
    assert path.is_dir()
    assert sorted(step for step, _ in list_checkpoints(run_dir)) == [3, 6, 8]
    assert latest_valid_checkpoint(run_dir) == path
    tight = CheckpointManager(run_dir, keep_last=1, keep_best=0)
    assert _save(tight, 4).is_dir() and [step for step, _ in list_checkpoints(run_dir)] == [4]


def test_a_failed_resave_keeps_the_old_checkpoint(run_dir, monkeypatch):
    manager = CheckpointManager(run_dir)
    original = _save(manager, 4, seed=0)
    real_rename = core.os.rename

    def failing_rename(src, dst):
        if ".tmp-step_" in str(src):  # the new checkpoint's move into place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(core.os, "rename", failing_rename)
    with pytest.raises(CheckpointError, match="Earlier checkpoints are intact"):
        _save(manager, 4, seed=1)
    monkeypatch.undo()
    verify_checkpoint(original)
    assert torch.equal(load_model_state(original)["block.bias"], _model_state(0)["block.bias"])


def test_a_checkpoint_moved_aside_by_an_interrupted_resave_is_restored(run_dir):
    manager = CheckpointManager(run_dir)
    path = _save(manager, 4)
    aside = path.parent / f".tmp-old-{path.name}-12345"
    path.rename(aside)  # as a crash between the two renames of a re-save leaves it
    manager.remove_stale_temporaries()
    assert not aside.exists() and verify_checkpoint(path)


@pytest.mark.parametrize("manifest", [
    {"files": "model.safetensors"}, {"files": ["model.safetensors"]}, {"files": {"model.safetensors": 1}},
    {"format": 1}, ["files"],
])
def test_a_manifest_without_a_files_mapping_is_corrupt(run_dir, manifest):
    """A hand-edited manifest: "files" must map each file name to its SHA-256 (it raised AttributeError)."""
    path = _save(CheckpointManager(run_dir), 1)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r'manifest.json is corrupt \(no "files" mapping of file name to '
                                              r'SHA-256\)'):
        verify_checkpoint(path)
    assert latest_valid_checkpoint(run_dir, report=lambda _: None) is None


def test_a_directory_that_was_never_a_checkpoint_is_not_called_partial(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is empty: not a checkpoint\. Give a checkpoint directory"):
        verify_checkpoint(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="other has neither manifest.json nor model.safetensors: not a "
                                              "checkpoint"):
        verify_checkpoint(tmp_path / "other")


def test_write_order_follows_the_sequence_number_not_the_clock(run_dir, monkeypatch):
    """A requeued run on a machine whose clock is behind: its new checkpoints are still the newest."""
    manager = CheckpointManager(run_dir, keep_last=2, keep_best=0)
    clock = iter(range(10**18, 0, -10**15))  # every save an earlier time than the one before
    monkeypatch.setattr(core.time, "time_ns", lambda: next(clock))
    monkeypatch.setattr(core.time, "time", lambda: next(clock) / 1e9)
    paths, seqs = [], []
    for step in (5, 9, 3):  # resumed from step 2 after step 9: 3 is the newest
        paths.append(_save(manager, step))
        seqs.append(json.loads((paths[-1] / "manifest.json").read_text())["seq"])
    assert seqs == [1, 2, 3]
    assert latest_valid_checkpoint(run_dir) == paths[2]
    assert sorted(step for step, _ in list_checkpoints(run_dir)) == [3, 9]  # the last two written


def test_checkpoints_without_a_sequence_number_come_first_by_their_clock(run_dir):
    """Checkpoints of an earlier version (only "saved_ns"): older than any with "seq", in saved_ns order."""
    manager = CheckpointManager(run_dir, keep_last=5, keep_best=0)
    for step, saved_ns in ((8, 300), (4, 200), (6, 100)):
        path = _save(manager, step)
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["seq"]
        (path / "manifest.json").write_text(json.dumps({**manifest, "saved_ns": saved_ns}))
    assert [step for step, _ in core.checkpoints_by_write_order(run_dir)] == [6, 4, 8]
    assert latest_valid_checkpoint(run_dir).name == "step_00000008"
    new = _save(manager, 2)
    assert json.loads((new / "manifest.json").read_text())["seq"] == 1
    assert [step for step, _ in core.checkpoints_by_write_order(run_dir)] == [6, 4, 8, 2]
    assert latest_valid_checkpoint(run_dir) == new


# A child process saving step 7 that pauses inside the save (after the weights) until it is told to go on or killed.
SLOW_SAVER = """
import sys
import torch
from codex_ml.checkpoint import CheckpointManager, core
real = core._write_torch
def slow(path, obj):
    print("saving", flush=True)
    sys.stdin.readline()
    real(path, obj)
core._write_torch = slow
CheckpointManager(sys.argv[1]).save(7, model_state={"w": torch.ones(3)}, torch_states={"optimizer": {}})
print("saved", flush=True)
"""


def _child(code, *args):
    """A Python child running `code` with `args`, its stdin and stdout piped (text)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_live_writers_temporaries_are_kept_and_a_dead_ones_removed(run_dir):
    manager = CheckpointManager(run_dir)
    _save(manager, 1)
    writer = _child(SLOW_SAVER, run_dir)
    assert writer.stdout.readline().strip() == "saving"
    temporaries = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))
    (writer_file,) = (run_dir / "checkpoints").glob(".tmp-writer-*")
    assert len(temporaries) == 2 and f"pid {writer.pid} " in writer_file.read_text()
    manager.remove_stale_temporaries()  # another process cleaning up while the save is in progress
    assert sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*")) == temporaries
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.stdout.readline().strip() == "saved" and writer.wait(60) == 0
    verify_checkpoint(run_dir / "checkpoints" / "step_00000007")
    assert list((run_dir / "checkpoints").glob(".tmp-*")) == []

    killed = _child(SLOW_SAVER, run_dir)
    assert killed.stdout.readline().strip() == "saving"
    killed.kill()  # kill -9 mid-save: its temporaries stay, and its lock is free
    killed.wait(60)
    assert len(list((run_dir / "checkpoints").glob(".tmp-*"))) == 2
    manager.remove_stale_temporaries()
    assert list((run_dir / "checkpoints").glob(".tmp-*")) == []
    verify_checkpoint(run_dir / "checkpoints" / "step_00000007")  # the earlier save of step 7 is intact


HOLDER = """
import sys
from codex_ml.checkpoint import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.readline()
"""


def test_the_run_directory_lock_refuses_a_second_holder_naming_the_first(run_dir):
    holder = _child(HOLDER, run_dir)
    assert holder.stdout.readline().strip() == "held"
    second = RunDirLock(run_dir)
    with pytest.raises(RunDirLocked, match=rf"{run_dir} is in use by another run \(pid {holder.pid} host "
                                           rf"{os.uname().nodename}\).*choose another --run_dir"):
        second.acquire()
    assert not second.held
    holder.stdin.write("\n")  # the holder exits normally
    holder.stdin.flush()
    assert holder.wait(60) == 0
    with RunDirLock(run_dir) as lock:
        assert lock.held and f"pid {os.getpid()} " in (run_dir / ".lock").read_text()
        with pytest.raises(RunDirLocked):  # another lock in this same process is refused too
            RunDirLock(run_dir).acquire()
    assert not lock.held


def test_kill_9_of_the_run_directory_holder_releases_the_lock(run_dir):
    holder = _child(HOLDER, run_dir)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirLocked):
        RunDirLock(run_dir).acquire()
    holder.kill()
    holder.wait(60)
    with RunDirLock(run_dir) as lock:  # no stale lock: the kernel released it with the process
        assert lock.held
