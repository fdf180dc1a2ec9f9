"""Helpers shared by the command-line entry points."""

import argparse
import os


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (exit 2), as the commands' other errors are; argparse's
    own prints the whole usage block first. Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def enter_working_directory() -> None:
    """Under `bazel run`, changes to the directory Bazel was run from, so relative paths mean what the user typed."""
    directory = os.environ.get("BUILD_WORKING_DIRECTORY")
    if directory:
        os.chdir(directory)
