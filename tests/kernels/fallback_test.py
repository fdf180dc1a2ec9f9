"""Compiled extensions that do not load (built for another torch, a file missing) never break codex_ml: import
works, every op runs its PyTorch path and matches float64, one warning per process says which extensions, why and
how to get them back, and an explicit impl="cpu" is an error saying the same.

Each case runs in a subprocess on a copy of the package whose extension files are damaged, so the process under
test never saw the working ones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import codex_ml

CHECK_OPS = Path(os.environ["RUNFILES_DIR"]) / "codex_ml" / "tests" / "packaging" / "check_ops.py"
EXTENSIONS = ("cross_entropy", "linear", "rms_norm", "rotary", "swiglu")


def _damaged_copy(root: Path, damage: str) -> Path:
    """A copy of the codex_ml package under root whose compiled CPU extensions are garbage or gone."""
    for part in codex_ml.__path__:  # the sources and, in a source tree, the assembled kernels
        shutil.copytree(part, root / "codex_ml", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    extensions = sorted((root / "codex_ml" / "kernels").glob("*/cpu*.so"))
    assert [path.parent.name for path in extensions] == list(EXTENSIONS)
    for path in extensions:
        if damage == "broken":
            path.write_bytes(b"\x7fELF built for another torch")
        else:
            path.unlink()
    return root


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNFILES_DIR", "RUNFILES_MANIFEST_FILE")}
    env.update(PYTHONPATH=str(root), PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=root, env=env)


@pytest.mark.parametrize("damage", ["broken", "missing"])
def test_ops_fall_back_to_pytorch_with_one_warning(damage, tmp_path):
    root = _damaged_copy(tmp_path, damage)
    result = _run(root, str(CHECK_OPS), "fallback")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    (warning,) = warnings
    assert f"codex_ml.kernels.{{{', '.join(EXTENSIONS)}}}.cpu do not load under torch {torch.__version__}" in warning
    assert "the ops run their PyTorch implementations" in warning and "tools/bazel build //python:wheel" in warning
    # impl="cpu" asked for by name is an error naming the extension and why.
    assert f"linear: impl='cpu' needs its compiled kernel, but codex_ml.kernels.linear.cpu does not load under " \
           f"torch {torch.__version__}" in result.stdout, result.stdout
    assert "or use impl='torch'" in result.stdout


def test_version_says_the_cpu_kernels_are_not_loaded(tmp_path):
    root = _damaged_copy(tmp_path, "broken")
    result = _run(root, "-m", "codex_ml", "--version")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[1:])
    assert lines["torch"] == torch.__version__
    assert lines["C++ CPU kernels"].startswith("not loaded, the ops run their PyTorch implementations")


def test_version_lists_the_active_backends():
    result = subprocess.run([sys.executable, "-m", "codex_ml", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == f"codex_ml {codex_ml.__version__}"
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[1:])
    assert list(lines) == ["torch", "C++ CPU kernels", "Triton", "CUDA libraries", "GPU"]
    assert lines["C++ CPU kernels"] == f"loaded ({', '.join(EXTENSIONS)})"
    assert lines["GPU"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
