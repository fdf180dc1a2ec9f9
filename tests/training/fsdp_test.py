"""FSDP2 (Trainer.parallelism = 'fsdp') under torchrun with 2 CPU processes (gloo on 127.0.0.1) against one process
with the same global batch, on the native GPT (fused ops, per-block sharding), and activation checkpointing.

Tolerance, as for DDP (distributed_test.py): losses and gradient norms rel 1e-5, final weights atol 1e-5. The runs see
the same rows; only the order of floating-point reductions differs (the reduce-scatter of gradients, the mean
over ranks). Gradient accumulation (2 micro-steps, synced on the last) and clipping (a max norm below the
gradients' norm, so every step clips by the global norm) are on.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from standins import exported_tiny_gpt, free_port, make_trainer, torchrun, train_records

from codex_ml.checkpoint import latest_valid_checkpoint, load_model_state, verify_checkpoint
from codex_ml.training import TrainerConfig
from codex_ml.training.config import ConfigError

OPTIONS = {"max_steps": 4, "batch_size": 4, "dropout": 0.0, "checkpoint_every": 2, "eval_every": 2,
           "grad_accum_steps": 2, "clip_grad_norm": 0.5, "system_metrics_every": 2, "model": "gpt"}


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_fsdp_two_processes_match_one(tmp_path, activation_checkpointing):
    single = make_trainer(tmp_path / "single", **OPTIONS).fit(resume="never")
    run_dir = tmp_path / "fsdp"
    proc = torchrun(run_dir, {**OPTIONS, "parallelism": "fsdp", "activation_checkpointing": activation_checkpointing})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(re.findall(r"STATUS finished 4 rank=(\d)\n", proc.stdout)) == ["0", "1"], proc.stdout

    records, single_records = train_records(run_dir), train_records(tmp_path / "single")
    assert sorted(records) == [1, 2, 3, 4]  # rank 0 alone logged
    for step, loss in single.train_losses.items():
        assert records[step]["loss"] == pytest.approx(loss, rel=1e-5)
        # The norm of the whole gradient (all shards), not of one process's shard: it is what clipping used.
        assert single_records[step]["grad_norm"] > OPTIONS["clip_grad_norm"]
        assert records[step]["grad_norm"] == pytest.approx(single_records[step]["grad_norm"], rel=1e-5)

    # Reported once (rank 0): tokens of the global batch, per process, and every process's peak memory.
    assert records[2]["tokens_per_s_per_process"] == pytest.approx(records[2]["tokens_per_s"] / 2)
    ranks = [records[2][f"peak_memory_mb_rank{r}"] for r in (0, 1)]
    assert all(mb > 10 for mb in ranks) and records[2]["peak_memory_mb"] == max(ranks)
    assert "peak_memory_mb" in single_records[2] and "peak_memory_mb_rank0" not in single_records[2]

    checkpoint = latest_valid_checkpoint(run_dir)
    manifest = verify_checkpoint(checkpoint)
    assert manifest["sharded"] is True and manifest["world_size"] == 2
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest["files"])
    assert "model.safetensors" not in manifest["files"]
    a, b = load_model_state(latest_valid_checkpoint(tmp_path / "single")), load_model_state(checkpoint)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    """One process: recomputing each block in the backward pass changes memory, not results (bitwise)."""
    plain = make_trainer(tmp_path / "plain", max_steps=3, model="gpt", dropout=0.0).fit(resume="never")
    recomputed = make_trainer(tmp_path / "ac", max_steps=3, model="gpt", dropout=0.0,
                              activation_checkpointing=True).fit(resume="never")
    assert recomputed.train_losses == plain.train_losses
    a, b = load_model_state(latest_valid_checkpoint(tmp_path / "plain")), load_model_state(
        latest_valid_checkpoint(tmp_path / "ac"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("settings, message", [
    ({"parallelism": "zero3"}, "Trainer.parallelism = 'zero3' is not one of ddp, fsdp"),
    ({"fsdp_cpu_offload": True}, "set Trainer.parallelism = 'fsdp' too"),
    ({"parallelism": "fsdp", "precision": "fp16"}, "use 'bf16'"),
    ({"collective_timeout_s": 0}, "Trainer.collective_timeout_s = 0 must be a number of seconds > 0"),
    ({"activation_checkpointing": "yes"}, "Trainer.activation_checkpointing = 'yes' must be True or False"),
])
def test_bad_parallelism_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainerConfig(**settings)


def _cli(tmp_path, run_dir, *bindings, nproc=1, gin_file="configs/smoke.gin"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    command = [*launcher, "-m", "codex_ml.cli.train", f"--gin_file={gin_file}", f"--run_dir={run_dir}",
               f"--gin_bindings=train.cache_dir = '{tmp_path / 'cache'}'", "--gin_bindings=Trainer.mlflow = False",
               "--gin_bindings=Trainer.max_steps = 6", "--gin_bindings=Trainer.log_every = 1",
               *[f"--gin_bindings={b}" for b in bindings]]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)


def test_smoke_config_under_torchrun_with_fsdp_matches_one_process(tmp_path):
    """The documented command: torchrun --nproc_per_node=2 -m codex_ml.cli.train --gin_file=configs/smoke.gin
    --gin_bindings="Trainer.parallelism = 'fsdp'" (real data pipeline and model), against one process."""
    one = _cli(tmp_path, "runs/one")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _cli(tmp_path, "runs/two", "Trainer.parallelism = 'fsdp'", nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "Done: finished at step 6" in two.stdout
    # Every process samples under FSDP (each forward pass gathers from all); the same seed gives the same text.
    sample = one.stdout[one.stdout.index("Sample from the trained model"):].split("Done:")[0]
    assert two.stdout.count(sample) == 1
    one_losses, two_losses = train_records(tmp_path / "runs/one"), train_records(tmp_path / "runs/two")
    assert sorted(two_losses) == list(range(1, 7))
    for step, record in one_losses.items():
        assert two_losses[step]["loss"] == pytest.approx(record["loss"], rel=1e-5)
    assert verify_checkpoint(latest_valid_checkpoint(tmp_path / "runs/two"))["sharded"] is True


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    return exported_tiny_gpt(tmp_path_factory.mktemp("hf"))


def test_lora_under_fsdp_matches_one_process_and_saves_the_adapters_alone(tmp_path, hf_model_dir):
    """configs/lora.gin (a Hugging Face model, fused ops, LoRA) on 2 processes under FSDP: the frozen base is
    sharded with the adapters, only the adapters train and are checkpointed, the losses are the 1-process run's."""
    from torch.distributed.checkpoint import FileSystemReader

    from codex_ml.models.generation import load_model

    small = ["Trainer.seq_len = 32", "Trainer.batch_size = 4", "Trainer.eval_batches = 0", "Trainer.max_steps = 3",
             "Trainer.warmup_steps = 1", "prepare_data.max_documents = 150", "prepare_data.splits = (0.8, 0.1, 0.1)",
             "train.sample_tokens = 4", "HFModelConfig.lora_r = 4", "HFModelConfig.lora_dropout = 0.0",
             f"MODEL_DIR = '{hf_model_dir}'"]
    one = _cli(tmp_path, "runs/one", *small, gin_file="configs/lora.gin")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _cli(tmp_path, "runs/two", *small, "Trainer.parallelism = 'fsdp'", nproc=2, gin_file="configs/lora.gin")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one_losses, two_losses = train_records(tmp_path / "runs/one"), train_records(tmp_path / "runs/two")
    assert sorted(two_losses) == [1, 2, 3]
    for step, record in one_losses.items():
        assert two_losses[step]["loss"] == pytest.approx(record["loss"], rel=1e-5)
    checkpoint = latest_valid_checkpoint(tmp_path / "runs/two")
    keys = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    weights = [k for k in keys if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights
    model, _ = load_model(tmp_path / "runs/two")  # the base from its folder, the adapters from the shards
    adapters = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # trained: lora_B starts at zero
