"""Where pip takes the locked packages from, and the install that uses them.

The lock pins every file by hash, so a source only decides where a file is downloaded from, never which file:
  - PyPI, always;
  - the machine's local mirrors, where they exist (simple indexes and a folder of wheels; no network needed for
    what they hold);
  - PyTorch's CPU wheel index for the locked torch build (2.13.0+cpu, which PyPI does not host), unless a local
    mirror already holds that file. CODEX_ML_TORCH_INDEX names another index (a mirror of PyTorch's) and is
    then always used.
pip's own configuration files and PIP_* variables are not read: the sources are exactly these.

  pip_sources.py args    --lock FILE [--local-index DIR]... [--local-wheels DIR]... [--index-url URL]
  pip_sources.py install --lock FILE --python VENV_PYTHON [same options]

`args` prints pip's source options, one per line; `install` installs the lock into the environment of
VENV_PYTHON with them (tools/python_env.bzl calls it). Without --local-index/--local-wheels the defaults below
are used.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

PYPI = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_INDEX_ENV = "CODEX_ML_TORCH_INDEX"
LOCAL_INDEXES = ("/opt/pypi/simple", "/opt/pypi-more/simple")
LOCAL_WHEELS = ("/opt/wheels",)


def locked_torch(lock_text: str) -> str | None:
    """The torch version the lock pins (e.g. '2.13.0+cpu'), or None."""
    match = re.search(r"^torch==(\S+)", lock_text, re.M)
    return match.group(1) if match else None


def _holds_torch(version: str, local_indexes: list[Path], local_wheels: list[Path]) -> bool:
    # Wheel file names keep the '+' of a local version; an index page may escape it as %2B.
    prefix = f"torch-{version}-"
    for folder in local_wheels:
        if folder.is_dir() and any(p.name.startswith(prefix) for p in folder.iterdir()):
            return True
    for index in local_indexes:
        page = index / "torch" / "index.html"
        if page.is_file() and prefix in urllib.parse.unquote(page.read_text(errors="replace")):
            return True
    return False


def source_args(
    lock_text: str,
    local_indexes: list[Path],
    local_wheels: list[Path],
    environ: dict[str, str],
    index_url: str = PYPI,
) -> list[str]:
    """pip's source options for installing `lock_text` (see the module docstring for the rule)."""
    indexes = [d for d in local_indexes if d.is_dir()]
    wheels = [d for d in local_wheels if d.is_dir()]
    args = ["--index-url", index_url]
    for index in indexes:
        args += ["--extra-index-url", index.resolve().as_uri()]
    for folder in wheels:
        args += ["--find-links", str(folder.resolve())]
    torch = locked_torch(lock_text)
    torch_index = environ.get(TORCH_INDEX_ENV, "")
    if torch_index or (torch and "+" in torch and not _holds_torch(torch, indexes, wheels)):
        args += ["--extra-index-url", torch_index or TORCH_CPU_INDEX]
    return args


def pip_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` without pip's settings: no PIP_* variable, no configuration file."""
    env = {k: v for k, v in environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _install(python: str, lock: Path, sources: list[str]) -> int:
    command = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes",
               "--disable-pip-version-check", "--no-warn-script-location", *sources, "-r", str(lock)]
    result = subprocess.run(command, env=pip_environment(dict(os.environ)))
    if result.returncode != 0:
        print(f"pip could not install {lock} from: {' '.join(sources)}", file=sys.stderr)
        torch = locked_torch(lock.read_text())
        if torch:
            print(f"torch {torch} comes from PyTorch's CPU wheel index ({TORCH_CPU_INDEX}) unless a local mirror "
                  f"holds it; where that index is unreachable, point --repo_env={TORCH_INDEX_ENV}=<url> at a copy "
                  "of it.", file=sys.stderr)
    return result.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["args", "install"])
    parser.add_argument("--lock", type=Path, required=True, help="hash-locked requirements file")
    parser.add_argument("--python", help="install: the interpreter of the environment to install into")
    parser.add_argument("--local-index", action="append", type=Path, help=f"default: {' '.join(LOCAL_INDEXES)}")
    parser.add_argument("--local-wheels", action="append", type=Path, help=f"default: {' '.join(LOCAL_WHEELS)}")
    parser.add_argument("--index-url", default=PYPI, help="the main index (default: PyPI)")
    opts = parser.parse_args(argv)
    local_indexes = opts.local_index if opts.local_index is not None else [Path(p) for p in LOCAL_INDEXES]
    local_wheels = opts.local_wheels if opts.local_wheels is not None else [Path(p) for p in LOCAL_WHEELS]
    sources = source_args(opts.lock.read_text(), local_indexes, local_wheels, dict(os.environ), opts.index_url)
    if opts.command == "args":
        print("\n".join(sources))
        return 0
    if not opts.python:
        parser.error("install needs --python (the environment's interpreter)")
    print("pip sources: " + " ".join(sources), flush=True)
    return _install(opts.python, opts.lock, sources)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
