"""bench_train --preset=quick end to end: the result file (metadata and six rows: three implementations under two
settings), the PNG, and the implementations agreeing.

One run as `bazel run` makes it (BUILD_WORKING_DIRECTORY set, no --json), so the default output paths are
checked too. The implementations start from the same weights and read the same batches, so their losses must
agree step by step, and fall.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import bench_train
from benchmarks.train_bench.spec import IMPLS, PRESETS, SETTINGS

FIELDS = {"impl", "settings", "allocator", "cpu_gemm", "params", "seq_len", "batch", "steps", "tokens_per_s",
          "peak_rss_mb", "final_loss", "first_loss", "losses", "train_peak_rss_mb", "tokens_per_s_median", "threads",
          "plain_loss"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("bench_train")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), BUILD_WORKING_DIRECTORY=str(home))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--preset=quick"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    json_path = home / "runs" / "bench_train" / "quick.json"
    return json.loads(json_path.read_text()), json_path.with_suffix(".png"), proc.stdout


def test_result_file_metadata(run):
    meta = run[0]["meta"]
    assert (meta["bench"], meta["preset"], meta["argv"]) == ("bench_train", "quick", ["--preset=quick"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"]), meta["date"]
    assert meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"]), meta["commit"]
    assert set(meta["machine"]) == {"cpu", "cores", "gpu", "hostname_hash"} and meta["machine"]["cores"] >= 1
    assert len(meta["load_avg"]) == 2 and all(x >= 0 for x in meta["load_avg"])
    assert set(meta["versions"]) == {"python", "torch", "triton", "transformers", "codex_ml"}
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and meta["versions"]["codex_ml"]


def test_six_rows_with_all_fields(run):
    rows = run[0]["rows"]
    assert [(row["settings"], row["impl"]) for row in rows] == [(s, i) for s in SETTINGS for i in IMPLS]
    spec = PRESETS["quick"]
    for row in rows:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert (row["steps"], row["batch"], row["seq_len"]) == (spec.steps, spec.batch, spec.seq_len)
        assert row["params"] == rows[0]["params"] > 0
        for key in ("tokens_per_s", "tokens_per_s_median", "peak_rss_mb", "train_peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["impl"], key, row[key])
        assert row["peak_rss_mb"] >= row["train_peak_rss_mb"]
        assert len(row["losses"]) == spec.steps and all(math.isfinite(x) for x in row["losses"])
        assert row["final_loss"] == row["losses"][-1]
        assert row["plain_loss"] == ("torch_chunked" if row["impl"] == "plain_torch" else None)
    for settings in SETTINGS:
        codex = next(row for row in rows if row["settings"] == settings and row["impl"] == "codex_ml")
        for other in ("hf_trainer", "plain_torch"):
            mate = next(row for row in rows if row["settings"] == settings and row["impl"] == other)
            assert codex[f"speedup_vs_{other}"] == pytest.approx(codex["tokens_per_s"] / mate["tokens_per_s"])
            assert codex[f"rss_ratio_vs_{other}"] == pytest.approx(codex["peak_rss_mb"] / mate["peak_rss_mb"])
    stdout = run[2]
    assert "as shipped (as_shipped)" in stdout and "same process settings (same_settings)" in stdout
    assert stdout.count("speedup_vs_hf_trainer") == 2 and "tokens_per_s" in stdout


def test_process_settings_of_each_comparison(run):
    """as_shipped: only codex_ml keeps freed blocks, its products go where its kernels choose; same_settings: all
    three keep freed blocks and use ATen's products."""
    rows = {(row["settings"], row["impl"]): row for row in run[0]["rows"]}
    glibc = rows[("same_settings", "plain_torch")]["allocator"]  # "glibc_default" only where libc is not glibc
    assert glibc in ("keep_freed", "glibc_default")
    for impl in IMPLS:
        assert rows[("same_settings", impl)]["allocator"] == glibc
        assert rows[("same_settings", impl)]["cpu_gemm"] == "aten"
    assert rows[("as_shipped", "codex_ml")]["allocator"] == glibc
    assert rows[("as_shipped", "codex_ml")]["cpu_gemm"] in ("aten", "onednn")
    for impl in ("hf_trainer", "plain_torch"):
        assert rows[("as_shipped", impl)]["allocator"] == "glibc_default"
        assert rows[("as_shipped", impl)]["cpu_gemm"] == "aten"


def test_png_written(run):
    _, png, _ = run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_same_problem_same_losses(run):
    """Same weights and batches: the first loss agrees to float rounding (about ln V at this init), later ones
    closely, and training lowers it."""
    rows = run[0]["rows"]
    first = [row["losses"][0] for row in rows]
    assert max(first) - min(first) < 1e-4, first
    assert abs(first[0] - math.log(PRESETS["quick"].vocab_size)) < 0.3, first
    for step in range(len(rows[0]["losses"])):
        values = [row["losses"][step] for row in rows]
        assert max(values) - min(values) < 1e-2, (step, values)
    assert all(row["final_loss"] < row["first_loss"] - 0.5 for row in rows), [r["losses"] for r in rows]


def test_plain_losses_train_alike(monkeypatch):
    """The plain loop's two losses (PyTorch's chunked F.linear_cross_entropy, F.cross_entropy on the full logits)
    give the same losses step by step from the same weights and batches, and each runs the loss it names."""
    import torch

    chunked_calls = []
    chunked = torch.nn.functional.linear_cross_entropy
    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy",
                        lambda *args, **kwargs: chunked_calls.append(kwargs["options"]) or chunked(*args, **kwargs))

    from benchmarks.train_bench.runners import run_plain
    from benchmarks.train_bench.spec import SyntheticCorpus

    spec = dataclasses.replace(PRESETS["quick"], steps=3)
    corpus = SyntheticCorpus(spec)
    bench_train.save_init(spec, init := os.path.join(os.environ["TEST_TMPDIR"], "init.pt"))
    losses = {}
    for loss in ("torch_chunked", "full_logits"):
        run_spec = dataclasses.replace(spec, plain_loss=loss, threads=1)
        losses[loss] = run_plain(run_spec, corpus, torch.load(init, weights_only=True), "", None)["losses"]
        assert len(chunked_calls) == (spec.steps if loss == "torch_chunked" else 0)
        chunked_calls.clear()
    assert losses["torch_chunked"] == pytest.approx(losses["full_logits"], abs=1e-4)
    assert len(set(losses["full_logits"])) == spec.steps  # it trains


@pytest.mark.parametrize("flag, message", [
    ("--impls=codex_ml,bogus", "--impls must name some of codex_ml, hf_trainer, plain_torch, got 'codex_ml,bogus'"),
    ("--settings=", "--settings must name some of as_shipped, same_settings, got ''"),
    ("--steps=2", "--steps must exceed the 2 untimed warmup steps"),
    ("--plain_loss=bogus", "flag --plain_loss=bogus: value should be one of <torch_chunked|full_logits>"),
])
def test_bad_flags_are_one_line_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main([flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"bench_train: error: {message} (see bench_train --help)\n"
