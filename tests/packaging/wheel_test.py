"""The wheel (//python:wheel) is complete, reproducible, and installs into a fresh virtual environment and works there.

The sandbox has no network, so pip installs the wheel with --no-deps --no-index, and the dependencies come
from the locked environment through a .pth file in the new environment. (`venv --system-site-packages` would
not do: the locked environment is itself a venv, and a venv made from its interpreter sees the base Python's
site-packages, not the locked packages.) So only codex_ml itself comes from the wheel, which the tests check.
Every subprocess runs from a directory under TEST_TMPDIR without PYTHONPATH, so the source tree and Bazel's
runfiles cannot leak onto sys.path. (Everything is written under TEST_TMPDIR, not pytest's tmp_path, which is
in /tmp under Bazel.)
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import codex_ml
from codex_ml.cli.entry_points import CONSOLE_SCRIPTS

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
TEST_TMPDIR = Path(os.environ["TEST_TMPDIR"])
WHEEL = next((RUNFILES / "python").glob("codex_ml-*.whl"))
PACKAGE = RUNFILES / "python" / "codex_ml"  # the files of //python:codex_ml, as Bazel assembles them
BUILD_WHEEL = RUNFILES / "tools" / "build_wheel.py"
SMOKE = RUNFILES / "configs" / "smoke.gin"
CHECK_OPS = RUNFILES / "tests" / "packaging" / "check_ops.py"
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
WHEEL_TAG = f"{TAG}-abi3-linux_x86_64"  # the extensions are on the stable Python ABI (docs/using-the-wheel.md)
DIST_INFO = f"codex_ml-{codex_ml.__version__}.dist-info"
CPU_EXTENSION = "codex_ml.kernels.cross_entropy.cpu"


def _record_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_files() -> dict[str, bytes]:
    with zipfile.ZipFile(WHEEL) as wheel:
        return {name: wheel.read(name) for name in wheel.namelist()}


def _package_files() -> dict[str, Path]:
    """Archive name -> file, for every file of //python:codex_ml (the wheel must hold exactly these).

    Read from the runfiles tree, where each of them is a symlink; the empty regular __init__.py files there
    are Bazel's own, made for directories without one (Python 3 needs none), and are not in the wheel.
    """
    files = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:  # the test's own imports write caches here
            continue
        if path.is_symlink():
            files["codex_ml/" + path.relative_to(PACKAGE).as_posix()] = path
        else:
            assert path.name == "__init__.py" and path.stat().st_size == 0, f"unexpected runfile {path}"
    return files


@pytest.fixture
def work() -> Path:
    """A fresh directory under TEST_TMPDIR (the working directory of the subprocesses)."""
    return Path(tempfile.mkdtemp(dir=TEST_TMPDIR))


def _clean_env(home: Path) -> dict[str, str]:
    """The test's environment without what would put Bazel's copy of codex_ml on sys.path; caches under home."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RUNFILES_DIR", "RUNFILES_MANIFEST_FILE", "PYTHONSAFEPATH")}
    env.update(HOME=str(home), PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               TRITON_CACHE_DIR=str(home / "triton"), MLFLOW_DISABLE_TELEMETRY="true")
    return env


