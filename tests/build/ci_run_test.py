""".ci/run's closing line cannot overstate: a passed target that executed nothing counts as a failure; paths new in
/tmp while the suite ran are listed for a reader (other programs write there too; the suite's actions have their
own /tmp).

.ci/run runs in a copy of the tree whose tools/bazel is a stand-in: it prints the per-target lines of a scenario,
may leave a file in /tmp, and answers `info bazel-testlogs` with a folder of test.xml files made here. (Under
Bazel's sandbox this test's /tmp is its own.)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CI_RUN = Path(os.environ["RUNFILES_DIR"]) / "codex_ml" / ".ci" / "run"

FAKE_BAZEL = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/.." && pwd)"
case "$1" in
  info) [[ "$2" == bazel-testlogs ]] && echo "${here}/testlogs"; exit 0 ;;
  test) cat "${here}/scenario/lines"
        [[ -f "${here}/scenario/leak" ]] && touch "$(cat "${here}/scenario/leak")"
        exit "$(cat "${here}/scenario/exit")" ;;
esac
exit 2
"""


def junit(tests: int, skipped: int) -> str:
    return f'<testsuites><testsuite name="pytest" tests="{tests}" skipped="{skipped}"/></testsuites>'


def run_ci(tmp_path: Path, lines: list[str], xml: dict[str, str], exit_code: int = 0,
           leak: Path | None = None) -> tuple[int, list[str], str]:
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(CI_RUN, tree / ".ci" / "run")
    (tree / "tools").mkdir()
    (tree / "tools" / "bazel").write_text(FAKE_BAZEL)
    (tree / "tools" / "bazel").chmod(0o755)
    (tree / "scenario").mkdir()
    (tree / "scenario" / "lines").write_text("".join(line + "\n" for line in lines))
    (tree / "scenario" / "exit").write_text(str(exit_code))
    if leak:
        (tree / "scenario" / "leak").write_text(str(leak))
    for target, content in xml.items():
        folder = tree / "testlogs" / target[2:].replace(":", "/").lstrip("/")
        folder.mkdir(parents=True)
        (folder / "test.xml").write_text(content)
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), "/bin", "/usr/bin"]))
    result = subprocess.run(["bash", str(tree / ".ci" / "run")], env=env, capture_output=True, text=True,
                            timeout=60)
    return result.returncode, result.stdout.splitlines(), result.stderr


def test_honest_run_counts_targets_and_executed_tests(tmp_path):
    code, out, err = run_ci(tmp_path, [
        "//tests/a:one_test                    PASSED in 1.0s",
        "//:lint                      (cached) PASSED in 0.5s",
        "//tests/a:gpu_test                    SKIPPED",
    ], {"//tests/a:one_test": junit(5, 2), "//:lint": junit(1, 0)})
    assert code == 0, (out, err)
    assert out[-1] == "2 passed, 0 failed, 1 skipped"
    assert "test runners executed 4 tests in the passed targets (2 more skipped inside them)" in out


def test_a_passed_target_that_executed_nothing_is_a_failure(tmp_path):
    code, out, err = run_ci(tmp_path, [
        "//tests/a:one_test                    PASSED in 1.0s",
        "//tests/a:empty_test         (cached) PASSED in 1.0s",
    ], {"//tests/a:one_test": junit(3, 0), "//tests/a:empty_test": junit(4, 4)})
    assert code != 0
    assert out[-1] == "1 passed, 1 failed, 0 skipped"
    assert "//tests/a:empty_test: reported PASSED but executed no test (4 in its test.xml, 4 skipped)" in err


def test_a_passed_target_without_test_xml_is_a_failure(tmp_path):
    code, out, err = run_ci(tmp_path, ["//tests/a:one_test                    PASSED in 1.0s"], {})
    assert code != 0
    assert out[-1] == "0 passed, 1 failed, 0 skipped"


@pytest.mark.parametrize("lines", [[], ["//tests/a:one_test                    FAILED in 1.0s"]])
def test_a_failed_build_or_target_fails(tmp_path, lines):
    code, out, err = run_ci(tmp_path, lines, {}, exit_code=3)
    assert code != 0
    assert out[-1] == "0 passed, 1 failed, 0 skipped"


def test_a_file_new_in_tmp_is_listed_by_name(tmp_path):
    leak = Path("/tmp") / f"ci_run_test_leak_{os.getpid()}"
    try:
        code, out, err = run_ci(tmp_path, ["//tests/a:one_test                    PASSED in 1.0s"],
                                {"//tests/a:one_test": junit(1, 0)}, leak=leak)
    finally:
        leak.unlink(missing_ok=True)
    assert any(line.startswith("new in /tmp while the suite ran") for line in out), out
    assert str(leak) in out
    assert out[-1] == "1 passed, 0 failed, 0 skipped"


def test_a_file_that_existed_before_the_suite_is_not_the_suites(tmp_path):
    # Another program's log in /tmp, appended to while the suite runs, is not something the suite wrote.
    log = Path("/tmp") / f"ci_run_test_log_{os.getpid()}"
    log.write_text("started\n")
    try:
        code, out, err = run_ci(tmp_path, ["//tests/a:one_test                    PASSED in 1.0s"],
                                {"//tests/a:one_test": junit(1, 0)}, leak=log)
    finally:
        log.unlink(missing_ok=True)
    assert code == 0, out
    assert str(log) not in out
    assert out[-1] == "1 passed, 0 failed, 0 skipped"
