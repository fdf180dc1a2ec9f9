"""Exact resume: 2N steps straight == N steps, stop (SIGTERM or kill -9), resume, N more steps.

Same loss at every step and bitwise-identical final weights on the CPU. The interrupted runs are
separate processes; the stand-in data sends the signal to its own process when the iterator reaches
a given batch, so the stop lands at a known point of the real loop.
"""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from standins import StandinData, TinyConfig, TinyLM, make_trainer

from codex_ml.checkpoint import CheckpointError, latest_valid_checkpoint, list_checkpoints, load_model_state
from codex_ml.training import ConfigError

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


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.ndjson").read_text().splitlines()]


def test_after_kill_9_and_resume_the_metrics_hold_each_step_once_and_say_where_it_resumed(tmp_path, straight):
    run_dir = tmp_path / "run"
    # Killed while step N+3 fetches its batch: steps N+1 and N+2 are in the metrics but not in a checkpoint.
    proc = _run_process(run_dir, {**OPTIONS, "signals": {str(N + 2): ["SIGKILL"]}})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert sorted(_train_losses(run_dir)) == list(range(1, N + 3))
    with open(run_dir / "metrics.ndjson", "a") as f:  # a line torn by the kill
        f.write('{"step": 7, "split": "tr')

    make_trainer(run_dir, **OPTIONS).fit(resume="auto")
    records = _records(run_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 2 * N + 1))
    with open(run_dir / "metrics.csv", newline="") as f:
        losses = [int(row["step"]) for row in csv.DictReader(f) if row["split"] == "train" and row["name"] == "loss"]
    assert losses == list(range(1, 2 * N + 1))
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == N, resumed
    assert "checkpoints/step_00000004 at step 4; 3 metrics row(s) of later steps" in resumed[0]["message"]
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


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4, metrics files, an MLflow store and its operative config."""
    run_dir = tmp_path_factory.mktemp("earlier") / "run"
    make_trainer(run_dir, max_steps=4, checkpoint_every=2, mlflow=True, operative_config="the earlier run",
                 data=StandinData(shards_sha256="a" * 64)).fit()
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    return run_dir


def _contents(run_dir):
    """Every file's SHA-256 and every directory, by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(run_dir).rglob("*"))}


def _corrupt_every_optimizer_state(run_dir):
    for _, path in list_checkpoints(run_dir):  # the weights stay intact: the checkpoints are worth keeping
        data = bytearray((path / "optimizer.pt").read_bytes())
        data[200] ^= 0xFF
        (path / "optimizer.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, options, resume, error, message", [
    (_corrupt_every_optimizer_state, {}, "auto", CheckpointError,
     r"--resume=auto: .*/run holds 2 checkpoint\(s\) but none verifies .*Fix or restore one \(e.g. from a backup\), "
     r"or start afresh in another --run_dir"),
    (_corrupt_every_optimizer_state, {}, "{tmp}/run", CheckpointError,
     r"--resume=.*/run: no checkpoint in this run directory verifies \(the reasons are printed above\). Fix or "
     r"restore one, or resume from another checkpoint"),
    (None, {}, "never", ConfigError,
     r"--resume=never: .*/run holds checkpoints of an earlier run \(newest step 4\), which starting afresh would "
     r"overwrite. Choose another --run_dir, or delete .*/run/checkpoints to start over there"),
    (None, {"model": TinyLM(TinyConfig(d_model=8))}, "auto", ConfigError,
     r"another configuration .*Use the configuration of that run, or start afresh in another --run_dir\.$"),
    (None, {}, "{tmp}/nope", CheckpointError, r"Checkpoint .*/nope does not exist or is not a directory"),
    (None, {"seed": 1}, "auto", ConfigError,
     r"the data layout changed \(train.seed 0 -> 1\); its data position is valid only with the old values. Restore "
     r"them \(train.seed = 0\), or start afresh in another --run_dir"),
    (None, {"batch_size": 2, "seq_len": 8}, "auto", ConfigError,
     r"the data layout changed \(Trainer.batch_size 4 -> 2, Trainer.seq_len 16 -> 8\);"),
    (None, {"learning_rate": 5e-3, "warmup_steps": 1}, "auto", ConfigError,
     r"the optimization settings changed \(Trainer.learning_rate 0.01 -> 0.005, Trainer.warmup_steps 2 -> 1\), "
     r"which changes how the run continues. Restore the old values, or, to continue with the new ones \(the change "
     r"is recorded in the run's metrics and MLflow\), set Trainer.allow_changed = \['learning_rate', "
     r"'warmup_steps'\]; or start afresh in another --run_dir"),
    (None, {"learning_rate": 5e-3, "grad_accum_steps": 2, "allow_changed": ["learning_rate"]}, "auto", ConfigError,
     r"the optimization settings changed \(Trainer.grad_accum_steps 1 -> 2\).*Trainer.allow_changed = "
     r"\['grad_accum_steps'\]"),
    (None, {"betas": (0.8, 0.95), "weight_decay": 0.0}, "auto", ConfigError,
     r"the optimizer changed \(Trainer.betas \[0.9, 0.95\] -> \[0.8, 0.95\], Trainer.weight_decay 0.1 -> 0.0\); "
     r"its saved optimizer state holds the old settings"),
    (None, {"data": StandinData(shards_sha256="b" * 64)}, "auto", ConfigError,
     r"its data position belongs to another shard set of the training data \(shards_sha256 'a{64}' -> 'b{64}'\): "
     r"the corpus or its preparation changed"),
], ids=["none_verifies", "run_dir_none_verifies", "never_over_checkpoints", "other_model", "missing_path",
        "other_seed", "other_batch", "other_learning_rate", "change_not_allowed", "other_betas", "other_shards"])
