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
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def interrupted_preparation(request, tmp_path_factory, cache):
    """A run stopped by a signal (request.param) while it builds its data cache, beside an earlier run's entries."""
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
    return SimpleNamespace(tmp=tmp, cache=shared, before=before, options=options, rc=rc, out=out, err=err,
                           temporaries=faults.temporaries(shared), run_dir_left=(tmp / "run").exists())


@pytest.mark.parametrize("interrupted_preparation", ["SIGINT", "SIGTERM"], indirect=True)
def test_interrupted_data_preparation_loses_nothing_and_the_next_run_trains(interrupted_preparation):
    stopped = interrupted_preparation
    assert stopped.rc != 0, stopped.out[-2000:] + stopped.err[-4000:]
    faults.assert_kept(stopped.before, stopped.cache)
    assert not list_checkpoints(stopped.tmp / "run")
    rc, out, err = faults.train(stopped.tmp, stopped.tmp / "run", stopped.cache, **stopped.options,
                                **{"Trainer.max_steps": "3"})
    assert rc == 0, out[-2000:] + err[-4000:]
    assert latest_valid_checkpoint(stopped.tmp / "run").name == "step_00000003"
    faults.assert_kept(stopped.before, stopped.cache)
    assert faults.temporaries(stopped.cache) == []


@pytest.mark.parametrize("interrupted_preparation", [
    "SIGINT",
    pytest.param("SIGTERM", marks=pytest.mark.xfail(
        strict=True, reason="SIGTERM during data preparation still ends the process by the signal, without a "
                            "message, leaving its cache temporary to the next run")),
], indirect=True)
def test_interrupted_data_preparation_says_so_in_one_line_and_leaves_nothing_behind(interrupted_preparation):
    stopped = interrupted_preparation
    status = stopped.out[-2000:] + stopped.err[-4000:]
    assert stopped.rc == 130 if "SIGINT" in stopped.tmp.name else stopped.rc > 0, status  # an exit, not a kill
    assert "Traceback" not in stopped.err, stopped.err[-4000:]
    assert [line for line in stopped.err.splitlines() if line.startswith("Interrupted")], stopped.err[-4000:]
    assert stopped.temporaries == []
    assert not stopped.run_dir_left  # the run directory made for this run, removed
