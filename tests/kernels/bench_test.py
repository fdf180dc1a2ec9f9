"""The kernel benchmarks run (quick preset) and write their result file: the run's metadata and the rows."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
COMMON = {"kernel", "impl", "dtype", "pass", "time_ms", "peak_mem_mb", "ref_time_ms", "ref_peak_mem_mb"}
FIELDS = {
    "bench_linear_cross_entropy": COMMON | {"N", "H", "V", "floor_time_ms"},
    "bench_attention": COMMON | {"B", "H", "T", "D", "causal", "tflops"},
    "bench_layers": COMMON | {"shape", "ratio"},
}


@pytest.mark.parametrize("bench", sorted(FIELDS))
def test_quick_preset_writes_json_rows(bench, tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([str(RUNFILES / "kernels" / bench), "--preset=quick", f"--json={out}"],
                            capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    meta, rows = record["meta"], record["rows"]
    assert (meta["bench"], meta["preset"], meta["argv"]) == (bench, "quick", ["--preset=quick", f"--json={out}"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"]) and len(meta["load_avg"]) == 2
    assert meta["machine"]["cpu"] and meta["machine"]["cores"] >= 1 and meta["versions"]["torch"]
    assert rows
    for row in rows:
        assert FIELDS[bench] <= set(row), FIELDS[bench] - set(row)
        assert row["time_ms"] > 0 and row["ref_time_ms"] > 0
    assert "time_ms" in result.stdout  # the table
    if bench == "bench_linear_cross_entropy":  # codex_ml's kernel and the references a user would pick instead
        from codex_ml.kernels.bench.bench_linear_cross_entropy import CHUNKINGS, REFERENCES

        assert sorted((row["impl"], row["pass"]) for row in rows) == sorted(
            (impl, p) for impl in ("cpu", *REFERENCES) for p in ("fwd", "fwd+bwd"))
        for row in rows:
            assert (row["chunking"] in CHUNKINGS) if row["impl"] == "torch_chunked" else row["chunking"] is None


def test_paired_timing_alternates_and_reports_each_median():
    from codex_ml.kernels.bench import common

    calls = []
    ours, theirs = common.time_pair_ms(lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002)),
                                       repeats=5, warmup=1)
    assert calls == ["a", "b"] * 6  # one warm-up pair, then five timed pairs, alternating
    assert 0 <= ours < 1.0 <= 2.0 <= theirs


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_result_file_names_the_commit_and_a_modified_tree(tmp_path, monkeypatch):
    """The commit of the tree Bazel ran from (BUILD_WORKSPACE_DIRECTORY), "+dirty" once a tracked file changes;
    a new untracked file (such as the result file itself) leaves it clean."""
    from codex_ml.kernels.bench import record

    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("BUILD_WORKSPACE_DIRECTORY", str(tmp_path))
    (tmp_path / "result.json").write_text("{}")
    assert record.source_commit() == sha
    (tmp_path / "a.py").write_text("x = 2\n")
    assert record.source_commit() == sha + "+dirty"


def test_result_file_is_rewritten_with_every_call(tmp_path):
    from codex_ml.kernels.bench import record

    path = tmp_path / "sub" / "r.json"
    results = record.ResultFile(str(path), "bench_layers", "cpu", ["--preset=cpu"])
    results.write([{"case": 1}])
    assert json.loads(path.read_text())["rows"] == [{"case": 1}]
    results.write([{"case": 1}, {"case": 2}])
    written = json.loads(path.read_text())
    assert written["rows"] == [{"case": 1}, {"case": 2}] and written["meta"]["preset"] == "cpu"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no partial file left behind
    record.ResultFile(None, "bench_layers", "cpu", []).write([{"case": 1}])  # no --json: nothing written
