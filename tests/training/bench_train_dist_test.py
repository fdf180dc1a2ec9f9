"""bench_train --preset=dist_quick end to end: five distributed trainings (codex_ml DDP, FSDP2, FSDP2 with
activation checkpointing, the HF Trainer's FSDP2 as shipped and under codex_ml's process settings), each two
processes under torchrun on gloo, give one row each with memory per process, and agree on the losses (same
weights, same batches)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_train
from benchmarks.train_bench.dist import merge_ranks
from benchmarks.train_bench.spec import DIST_IMPLS, PRESETS, CorpusData, SyntheticCorpus

SPEC = PRESETS["dist_quick"]
FIELDS = {"impl", "settings", "parallelism", "activation_checkpointing", "world_size", "backend", "allocator",
          "cpu_gemm", "params", "seq_len", "batch", "steps", "timed_steps", "tokens_per_s", "tokens_per_s_median",
          "tokens_per_s_best", "peak_rss_mb", "peak_rss_mb_per_rank", "train_peak_rss_mb",
          "train_peak_rss_mb_per_rank", "base_rss_mb", "first_loss", "final_loss", "losses", "step_s", "threads",
          "wall_s", "load_avg_1m"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("bench_train_dist")
    json_path = home / "dist_quick.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--preset=dist_quick",
                           f"--json={json_path}"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(json_path.read_text()), proc.stdout


def test_one_row_per_training_with_memory_per_process(run):
    result, stdout = run
    assert (result["meta"]["bench"], result["meta"]["preset"]) == ("bench_train", "dist_quick")
    rows = result["rows"]
    assert [(row["settings"], row["impl"]) for row in rows] == [("as_shipped", impl) for impl in DIST_IMPLS] + [
        ("same_settings", "hf_trainer_fsdp")]
    assert [(row["parallelism"], row["activation_checkpointing"]) for row in rows] == [
        ("ddp", False), ("fsdp", False), ("fsdp", True), ("fsdp", False), ("fsdp", False)]
    # The HF Trainer's FSDP2 as shipped (glibc's defaults) and under codex_ml's FSDP allocator setting.
    assert [row["allocator"] for row in rows[3:]] == ["glibc_default", "return_freed"]
    for row in rows:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert (row["world_size"], row["backend"], row["threads"]) == (2, "gloo", 1)
        assert (row["steps"], row["batch"], row["seq_len"]) == (SPEC.steps, SPEC.batch, SPEC.seq_len)
        assert row["params"] == rows[0]["params"] > 0
        assert len(row["step_s"]) == row["timed_steps"] == SPEC.steps - SPEC.timing_warmup
        for key in ("tokens_per_s", "tokens_per_s_median", "tokens_per_s_best"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["impl"], key, row[key])
        assert row["tokens_per_s"] == pytest.approx(SPEC.batch * SPEC.seq_len * len(row["step_s"]) /
                                                    sum(row["step_s"]))
        for key in ("peak_rss_mb", "train_peak_rss_mb"):
            per_rank = row[f"{key}_per_rank"]
            assert len(per_rank) == 2 and all(100 < mb < 20_000 for mb in per_rank), (row["impl"], per_rank)
            assert row[key] == max(per_rank)
        assert row["peak_rss_mb"] >= row["train_peak_rss_mb"] >= row["base_rss_mb"] > 0
    by_impl = {row["impl"]: row for row in rows[:4]}
    for impl in ("codex_ml_fsdp", "codex_ml_fsdp_ac"):
        ours = by_impl[impl]
        for other in ("codex_ml_ddp", "hf_trainer_fsdp"):
            assert ours[f"speedup_vs_{other}"] == pytest.approx(ours["tokens_per_s"] / by_impl[other]["tokens_per_s"])
            assert ours[f"rss_ratio_vs_{other}"] == pytest.approx(ours["peak_rss_mb"] / by_impl[other]["peak_rss_mb"])
    assert not any(key.startswith("speedup_vs") for key in by_impl["hf_trainer_fsdp"])
    assert "peak_rss_mb_per_rank" in stdout and "2 processes each" in stdout


def test_same_problem_same_losses(run):
    """Same weights and global batches: every training's first loss agrees to float rounding, later ones closely
    (sharding and recomputation change only the order of float sums), and training lowers it."""
    rows = run[0]["rows"]
    for step in range(SPEC.steps):
        values = [row["losses"][step] for row in rows]
        assert all(math.isfinite(v) for v in values)
        assert max(values) - min(values) < (1e-4 if step == 0 else 1e-2), (step, values)
    assert all(row["final_loss"] == row["losses"][-1] < row["first_loss"] - 0.3 for row in rows)


def test_processes_together_read_the_global_batch():
    """Process r of 2 reads rows [2r, 2r + 2) of each global batch of 4: together what one process reads."""
    spec = dataclasses.replace(SPEC, steps=3)
    data = CorpusData(SyntheticCorpus(spec))
    one = data.batches("train", batch_size=4, seq_len=spec.seq_len, seed=0)
    two = [data.batches("train", batch_size=2, seq_len=spec.seq_len, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(spec.steps):
        whole, parts = next(one), [next(b) for b in two]
        for key in ("input_ids", "targets"):
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))
    with pytest.raises(ValueError, match="another batch, sequence length or process count"):
        data.batches("train", batch_size=4, seq_len=spec.seq_len, seed=0, rank=0, world_size=2)


def test_a_step_lasts_until_its_slowest_process_finishes_it():
    ranks = [{"step_s": [1.0, 2.0, 1.0], "peak_rss_mb": 500.0, "train_peak_rss_mb": 450.0, "base_rss_mb": 300.0,
              "peak_gpu_mb": None, "losses": [6.0, 5.0], "params": 10, "allocator": "keep_freed",
              "cpu_gemm": "aten", "threads": 1, "load_avg_1m": [1.0, 2.0]},
             {"step_s": [2.0, 1.0, 1.0], "peak_rss_mb": 400.0, "train_peak_rss_mb": 460.0, "base_rss_mb": 310.0,
              "peak_gpu_mb": None, "losses": [6.0, 5.0], "params": 10, "allocator": "keep_freed",
              "cpu_gemm": "aten", "threads": 1, "load_avg_1m": [0.5, 3.0]}]
    row = merge_ranks("codex_ml_fsdp", "as_shipped", SPEC, ranks, wall_s=9.0)
    assert row["step_s"] == [2.0, 2.0, 1.0]
    assert row["tokens_per_s"] == pytest.approx(SPEC.batch * SPEC.seq_len * 3 / 5.0)
    assert row["tokens_per_s_best"] == pytest.approx(SPEC.batch * SPEC.seq_len / 1.0)
    assert (row["peak_rss_mb"], row["peak_rss_mb_per_rank"]) == (500.0, [500.0, 400.0])
    assert (row["train_peak_rss_mb"], row["base_rss_mb"], row["load_avg_1m"]) == (460.0, 310.0, [0.5, 3.0])
    assert (row["parallelism"], row["activation_checkpointing"], row["peak_gpu_mb"]) == ("fsdp", False, None)


@pytest.mark.parametrize("flag, message", [
    ("--impls=codex_ml", "--impls must name some of codex_ml_ddp, codex_ml_fsdp, codex_ml_fsdp_ac, "
                         "hf_trainer_fsdp, got 'codex_ml'"),
    ("--settings=bogus", "--settings must name some of as_shipped, same_settings, got 'bogus'"),
])
def test_bad_flags_of_a_distributed_preset_are_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--preset=dist_quick", flag])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"bench_train: error: {message} (see bench_train --help)\n"


@pytest.mark.parametrize("available, count, message", [
    (False, 0, "--preset=dist_gpu needs a CUDA device and none is available"),
    (True, 2, "--preset=dist_gpu needs 8 CUDA devices and this machine has 2"),
])
def test_the_gpu_preset_needs_its_gpus(available, count, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--preset=dist_gpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"bench_train: error: {message} (see bench_train --help)\n"
