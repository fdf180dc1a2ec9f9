"""End to end: configs/smoke.gin through the real command line, data pipeline and model.

One run trains from nothing (tokenizer, shards, model) and prints a sample; a second run in another
run directory reuses the cached tokenizer and shards; resuming the first run with another model shape
is refused with exit code 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, verify_checkpoint


def _train(tmp_path, *args, path_first=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path_first), *sys.path]))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    command = [sys.executable, "-m", "codex_ml.cli.train", "--gin_file=configs/smoke.gin",
               f"--gin_bindings=train.cache_dir = '{tmp_path / 'cache'}'", "--gin_bindings=Trainer.mlflow = False",
               *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    proc = _train(tmp_path, "--run_dir=runs/first")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp_path, proc


def test_smoke_config_trains_end_to_end(first_run):
    tmp_path, proc = first_run
    run_dir = tmp_path / "runs" / "first"
    assert "Sample from the trained model" in proc.stdout
    assert "Trainer.max_steps" in (run_dir / "operative_config.gin").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0]["loss"], train[-1]["loss"])
    assert val and {"loss", "perplexity", "token_accuracy"} <= set(val[-1])
    checkpoint = latest_valid_checkpoint(run_dir)
    manifest = verify_checkpoint(checkpoint)
    assert {"model.safetensors", "model_config.json", "tokenizer.model", "optimizer.pt", "rng.pt",
            "data_state.json", "operative_config.gin", "trainer_state.json"} <= set(manifest["files"])
    assert manifest["tokenizer_sha256"]
    assert json.loads((checkpoint / "model_config.json").read_text())["architecture"] == "codex_ml.GPT"


def test_second_run_reuses_cached_tokenizer_and_shards(first_run):
    tmp_path, _ = first_run
    cache = tmp_path / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    proc = _train(tmp_path, "--run_dir=runs/second", "--gin_bindings=Trainer.max_steps = 2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert before and {p: after.get(p) for p in before} == before  # nothing rebuilt or rewritten


def test_resume_with_another_model_shape_is_refused(first_run):
    tmp_path, _ = first_run
    proc = _train(tmp_path, "--run_dir=runs/first", "--gin_bindings=Trainer.max_steps = 100",
                  "--gin_bindings=GPTConfig.n_layer = 3")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "another configuration" in proc.stderr and "n_layer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert Path(tmp_path / "runs" / "first").is_dir()


@pytest.mark.parametrize("binding, message", [
    ("GPTConfig.n_head = 3", "GPTConfig.d_model=64 must be a multiple of n_head=3"),
    ("Trainer.keep_last = 0", "Trainer.keep_last must be >= 1"),
])
def test_a_bad_model_or_trainer_binding_is_a_usage_error(first_run, binding, message):
    tmp_path, _ = first_run  # the cached data: the error comes once the model and trainer are built
    proc = _train(tmp_path, "--run_dir=runs/refused", f"--gin_bindings={binding}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "refused" / "checkpoints").exists()


def test_mlflow_that_cannot_be_imported_is_a_usage_error(first_run):
    tmp_path, _ = first_run
    blocked = tmp_path / "blocked"
    (blocked / "mlflow").mkdir(parents=True)
    (blocked / "mlflow" / "__init__.py").write_text("raise ImportError('mlflow is blocked by the test')\n")
    proc = _train(tmp_path, "--run_dir=runs/no_mlflow", "--gin_bindings=Trainer.mlflow = True", path_first=[blocked])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow logging is on but mlflow cannot be imported (mlflow is blocked by the test)" in proc.stderr
    assert "Trainer.mlflow = False" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "no_mlflow" / "metrics.ndjson").exists()


def test_missing_data_source_is_a_clear_error(tmp_path):
    proc = _train(tmp_path, "--run_dir=runs/bad", "--gin_bindings=prepare_data.sources = ['/nonexistent/code']")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "/nonexistent/code" in proc.stderr and "Traceback" not in proc.stderr