@pytest.fixture(scope="module")
def venv() -> Path:
    root = TEST_TMPDIR / "venv"
    home = Path(tempfile.mkdtemp(dir=TEST_TMPDIR))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    (site / "locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "--quiet", str(WHEEL)], check=True, env=_clean_env(home), cwd=home)
    # --no-deps above: the locked environment must satisfy every Requires-Dist of the wheel (names and pins).
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "check"],
                           capture_output=True, text=True, env=_clean_env(home), cwd=home)
    assert check.returncode == 0, check.stdout + check.stderr
    return root


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs venv/bin/args[0] with the rest as arguments, from cwd, with a clean environment."""
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env(cwd))


def test_wheel_holds_exactly_the_package_files():
    wheel = _wheel_files()
    package = _package_files()
    in_package = {name for name in wheel if not name.startswith(DIST_INFO + "/")}
    assert in_package == set(package), (sorted(in_package - set(package)), sorted(set(package) - in_package))
    for name, path in package.items():
        assert wheel[name] == path.read_bytes(), name
    # What the issue asks to ship: the CLI, the Triton sources, a compiled CPU extension, the benchmarks.
    assert "codex_ml/__main__.py" in wheel and "codex_ml/cli/train.py" in wheel
    assert "codex_ml/kernels/cross_entropy/triton.py" in wheel
    assert f"{CPU_EXTENSION.replace('.', '/')}.so" in wheel
    assert "codex_ml/kernels/bench/bench_linear_cross_entropy.py" in wheel
    # The extensions find torch's libraries beside them in site-packages (tools/torch_extension.bzl).
    assert b"$ORIGIN/../../../torch/lib" in wheel[f"{CPU_EXTENSION.replace('.', '/')}.so"]


def test_metadata_tags_and_console_scripts():
    wheel = _wheel_files()
    assert WHEEL.name == f"codex_ml-{codex_ml.__version__}-{WHEEL_TAG}.whl"
    metadata = wheel[f"{DIST_INFO}/METADATA"].decode().splitlines()
    assert "Name: codex-ml" in metadata
    assert f"Version: {codex_ml.__version__}" in metadata
    # A range, not a pin: the extensions use LibTorch's stable ABI (docs/using-the-wheel.md).
    assert [line for line in metadata if line.startswith("Requires-Dist: torch")] == [
        "Requires-Dist: torch>=2.13,<2.15"]
    assert f"Requires-Python: >=3.{sys.version_info.minor}" in metadata
    assert "Root-Is-Purelib: false" in wheel[f"{DIST_INFO}/WHEEL"].decode().splitlines()
    assert f"Tag: {WHEEL_TAG}" in wheel[f"{DIST_INFO}/WHEEL"].decode().splitlines()
    scripts = wheel[f"{DIST_INFO}/entry_points.txt"].decode().splitlines()
    assert scripts[0] == "[console_scripts]"
    assert dict(line.split(" = ") for line in scripts[1:]) == CONSOLE_SCRIPTS
    assert set(CONSOLE_SCRIPTS) == {"codex-train", "codex-generate", "codex-tokenize", "codex-bench", "codex-export",
                                    "codex-runs", "codex-sweep"}


def test_record_lists_every_file_with_its_digest():
    wheel = _wheel_files()
    rows = list(csv.reader(io.StringIO(wheel[f"{DIST_INFO}/RECORD"].decode())))
    assert sorted(row[0] for row in rows) == sorted(wheel)
    for name, digest, size in rows:
        if name == f"{DIST_INFO}/RECORD":
            assert digest == size == ""
        else:
            assert digest == _record_digest(wheel[name]) and int(size) == len(wheel[name]), name


def test_zip_is_reproducible():
    with zipfile.ZipFile(WHEEL) as wheel:
        infos = wheel.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(2020, 1, 1, 0, 0, 0)}


def test_compiled_libraries_hold_nothing_of_the_build_that_made_them():
    """What would make two builds of one tree differ: nvcc's temporary file names (tools/cuda.bzl strips
    them) and absolute paths of the build machine."""
    libraries = {name: data for name, data in _wheel_files().items() if name.endswith(".so")}
    assert f"{CPU_EXTENSION.replace('.', '/')}.so" in libraries
    for name, data in libraries.items():
        assert b"tmpxft_" not in data, name
        assert b"/execroot/" not in data and b"/sandbox/" not in data, name


def test_extensions_use_only_the_stable_abi_of_libtorch(work):
    """What lets one wheel load beside several torch releases and CPython versions: the CPU extensions call into
    LibTorch through its C functions (the stable ABI) and never through a C++ symbol of at::, c10:: or torch::,
    whose ABI changes from one release to the next (libcodex_onednn_gemm.so is the exception, opened only under
    the build's torch); and into CPython through its stable ABI only."""
    extensions = {name: data for name, data in _wheel_files().items() if name.endswith("/cpu.so")}
    assert len(extensions) == 5, sorted(extensions)
    for name, data in extensions.items():
        path = work / name.replace("/", "_")
        path.write_bytes(data)
        symbols = subprocess.run(["nm", "-D", "--undefined-only", str(path)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert "torch_call_dispatcher" in symbols, name
        cxx = [s for s in symbols if s.startswith(("_ZN2at", "_ZNK2at", "_ZN3c10", "_ZNK3c10", "_ZN5torch",
                                                   "_ZNK5torch"))]
        assert not cxx, (name, cxx[:5])
        # Nor of CPython's but its stable ABI (abi3): the module stub's one call.
        assert [s for s in symbols if s.startswith(("Py", "_Py"))] == ["PyModule_Create2"], name


def test_same_inputs_give_the_same_bytes(work):
    """Rebuilds the wheel with the tool, elsewhere, later, from the files in another order: byte-identical."""
    requires, extras = [], []
    for line in _wheel_files()[f"{DIST_INFO}/METADATA"].decode().splitlines():
        if line.startswith("Requires-Dist: "):
            req, _, extra = line.removeprefix("Requires-Dist: ").partition('; extra == "')
            if extra:
                extras.append(f"--extra={extra.rstrip(chr(34))}={req}")
            else:
                requires.append(f"--requires={req}")
    files = [f"{name}={path}" for name, path in reversed(_package_files().items())]
    for attempt in ("first", "second"):
        (work / attempt).mkdir()
        subprocess.run([sys.executable, str(BUILD_WHEEL), f"--out={work / attempt / WHEEL.name}",
                        f"--python_tag={TAG}", "--abi_tag=abi3", *requires, *extras, *files], check=True)
    first = (work / "first" / WHEEL.name).read_bytes()
    assert first == (work / "second" / WHEEL.name).read_bytes()
    assert first == WHEEL.read_bytes()


def test_build_wheel_refuses_a_name_that_disagrees_with_the_version(work):
    files = [f"{name}={path}" for name, path in _package_files().items()]
    result = subprocess.run([sys.executable, str(BUILD_WHEEL), f"--out={work / 'codex_ml-9.9.9-cp311-cp311-x.whl'}",
                             f"--python_tag={TAG}", *files], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"does not match version {codex_ml.__version__}" in result.stderr


def test_imports_from_the_new_environment(venv, work):
    result = run(venv, "python", "-c", f"import codex_ml, {CPU_EXTENSION} as ext; "
                 "print(codex_ml.__file__); print(ext.__file__)", cwd=work)
    assert result.returncode == 0, result.stderr
    site = next(venv.glob("lib/python*/site-packages"))
    package_file, extension_file = result.stdout.split()
    assert package_file == str(site / "codex_ml" / "__init__.py")
    assert extension_file.startswith(str(site / "codex_ml" / "kernels" / "cross_entropy" / "cpu."))
    assert os.stat(extension_file).st_mode & 0o111  # installed executable, as compiled libraries are


def test_version_command(venv, work):
    result = run(venv, "python", "-m", "codex_ml", "--version", cwd=work)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"codex_ml {codex_ml.__version__}"
    assert f"torch: {torch.__version__}" in lines
    assert "C++ CPU kernels: loaded (cross_entropy, linear, rms_norm, rotary, swiglu)" in lines


def test_ops_match_float64_pytorch_in_the_new_environment(venv, work):
    """Each op, forward and backward, on odd shapes, against float64 PyTorch; the loss, the layer ops and linear
    through the wheel's extensions (check_ops.py)."""
    result = run(venv, "python", str(CHECK_OPS), "compiled", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    extensions = result.stdout.split()
    assert len(extensions) == 5 and all(path.startswith(str(venv)) for path in extensions), result.stdout


# A flag each command's --help must list.
HELP_NAMES = {"codex-bench": "--list", "codex-export": "--out", "codex-generate": "--checkpoint",
              "codex-tokenize": "--output", "codex-train": "--gin_file", "codex-runs": "--metrics",
              "codex-sweep": "--sweep"}


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_console_script_is_installed_and_runs(venv, work, script):
    assert (venv / "bin" / script).is_file()
    result = run(venv, script, "--help", cwd=work)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert HELP_NAMES[script] in result.stdout, result.stdout
    bad = run(venv, script, "--bogus", cwd=work)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--help" in bad.stderr, bad.stderr


def test_python_m_delegates_to_the_console_scripts(venv, work):
    result = run(venv, "python", "-m", "codex_ml", "bench", "--list", cwd=work)
    assert result.returncode == 0, result.stderr
    assert {"attention", "layers", "linear_cross_entropy"} <= set(result.stdout.split())


def test_codex_bench_runs_a_benchmark_from_the_wheel(venv, work):
    out = work / "rows.json"
    result = run(venv, "codex-bench", "linear_cross_entropy", "--preset=quick", "--repeats=1", f"--json={out}",
                 cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time_ms" in out.read_text()
    unknown = run(venv, "codex-bench", "no_such_kernel", cwd=work)
    assert unknown.returncode == 2 and "no benchmark 'no_such_kernel'; available:" in unknown.stderr


def test_console_script_trains_with_the_smoke_config(venv, work):
    result = run(venv, "codex-train", f"--gin_file={SMOKE}", f"--run_dir={work / 'run'}",
                 "--gin_bindings=Trainer.max_steps = 4", "--gin_bindings=Trainer.eval_every = 2",
                 "--gin_bindings=Trainer.checkpoint_every = 2", cwd=work)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Done: finished at step 4" in result.stdout, result.stdout[-2000:]
    assert (work / "run" / "metrics.ndjson").is_file()
    assert list((work / "run" / "checkpoints").glob("step_*"))
    # The trained run generates through the installed codex-generate (streamed, greedy).
    generated = run(venv, "codex-generate", f"--checkpoint={work / 'run'}", "--prompt=def ", "--max_new_tokens=8",
                    cwd=work)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("def ") and len(generated.stdout) > len("def \n"), generated.stdout
