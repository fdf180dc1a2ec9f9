"""The GPU check works end to end without a GPU: tools/gpu_bundle.sh's bundle, run by tools/gpu_check.sh's dry run.

A plumbing bug (a module missing from the bundle, a library that does not load, an import that only Bazel
satisfies, a GPU test that fails to collect, a benchmark that writes its rows only at the end) would only show on
the GPU machine, after its time is spent. Here the bundle is built by the same script, from the libraries Bazel
built for this test (--libs: the runfiles tree) and without downloading its wheels (no network in tests: their list
is checked by name), then run through the dry run: the load check, every module imported, every GPU test collected,
each stage at its smallest size on the CPU, the summary.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
CUDA_BUILT = os.environ.get("CODEX_ML_CUDA_BUILT") == "1"
STAGES = ["tests", "bench_attention", "bench_linear_cross_entropy", "bench_layers", "tune_attention", "bench_train"]
GPU_TEST_FILES = ["attention_gpu_test.py", "cross_entropy_gpu_test.py", "rms_norm_gpu_test.py", "rotary_gpu_test.py",
                  "swiglu_gpu_test.py", "training/gpu_test.py"]
# The GPU machine's python3 holds these distributions (tools/gpu_wheels.txt's header): what the GPU path imports
# from elsewhere must be a wheel of the bundle.
GPU_MACHINE_HAS = {"torch", "triton", "numpy", "absl-py", "accelerate", "transformers", "peft", "safetensors",
                   "sentencepiece", "tensorboard", "matplotlib", "psutil", "nvidia-ml-py", "pytest"}
# Modules imported only when switched on, and off in every stage: MLflow (Trainer.mlflow, off in bench_train), W&B.
NOT_ON_THE_GPU_PATH = {"mlflow", "wandb"}


def make_bundle(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_bundle.sh"), "--out", str(out), "--libs", str(ROOT),
                           "--no-wheels"], capture_output=True, text=True, timeout=300)


def run_check(out: Path, bundle: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the tree the script builds
    (out / "device_out").mkdir(parents=True)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(clean, PYTHON=sys.executable, GPU_BUNDLE=str(bundle), GPU_CHECK_OUT=str(out),
                                   OUT=str(out / "device_out"), **env), timeout=1800)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "gpu_bundle"
    result = make_bundle(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


@pytest.fixture(scope="module")
def dry_run(bundle, tmp_path_factory):
    """The dry run, with a deadline long enough for every stage on a busy CPU (the budgets are shares of it)."""
    out = tmp_path_factory.mktemp("out")
    return run_check(out, bundle[0], GPU_CHECK_DEADLINE="1500"), out


def test_bundle_is_under_64_mib(bundle):
    out, printed = bundle
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 64 * 1024 * 1024
    assert f"bundle {out}: {size // 1024} KiB" in printed


def test_bundle_holds_the_package_and_its_libraries(bundle):
    out, _ = bundle
    manifest = (out / "BUNDLE").read_text()
    assert (out / "codex_ml" / "ops" / "dispatch.py").is_file()
    assert (out / "codex_ml" / "kernels" / "bench" / "record.py").is_file()
    assert (out / "benchmarks" / "bench_train.py").is_file()
    for ext in ("cross_entropy", "linear", "rms_norm", "rotary", "swiglu"):
        assert f"kernels/{ext}/cpu.so" in manifest
    cuda = ["kernels/attention/libcodex_attention.so", "kernels/common/libcodex_cuda_device.so",
            "kernels/cross_entropy/libcodex_cross_entropy.so"]
    assert all((out / "codex_ml" / lib).is_file() == CUDA_BUILT for lib in cuda)
    assert "wheels: gin-config==0.5.0 liger-kernel==" in manifest and "(listed only)" in manifest


def _distributions_imported(folder: Path) -> set[str]:
    """The distributions (by this environment's metadata) of what the Python files under `folder` import, less the
    modules NOT_ON_THE_GPU_PATH."""
    owners = importlib.metadata.packages_distributions()
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {owners[name][0].lower().replace("_", "-") for name in names - NOT_ON_THE_GPU_PATH if name in owners}


def test_the_wheels_cover_every_import_the_gpu_machine_lacks(bundle):
    out, _ = bundle
    wheels = re.search(r"^wheels: (.*) \(", (out / "BUNDLE").read_text(), re.M).group(1).split()
    carried = {w.split("==")[0] for w in wheels}
    imported = _distributions_imported(out) | {"liger-kernel"}  # kernels/bench/common.py imports it by name
    uncovered = imported - GPU_MACHINE_HAS - carried
    assert not uncovered, f"add to tools/gpu_wheels.txt: {sorted(uncovered)}"
    assert {"gin-config", "liger-kernel", "cut-cross-entropy"} <= carried
    pins = (ROOT / "tools" / "gpu_wheels.txt").read_text()
    assert all(re.search(rf"^{re.escape(w)} --hash=sha256:[0-9a-f]{{64}}$", pins, re.M) for w in wheels)


def test_dry_run_passes(dry_run):
    result, _ = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "== no CUDA device: dry run" in result.stdout
    assert "imports ok" in result.stdout and "gpu tests collected ok" in result.stdout
    load = [line for line in result.stdout.splitlines() if line.startswith("load check:")]
    assert len(load) >= 1 and "codex_ml" not in load[0]  # one line; the package and its libraries load
    assert "libcodex" not in load[0]


def test_every_stage_runs_and_writes_its_rows(dry_run):
    result, out = dry_run
    assert "== bench_attention (preset quick, at most 500 s)" in result.stdout  # 2 x 90 s x 1500 / 540
    stages = (out / "stages.txt").read_text().splitlines()
    assert [line.split()[0] for line in stages] == STAGES
    assert all(line.split()[1] == "ok" for line in stages), stages
    for stage in STAGES[1:]:
        record = json.loads((out / f"{stage}.json").read_text())
        assert record["meta"]["preset"] == "quick" and record["rows"], stage


def test_the_summary_prints_last_and_comes_back_as_files(dry_run):
    result, out = dry_run
    summary = (out / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())
    for stage in STAGES:
        assert re.search(rf"^{stage}  ok ", summary, re.M)
    assert "no rows" not in summary
    returned = sorted(p.name for p in (out / "device_out").iterdir())
    assert len(returned) <= 8
    assert {"gpu_check.tgz", "summary.txt", "bench_attention.json", "bench_train.json"} <= set(returned)
    with tarfile.open(out / "device_out" / "gpu_check.tgz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"env.txt", "dry_run.log", "gpu_tests.log", "stages.txt", "summary.txt"} <= names


def test_tree_is_the_bundle(dry_run, bundle):
    _, out = dry_run
    env = (out / "env.txt").read_text()
    version = re.search(r'^VERSION = "(.+)"$', (ROOT / "tools" / "version.bzl").read_text(), re.M).group(1)
    assert f"codex_ml {version} from " in env  # _version.py written from tools/version.bzl
    assert str(ROOT) not in env  # imported from the bundle's copy, not from Bazel's runfiles


def test_every_gpu_test_is_collected(dry_run):
    _, out = dry_run
    collected = (out / "gpu_tests.log").read_text()
    for name in GPU_TEST_FILES:
        assert f"{name}::" in collected, collected[-3000:]
    assert "error" not in collected.lower()


def test_the_tests_stage_runs_the_triton_attention_sweep_a_case_per_code_path(dry_run):
    """CODEX_ML_GPU_CHECK_QUICK: the Triton attention tests (each case compiles its kernels) run on fewer rows of
    the grid than the CUDA kernel's tests (which compile nothing) and a plain pytest run."""
    _, out = dry_run
    collected = (out / "gpu_tests.log").read_text()
    triton_rows = len(re.findall(r"test_triton_on_cuda_matches_float64\[", collected)) / 3  # bf16, fp16, fp32
    cuda_rows = len(re.findall(r"test_cuda_kernel_matches_float64\[", collected)) / 2  # bf16, fp16
    assert 0 < triton_rows < cuda_rows, (triton_rows, cuda_rows)


def test_every_kernel_and_benchmark_module_is_imported(dry_run):
    _, out = dry_run
    imported = int((out / "dry_run.log").read_text().split("imported ")[1].split()[0])
    files = list((ROOT / "kernels").glob("*/*.py")) + list((ROOT / "python" / "codex_ml" / "ops").glob("*.py"))
    assert imported >= len(files)


def test_tune_attention_checks_each_config_in_the_interpreter(dry_run):
    """The tune_attention stage's quick run (the Triton interpreter): each config checked against SDPA, timed."""
    _, out = dry_run
    record = json.loads((out / "tune_attention.json").read_text())
    rows = record["rows"]
    assert (record["meta"]["bench"], record["meta"]["preset"]) == ("tune_attention", "quick")
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-4 and r["time_ms"] > 0 for r in rows), rows
    assert sum(r["default"] for r in rows) == 2  # the default config of each pass is among the candidates


