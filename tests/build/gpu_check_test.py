"""tools/gpu_check.sh, the script that tests and benchmarks the GPU kernels on a GPU machine, works in its dry run.

A plumbing bug (a module missing from the assembled tree, an import that only Bazel satisfies, a GPU test that
fails to collect) would only show on the GPU machine, after its time is spent. Without a CUDA device the script
assembles codex_ml from the sources exactly as on the GPU machine, imports the op API, the kernels and the
benchmarks from that tree, and collects every GPU test; this test runs it so, from the runfiles tree.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
GPU_TEST_FILES = ["attention_gpu_test.py", "cross_entropy_gpu_test.py", "rms_norm_gpu_test.py", "rotary_gpu_test.py",
                  "swiglu_gpu_test.py", "training/gpu_test.py"]


def run_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the tree the script builds
    (tmp_path / "device_out").mkdir()
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "quick"], capture_output=True, text=True,
                          env=dict(clean, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path),
                                   OUT=str(tmp_path / "device_out"), **env), timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run_check(out, NVCC="none"), out


def test_dry_run_passes(dry_run):
    result, _ = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== no CUDA device: dry run" in result.stdout
    assert "imports ok" in result.stdout and "gpu tests collected ok" in result.stdout


def test_logs_are_packed_for_the_device_tool(dry_run):
    """With OUT set, the logs come as one archive and a summary, however many stages ran."""
    _, out = dry_run
    with tarfile.open(out / "device_out" / "gpu_check.tgz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"env.txt", "dry_run.log", "gpu_tests.log"} <= names
    assert len(list((out / "device_out").iterdir())) <= 8


def test_tree_is_assembled_from_sources(dry_run):
    _, out = dry_run
    env = (out / "env.txt").read_text()
    version = re.search(r'^VERSION = "(.+)"$', (ROOT / "tools" / "version.bzl").read_text(), re.M).group(1)
    assert f"codex_ml {version} from " in env  # _version.py written from tools/version.bzl
    assert str(ROOT) not in env  # imported from the script's tree, not from Bazel's runfiles


def test_every_gpu_test_is_collected(dry_run):
    _, out = dry_run
    collected = (out / "gpu_tests.log").read_text()
    for name in GPU_TEST_FILES:
        assert f"{name}::" in collected, collected[-3000:]
    assert "error" not in collected.lower()


def test_every_kernel_and_benchmark_module_is_imported(dry_run):
    _, out = dry_run
    imported = int((out / "dry_run.log").read_text().split("imported ")[1].split()[0])
    files = list((ROOT / "kernels").glob("*/*.py")) + list((ROOT / "python" / "codex_ml" / "ops").glob("*.py"))
    assert imported >= len(files)


def test_a_failed_cuda_build_fails_the_check(tmp_path):
    result = run_check(tmp_path, NVCC="false")  # a compiler that fails every file
    assert result.returncode != 0
    assert "FAILED to build kernels/attention/attention.cu" in result.stdout


def test_summary_prints_the_targets_ratios(tmp_path):
    """tools/gpu_summary.py (the table gpu_check.sh prints last) on rows shaped as the benchmarks write them."""
    lce = {"kernel": "linear_cross_entropy", "N": 16384, "H": 4096, "V": 128256, "dtype": "bfloat16",
           "pass": "fwd+bwd", "peak_mem_mb": 500.0, "ref_time_ms": 100.0, "ref_peak_mem_mb": 20000.0,
           "floor_time_ms": 70.0, "compiled_ref_time_ms": None}
    train = {"params": 1e8, "batch": 16, "seq_len": 1024, "steps": 40, "device": "cuda", "precision": "bf16",
             "peak_rss_mb": 9.0, "final_loss": 4.0}
    attn = {"kernel": "attention", "B": 8, "H": 32, "T": 4096, "D": 128, "dtype": "bfloat16", "causal": True,
            "peak_mem_mb": 1.0, "ref_peak_mem_mb": 1.0}
    rows = {
        "bench_linear_cross_entropy": [dict(lce, impl="triton", time_ms=80.0), dict(lce, impl="liger", time_ms=64.0)],
        "bench_attention": [
            {"kernel": "matmul_peak", "impl": "torch", "tflops": 790.0},
            dict(attn, impl="triton", **{"pass": "fwd"}, time_ms=2.0, ref_time_ms=3.0, tflops=500.0),
        ],
        # A result file (meta and rows), one run with both settings: each group's ratios from its own rows.
        "bench_train": {"meta": {"bench": "bench_train", "preset": "gpu"}, "rows": [
            dict(train, impl="codex_ml", settings="as_shipped", tokens_per_s=300.0, peak_gpu_mb=600.0),
            dict(train, impl="hf_trainer", settings="as_shipped", tokens_per_s=200.0, peak_gpu_mb=1000.0),
            dict(train, impl="codex_ml", settings="same_settings", tokens_per_s=250.0, peak_gpu_mb=600.0),
            dict(train, impl="hf_trainer", settings="same_settings", tokens_per_s=200.0, peak_gpu_mb=800.0),
        ]},
    }
    for name, content in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_summary.py"), str(tmp_path)],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    triton_loss = next(line.split() for line in lines if line.startswith("triton") and "fwd+bwd" in line)
    assert triton_loss[3:7] == ["0.80x", "1.14x", "0.03x", "1.25x"]  # time/ref, time/floor, mem/ref, time/liger
    assert "bf16 matmul peak measured: 790 TFLOP/s" in result.stdout
    triton_attention = next(line for line in lines if line.startswith("triton") and " fwd " in line)
    assert triton_attention.split()[-2:] == ["500", "1.50x"]
    codex = [line.split() for line in lines if " codex_ml " in line]
    assert [(row[0], row[3], row[6]) for row in codex] == [("as_shipped", "1.50x", "0.60x"),
                                                          ("same_settings", "1.25x", "0.75x")]
    assert "bench_layers: no rows" in result.stdout


def test_tune_attention_runs_in_the_interpreter(tmp_path):
    """tools/tune_attention.py (stage tune_attention) checks and times each config; here its --quick mode."""
    out = tmp_path / "tune.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "tune_attention.py"), "--quick", f"--json={out}"],
                            capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert (record["meta"]["bench"], record["meta"]["preset"]) == ("tune_attention", "quick")
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-4 and r["time_ms"] > 0 for r in rows), rows
    assert sum(r["default"] for r in rows) == 2  # the default config of each pass is among the candidates
