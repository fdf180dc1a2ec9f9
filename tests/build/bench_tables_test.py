"""The figure tables of README.md and docs/benchmarks.md are what tools/bench_tables.py renders from the committed
result files in benchmarks/results/, and the renderer computes each ratio from the rows of one file."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
_spec = importlib.util.spec_from_file_location("bench_tables", RUNFILES / "tools" / "bench_tables.py")
bench_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tables)

META = {"bench": "bench_train", "preset": "cpu", "argv": ["--preset=cpu"], "commit": "0123abc",
        "date": "2026-12-02T09:30:00Z", "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None, "hostname_hash": None},
        "load_avg": [1.25, 1.75], "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}}


def _train_row(impl: str, settings: str, tokens_per_s: float, rss: float) -> dict:
    return {"impl": impl, "settings": settings, "tokens_per_s": tokens_per_s, "tokens_per_s_median": tokens_per_s,
            "peak_rss_mb": rss, "final_loss": 5.235}


def _write(root: Path, name: str, meta: dict, rows: list[dict]) -> Path:
    path = root / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _train_rows() -> list[dict]:
    return [_train_row("codex_ml", "as_shipped", 1300.0, 1000.0),
            _train_row("hf_trainer", "as_shipped", 1000.0, 2000.0),
            _train_row("plain_torch", "as_shipped", 1040.0, 2100.0),
            _train_row("codex_ml", "same_settings", 1200.0, 1100.0),
            _train_row("hf_trainer", "same_settings", 1000.0, 2000.0),
            _train_row("plain_torch", "same_settings", 960.0, 2100.0)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _write(tmp_path, "bench_train-cpu", META, _train_rows())
    (tmp_path / "README.md").write_text(
        "# x\n\n<!-- bench:bench_train-cpu:headline -->\n<!-- /bench -->\n\nprose stays\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text(
        "<!-- bench:bench_train-cpu -->\nold text\n<!-- /bench -->\n"
        "<!-- bench:bench_attention-gpu -->\n<!-- /bench -->\n")
    return tmp_path


def _check(root: Path) -> int:
    return bench_tables.main(["--check", "--root", str(root)])


def test_committed_tables_match_the_result_files(capsys):
    """The real pages and benchmarks/results/: run `python3 tools/bench_tables.py` when this fails."""
    assert _check(RUNFILES) == 0, capsys.readouterr().err


def test_the_pages_carry_the_tables():
    readme = (RUNFILES / "README.md").read_text()
    benchmarks = (RUNFILES / "docs" / "benchmarks.md").read_text()
    assert "<!-- bench:bench_train-cpu:headline -->" in readme
    for name in ("bench_train-cpu", "bench_train-dist", "bench_linear_cross_entropy-cpu", "bench_attention-cpu",
                 "bench_layers-cpu"):
        assert f"<!-- bench:{name} -->" in benchmarks


def test_rewrite_then_check_passes(root: Path):
    assert _check(root) == 1
    assert bench_tables.main(["--root", str(root)]) == 0
    assert _check(root) == 0
    readme = (root / "README.md").read_text()
    assert "prose stays" in readme
    # Both settings, each ratio from its own group of rows of the one file.
    assert "- as shipped: 1.30x the HF Trainer's tokens/s at 0.50x its peak memory, 1.25x the plain loop's " \
           "tokens/s;" in readme
    assert "- same process settings: 1.20x the HF Trainer's tokens/s at 0.55x its peak memory, 1.25x the plain " \
           "loop's tokens/s." in readme
    assert "_Measured 2026-12-02T09:30:00Z on Test CPU, 2 cores, no GPU; commit 0123abc; load average 1.2 → 1.8" \
        in readme
    benchmarks = (root / "docs" / "benchmarks.md").read_text()
    assert "old text" not in benchmarks
    assert "| same process settings | codex_ml | 1,200 | 1,200 | 1,100 | 5.2350 | 1.20x | 0.55x | 1.25x |" \
        in benchmarks
    assert "_No result file yet: run `tools/bazel run //kernels:bench_attention -- --preset=gpu " \
           "--json=$PWD/benchmarks/results/bench_attention-gpu.json`" in benchmarks


def test_an_indented_marker_indents_its_table(root: Path):
    (root / "README.md").write_text("- item:\n  <!-- bench:bench_train-cpu:headline -->\n  <!-- /bench -->\n- next\n")
    assert bench_tables.main(["--root", str(root)]) == 0
    lines = (root / "README.md").read_text().splitlines()
    assert lines[1:4] == ["  <!-- bench:bench_train-cpu:headline -->",
                          "  - as shipped: 1.30x the HF Trainer's tokens/s at 0.50x its peak memory, 1.25x the plain "
                          "loop's tokens/s;",
                          "  - same process settings: 1.20x the HF Trainer's tokens/s at 0.55x its peak memory, "
                          "1.25x the plain loop's tokens/s."]
    assert lines[4] == "" and lines[5].startswith("  _Measured ") and lines[6:] == ["  <!-- /bench -->", "- next"]
    assert _check(root) == 0


def test_a_changed_figure_fails_the_check(root: Path, capsys):
    bench_tables.main(["--root", str(root)])
    rows = _train_rows()
    rows[1]["tokens_per_s"] = 1100.0  # the HF Trainer, as shipped
    _write(root, "bench_train-cpu", META, rows)
    assert _check(root) == 1
    err = capsys.readouterr().err
    assert "README.md: table bench:bench_train-cpu:headline differs" in err
    assert "docs/benchmarks.md: table bench:bench_train-cpu differs" in err


def test_a_hand_edited_table_fails_the_check(root: Path):
    bench_tables.main(["--root", str(root)])
    page = root / "docs" / "benchmarks.md"
    page.write_text(page.read_text().replace("1.30x", "1.40x"))
    assert _check(root) == 1


def test_a_new_result_file_fails_the_check_until_rendered(root: Path):
    bench_tables.main(["--root", str(root)])
    _write(root, "bench_attention-gpu", {**META, "bench": "bench_attention", "preset": "gpu"}, [
        {"kernel": "attention", "impl": "triton", "B": 1, "H": 8, "T": 2048, "D": 64, "dtype": "bfloat16",
         "causal": True, "pass": "fwd", "time_ms": 2.0, "ref_time_ms": 2.5, "tflops": 100.0, "peak_mem_mb": 1.0,
         "ref_peak_mem_mb": 1.0}])
    assert _check(root) == 1
    bench_tables.main(["--root", str(root)])
    assert "| triton | 1 × 8 × 2048 × 64 | bfloat16 | yes | fwd | 2.00 | 2.50 | 0.80x |" in \
        (root / "docs" / "benchmarks.md").read_text()


def test_a_further_run_of_a_preset_has_its_own_file_and_table(root: Path):
    """bench_train-cpu.2 is a second run of the cpu preset: its own result file, its own table, the cpu command."""
    page = root / "docs" / "benchmarks.md"
    page.write_text(page.read_text() + "<!-- bench:bench_train-cpu.2 -->\n<!-- /bench -->\n")
    bench_tables.main(["--root", str(root)])
    assert "--preset=cpu --json=$PWD/benchmarks/results/bench_train-cpu.2.json" in page.read_text()
    rows = _train_rows()
    rows[0]["tokens_per_s"] = 1500.0
    _write(root, "bench_train-cpu.2", META, rows)
    assert _check(root) == 1
    bench_tables.main(["--root", str(root)])
    text = page.read_text()
    assert "benchmarks/results/bench_train-cpu.2.json" in text and "1,500" in text and "1,300" in text


def test_kernel_ratios_come_from_each_row():
    rows = [{"impl": "cpu", "N": 8, "H": 4, "V": 16, "dtype": "float32", "pass": "fwd", "time_ms": 3.0,
             "ref_time_ms": 4.0, "floor_time_ms": 2.5, "compiled_ref_time_ms": None, "peak_mem_mb": 32.0,
             "ref_peak_mem_mb": 2048.0}]
    table = bench_tables.linear_cross_entropy_table({"meta": META, "rows": rows})
    assert "| cpu | 8 × 4 × 16 | float32 | fwd | 3.00 | 4.00 | – | 2.50 | 0.75x | 1.20x | 32.0 | 2,048 |" in table
    layers = bench_tables.layers_table({"meta": META, "rows": [
        {"kernel": "rms_norm", "impl": "cpu", "shape": "[4, 512, 384]", "dtype": "float32", "pass": "fwd+bwd",
         "time_ms": 3.5, "ref_time_ms": 17.5, "peak_mem_mb": 5.9, "ref_peak_mem_mb": 17.8}]})
    assert "| rms_norm | cpu | `[4, 512, 384]` | float32 | fwd+bwd | 3.50 | 17.5 | 0.20x | 5.90 | 17.8 |" in layers


def test_bad_markers_and_files_are_named(root: Path, capsys):
    (root / "README.md").write_text("<!-- bench:bench_nothing-cpu -->\n<!-- /bench -->\n")
    assert _check(root) == 2
    assert "table 'bench_nothing-cpu'" in capsys.readouterr().err
    (root / "README.md").write_text("<!-- bench:bench_train-cpu:plot -->\n<!-- /bench -->\n")
    assert _check(root) == 2
    assert "bench_train has the views headline, table" in capsys.readouterr().err
    (root / "README.md").write_text("<!-- bench:bench_train-cpu -->\n<!-- /bench -->\n")
    (root / "benchmarks" / "results" / "bench_train-cpu.json").write_text(json.dumps([{"impl": "codex_ml"}]))
    assert _check(root) == 2
    assert "expected an object with 'meta' and 'rows'" in capsys.readouterr().err


def _dist_row(impl: str, tokens_per_s: float, per_rank: list[float], final_loss: float) -> dict:
    return {"impl": impl, "settings": "as_shipped", "world_size": 2, "tokens_per_s": tokens_per_s,
            "tokens_per_s_median": tokens_per_s, "peak_rss_mb": max(per_rank), "peak_rss_mb_per_rank": per_rank,
            "peak_gpu_mb": None, "peak_gpu_mb_per_rank": None, "final_loss": final_loss}


def test_distributed_rows_render_per_process_memory_and_their_ratios(root: Path):
    """bench_train's dist presets: one line per training, memory per process, each codex_ml training's peak memory
    against codex_ml DDP's and its tokens/s and final loss against the HF Trainer's FSDP2, from the same file."""
    _write(root, "bench_train-dist", {**META, "preset": "dist"}, [
        _dist_row("codex_ml_ddp", 1000.0, [2000.0, 1900.0], 6.5),
        _dist_row("codex_ml_fsdp", 900.0, [1000.0, 1100.0], 6.5002),
        _dist_row("codex_ml_fsdp_ac", 600.0, [900.0, 880.0], 6.4999),
        _dist_row("hf_trainer_fsdp", 500.0, [1300.0, 1250.0], 6.5),
    ])
    (root / "docs" / "benchmarks.md").write_text("<!-- bench:bench_train-dist -->\n<!-- /bench -->\n")
    (root / "README.md").write_text("<!-- bench:bench_train-dist:headline -->\n<!-- /bench -->\n")
    assert _check(root) == 1
    assert bench_tables.main(["--root", str(root)]) == 0
    assert _check(root) == 0
    table = (root / "docs" / "benchmarks.md").read_text()
    assert "| settings | training | processes | tokens/s | median step tokens/s | peak RSS MB per process |" in table
    assert "| as shipped | codex_ml DDP | 2 | 1,000 | 1,000 | 2,000 / 1,900 | 6.5000 | – | 2.00x | 0.0000 |" in table
    assert "| as shipped | codex_ml FSDP2 | 2 | 900 | 900 | 1,000 / 1,100 | 6.5002 | 0.55x | 1.80x | 0.0002 |" in table
    assert "| as shipped | codex_ml FSDP2 + activation checkpointing | 2 | 600 | 600 | 900 / 880 | 6.4999 | 0.45x | " \
           "1.20x | -0.0001 |" in table
    assert "| as shipped | HF Trainer FSDP2 | 2 | 500 | 500 | 1,300 / 1,250 | 6.5000 | – | – | – |" in table
    readme = (root / "README.md").read_text()
    assert "- codex_ml FSDP2 (as shipped, 2 processes): 0.55x codex_ml DDP's peak memory per process, 1.80x the HF " \
           "Trainer FSDP2's tokens/s at final losses 0.0002 apart." in readme
    assert "- codex_ml FSDP2 + activation checkpointing (as shipped, 2 processes): 0.45x codex_ml DDP's" in readme
    assert "same process settings" not in table + readme  # no such HF row: no such column


def test_distributed_speed_also_against_the_hf_trainer_under_codex_mls_process_settings(root: Path):
    """An HF Trainer FSDP2 row run under codex_ml's process settings ('same_settings') gets codex_ml's as-shipped
    rows compared with it too, in a column and in the headline, beside the as-shipped comparison."""
    alike = {**_dist_row("hf_trainer_fsdp", 400.0, [1000.0, 1000.0], 6.5), "settings": "same_settings",
             "allocator": "return_freed"}
    _write(root, "bench_train-dist", {**META, "preset": "dist"}, [
        {**_dist_row("codex_ml_ddp", 1000.0, [2000.0, 1900.0], 6.5), "allocator": "keep_freed"},
        {**_dist_row("codex_ml_fsdp", 900.0, [1000.0, 1100.0], 6.5002), "allocator": "return_freed"},
        {**_dist_row("hf_trainer_fsdp", 500.0, [1300.0, 1250.0], 6.5), "allocator": "glibc_default"},
        alike,
    ])
    (root / "docs" / "benchmarks.md").write_text("<!-- bench:bench_train-dist -->\n<!-- /bench -->\n")
    (root / "README.md").write_text("<!-- bench:bench_train-dist:headline -->\n<!-- /bench -->\n")
    assert bench_tables.main(["--root", str(root)]) == 0
    table = (root / "docs" / "benchmarks.md").read_text()
    assert "| tokens/s vs HF Trainer FSDP2 under the same process settings |" in table
    assert "| as shipped | codex_ml FSDP2 | 2 | 900 | 900 | 1,000 / 1,100 | 6.5002 | 0.55x | 1.80x | 0.0002 | 2.25x |" \
        in table
    # DDP keeps freed blocks: not the same process settings as the HF row's, so no ratio
    assert "| as shipped | codex_ml DDP | 2 | 1,000 | 1,000 | 2,000 / 1,900 | 6.5000 | – | 2.00x | 0.0000 | – |" \
        in table
    assert "| same process settings | HF Trainer FSDP2 | 2 | 400 | 400 | 1,000 / 1,000 | 6.5000 | – | – | – | – |" \
        in table
    readme = (root / "README.md").read_text()
    assert "- codex_ml FSDP2 (as shipped, 2 processes): 0.55x codex_ml DDP's peak memory per process, 1.80x the HF " \
           "Trainer FSDP2's tokens/s as shipped and 2.25x under the same process settings at final losses 0.0002 " \
           "apart." in readme
