"""The training loop on tiny stand-ins: accumulation, non-finite policy, evaluation, schedules, tracking."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from standins import StandinData, TinyConfig, TinyLM, make_trainer

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, load_model_state
from codex_ml.eval import evaluate, register_metric
from codex_ml.training import ConfigError, LRSchedule


def _records(run_dir, split):
    lines = (run_dir / "metrics.ndjson").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_training_reduces_loss_and_writes_metrics(tmp_path):
    result = make_trainer(tmp_path, max_steps=40, eval_every=20, dropout=0.0).fit()
    assert result.status == "finished" and result.step == 40
    first, last = result.train_losses[1], result.train_losses[40]
    assert last < first - 1.0, (first, last)  # the pattern is learnable: ln(32) = 3.47 -> well below
    train = _records(tmp_path, "train")
    assert [r["step"] for r in train] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(train[0])
    val = _records(tmp_path, "val")
    assert [r["step"] for r in val] == [20, 40]
    assert math.isclose(val[-1]["perplexity"], math.exp(val[-1]["loss"]), rel_tol=1e-9)
    assert 0.0 <= val[-1]["token_accuracy"] <= 1.0 and val[-1]["loss"] < val[0]["loss"] + 0.5
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,split,name,value" and any(line.startswith("40,val,loss,") for line in csv_lines)
    assert (tmp_path / "checkpoints" / "step_00000040" / "manifest.json").is_file()


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = make_trainer(tmp_path / "full", batch_size=4, grad_accum_steps=1, dropout=0.0).fit()
    # The stand-in data hands out the rows of a batch of 4 as two consecutive batches of 2.
    accumulated = make_trainer(tmp_path / "accum", batch_size=2, grad_accum_steps=2, dropout=0.0).fit()
    for step, loss in full.train_losses.items():
        assert accumulated.train_losses[step] == pytest.approx(loss, rel=1e-5)
    a = load_model_state(full.last_checkpoint)
    b = load_model_state(accumulated.last_checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_alternative_optimizers_train(tmp_path, optimizer):
    lr = 0.5 if optimizer == "sgd" else 1e-2
    result = make_trainer(tmp_path, optimizer=optimizer, learning_rate=lr, max_steps=30, dropout=0.0).fit()
    assert result.train_losses[30] < result.train_losses[1] - 0.3


def test_bf16_autocast_on_cpu_trains(tmp_path):
    result = make_trainer(tmp_path, precision="bf16", max_steps=20, dropout=0.0).fit()
    assert result.train_losses[20] < result.train_losses[1]


def test_nan_loss_skip_policy_skips_update_and_logs(tmp_path):
    model = TinyLM(TinyConfig(), nan_at_call=3)
    trainer = make_trainer(tmp_path, model=model, nan_policy="skip", max_steps=5)
    result = trainer.fit()
    assert result.status == "finished" and result.step == 5
    assert math.isnan(result.train_losses[3]) and all(math.isfinite(result.train_losses[s]) for s in (1, 2, 4, 5))
    events = [r for r in _records(tmp_path, "event") if r["event"] == "nonfinite_skip"]
    assert len(events) == 1 and events[0]["step"] == 3
    assert trainer.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_skips_are_counted_across_a_resume(tmp_path):
    """max_consecutive_nonfinite counts skipped updates in a row even when a checkpoint and a resume fall between."""
    model = TinyLM(TinyConfig(), nan_at_call=2)
    make_trainer(tmp_path, model=model, nan_policy="skip", max_steps=2, checkpoint_every=2).fit()
    state = json.loads((latest_valid_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["consecutive_nonfinite"] == 1
    resumed = make_trainer(tmp_path, nan_policy="skip", max_steps=2)
    resumed.fit(resume="auto")
    assert resumed.consecutive_nonfinite == 1


def test_nan_loss_stop_policy_keeps_last_good_checkpoint(tmp_path):
    model = TinyLM(TinyConfig(), nan_at_call=5)
    result = make_trainer(tmp_path, model=model, nan_policy="stop", checkpoint_every=2).fit()
    assert result.status == "stopped_nonfinite" and result.step == 5
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    state = load_model_state(latest_valid_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert [r["event"] for r in _records(tmp_path, "event") if r["event"].startswith("nonfinite")] == ["nonfinite_stop"]


def test_best_checkpoint_by_val_loss_is_kept(tmp_path):
    make_trainer(tmp_path, max_steps=12, eval_every=2, checkpoint_every=2, keep_last=2, keep_best=1,
                 dropout=0.0).fit()
    kept = list_checkpoints(tmp_path)
    manifests = {step: json.loads((p / "manifest.json").read_text()) for step, p in kept}
    val = {r["step"]: r["loss"] for r in _records(tmp_path, "val")}
    best_step = min(val, key=val.get)
    assert set(manifests) == {10, 12} | {best_step}
    assert manifests[best_step]["val_loss"] == val[best_step]


def test_resume_refuses_other_model_shape(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    other = TinyLM(TinyConfig(d_model=8))
    with pytest.raises(ConfigError, match=r"another configuration \(d_model: checkpoint 16 vs now 8\)"):
        make_trainer(tmp_path, model=other, max_steps=4).fit(resume="auto")


def test_resume_refuses_other_tokenizer(tmp_path):
    class Tok:
        def __init__(self, sha):
            self.sha256, self.model_path = sha, None

    data = StandinData()
    data.tokenizer = Tok("a" * 64)
    make_trainer(tmp_path, data=data, max_steps=2).fit()
    data.tokenizer = Tok("b" * 64)
    with pytest.raises(ConfigError, match="another tokenizer"):
        make_trainer(tmp_path, data=data, max_steps=4).fit(resume="auto")


def test_the_config_is_frozen_and_holds_tuples():
    import dataclasses

    from codex_ml.training import TrainerConfig

    config = TrainerConfig(betas=[0.8, 0.9], metrics=["loss"])
    assert config.betas == (0.8, 0.9) and config.metrics == ("loss",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_steps = 5
    with pytest.raises(ConfigError, match=r"Trainer.max_steps must be a positive integer, got 0"):
        dataclasses.replace(config, max_steps=0)


def test_bad_options_are_rejected_clearly(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        make_trainer(tmp_path, precision="fp8")
    with pytest.raises(ConfigError, match="needs a GPU"):
        make_trainer(tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match="Unknown optimizer 'adamx'"):
        make_trainer(tmp_path, optimizer="adamx")
    with pytest.raises(ConfigError, match="warmup_steps must be in"):
        make_trainer(tmp_path, warmup_steps=50, max_steps=20)


def test_lr_schedules():
    cosine = LRSchedule("cosine", 1.0, total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    linear = LRSchedule("linear", 1.0, total_steps=100, warmup_steps=0, min_ratio=0.0)
    assert linear(50) == pytest.approx(0.5)
    assert LRSchedule("constant", 2.0, total_steps=10, warmup_steps=2)(9) == 2.0
    with pytest.raises(ValueError, match="Unknown learning-rate schedule"):
        LRSchedule("step", 1.0, 10)


def test_custom_metric_from_registry_and_exact_values():
    @register_metric("test_top2_accuracy")
    def top2(logits, targets):
        hit = (logits.topk(2, dim=-1).indices == targets.unsqueeze(-1)).any(-1)
        return hit.sum(), torch.tensor(targets.numel())

    class Uniform(torch.nn.Module):
        def forward(self, idx, targets=None):
            logits = torch.zeros(*idx.shape, 8)
            logits[..., 3] = 1.0
            logits[..., 5] = 0.5
            return logits, None

    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "targets": torch.tensor([[3, 5, 1, 3]] * 2)}]
    out = evaluate(Uniform(), batches, num_batches=1, metrics=["loss", "perplexity", "token_accuracy",
                                                                "test_top2_accuracy"])
    log_z = math.log(math.e + math.exp(0.5) + 6)
    expected_loss = ((log_z - 1) * 2 + (log_z - 0.5) + log_z) / 4
    assert out["loss"] == pytest.approx(expected_loss)
    assert out["perplexity"] == pytest.approx(math.exp(expected_loss))
    assert out["token_accuracy"] == pytest.approx(0.5) and out["test_top2_accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="Unknown metric 'nope'"):
        evaluate(Uniform(), batches, num_batches=1, metrics=["nope"])


def test_mlflow_sqlite_store_in_run_dir(tmp_path):
    make_trainer(tmp_path, max_steps=2, mlflow=True).fit()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("codex_ml").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "val/loss")]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts stay in the run directory


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from codex_ml.checkpoint import CheckpointError, core, verify_checkpoint

    real_save = core.save_checkpoint
    saves = []

    def save_or_fail(path, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            def full_disk(file, data):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(core, "_write_bytes", full_disk)
        return real_save(path, **kwargs)

    monkeypatch.setattr(core, "save_checkpoint", save_or_fail)
    with pytest.raises(CheckpointError, match="No space left on device.*Earlier checkpoints are intact"):
        make_trainer(tmp_path, checkpoint_every=2).fit()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    verify_checkpoint(latest_valid_checkpoint(tmp_path))


def test_keep_freed_cpu_memory_avoids_page_faults_on_reallocation():
    """After keep_freed_cpu_memory(), a 64 MiB tensor freed and allocated again reuses resident pages; glibc's
    default unmaps it on free, so filling each new one page-faults all 16,384 pages in again."""
    import platform
    import resource

    from codex_ml.training.setup import keep_freed_cpu_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt settings are glibc's; this C library is " + (platform.libc_ver()[0] or "unknown"))

    def faults_of_a_fresh_64mib_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_cpu_memory()
    # The heap may grow a few times first (a small allocation in between can take the start of a freed block);
    # then the blocks are reused. With glibc's default every one of them faults all its pages in.
    faults = [faults_of_a_fresh_64mib_tensor() for _ in range(20)]
    assert sum(faults[10:]) < 2 * 16384, faults


def test_fsdp_on_the_cpu_returns_freed_blocks_to_the_system():
    """Under FSDP the allocator gives blocks of 256 KiB and more back when they are freed (each block's gathered
    parameters are freed within the step; kept, they would grow the resident set back towards an unsharded
    copy): a freed 8 MiB tensor leaves the resident set, so a new one faults its pages in again, and so does a
    768 KiB one (an activation of a few hundred tokens: kept in the heap, such blocks let gathered parameters and
    gradients fill the holes they leave, and the heap grows by them). Unsharded training keeps them. Process-wide
    settings, so each case runs in a fresh interpreter."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt settings are glibc's; this C library is " + (platform.libc_ver()[0] or "unknown"))
    program = """
import resource, sys, torch
from codex_ml.training.setup import configure_cpu_allocator
print(configure_cpu_allocator(True, sys.argv[1]))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(int(sys.argv[2]), dtype=torch.float32).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[10:]))
"""
    def run(parallelism: str, pages: int) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", program, parallelism, str(pages * 1024)], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    for pages in (2048, 192):  # 8 MiB, 768 KiB
        setting, faults = run("fsdp", pages)
        assert setting == "return_freed" and faults >= 10 * pages * 0.9, (pages, setting, faults)
    setting, faults = run("ddp", 2048)
    assert setting == "keep_freed" and faults < 2 * 2048, (setting, faults)


