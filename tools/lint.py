"""The lint test: ruff over every Python file of python/, kernels/, tools/ and tests/.

Bazel caches a test by its inputs, so the files are declared inputs; to catch a package whose files
were never declared, the test also lists the source tree's .py files (found through the runfile
symlinks) and fails on any it was not given.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOTS = ("python", "kernels", "tools", "tests")


def main(files: list[str]) -> int:
    config = Path("ruff.toml").resolve()
    workspace = config.parent
    given = {str(Path(f).resolve().relative_to(workspace)) for f in files}
    on_disk = set()
    for root in ROOTS:
        for path in (workspace / root).rglob("*.py"):
            rel = path.relative_to(workspace)
            if not any(part.startswith(("bazel-", ".")) or part == "__pycache__" for part in rel.parts):
                on_disk.add(str(rel))
    missing = sorted(on_disk - given)
    if missing:
        print("Python files not given to //:lint (add their package's py_sources filegroup to it):")
        print("\n".join("  " + m for m in missing))
        return 1
    ruff = Path(sys.executable).parent / "ruff"
    env = dict(os.environ, RUFF_CACHE_DIR=os.environ.get("TEST_TMPDIR", "/tmp") + "/ruff")
    result = subprocess.run([str(ruff), "check", "--no-fix", "--config", str(config), *sorted(given)],
                            cwd=workspace, env=env)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
