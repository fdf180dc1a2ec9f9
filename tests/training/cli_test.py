"""The train command line: bad input gives one clear paragraph and exit code 2, never a traceback."""

import os
import re
import subprocess
import sys

import pytest


def _train(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "codex_ml.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("Trainr.max_steps = 3", "Unknown configurable 'Trainr'.*Did you mean 'Trainer'"),
        ("Trainer.max_step = 3", "Trainer has no parameter 'max_step'.*Did you mean 'max_steps'"),
        ("Trainer.max_steps = 'ten'", "Trainer.max_steps = 'ten' has the wrong type: expected int"),
        ("Trainer.learning_rate = [1]", "Trainer.learning_rate = \\[1\\] has the wrong type: expected float"),
        ("Trainer.max_steps = = 3", "Invalid gin configuration"),
        ("prepare_data.cache_dir = '/tmp/x'", "prepare_data.cache_dir cannot be bound: train passes it itself.*"
         "Bind train.cache_dir instead"),
        ("GPT.config = None", "GPT.config cannot be bound: train passes it itself"),
        ("Trainer.seed = 1", "Trainer.seed cannot be bound: train passes it itself.*Bind train.seed instead"),
    ],
)
def test_bad_bindings_exit_2_with_a_clear_message(tmp_path, binding, expected):
    proc = _train(f"--gin_bindings={binding}", f"--run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(expected, proc.stderr), proc.stderr


def test_a_wrong_trainer_setting_is_refused_before_anything_is_prepared_or_written(tmp_path):
    proc = _train("--gin_bindings=Trainer.precision = 'fp8'", f"--run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: Trainer.precision = 'fp8' is not one of fp32, bf16, fp16."
    assert not (tmp_path / "run").exists() and not (tmp_path / ".cache").exists()


def test_missing_gin_file_is_named(tmp_path):
    proc = _train("--gin_file=configs/nope.gin", cwd=tmp_path)
    assert proc.returncode == 2 and "Gin file 'configs/nope.gin' not found" in proc.stderr


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _train("--gin_bindings=Trainer.max_steps = 3", f"--run_dir={blocker / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Cannot write the run directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_gin_help_lists_configurables_and_parameters(tmp_path):
    proc = _train("--gin_help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Trainer.max_steps = 100" in proc.stdout and "train.sample_prompt = 'def '" in proc.stdout


@pytest.mark.parametrize("module", ["codex_ml", "codex_ml.cli.generate", "codex_ml.cli.tokenizer",
                                    "codex_ml.cli.export", "codex_ml.cli.bench"])
def test_the_other_commands_usage_errors_are_one_line(tmp_path, module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", module, "--bogus"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], proc.stderr  # no usage block first


def test_unknown_flag_exits_2_and_help_shows_this_commands_flags(tmp_path):
    proc = _train("--bogus", cwd=tmp_path)
    assert proc.returncode == 2 and "Unknown command line flag 'bogus'" in proc.stderr, proc.stderr
    proc = _train("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Trains a model from gin configs" in proc.stdout and "--gin_file" in proc.stdout, proc.stdout


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("cuda:3", 2, "--device='cuda:3' but this machine has 2 CUDA device(s): use cuda:0 to cuda:1, or auto."),
    ("cuda", 0, "--device='cuda' but this machine has 0 CUDA device(s): use cpu or auto."),
    ("meta", 0, "--device='meta': generate runs on cpu, cuda, cuda:N or auto."),
    ("mps", 0, "--device='mps': generate runs on cpu, cuda, cuda:N or auto."),
])
def test_generate_on_a_device_this_machine_lacks_is_a_clear_error(tmp_path, monkeypatch, capsys, device,
                                                                  cuda_devices, message):
    import torch

    from codex_ml.cli import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.delenv("BUILD_WORKING_DIRECTORY", raising=False)
    code = generate.main([f"--checkpoint={tmp_path}", "--prompt=x", f"--device={device}"])
    assert code == 2 and capsys.readouterr().err == f"error: {message}\n"