def test_bad_metric_names_and_log_every_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="Unknown metric 'bogus'"):
        make_trainer(tmp_path, metrics=("loss", "bogus"))
    with pytest.raises(ConfigError, match="log_every must be a positive integer"):
        make_trainer(tmp_path, log_every=0)


def test_an_mlflow_failure_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    import mlflow

    real, calls = mlflow.log_metrics, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", flaky)
    result = make_trainer(tmp_path, max_steps=4, mlflow=True, checkpoint_every=2).fit()
    assert result.status == "finished" and result.step == 4 and len(calls) == 2  # MLflow off after the failure
    assert [r["step"] for r in _records(tmp_path, "train")] == [1, 2, 3, 4]  # the files have every step
    assert [r["event"] for r in _records(tmp_path, "event") if r["event"] == "mlflow_disabled"] == ["mlflow_disabled"]
    assert latest_valid_checkpoint(tmp_path).name == "step_00000004"


def test_a_signal_during_the_last_step_still_finishes_the_run(tmp_path):
    class SignalAtLastStep(TinyLM):
        def forward(self, idx, targets=None):
            out = super().forward(idx, targets)
            if targets is not None and self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

    result = make_trainer(tmp_path, model=SignalAtLastStep(TinyConfig()), max_steps=3, eval_batches=0).fit()
    assert result.status == "finished" and result.step == 3 and result.last_checkpoint is not None


