"""codex-sweep end to end on the smoke config: a 2x2 grid, one shared MLflow store, the table, sweep.csv and the
plot; killed mid-way and run again, it finishes the remaining trials only. Bad specs fail before any trial."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

BASE = ["--gin_file=configs/smoke.gin", "--gin_bindings=Trainer.max_steps = 30",
        "--gin_bindings=Trainer.checkpoint_every = 2", "--gin_bindings=Trainer.eval_every = 30",
        "--gin_bindings=train.sample_prompt = None", "--gin_bindings=prepare_data.max_documents = 100",
        "--sweep=Trainer.learning_rate=[1e-3, 1e-2]", "--sweep=GPTConfig.n_layer=[1, 2]", "--sweep_dir=sweep"]


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    return env


def _sweep(tmp_path, *args, **kwargs):
    command = [sys.executable, "-m", "codex_ml.cli.sweep",
               f"--gin_bindings=train.cache_dir = '{tmp_path / 'cache'}'", *args]
    return subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("spec", ["Trainer.learning_rat=[1e-3]", "Trainer.learning_rate=[]",
                                  "Trainer.learning_rate=[1e-3, fast]", "Nope.x=[1]",
                                  "Trainer.learning_rate=[-1.0]"])
def test_a_bad_spec_fails_before_any_trial_naming_it(tmp_path, spec):
    proc = _sweep(tmp_path, "--gin_file=configs/smoke.gin", f"--sweep={spec}", "--sweep=GPTConfig.n_layer=[1]")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"--sweep={spec!r}" in out and "Traceback" not in out
    assert not list(tmp_path.glob("sweeps/*")) and not (tmp_path / "cache").exists()


def test_a_killed_sweep_run_again_finishes_the_remaining_trials_only(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(tmp_path, *BASE)
    try:
        # trial-0 done, trial-1 past its first checkpoint: stop the sweep.
        _wait_for(lambda: (sweep / "trial-1" / "checkpoints" / "step_00000002").is_dir(), 400, "trial-1's checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert (sweep / "trial-0" / "trial.json").is_file() and not (sweep / "trial-1" / "trial.json").exists()
    assert not (sweep / "trial-2").exists()
    first_log = (sweep / "trial-0" / "train.log").read_text()

    proc = _sweep(tmp_path, *BASE)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "trial-0: finished earlier, skipped" in out
    assert (sweep / "trial-0" / "train.log").read_text() == first_log  # not run again
    assert "Resumed from" in (sweep / "trial-1" / "train.log").read_text()
    for trial in ("trial-1", "trial-2", "trial-3"):
        assert (sweep / trial / "trial.json").is_file(), trial

    with open(sweep / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [r["trial"] for r in sorted(rows, key=lambda r: float(r["val/loss"]))]
    assert sorted((r["Trainer.learning_rate"], r["GPTConfig.n_layer"]) for r in rows) == [
        ("0.001", "1"), ("0.001", "2"), ("0.01", "1"), ("0.01", "2")]
    assert all(r["status"] == "finished" and r["step"] == "30" for r in rows)
    best = rows[0]
    assert out.splitlines()[-5].startswith(best["trial"] + " ")  # the table's first row
    assert (sweep / "plots" / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("codex_ml").experiment_id])
    assert {r.info.run_name for r in runs} == {"trial-0", "trial-1", "trial-2", "trial-3"}
    finished = [r for r in runs if r.info.run_name == "trial-3"]
    assert finished[0].data.params["GPTConfig.n_layer"] == "2"
