"""SIGTERM and SIGINT (Ctrl-C) at several points of a run: during a step, inside a checkpoint save, twice, and
during data preparation.

During training the documented behaviour holds (docs/training.md, docs/troubleshooting.md "Exit codes"): the step
finishes, a checkpoint is written, the process says so and exits 0; a second Ctrl-C exits at once with 130. In
every case no checkpoint or cache entry committed before is lost or changed, and the same command again
(--resume=auto) continues the run.
"""

import random
import shutil
import signal
import time

import faults
import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, verify_checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A data cache with the tokenizer and shards of the small run."""
    tmp = tmp_path_factory.mktemp("cache")
    rc, out, err = faults.train(tmp, tmp / "run", tmp / "cache", **{"Trainer.max_steps": "2"})
    assert rc == 0, out[-2000:] + err[-4000:]
    return tmp / "cache"


def _resume_finishes(tmp_path, run_dir, cache, stopped_at):
    rc, out, err = faults.train(tmp_path, run_dir, cache)
    assert rc == 0, out[-2000:] + err[-4000:]
    assert f"Resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'}" in out, out[-3000:]
    assert latest_valid_checkpoint(run_dir).name == f"step_{faults.STEPS:08d}"


@pytest.mark.parametrize("name, moment", [("SIGTERM", "step"), ("SIGINT", "step"), ("SIGTERM", "save"),
                                          ("SIGINT", "save")])
def test_a_signal_during_training_checkpoints_exits_0_and_the_run_resumes(tmp_path, cache, name, moment):
    run_dir = tmp_path / "run"
    slow = {"FAULT_SLOW_FSYNC_DIR": str(run_dir / "checkpoints"), "FAULT_SLOW_FSYNC_MS": "40"}
    proc = faults.start(tmp_path, run_dir, cache, faults=slow)
    if moment == "step":
        step = random.randint(2, 8)
        reached = faults.wait_for(lambda: max(faults.train_steps(run_dir), default=0) >= step, proc)
    else:
        reached = faults.wait_for(lambda: any(p.name.startswith(".tmp-step_")
                                              for p in faults.temporaries(run_dir / "checkpoints")), proc)
    assert reached, "the run ended before the moment of the signal"
    before = faults.committed(run_dir, cache)
    proc.send_signal(getattr(signal, name))
    rc, out, err = faults.finish(proc)
    assert rc == 0, out[-2000:] + err[-4000:]
    assert f"{name} received: finishing this step and writing a checkpoint" in out, out[-3000:]
    assert "Traceback" not in err, err[-4000:]
    faults.assert_kept(before, run_dir, cache)
    stopped_at = max(faults.train_steps(run_dir))
    if stopped_at < faults.STEPS:
        assert f"Stopped by signal after step {stopped_at}" in out, out[-3000:]
    newest = latest_valid_checkpoint(run_dir)
    assert newest.name == f"step_{stopped_at:08d}"
    for _, path in list_checkpoints(run_dir):
        verify_checkpoint(path)
    assert faults.temporaries(run_dir / "checkpoints") == []
    if stopped_at < faults.STEPS:
        _resume_finishes(tmp_path, run_dir, cache, stopped_at)


def test_a_second_sigint_exits_130_at_once_and_the_run_resumes(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc = faults.start(tmp_path, run_dir, cache)
    assert faults.wait_for(lambda: max(faults.train_steps(run_dir), default=0) >= 4, proc)
    before = faults.committed(run_dir, cache)
    proc.send_signal(signal.SIGINT)
    out_path = proc.logs[0].name
    assert faults.wait_for(lambda: "SIGINT received" in open(out_path).read(), proc)
    proc.send_signal(signal.SIGINT)
    rc, out, err = faults.finish(proc)
    assert rc == 130, out[-2000:] + err[-4000:]
    assert "Second SIGINT: exiting now, without a checkpoint of the current step." in out
    faults.assert_kept(before, run_dir, cache)
    committed_steps = [step for step, _ in list_checkpoints(run_dir)]
    assert committed_steps and max(committed_steps) % 3 == 0  # the stop's own checkpoint was not written
    _resume_finishes(tmp_path, run_dir, cache, max(committed_steps))


@pytest.fixture(scope="module", params=["SIGINT", "SIGTERM"])
def interrupted_preparation(request, tmp_path_factory, cache):
    """A run stopped by a signal while it builds its data cache (a fresh one, beside an earlier run's entries)."""
    tmp = tmp_path_factory.mktemp(f"preparation-{request.param}")
    shared = tmp / "cache"
    shutil.copytree(cache, shared)
    before = faults.committed(shared)
    # Another vocabulary: a new tokenizer and shard set to build, next to the committed ones.
    options = {"prepare_data.vocab_size": "384"}
    proc = faults.start(tmp, tmp / "run", shared, **options)
    committed_entries = len(list((cache / "tokenizers").iterdir()))
    assert faults.wait_for(lambda: len(list((shared / "tokenizers").iterdir())) > committed_entries, proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.send_signal(getattr(signal, request.param))
    rc, out, err = faults.finish(proc)
    return tmp, shared, before, options, rc, out, err, faults.temporaries(shared)


def test_interrupted_data_preparation_loses_nothing_and_the_next_run_trains(interrupted_preparation):
    tmp, shared, before, options, rc, out, err, _ = interrupted_preparation
    assert rc != 0, out[-2000:] + err[-4000:]
    faults.assert_kept(before, shared)
    assert not list_checkpoints(tmp / "run")
    rc, out, err = faults.train(tmp, tmp / "run", shared, **options, **{"Trainer.max_steps": "3"})
    assert rc == 0, out[-2000:] + err[-4000:]
    assert latest_valid_checkpoint(tmp / "run").name == "step_00000003"
    faults.assert_kept(before, shared)
    assert faults.temporaries(shared) == []


@pytest.mark.xfail(strict=True, reason="the train command does not yet turn a signal during data preparation into "
                                       "a message and exit status 130")
def test_interrupted_data_preparation_says_so_and_exits_130(interrupted_preparation):
    _, _, _, _, rc, out, err, left = interrupted_preparation
    assert rc == 130, out[-2000:] + err[-4000:]
    assert "Traceback" not in err and "interrupted" in err, err[-4000:]
    assert left == []