def test_evaluate_takes_no_batch_beyond_those_it_uses():
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 4), None

    batches = iter([{"input_ids": torch.zeros(1, 3, dtype=torch.long), "targets": torch.zeros(1, 3, dtype=torch.long)}
                    for _ in range(6)])
    evaluate(Uniform(), batches, num_batches=2, metrics=["loss"])
    assert len(list(batches)) == 4


@pytest.mark.parametrize("options, message", [
    ({"clip_grad_norm": -1.0}, r"Trainer.clip_grad_norm = -1.0 must be None or a number >= 0"),
    ({"clip_grad_norm": float("nan")}, r"Trainer.clip_grad_norm = nan must be None"),
    ({"min_lr_ratio": -2.0}, r"Trainer.min_lr_ratio = -2.0 must be a number in \[0, 1\]"),
    ({"min_lr_ratio": 5.0}, r"Trainer.min_lr_ratio = 5.0 must be"),
    ({"learning_rate": -1.0}, r"Trainer.learning_rate = -1.0 must be a finite number >= 0"),
    ({"learning_rate": float("inf")}, r"Trainer.learning_rate = inf must be"),
    ({"optimizer": "adafactor", "learning_rate": -1.0}, r"Trainer.learning_rate = -1.0"),
    ({"betas": (0.9,)}, r"Trainer.betas = \(0.9,\) must be two numbers in \[0, 1\)"),
    ({"betas": (0.9, 0.95, 0.99)}, r"Trainer.betas = \(0.9, 0.95, 0.99\) must be two"),
    ({"betas": (1.5, 0.9)}, r"Trainer.betas = \(1.5, 0.9\) must be two"),
    ({"optimizer": "sgd", "momentum": -1.0}, r"Trainer.momentum = -1.0 must be a number in \[0, 1\)"),
    ({"weight_decay": -0.1}, r"Trainer.weight_decay = -0.1 must be a finite number >= 0"),
    ({"eval_every": -1}, r"Trainer.eval_every = -1 must be an integer >= 0 \(0: evaluate at the end only\)"),
    ({"checkpoint_every": -2}, r"Trainer.checkpoint_every = -2 must be an integer >= 0"),
    ({"system_metrics_every": -1}, r"Trainer.system_metrics_every = -1 must be an integer >= 0"),
    ({"eval_batches": -1}, r"Trainer.eval_batches = -1 must be an integer >= 0 \(0: no evaluation\)"),
    ({"max_consecutive_nonfinite": -1}, r"Trainer.max_consecutive_nonfinite = -1 must be an integer >= 0"),
    ({"peak_flops_per_device": 0.0}, r"Trainer.peak_flops_per_device = 0.0 must be None"),
    ({"metrics": ()}, r"Trainer.metrics is empty but evaluation is on"),
    ({"device": "foo"}, r"Trainer.device='foo' is not a device: use cpu, cuda, cuda:N or auto"),
    ({"device": "cuda:7"}, r"Trainer.device='cuda:7' but "),  # no CUDA here, or fewer than 8 devices
    ({"seed": -1}, r"The seed \(train.seed\) must be an integer in \[0, 2\*\*63\), got -1"),
    ({"seed": 2**63}, r"The seed \(train.seed\) must be an integer in \[0, 2\*\*63\), got 9223372036854775808"),
])
def test_nonsense_numbers_and_devices_are_config_errors_before_anything_is_written(tmp_path, options, message):
    """Each of these used to train silently in the wrong direction (negative clip norm or learning rate), to be
    ignored, or to fail with torch's or numpy's own text (or a traceback) at the first step."""
    with pytest.raises(ConfigError, match=message):
        make_trainer(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_the_edges_of_the_valid_ranges_are_accepted(tmp_path):
    for options in ({"clip_grad_norm": 0.0}, {"clip_grad_norm": None}, {"min_lr_ratio": 0.0}, {"min_lr_ratio": 1.0},
                    {"learning_rate": 0.0}, {"betas": [0.0, 0.999]}, {"optimizer": "sgd", "momentum": 0.0},
                    {"weight_decay": 0.0}, {"eval_every": 0, "checkpoint_every": 0, "system_metrics_every": 0,
                                            "max_consecutive_nonfinite": 0}, {"eval_batches": 0, "metrics": ()},
                    {"seed": 2**63 - 1}):
        make_trainer(tmp_path / "run", **options)


def test_a_cuda_index_beyond_the_devices_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"Trainer.device='cuda:3' but this machine has 1 CUDA device\(s\): use "
                                          r"cuda:0 to cuda:0, or auto"):
        make_trainer(tmp_path, device="cuda:3")


