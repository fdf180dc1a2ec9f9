"""Helpers shared by the command-line entry points."""

import os


def enter_working_directory() -> None:
    """Under `bazel run`, changes to the directory Bazel was run from, so relative paths mean what the user typed."""
    directory = os.environ.get("BUILD_WORKING_DIRECTORY")
    if directory:
        os.chdir(directory)