def test_a_refused_resume_changes_nothing_in_the_run_directory(tmp_path, earlier_run, damage, options, resume, error,
                                                               message):
    """Refusals come before anything is written: the earlier run's operative_config.gin, metrics, MLflow store and
    checkpoints stay byte-identical, and starting afresh never replaces checkpoints that exist."""
    run_dir = tmp_path / "run"
    shutil.copytree(earlier_run, run_dir)
    if damage:
        damage(run_dir)
    before = _contents(run_dir)
    trainer = make_trainer(run_dir, **{"max_steps": 6, "mlflow": True, "operative_config": "the refused run",
                                       **options})
    with pytest.raises(error, match=message):
        trainer.fit(resume=resume.format(tmp=tmp_path))
    assert _contents(run_dir) == before


def test_a_change_allowed_by_allow_changed_is_used_and_recorded_in_the_metrics_and_mlflow(tmp_path, earlier_run,
                                                                                         capsys):
    from mlflow.tracking import MlflowClient

    from codex_ml.training import LRSchedule

    run_dir = tmp_path / "run"
    shutil.copytree(earlier_run, run_dir)
    trainer = make_trainer(run_dir, max_steps=6, learning_rate=5e-3, allow_changed=["learning_rate"], mlflow=True)
    result = trainer.fit(resume="auto")
    assert result.status == "finished" and sorted(result.train_losses) == [5, 6]
    assert ("Resuming with a changed setting (Trainer.allow_changed): Trainer.learning_rate 0.01 -> 0.005."
            in capsys.readouterr().out)
    records = _records(run_dir)
    changed = [r for r in records if r.get("event") == "resume_changed"]
    assert [(r["step"], r["message"]) for r in changed] == [
        (4, "Trainer.learning_rate 0.01 -> 0.005 (Trainer.allow_changed)")]
    lr = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    assert lr[5] == pytest.approx(LRSchedule("cosine", 5e-3, 6, 2, 0.1)(4))  # the new peak, not the checkpoint's
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("codex_ml").experiment_id])
    assert any(r.data.params.get("resume_changed/Trainer.learning_rate") == "0.01 -> 0.005" for r in runs)
    # The checkpoints since hold the new value: resuming with it needs no override.
    assert make_trainer(run_dir, max_steps=7, learning_rate=5e-3).fit(resume="auto").step == 7


def test_allow_changed_names_only_settings_a_resume_may_change():
    with pytest.raises(ConfigError, match=r"Trainer.allow_changed = \['seed'\]: a resume may change only "
                                          r"learning_rate, schedule, warmup_steps"):
        make_trainer("unused", allow_changed=["seed"])


def test_auto_resume_after_an_interrupted_first_save_starts_afresh(tmp_path):
    """A first save killed midway leaves only a temporary directory: nothing to keep, so the run starts normally."""
    partial = tmp_path / "checkpoints" / ".tmp-step_00000002-4242"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half written")
    result = make_trainer(tmp_path, max_steps=2, eval_batches=0).fit(resume="auto")
    assert result.status == "finished" and min(result.train_losses) == 1
    assert not partial.exists() and [step for step, _ in list_checkpoints(tmp_path)] == [2]


def test_auto_resume_restores_a_checkpoint_moved_aside_by_an_interrupted_re_save(tmp_path, earlier_run):
    """Killed between moving step 4 aside and renaming its re-save into place: step 4 goes back, then is resumed."""
    run_dir = tmp_path / "run"
    shutil.copytree(earlier_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000002")
    os.rename(checkpoints / "step_00000004", checkpoints / ".tmp-old-step_00000004-4242")
    result = make_trainer(run_dir, max_steps=6).fit(resume="auto")
    assert min(result.train_losses) == 5 and result.step == 6


def test_resuming_at_or_past_max_steps_says_so(tmp_path, earlier_run):
    run_dir = tmp_path / "run"
    shutil.copytree(earlier_run, run_dir)
    messages = []
    trainer = make_trainer(run_dir, max_steps=2)
    trainer._say = messages.append
    result = trainer.fit(resume="auto")
    assert result.status == "finished" and result.step == 4 and not result.train_losses
    assert ("Nothing to train: the checkpoint is at step 4 and Trainer.max_steps = 2; raise Trainer.max_steps to train "
            "further.") in messages
