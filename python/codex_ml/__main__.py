"""python -m codex_ml: the version, and the console scripts as subcommands.

    python -m codex_ml --version
    python -m codex_ml train --gin_file=configs/smoke.gin     (same as codex-train ...)
    python -m codex_ml bench linear_cross_entropy --preset=quick

Each subcommand runs the function its codex-* console script runs (codex_ml/cli/entry_points.py), with the
same arguments, so it works where the scripts are not on PATH.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import codex_ml
from codex_ml.cli.common import ArgumentParser
from codex_ml.cli.entry_points import CONSOLE_SCRIPTS

COMMANDS = {script.removeprefix("codex-"): target for script, target in CONSOLE_SCRIPTS.items()}


def main(argv: list[str] | None = None) -> int:
    """Prints the version or runs a subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="python -m codex_ml", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"codex_ml {codex_ml.__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), help="the console script to run")
    # The command's own flags are not ours: hand everything after the command name over untouched.
    split = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser.parse_args(argv[:split])
    module_name, function_name = COMMANDS[args.command].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"python -m codex_ml: {args.command} is not available in this build ({module_name} is missing)",
              file=sys.stderr)
        return 2
    sys.argv = [f"codex-{args.command}", *argv[split:]]
    return getattr(module, function_name)() or 0


if __name__ == "__main__":
    sys.exit(main())
