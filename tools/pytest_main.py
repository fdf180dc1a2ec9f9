"""Entry point of every py test target: runs pytest on the test's own files, quietly.

A target passes only if at least one test executed: pytest's exit 5 (nothing collected) and a run whose every
test skipped fail with a one-line reason, so a target that tested nothing is never reported as passed.
Under Bazel, everything a test writes (home, caches, temporary files) goes under TEST_TMPDIR.
"""

import os
import sys
import tempfile

import pytest

# Where programs put their files by default: all of them inside the test's own directory. (Its path is long: a
# Unix socket, limited to 108 bytes, cannot live under TMPDIR here; use TCP on 127.0.0.1.)
_TMPDIR_VARIABLES = {
    "HOME": "home",
    "TMPDIR": "tmp",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "TRITON_CACHE_DIR": "triton-cache",
    "MPLCONFIGDIR": "matplotlib",
}


def confine_to(test_tmpdir: str) -> None:
    """Points HOME, TMPDIR and the caches the suite uses under `test_tmpdir`."""
    for name, sub in _TMPDIR_VARIABLES.items():
        path = os.path.join(test_tmpdir, sub)
        os.makedirs(path, exist_ok=True)
        os.environ[name] = path
    tempfile.tempdir = None  # tempfile reads TMPDIR again


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


class ExecutedCounter:
    """A pytest plugin counting the tests that ran (passed, failed or xfailed) and those that skipped."""

    def __init__(self) -> None:
        self.executed = 0
        self.skipped = 0
        self.reasons: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and (report.passed or report.failed or hasattr(report, "wasxfail")):
            self.executed += 1
        elif report.skipped and not hasattr(report, "wasxfail"):
            self._skip(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module skipped as a whole (pytest.skip(allow_module_level=True))
            self._skip(report)

    def _skip(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        self.skipped += 1
        reason = _reason(report)
        if reason not in self.reasons:
            self.reasons.append(reason)


def run(args: list[str]) -> int:
    """Runs pytest on the .py files in `args` (the other arguments are pytest flags); returns the exit status."""
    files = [a for a in args if a.endswith(".py")]
    flags = [a for a in args if not a.endswith(".py")]
    if "TEST_TMPDIR" in os.environ:  # pytest's tmp_path too stays inside the test's own directory
        flags.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        flags.append("--junitxml=" + xml)
    counter = ExecutedCounter()
    # -p no:cacheprovider: tests write nothing outside TEST_TMPDIR.
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-rs", *flags, *files], plugins=[counter])
    if status == pytest.ExitCode.OK and counter.executed == 0:
        status = pytest.ExitCode.NO_TESTS_COLLECTED
    if status == pytest.ExitCode.NO_TESTS_COLLECTED:
        why = f"all {counter.skipped} skipped: " + "; ".join(counter.reasons) if counter.skipped else "none collected"
        print(f"FAILED: no test executed in {' '.join(files)} ({why})")
    return int(status)


if __name__ == "__main__":
    if "TEST_TMPDIR" in os.environ:
        confine_to(os.environ["TEST_TMPDIR"])
    # Triton kernels run on CPU tensors only through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(run(sys.argv[1:]))
