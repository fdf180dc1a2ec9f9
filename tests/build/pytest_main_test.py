"""tools/pytest_main.py, the entry point of every py test target, passes a target only if a test executed.

Each case writes a test file and runs pytest_main on it in a child process, as Bazel would, with its own
TEST_TMPDIR (and without this test's XML_OUTPUT_FILE, which the child would overwrite).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTEST_MAIN = Path(os.environ["RUNFILES_DIR"]) / "codex_ml" / "tools" / "pytest_main.py"


def run_pytest_main(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    test_file = tmp_path / "sample_test.py"
    test_file.write_text(source)
    test_tmpdir = tmp_path / "test_tmpdir"
    test_tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XML_OUTPUT_FILE", "PYTEST_ADDOPTS")}
    env["TEST_TMPDIR"] = str(test_tmpdir)
    return subprocess.run([sys.executable, str(PYTEST_MAIN), str(test_file)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_a_file_whose_every_test_skips_fails(tmp_path):
    result = run_pytest_main(tmp_path, """
import pytest

pytestmark = pytest.mark.skipif(True, reason="needs a CUDA GPU")


def test_one():
    pass


def test_two():
    pass
""")
    assert result.returncode != 0, result.stdout
    assert last_line(result) == "FAILED: no test executed in %s (all 2 skipped: needs a CUDA GPU)" % (
        tmp_path / "sample_test.py")


def test_a_file_skipped_at_module_level_fails(tmp_path):
    result = run_pytest_main(tmp_path, """
import pytest

pytest.skip("no device", allow_module_level=True)


def test_one():
    pass
""")
    assert result.returncode != 0, result.stdout
    assert last_line(result).startswith("FAILED: no test executed in ")
    assert "no device" in last_line(result)


def test_a_file_without_tests_fails(tmp_path):
    result = run_pytest_main(tmp_path, "VALUE = 1\n")
    assert result.returncode != 0, result.stdout
    assert last_line(result).endswith("(none collected)")


def test_a_partly_skipped_file_passes(tmp_path):
    result = run_pytest_main(tmp_path, """
import pytest


def test_runs():
    assert 1 + 1 == 2


@pytest.mark.skip(reason="not here")
def test_skipped():
    pass
""")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
    assert "no test executed" not in result.stdout


def test_an_expected_failure_counts_as_executed(tmp_path):
    result = run_pytest_main(tmp_path, """
import pytest


@pytest.mark.xfail(reason="known", strict=True)
def test_known_bug():
    assert False
""")
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("body", ["assert False", "raise RuntimeError('boom')"])
def test_a_failing_test_still_fails(tmp_path, body):
    result = run_pytest_main(tmp_path, f"def test_fails():\n    {body}\n")
    assert result.returncode == 1, result.stdout
    assert "no test executed" not in result.stdout


def test_home_tmpdir_and_caches_are_under_test_tmpdir(tmp_path):
    result = run_pytest_main(tmp_path, """
import os
import tempfile


def test_environment():
    root = os.environ["TEST_TMPDIR"]
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert os.environ[name].startswith(root + os.sep), name
        assert os.path.isdir(os.environ[name]), name
    assert tempfile.gettempdir().startswith(root + os.sep)
    assert os.path.expanduser("~").startswith(root + os.sep)
""")
    assert result.returncode == 0, result.stdout + result.stderr
