"""tools/compare_results.py compares two runs through ratios taken within each run: it flags a real change of a
ratio or of a loss, and passes two runs whose absolute times differ but whose ratios and losses agree."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
_spec = importlib.util.spec_from_file_location("compare_results", RUNFILES / "tools" / "compare_results.py")
compare_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_results)

META = {"bench": "bench_layers", "preset": "cpu", "commit": "0123abc", "date": "2026-12-02T09:30:00Z",
        "load_avg": [0.5, 0.6]}


def _layer_row(kernel: str, pass_name: str, time_ms: float, ref_time_ms: float) -> dict:
    return {"kernel": kernel, "impl": "cpu", "shape": "[4, 512, 384]", "dtype": "float32", "pass": pass_name,
            "time_ms": time_ms, "peak_mem_mb": 1.0, "ref_time_ms": ref_time_ms, "ref_peak_mem_mb": 2.0}


def _train_row(impl: str, tokens_per_s: float, losses: list[float], settings: str | None = None) -> dict:
    row = {"impl": impl, "tokens_per_s": tokens_per_s, "tokens_per_s_median": tokens_per_s,
           "final_loss": losses[-1], "losses": losses}
    if settings is not None:
        row["settings"] = settings
    return row


def _layers(*rows: tuple[str, float, float]) -> list[dict]:
    return [_layer_row(kernel, "fwd", time_ms, ref_time_ms) for kernel, time_ms, ref_time_ms in rows]


def _write(path: Path, rows: list[dict], meta: dict | None = META) -> Path:
    path.write_text(json.dumps(rows if meta is None else {"meta": meta, "rows": rows}))
    return path


def _run(capsys, *argv: object) -> tuple[int, str]:
    status = compare_results.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out + out.err


def test_equal_ratios_pass_though_absolute_times_differ(tmp_path, capsys):
    before = _write(tmp_path / "a.json", _layers(("rms_norm", 1.0, 2.0), ("swiglu", 3.0, 3.0)))
    # A machine twice as slow: every time doubles, every ratio stays.
    after = _write(tmp_path / "b.json", _layers(("rms_norm", 2.0, 4.0), ("swiglu", 6.0, 6.0)))
    status, out = _run(capsys, before, after)
    assert status == 0, out
    assert "DIFFERENT" not in out
    assert "no difference beyond the bound" in out
    assert "0.500    0.500     1.000" in out


def test_a_changed_ratio_is_flagged_and_only_that_row(tmp_path, capsys):
    before = _write(tmp_path / "a.json", _layers(("rms_norm", 1.0, 2.0), ("swiglu", 3.0, 3.0)))
    # rms_norm's kernel got 1.5x slower against the same reference; swiglu moved within the noise bound (5%).
    after = _write(tmp_path / "b.json", _layers(("rms_norm", 1.5, 2.0), ("swiglu", 3.15, 3.0)))
    status, out = _run(capsys, before, after)
    assert status == 1, out
    flagged = [line for line in out.splitlines() if line.endswith("DIFFERENT")]
    assert len(flagged) == 1 and "kernel=rms_norm" in flagged[0] and "1.500" in flagged[0], out
    assert "1 difference(s) flagged" in out


def test_a_faster_kernel_is_flagged_too(tmp_path, capsys):
    before = _write(tmp_path / "a.json", [_layer_row("rms_norm", "fwd", 1.0, 1.0)])
    after = _write(tmp_path / "b.json", [_layer_row("rms_norm", "fwd", 0.5, 1.0)])
    status, out = _run(capsys, before, after)
    assert status == 1 and "DIFFERENT" in out, out


def test_tolerance_flag_sets_the_bound(tmp_path, capsys):
    before = _write(tmp_path / "a.json", [_layer_row("rms_norm", "fwd", 1.0, 1.0)])
    after = _write(tmp_path / "b.json", [_layer_row("rms_norm", "fwd", 1.2, 1.0)])
    assert _run(capsys, before, after)[0] == 1
    assert _run(capsys, before, after, "--tolerance=0.25")[0] == 0


def test_rows_in_one_file_only_are_named(tmp_path, capsys):
    before = _write(tmp_path / "a.json", [_layer_row("rms_norm", "fwd", 1.0, 1.0)])
    after = _write(tmp_path / "b.json", _layers(("rms_norm", 1.0, 1.0), ("rotary", 1.0, 1.0)))
    status, out = _run(capsys, before, after)
    assert status == 0, out
    assert "kernel=rotary impl=cpu shape=[4, 512, 384] dtype=float32 pass=fwd: only in AFTER" in out


def test_train_equal_losses_and_ratios_pass_across_file_forms(tmp_path, capsys):
    losses = [10.4, 9.1, 7.25]
    # An older bench wrote a bare list of rows without settings; a newer one both settings.
    before = _write(tmp_path / "a.json",
                    [_train_row("codex_ml", 1500.0, losses), _train_row("hf_trainer", 1000.0, losses)], meta=None)
    after = _write(tmp_path / "b.json", [
        _train_row("codex_ml", 750.0, losses, "as_shipped"), _train_row("hf_trainer", 500.0, losses, "as_shipped"),
        _train_row("codex_ml", 100.0, [1.0, 1.0, 1.0], "same_settings"),
        _train_row("hf_trainer", 500.0, losses, "same_settings")])
    status, out = _run(capsys, before, after, "--where", "settings=as_shipped")
    assert status == 0, out
    assert "impl=codex_ml vs=hf_trainer" in out and "0.667    0.667     1.000" in out
    assert "impl=codex_ml: losses equal (3 steps" in out
    assert "impl=hf_trainer: losses equal (3 steps" in out
    assert "no metadata" in out


def test_train_changed_loss_is_flagged(tmp_path, capsys):
    before = _write(tmp_path / "a.json", [_train_row("codex_ml", 1500.0, [10.4, 9.1, 7.25]),
                                          _train_row("hf_trainer", 1000.0, [10.4, 9.1, 7.25])])
    after = _write(tmp_path / "b.json", [_train_row("codex_ml", 1500.0, [10.4, 9.1, 7.2500005]),
                                         _train_row("hf_trainer", 1000.0, [10.4, 9.1, 7.25])])
    status, out = _run(capsys, before, after)
    assert status == 1, out
    assert "impl=codex_ml: losses DIFFER at 1 of 3 steps (first at step 2" in out
    assert "impl=hf_trainer: losses equal" in out


def test_files_that_cannot_be_compared_are_named(tmp_path, capsys):
    good = _write(tmp_path / "a.json", [_layer_row("rms_norm", "fwd", 1.0, 1.0)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    status, out = _run(capsys, good, broken)
    assert status == 2 and "broken.json: cannot read it as JSON" in out
    status, out = _run(capsys, good, good, "--where", "impl=triton")
    assert status == 2 and "no rows to compare" in out
    status, out = _run(capsys, good, good, "--where", "impl")
    assert status == 2 and "FIELD=VALUE" in out
