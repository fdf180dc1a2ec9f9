"""The Python toolchain really is the locked environment."""

import importlib.metadata
import os
import re
import sys
from pathlib import Path


def _runfile(path: str) -> Path:
    root = Path(os.environ["RUNFILES_DIR"]) if "RUNFILES_DIR" in os.environ else Path(__file__).parents[3]
    return root / path


def _locked_versions() -> dict[str, str]:
    lock = _runfile("pyenv/requirements.lock").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)}


def test_interpreter_is_the_locked_venv():
    assert "/external/pyenv/venv/" in sys.executable, sys.executable
    assert sys.prefix != sys.base_prefix, "not running inside a virtual environment"


def test_every_locked_package_is_installed_at_its_version():
    locked = _locked_versions()
    assert "torch" in locked and locked["torch"].startswith("2.13.0")
    mismatched = {}
    for name, version in locked.items():
        installed = importlib.metadata.version(name)
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, mismatched


def test_torch_is_the_cpu_build_from_the_lock():
    import torch

    assert torch.__version__ == _locked_versions()["torch"]


def test_global_site_packages_are_not_visible():
    assert not any(p.endswith("site-packages") and "/external/pyenv/venv/" not in p for p in sys.path), sys.path


def test_lock_pins_every_package_by_hash_and_names_no_source():
    """Installable anywhere: tools/pip_sources.py picks the sources, the lock only names files by hash."""
    lock = _runfile("pyenv/requirements.lock").read_text()
    # One entry per unindented line: the requirement, then its indented --hash lines and comments.
    requirements = [e for e in re.split(r"\n(?=\S)", lock) if e.strip() and not e.startswith("#")]
    assert len(requirements) == len(_locked_versions()) > 100
    unhashed = [e.split()[0] for e in requirements if "--hash=sha256:" not in e]
    assert not unhashed, unhashed
    options = [line for line in lock.splitlines() if line.startswith("-")]
    assert not options, options  # no --index-url, --extra-index-url or --find-links
    assert "file://" not in lock and "/opt/" not in lock
