"""The kernel benchmarks run (quick preset) and write the JSON rows the issues specify."""

import json
import os
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
    rows = json.loads(out.read_text())
    assert rows
    for row in rows:
        assert FIELDS[bench] <= set(row), FIELDS[bench] - set(row)
        assert row["time_ms"] > 0 and row["ref_time_ms"] > 0
    assert "time_ms" in result.stdout  # the table


def test_paired_timing_alternates_and_reports_each_median():
    from codex_ml.kernels.bench import common

    calls = []
    ours, theirs = common.time_pair_ms(lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002)),
                                       repeats=5, warmup=1)
    assert calls == ["a", "b"] * 6  # one warm-up pair, then five timed pairs, alternating
    assert 0 <= ours < 1.0 <= 2.0 <= theirs
