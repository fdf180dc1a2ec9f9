"""The wheel installs into a fresh virtual environment outside Bazel's, and works there.

The sandbox has no network, so the wheel is installed with --no-deps and its dependencies come from
the locked environment through a .pth file: only codex_ml itself comes from the wheel.
"""

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

RUNFILES = Path(os.environ.get("RUNFILES_DIR", Path(__file__).resolve().parents[2].parent)) / "codex_ml"
WHEEL = next((RUNFILES / "python").glob("codex_ml-*.whl"))
SMOKE = RUNFILES / "configs" / "smoke.gin"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    (site / "locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "--quiet", str(WHEEL)], check=True, env=_clean_env())
    return root


def _clean_env() -> dict:
    """No PYTHONPATH (Bazel's runfiles would shadow the installed package)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RUNFILES_DIR", "PYTHONSAFEPATH")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def run(venv, *args, cwd):
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env())


def test_metadata_tags_and_record():
    with zipfile.ZipFile(WHEEL) as wheel:
        names = wheel.namelist()
        assert names == sorted(names)
        assert all(info.date_time == (2020, 1, 1, 0, 0, 0) for info in wheel.infolist())
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{dist}/METADATA").decode()
        assert "Name: codex-ml" in metadata
        assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in metadata
        assert "Tag: cp311-cp311-linux_x86_64" in wheel.read(f"{dist}/WHEEL").decode()
        assert "codex-train = codex_ml.cli.train:console_main" in wheel.read(f"{dist}/entry_points.txt").decode()
        assert any(n.startswith("codex_ml/kernels/_") and n.endswith(".so") for n in names)
        assert "codex_ml/kernels/triton/cross_entropy.py" in names
        for name, digest, size in csv.reader(io.StringIO(wheel.read(f"{dist}/RECORD").decode())):
            if digest:
                data = wheel.read(name)
                expected = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == expected and int(size) == len(data), name


def test_imports_from_the_new_environment(venv, tmp_path):
    result = run(venv, "python", "-c", "import codex_ml, codex_ml.kernels._linear_cross_entropy_cpu as ext;"
                 "print(codex_ml.__file__); print(ext.__file__)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.split():
        assert line.startswith(str(venv)), line
    version = run(venv, "python", "-m", "codex_ml", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("codex_ml 0."), version.stderr


def test_ops_match_pytorch_in_the_new_environment(venv, tmp_path):
    script = """
import torch, torch.nn.functional as F
from codex_ml.ops import attention, cross_entropy, linear_cross_entropy
torch.manual_seed(0)
h, w, t = torch.randn(50, 32), torch.randn(300, 32), torch.randint(0, 300, (50,))
torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t), rtol=1e-5, atol=1e-5)
logits = torch.randn(50, 300)
torch.testing.assert_close(cross_entropy(logits, t), F.cross_entropy(logits, t), rtol=1e-5, atol=1e-5)
q, k = torch.randn(1, 4, 33, 64), torch.randn(1, 4, 33, 64)
torch.testing.assert_close(attention(q, k, k), F.scaled_dot_product_attention(q, k, k, is_causal=True),
                           rtol=1e-5, atol=1e-5)
print("ok")
"""
    result = run(venv, "python", "-c", script, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_console_script_trains_with_the_smoke_config(venv, tmp_path):
    result = run(venv, "codex-train", f"--gin_file={SMOKE}", f"--run_dir={tmp_path / 'run'}",
                 "--gin_bindings=Trainer.max_steps = 4", "--gin_bindings=Trainer.eval_every = 2",
                 "--gin_bindings=Trainer.checkpoint_every = 2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.ndjson").is_file()
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
