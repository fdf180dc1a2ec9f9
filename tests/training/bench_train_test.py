"""bench_train --preset=quick end to end: three JSON rows, the PNG, and the three implementations agreeing.

One run as `bazel run` makes it (BUILD_WORKING_DIRECTORY set, no --json), so the default output paths are
checked too. The three implementations start from the same weights and read the same batches, so their
losses must agree step by step, and fall.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from codex_ml.cli import bench_train

FIELDS = {"impl", "params", "seq_len", "batch", "steps", "tokens_per_s", "peak_rss_mb", "final_loss", "first_loss",
          "losses", "train_peak_rss_mb", "tokens_per_s_median", "threads"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("bench_train")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), BUILD_WORKING_DIRECTORY=str(home))
    proc = subprocess.run([sys.executable, "-m", "codex_ml.cli.bench_train", "--preset=quick"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    json_path = home / "runs" / "bench_train" / "quick.json"
    return json.loads(json_path.read_text()), json_path.with_suffix(".png"), proc.stdout


def test_three_rows_with_all_fields(run):
    rows, _, stdout = run
    assert [row["impl"] for row in rows] == ["codex_ml", "hf_trainer", "plain_torch"]
    spec = bench_train.PRESETS["quick"]
    for row in rows:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert (row["steps"], row["batch"], row["seq_len"]) == (spec.steps, spec.batch, spec.seq_len)
        assert row["params"] == rows[0]["params"] > 0
        for key in ("tokens_per_s", "tokens_per_s_median", "peak_rss_mb", "train_peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["impl"], key, row[key])
        assert row["peak_rss_mb"] >= row["train_peak_rss_mb"]
        assert len(row["losses"]) == spec.steps and all(math.isfinite(x) for x in row["losses"])
        assert row["final_loss"] == row["losses"][-1]
    codex = rows[0]
    for other in ("hf_trainer", "plain_torch"):
        assert codex[f"speedup_vs_{other}"] > 0 and codex[f"rss_ratio_vs_{other}"] > 0
    assert "speedup_vs_hf_trainer" in stdout and "tokens_per_s" in stdout


def test_png_written(run):
    _, png, _ = run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_same_problem_same_losses(run):
    """Same weights and batches: the first loss agrees to float rounding (about ln V at this init), later ones
    closely, and training lowers it."""
    rows, _, _ = run
    first = [row["losses"][0] for row in rows]
    assert max(first) - min(first) < 1e-4, first
    assert abs(first[0] - math.log(bench_train.PRESETS["quick"].vocab_size)) < 0.3, first
    for step in range(len(rows[0]["losses"])):
        values = [row["losses"][step] for row in rows]
        assert max(values) - min(values) < 1e-2, (step, values)
    assert all(row["final_loss"] < row["first_loss"] - 0.5 for row in rows), [r["losses"] for r in rows]


def test_bad_impls_flag_is_refused():
    with pytest.raises(SystemExit, match="--impls"):
        bench_train.main(["--impls=codex_ml,bogus"])