def test_a_missing_library_is_named_and_a_short_deadline_skips_every_stage(bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle[0], broken)
    library = broken / "codex_ml" / "kernels" / "attention" / "libcodex_attention.so"
    library.unlink(missing_ok=True)
    result = run_check(tmp_path / "out", broken, GPU_CHECK_DEADLINE="20")
    load = next(line for line in result.stdout.splitlines() if line.startswith("load check:"))
    assert "MISSING" in load and "libcodex_attention.so" in load
    skipped = (tmp_path / "out" / "stages.txt").read_text()
    assert [line.split()[:2] for line in skipped.splitlines()] == [[stage, "SKIPPED"] for stage in STAGES]
    assert skipped in (tmp_path / "out" / "summary.txt").read_text()


def test_without_a_bundle_it_builds_with_nvcc_and_a_failed_build_fails(tmp_path):
    result = run_check(tmp_path, tmp_path / "no_bundle", NVCC="false", GPU_CHECK_DEADLINE="20")
    assert "no bundle at" in result.stdout and "building the CUDA libraries with nvcc" in result.stdout
    assert "FAILED to build kernels/attention/attention.cu" in result.stdout
    assert result.returncode != 0


def test_bench_attention_measures_the_target_shape_first(bundle):
    """The gpu preset's first case is the target (T 4096, D 128, B*H >= 128): a stage stopped early still has it."""
    code = "from codex_ml.kernels.bench.bench_attention import PRESETS; b, h, t, d = PRESETS['gpu'][0][:4]; " \
           "print(b * h, t, d)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(bundle[0])),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    heads, t, d = map(int, result.stdout.split())
    assert (t, d) == (4096, 128) and heads >= 128


@pytest.mark.parametrize("bench,args,done", [
    ("codex_ml.kernels.bench.bench_attention", ["--preset=quick"], 6),
    ("codex_ml.kernels.bench.bench_layers", ["--preset=quick"], 16),
    ("benchmarks.bench_train", ["--preset=quick", "--steps=4"], 6),
])
def test_a_benchmark_stopped_early_keeps_the_rows_it_finished(bundle, tmp_path, bench, args, done):
    """What the stages' time limits rely on: the result file holds every finished row at any moment."""
    path = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(bundle[0]))
    proc = subprocess.Popen([sys.executable, "-m", bench, *args, f"--json={path}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        # Read at first sight (the file is replaced atomically), then stop the run as `timeout` does at a stage's
        # budget: the rows seen while the run was still going are the ones a stopped stage returns.
        first_rows = json.loads(path.read_text())["rows"]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 0 < len(first_rows) < done  # written before the run ended
    assert len(json.loads(path.read_text())["rows"]) >= len(first_rows)
