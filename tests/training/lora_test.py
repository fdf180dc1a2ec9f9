"""configs/lora.gin end to end: LoRA fine-tuning of a local Hugging Face folder through the train command.

The folder is a tiny native GPT, with a SentencePiece tokenizer trained on a few standard-library files,
exported to the Hugging Face format (the path docs/models.md shows); nothing is downloaded. Checks: the run
finishes, checkpoints hold only the adapter weights, the adapter folder loads on its own, resume continues
the run, generation works from the run directory, and an unset MODEL_DIR is a clear error.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from standins import exported_tiny_gpt

from codex_ml.checkpoint import latest_valid_checkpoint
from codex_ml.models.generation import SamplingConfig, generate, load_model

SMALL = ["Trainer.seq_len = 32", "Trainer.batch_size = 4", "Trainer.eval_every = 3", "Trainer.eval_batches = 1",
         "Trainer.checkpoint_every = 3", "Trainer.log_every = 1", "Trainer.mlflow = False", "Trainer.warmup_steps = 1",
         "prepare_data.max_documents = 150", "prepare_data.splits = (0.8, 0.1, 0.1)", "train.sample_tokens = 8",
         "HFModelConfig.lora_r = 4"]


def _train(tmp_path, *bindings, run_dir="runs/lora"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    command = [sys.executable, "-m", "codex_ml.cli.train", "--gin_file=configs/lora.gin", f"--run_dir={run_dir}",
               f"--gin_bindings=train.cache_dir = '{tmp_path / 'cache'}'",
               *[f"--gin_bindings={b}" for b in SMALL + list(bindings)]]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The documented path: a native GPT checkpoint (with its tokenizer) exported to a Hugging Face folder."""
    return exported_tiny_gpt(tmp_path_factory.mktemp("hf"))


def test_lora_config_trains_resumes_and_generates(tmp_path, model_dir):
    proc = _train(tmp_path, f"MODEL_DIR = '{model_dir}'", "Trainer.max_steps = 6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done: finished at step 6" in proc.stdout
    run_dir = tmp_path / "runs" / "lora"
    checkpoint = latest_valid_checkpoint(run_dir)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # the adapter alone, not the frozen base
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.ndjson").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert len(losses) == 6 and all(loss == loss for loss in losses)

    resumed = _train(tmp_path, f"MODEL_DIR = '{model_dir}'", "Trainer.max_steps = 8")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "Done: finished at step 8" in resumed.stdout

    # Generation: from the run directory (base folder + checkpointed adapter) and from folder + adapter/.
    config = SamplingConfig(max_new_tokens=6, filter_secrets=False)
    model, tok = load_model(run_dir)
    from_run = generate(model, tok, "def ", config)
    model, tok = load_model(model_dir, adapter=adapter)
    assert generate(model, tok, "def ", config).token_ids == from_run.token_ids


def test_unset_model_dir_is_a_clear_error(tmp_path):
    proc = _train(tmp_path, "Trainer.max_steps = 2")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "bind MODEL_DIR" in proc.stderr and "Traceback" not in proc.stderr
    missing = _train(tmp_path, f"MODEL_DIR = '{Path(tmp_path) / 'nope'}'", "Trainer.max_steps = 2")
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr[-2000:]
