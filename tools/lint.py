"""A lint test: ruff over the Python files of part of the tree.

    lint.py --root=DIR [--root=DIR ...] [--skip=DIR ...] FILE...

Bazel caches a test by its inputs, so the files are declared inputs; to catch a package whose files
were never declared, the test also lists the .py files of the source tree under each --root (found
through the runfile symlinks; a --skip folder is another lint target's) and fails on any it was not given.
"""

import os
import subprocess
import sys
from pathlib import Path


def split_args(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(roots, skipped folders, files) from the command line."""
    roots = [a.removeprefix("--root=") for a in argv if a.startswith("--root=")]
    skip = [a.removeprefix("--skip=") for a in argv if a.startswith("--skip=")]
    files = [a for a in argv if not a.startswith("--")]
    return roots, skip, files


def main(argv: list[str]) -> int:
    roots, skip, files = split_args(argv)
    config = Path("ruff.toml").resolve()
    workspace = config.parent
    given = {str(Path(f).resolve().relative_to(workspace)) for f in files}
    on_disk = set()
    for root in roots:
        for path in (workspace / root).rglob("*.py"):
            rel = path.relative_to(workspace)
            if any(part.startswith(("bazel-", ".")) or part == "__pycache__" for part in rel.parts):
                continue
            if not any(rel.is_relative_to(folder) for folder in skip):
                on_disk.add(str(rel))
    missing = sorted(on_disk - given)
    if missing:
        print(f"Python files under {', '.join(roots)} not given to this lint target (add their package's "
              "py_sources filegroup to it in BUILD.bazel):")
        print("\n".join("  " + m for m in missing))
        return 1
    ruff = Path(sys.executable).parent / "ruff"
    env = dict(os.environ, RUFF_CACHE_DIR=os.environ.get("TEST_TMPDIR", "/tmp") + "/ruff")
    result = subprocess.run([str(ruff), "check", "--no-fix", "--config", str(config), *sorted(given)],
                            cwd=workspace, env=env)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