def test_world_size_without_torchrun_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 and RANK=0 are set but MASTER_ADDR and MASTER_PORT not: "
                                          r"launch multi-process training with torchrun"):
        make_trainer(tmp_path)


def test_a_val_split_too_small_for_a_batch_is_a_data_error_before_training(tmp_path):
    import numpy as np

    from codex_ml.data import BatchIterator, DataError

    class TinyValSplit(StandinData):
        def batches(self, split, **kwargs):
            if split == "val":  # the real iterator over a val split of 10 tokens
                return BatchIterator(np.arange(10), split="val", **kwargs)
            return super().batches(split, **kwargs)

    with pytest.raises(DataError, match=r"Evaluation is on \(Trainer.eval_batches = 2\) but split 'val' has 10 tokens: "
                                        r"too few for one batch.*or set Trainer.eval_batches = 0 to train without"):
        make_trainer(tmp_path / "run", data=TinyValSplit())
    assert not (tmp_path / "run").exists()
    assert make_trainer(tmp_path / "run", data=TinyValSplit(), eval_batches=0, max_steps=2).fit().step == 2


def test_the_max_seq_len_of_a_model_without_one_in_its_config_is_enforced(tmp_path):
    model = TinyLM(TinyConfig())
    model.max_seq_len = 8  # as HFCausalLM has it (from max_position_embeddings); its HFModelConfig has none
    with pytest.raises(ConfigError, match=r"Trainer.seq_len = 16 exceeds the model's max_seq_len = 8"):
        make_trainer(tmp_path, model=model)


