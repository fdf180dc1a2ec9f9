"""SIGTERM and SIGINT (Ctrl-C) at several points of training: during a step, inside a checkpoint save, and twice.

During training the documented behaviour holds (docs/training.md, docs/troubleshooting.md "Exit codes"): the step
finishes, a checkpoint is written, the process says so and exits 0; a second Ctrl-C exits at once with 130. In
every case no checkpoint or cache entry committed before is lost or changed, and the same command again
(--resume=auto) continues the run.
"""

import random
import signal

import faults
import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, verify_checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return faults.prepared_cache(tmp_path_factory.mktemp("cache"))


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
