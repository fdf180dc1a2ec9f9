"""Entry point of every py test target: runs pytest on the test's own files, quietly."""

import os
import sys

import pytest

if __name__ == "__main__":
    # Triton kernels run on CPU tensors only through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    args = [a for a in sys.argv[1:]]
    files = [a for a in args if a.endswith(".py")]
    flags = [a for a in args if not a.endswith(".py")]
    if "TEST_TMPDIR" in os.environ:  # pytest's tmp_path too stays inside the test's own directory
        flags.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        flags.append("--junitxml=" + xml)
    # -p no:cacheprovider: tests write nothing outside TEST_TMPDIR.
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", *flags, *files]))