def test_train_checks_the_seed_and_the_model_config_type_before_preparing_data(tmp_path):
    from codex_ml.models.gpt import GPT, GPTConfig
    from codex_ml.models.hf import HFCausalLM, HFModelConfig
    from codex_ml.training import TrainerConfig, setup_process
    from codex_ml.training.experiment import train as train_experiment

    config = TrainerConfig(device="cpu", mlflow=False)
    process = setup_process(config)

    def train(run_dir, **kwargs):
        return train_experiment(run_dir, config=config, process=process, **kwargs)

    def no_data(**kwargs):
        raise AssertionError("the data was prepared before the configuration was checked")

    with pytest.raises(ConfigError, match=r"The seed \(train.seed\) must be an integer in \[0, 2\*\*63\), got -1"):
        train(tmp_path, seed=-1, data_fn=no_data, model_fn=GPT, model_config=GPTConfig())
    with pytest.raises(ConfigError, match=r"must be an integer in \[0, 2\*\*63\), got 1180591620717411303424"):
        train(tmp_path, seed=2**70, data_fn=no_data, model_fn=GPT, model_config=GPTConfig())
    with pytest.raises(ConfigError, match=r"train.model_fn = @GPT needs train.model_config = @GPTConfig\(\), but it "
                                          r"is a HFModelConfig: bind a matching pair"):
        train(tmp_path, data_fn=no_data, model_fn=GPT, model_config=HFModelConfig())
    with pytest.raises(ConfigError, match=r"train.model_fn = @HFCausalLM needs train.model_config = "
                                          r"@HFModelConfig\(\), but it is a GPTConfig"):
        train(tmp_path, data_fn=no_data, model_fn=HFCausalLM, model_config=GPTConfig())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_training_does_not_run_on_is_a_config_error(tmp_path, device):
    with pytest.raises(ConfigError, match=rf"Trainer.device='{device}': training runs on cpu, cuda, cuda:N or auto"):
        make_trainer(tmp_path / "run", device=device)
    assert not (tmp_path / "run").exists()


