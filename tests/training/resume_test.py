"""Exact resume: 2N steps straight == N steps, stop (SIGTERM or kill -9), resume, N more steps.

Same loss at every step and bitwise-identical final weights on the CPU. The interrupted runs are
separate processes; the stand-in data sends the signal to its own process when the iterator reaches
a given batch, so the stop lands at a known point of the real loop.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from standins import make_trainer

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, load_model_state
from codex_ml.training.trainer import ConfigError

HERE = Path(__file__).absolute().parent
N = 4
OPTIONS = {"max_steps": 2 * N, "checkpoint_every": N}


def _train_losses(run_dir):
    losses = {}
    for line in (Path(run_dir) / "metrics.ndjson").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def _run_process(run_dir, options):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    return subprocess.run([sys.executable, str(HERE / "train_standin_main.py"), str(run_dir), json.dumps(options)],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = make_trainer(run_dir, **OPTIONS).fit(resume="never")
    assert result.status == "finished" and result.step == 2 * N
    return result.train_losses, load_model_state(latest_valid_checkpoint(run_dir))


def _assert_same_as_straight(run_dir, straight):
    losses, weights = straight
    assert _train_losses(run_dir) == losses  # exact float equality at every step
    resumed = load_model_state(latest_valid_checkpoint(run_dir))
    for name, tensor in weights.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.parametrize("signal_name, expected_rc", [("SIGTERM", 0), ("SIGKILL", -signal.SIGKILL)])
def test_stop_and_resume_matches_straight_run(tmp_path, straight, signal_name, expected_rc):
    run_dir = tmp_path / "run"
    # SIGTERM arrives while step N is fetching its batch: the step finishes, checkpoints and exits 0.
    # SIGKILL arrives while step N+1 fetches its batch, i.e. right after the checkpoint of step N.
    position = N - 1 if signal_name == "SIGTERM" else N
    proc = _run_process(run_dir, {**OPTIONS, "signals": {str(position): [signal_name]}})
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    if signal_name == "SIGTERM":
        assert f"STATUS interrupted {N}" in proc.stdout
        assert "SIGTERM received" in proc.stdout
    assert [step for step, _ in list_checkpoints(run_dir)] == [N]
    assert sorted(_train_losses(run_dir)) == list(range(1, N + 1))

    result = make_trainer(run_dir, **OPTIONS).fit(resume="auto")
    assert result.status == "finished"
    assert sorted(result.train_losses) == list(range(N + 1, 2 * N + 1))
    _assert_same_as_straight(run_dir, straight)


def test_second_sigint_exits_at_once_without_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_process(run_dir, {**OPTIONS, "signals": {"5": ["SIGINT", "SIGINT"]}})
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Second SIGINT" in proc.stdout
    assert [step for step, _ in list_checkpoints(run_dir)] == [N]  # step 6 never checkpointed


def test_resume_skips_corrupt_newest_checkpoint(tmp_path, straight):
    run_dir = tmp_path / "run"
    make_trainer(run_dir, **{**OPTIONS, "checkpoint_every": 2, "max_steps": 2 * N}).fit(resume="never")
    # Reproduce a crash: drop checkpoints after N, corrupt one newer than N by hand.
    for step, path in list_checkpoints(run_dir):
        if step > N:
            (path / "model.safetensors").write_bytes(b"torn write")
    messages = []
    trainer = make_trainer(run_dir, **{**OPTIONS, "checkpoint_every": 2})
    trainer._say = messages.append
    result = trainer.fit(resume="auto")
    assert any("Skipping checkpoint" in m and "model.safetensors is corrupt" in m for m in messages)
    assert min(result.train_losses) == N + 1
    losses, weights = straight
    assert {s: result.train_losses[s] for s in result.train_losses} == {s: losses[s] for s in range(N + 1, 2 * N + 1)}
    final = load_model_state(latest_valid_checkpoint(run_dir))
    assert all(torch.equal(final[k], v) for k, v in weights.items())


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, max_steps=2, checkpoint_every=2, eval_batches=0, optimizer="adamw").fit(resume="never")
    with pytest.raises(ConfigError, match="Trainer.optimizer = 'adamw'"):
        make_trainer(run, max_steps=3, eval_batches=0, optimizer="sgd").fit(resume="auto")


def test_resume_from_a_run_directory_takes_its_newest_valid_checkpoint(tmp_path):
    first = tmp_path / "first"
    make_trainer(first, max_steps=4, checkpoint_every=2, eval_batches=0).fit(resume="never")
    resumed = make_trainer(tmp_path / "second", max_steps=5, eval_batches=0)
    resumed.fit(resume=str(first))
    assert resumed.step == 5
    assert (tmp_path / "second" / "checkpoints").is_dir()
