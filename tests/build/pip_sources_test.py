"""tools/pip_sources.py: where the locked environment's files come from, on a machine with local mirrors and on one
without.

The install cases build a real environment from a hash-locked file in TEST_TMPDIR, with no network: PEP 503
file:// indexes made here stand in for PyPI and for PyTorch's CPU wheel index, holding tiny wheels built here (one
of them a stand-in `torch` 2.13.0+cpu), and the machine's local mirrors are replaced by folders the test
controls.
"""

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TOOLS = Path(os.environ["RUNFILES_DIR"]) / "codex_ml" / "tools"
_spec = importlib.util.spec_from_file_location("pip_sources", TOOLS / "pip_sources.py")
pip_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_sources)

TORCH = "2.13.0+cpu"


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of package `name` whose module records its version and origin."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def simple_index(root: Path, wheels: list[Path]) -> Path:
    """A PEP 503 simple index at `root` (root/<project>/index.html) linking `wheels`, files beside the pages."""
    for wheel in wheels:
        project = root / wheel.name.split("-")[0]
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).write_bytes(wheel.read_bytes())
        (project / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_for(wheels: dict[str, Path], path: Path) -> Path:
    """A lock in the project's format: one `name==version` per package, pinned by hash, no index or path."""
    path.write_text("".join(f"{pin} \\\n    --hash=sha256:{sha256(wheel)}\n" for pin, wheel in wheels.items()))
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wheels")
    return {"tinydep==1.0": build_wheel(folder, "tinydep", "1.0"),
            f"torch=={TORCH}": build_wheel(folder, "torch", TORCH)}


def venv_python(folder: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    return str(folder / "bin" / "python")


def install(tmp_path: Path, lock: Path, *options: str, torch_index: str | None = None) -> tuple[str, str]:
    """Runs `pip_sources.py install` into a new environment; returns (its python, pip_sources' output)."""
    python = venv_python(tmp_path / "venv")
    # pip's own configuration must not count: point it at a source that does not exist.
    env = {k: v for k, v in os.environ.items() if k != pip_sources.TORCH_INDEX_ENV}
    env.update(PIP_INDEX_URL="file:///nonexistent/index", PIP_FIND_LINKS="/nonexistent/wheels")
    if torch_index is not None:
        env[pip_sources.TORCH_INDEX_ENV] = torch_index
    result = subprocess.run([sys.executable, str(TOOLS / "pip_sources.py"), "install", "--lock", str(lock),
                             "--python", python, *options], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return python, result.stdout


def installed_version(python: str, module: str) -> str:
    code = f"import {module}; print({module}.__version__, {module}.__file__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1].startswith(str(Path(python).parent.parent)), out  # from the new environment, nowhere else
    return out[0]


def test_without_local_mirrors_torch_comes_from_the_torch_index(tmp_path, wheels):
    """Mirrors hidden: PyPI (here a fake) for the rest, the torch index (here a fake) for torch, nothing else."""
    pypi = simple_index(tmp_path / "pypi" / "simple", [wheels["tinydep==1.0"]])
    torch_index = simple_index(tmp_path / "torch-cpu", [wheels[f"torch=={TORCH}"]])
    lock = lock_for(wheels, tmp_path / "requirements.lock")
    python, output = install(
        tmp_path, lock, "--local-index", str(tmp_path / "hidden" / "pypi" / "simple"),
        "--local-wheels", str(tmp_path / "hidden" / "wheels"), "--index-url", pypi.as_uri(),
        torch_index=torch_index.as_uri())
    assert output.strip() == f"pip sources: --index-url {pypi.as_uri()} --extra-index-url {torch_index.as_uri()}"
    assert installed_version(python, "torch") == TORCH
    assert installed_version(python, "tinydep") == "1.0"


def test_with_local_mirrors_no_torch_index_is_asked(tmp_path, wheels):
    """A local mirror holding the locked torch: no torch index among the sources (none needed, none waited on)."""
    pypi = simple_index(tmp_path / "pypi" / "simple", [wheels["tinydep==1.0"]])
    mirror = tmp_path / "mirror" / "wheels"
    mirror.mkdir(parents=True)
    (mirror / wheels[f"torch=={TORCH}"].name).write_bytes(wheels[f"torch=={TORCH}"].read_bytes())
    lock = lock_for(wheels, tmp_path / "requirements.lock")
    python, output = install(tmp_path, lock, "--local-index", str(tmp_path / "no-index"), "--local-wheels",
                             str(mirror), "--index-url", pypi.as_uri())
    assert output.strip() == f"pip sources: --index-url {pypi.as_uri()} --find-links {mirror.resolve()}"
    assert installed_version(python, "torch") == TORCH


def test_a_file_whose_hash_differs_from_the_lock_is_refused(tmp_path, wheels):
    other = build_wheel(tmp_path / "other", "tinydep", "1.0")  # same name and version, other bytes
    other.write_bytes(other.read_bytes() + b"\0")
    pypi = simple_index(tmp_path / "pypi" / "simple", [other])
    lock = lock_for({"tinydep==1.0": wheels["tinydep==1.0"]}, tmp_path / "requirements.lock")
    python = venv_python(tmp_path / "venv")
    result = subprocess.run([sys.executable, str(TOOLS / "pip_sources.py"), "install", "--lock", str(lock),
                             "--python", python, "--local-index", str(tmp_path / "none"), "--local-wheels",
                             str(tmp_path / "none"), "--index-url", pypi.as_uri()],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in result.stderr
    assert f"pip could not install {lock} from: --index-url {pypi.as_uri()}" in result.stderr


def test_sources_without_mirrors_are_pypi_and_pytorchs_cpu_index(tmp_path):
    lock = f"torch=={TORCH} \\\n    --hash=sha256:{'0' * 64}\n"
    absent = [tmp_path / "absent"]
    assert pip_sources.source_args(lock, absent, absent, {}) == [
        "--index-url", "https://pypi.org/simple", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]


def test_sources_with_mirrors_holding_torch_are_local(tmp_path):
    index, wheels = tmp_path / "simple", tmp_path / "wheels"
    (index / "torch").mkdir(parents=True)
    (index / "torch" / "index.html").write_text(
        '<a href="../../files/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl#sha256=00">torch</a>')
    wheels.mkdir()
    lock = f"torch=={TORCH} \\\n    --hash=sha256:{'0' * 64}\n"
    args = pip_sources.source_args(lock, [index], [wheels], {})
    assert args == ["--index-url", "https://pypi.org/simple", "--extra-index-url", index.resolve().as_uri(),
                    "--find-links", str(wheels.resolve())]


def test_a_mirror_without_the_locked_torch_adds_the_torch_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    lock = f"torch=={TORCH} \\\n    --hash=sha256:{'0' * 64}\n"
    assert pip_sources.source_args(lock, [], [wheels], {})[-2:] == [
        "--extra-index-url", pip_sources.TORCH_CPU_INDEX]


def test_the_torch_index_setting_is_always_used(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    lock = f"torch=={TORCH} \\\n    --hash=sha256:{'0' * 64}\n"
    args = pip_sources.source_args(lock, [], [wheels], {pip_sources.TORCH_INDEX_ENV: "https://mirror.example/cpu"})
    assert args[-2:] == ["--extra-index-url", "https://mirror.example/cpu"]


def test_pip_reads_no_configuration_of_its_own():
    env = pip_sources.pip_environment({"PATH": "/bin", "PIP_INDEX_URL": "x", "PIP_FIND_LINKS": "y"})
    assert env == {"PATH": "/bin", "PIP_CONFIG_FILE": os.devnull}