def test_eval_batches_beyond_the_val_split_evaluate_each_batch_once(tmp_path, capsys):
    import numpy as np

    from codex_ml.data import BatchIterator

    val_tokens = np.random.default_rng(0).integers(0, 32, 3 * 4 * 16 + 1)  # three batches of 4 x 16

    class SmallValSplit(StandinData):
        def batches(self, split, **kwargs):
            if split == "val":
                return BatchIterator(val_tokens, split="val", **kwargs)
            return super().batches(split, **kwargs)

    trainer = make_trainer(tmp_path, data=SmallValSplit(), eval_batches=5, max_steps=2)
    assert ("Note: Trainer.eval_batches = 5 but the val split holds 3 batch(es) of this size: evaluating on those 3, "
            "each once.") in capsys.readouterr().out
    once = evaluate(trainer.model, BatchIterator(val_tokens, split="val", batch_size=4, seq_len=16, seed=0),
                    num_batches=3, metrics=["loss"])
    assert trainer.evaluate()["loss"] == pytest.approx(once["loss"], rel=1e-6)


def test_mlflow_telemetry_is_off_when_the_trainer_imports_mlflow(tmp_path):
    """MLflow decides at its first import whether to start its telemetry client: the variables must be set before
    any import of it, here the one in Trainer.__init__ (a process with none of them set, and no CI marker)."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\n"
              "from standins import make_trainer\n"
              "make_trainer(sys.argv[1], mlflow=True)\n"
              "import mlflow.telemetry\n"
              "from mlflow.telemetry.utils import is_telemetry_disabled\n"
              "print(mlflow.telemetry.get_telemetry_client() is None, is_telemetry_disabled())\n")
    markers = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "TF_BUILD",
               "JENKINS_URL", "BUILDKITE", "GITLAB_CI", "TRAVIS", "CIRCLECI")
    env = {k: v for k, v in os.environ.items() if k not in markers}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"], proc.stdout


def test_a_full_disk_for_the_metrics_files_warns_and_training_goes_on(tmp_path, caplog):
    """metrics.ndjson on /dev/full: every write fails with ENOSPC, as on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / "metrics.ndjson").symlink_to("/dev/full")
    result = make_trainer(tmp_path, max_steps=4, checkpoint_every=2).fit()
    assert result.status == "finished" and result.step == 4
    assert latest_valid_checkpoint(tmp_path).name == "step_00000004"
    warnings = [r.getMessage() for r in caplog.records if "Cannot write the metrics files" in r.getMessage()]
    assert len(warnings) == 1 and "incomplete from step 1 on" in warnings[0], warnings


def test_the_sample_printed_after_training_goes_through_the_secret_filter(tmp_path, monkeypatch, capsys):
    from codex_ml.training import TrainerConfig, experiment, setup_process

    class Tokenizer:
        vocab_size, eos_id = 32, 0

    data = StandinData()
    data.tokenizer = Tokenizer()
    secret = "AKIA" + "ABCDEFGHIJKLMNOP"
    monkeypatch.setattr(experiment, "sample_text", lambda *args, **kwargs: f"def f():\n    key = '{secret}'\n")
    config = TrainerConfig(device="cpu", mlflow=False, max_steps=1, batch_size=4, seq_len=16, eval_batches=0)
    experiment.train(tmp_path, config=config, process=setup_process(config), data_fn=lambda **kwargs: data,
                     model_fn=TinyLM, model_config=TinyConfig())
    out = capsys.readouterr().out
    assert "Sample from the trained model" in out and "def f():" in out
    assert secret not in out and "secret(s) withheld" in out
