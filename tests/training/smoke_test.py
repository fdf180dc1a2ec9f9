"""End to end: configs/smoke.gin through the real command line, data pipeline and model.

One run trains from nothing (tokenizer, shards, model) and prints a sample; a second run in another
run directory reuses the cached tokenizer and shards; resuming the first run with another model shape,
or starting afresh over it, is refused with exit code 2 and leaves its files as they were.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, verify_checkpoint


def _train(tmp_path, *args, path_first=(), env_extra=None):
    """env_extra: variables to set, or to remove where the value is None."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path_first), *sys.path]))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    for name, value in (env_extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
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


def _contents(run_dir):
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(run_dir).rglob("*"))}


@pytest.mark.parametrize("args, message", [
    (["--gin_bindings=GPTConfig.n_layer = 3"], "another configuration (n_layer: checkpoint 2 vs now 3)"),
    (["--resume=never"], "holds checkpoints of an earlier run (newest step 40), which starting afresh would overwrite"),
])
def test_resume_with_another_model_shape_or_never_is_refused_and_changes_nothing(first_run, args, message):
    tmp_path, _ = first_run
    run_dir = tmp_path / "runs" / "first"
    before = _contents(run_dir)
    proc = _train(tmp_path, "--run_dir=runs/first", "--gin_bindings=Trainer.max_steps = 100", *args)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "another --run_dir" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _contents(run_dir) == before  # operative_config.gin included: it records the run that was accepted


@pytest.mark.parametrize("binding, message", [
    ("GPTConfig.n_head = 3", "GPTConfig.d_model=64 must be a multiple of n_head=3"),
    ("Trainer.keep_last = 0", "Trainer.keep_last must be >= 1"),
    ("Trainer.betas = (0.9,)", "Trainer.betas = (0.9,) must be two numbers in [0, 1)"),
    ("Trainer.clip_grad_norm = -1.0", "Trainer.clip_grad_norm = -1.0 must be None or a number >= 0"),
    ("Trainer.device = 'cuda:7'", "Trainer.device='cuda:7' but "),
    ("train.seed = -1", "The seed (train.seed) must be an integer in [0, 2**63), got -1"),
    ("train.model_config = @HFModelConfig()", "train.model_fn = @GPT needs train.model_config = @GPTConfig()"),
])
def test_a_bad_model_or_trainer_binding_is_a_usage_error(first_run, binding, message):
    tmp_path, _ = first_run  # the cached data: the error comes once the model and trainer are built
    proc = _train(tmp_path, "--run_dir=runs/refused", f"--gin_bindings={binding}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "refused").exists()  # the CLI removes the empty run directory it made


def test_world_size_without_torchrun_is_a_usage_error(first_run):
    tmp_path, _ = first_run
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": None, "MASTER_PORT": None}
    proc = _train(tmp_path, "--run_dir=runs/no_torchrun", env_extra=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch multi-process training with torchrun" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "no_torchrun" / "checkpoints").exists()
    # Without --run_dir the processes first agree on a default one, which needs the process group too.
    proc = _train(tmp_path, env_extra=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch multi-process training with torchrun" in proc.stderr and "Traceback" not in proc.stderr


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
