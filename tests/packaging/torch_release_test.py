"""The wheel (//python:wheel) in an environment with another torch release than the one it was built with
(OTHER_TORCH, installed from the machine's local package mirrors): it installs with --no-deps, its torch
requirement admits that release, and every op matches float64 with the compiled C++ kernels active.

Tagged manual (run on demand): installing a CUDA build of torch takes about 5.5 GB and minutes. The new
environment gets torch and the CUDA libraries its import loads (its nvidia-* and cuda-toolkit requirements);
everything else comes from the locked environment through a .pth file, which Python reads after the new
environment's site-packages, so the new torch wins. (torch's cuda-bindings requirement is left out: the local
mirrors do not hold it, and nothing here imports it.) Subprocesses run without PYTHONPATH from a directory under
TEST_TMPDIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
TEST_TMPDIR = Path(os.environ["TEST_TMPDIR"])
WHEEL = next((RUNFILES / "python").glob("codex_ml-*.whl"))
CHECK_OPS = RUNFILES / "tests" / "packaging" / "check_ops.py"
OTHER_TORCH = "2.14.1"
# The machine's local package mirrors (those of tools/pip_sources.py), and nothing else: no network.
SOURCES = ["--index-url=file:///opt/pypi-more/simple", "--extra-index-url=file:///opt/pypi/simple",
           "--find-links=/opt/wheels"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RUNFILES_DIR", "RUNFILES_MANIFEST_FILE", "PYTHONSAFEPATH")}
    env.update(HOME=str(home), PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               TRITON_CACHE_DIR=str(home / "triton"), MLFLOW_DISABLE_TELEMETRY="true", PYTHONWARNINGS="default")
    return env


@pytest.fixture(scope="module")
def venv() -> Path:
    root, home = TEST_TMPDIR / "venv", Path(tempfile.mkdtemp(dir=TEST_TMPDIR))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--quiet"]
    subprocess.run([*pip, *SOURCES, "--no-deps", f"torch=={OTHER_TORCH}"], check=True, env=_env(home), cwd=home)
    site = next(root.glob("lib/python*/site-packages"))
    metadata = (site / f"torch-{OTHER_TORCH}.dist-info" / "METADATA").read_text()
    cuda = [req for line in metadata.splitlines() if line.startswith("Requires-Dist: ")
            if (req := line.removeprefix("Requires-Dist: ")).startswith(("nvidia-", "cuda-toolkit"))]
    assert cuda, "no CUDA library among torch's requirements"
    subprocess.run([*pip, *SOURCES, *cuda], check=True, env=_env(home), cwd=home)
    (site / "zz_locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--no-deps", "--no-index", str(WHEEL)], check=True, env=_env(home), cwd=home)
    return root


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    work = Path(tempfile.mkdtemp(dir=TEST_TMPDIR))
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, cwd=work,
                          env=_env(work))


def test_the_wheel_admits_the_other_release(venv):
    with zipfile.ZipFile(WHEEL) as wheel:
        metadata = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    (torch_requirement,) = [Requirement(line.removeprefix("Requires-Dist: ")) for line in metadata.splitlines()
                            if line.startswith("Requires-Dist: torch")]
    result = _run(venv, "-c", "import torch; print(torch.__version__)")
    assert result.returncode == 0, result.stderr[-3000:]
    installed = result.stdout.strip()
    assert installed.split("+")[0] == OTHER_TORCH
    assert torch_requirement.specifier.contains(installed.split("+")[0]), (str(torch_requirement), installed)


def test_every_op_matches_float64_with_the_compiled_kernels(venv):
    result = _run(venv, str(CHECK_OPS), "compiled")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr, result.stderr[-3000:]
    extensions = result.stdout.split()
    assert len(extensions) == 5 and all(path.startswith(str(venv)) for path in extensions), result.stdout


def test_version_reports_the_kernels_loaded(venv):
    result = _run(venv, "-m", "codex_ml", "--version")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"torch: {OTHER_TORCH}" in result.stdout
    assert "C++ CPU kernels: loaded (cross_entropy, linear, rms_norm, rotary, swiglu)" in result.stdout
