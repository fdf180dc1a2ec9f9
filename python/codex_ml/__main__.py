"""python -m codex_ml: the version, and the console scripts as subcommands.

    python -m codex_ml --version     (and which backends are active: C++ CPU kernels, Triton, CUDA, GPU)
    python -m codex_ml train --gin_file=configs/smoke.gin     (same as codex-train ...)
    python -m codex_ml bench linear_cross_entropy --preset=quick

Each subcommand runs the function its codex-* console script runs (codex_ml/cli/entry_points.py), with the
same arguments, so it works where the scripts are not on PATH.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

import codex_ml
from codex_ml.cli.common import parse_flags, usage_error
from codex_ml.cli.entry_points import CONSOLE_SCRIPTS

COMMANDS = {script.removeprefix("codex-"): target for script, target in CONSOLE_SCRIPTS.items()}
PROG = "python -m codex_ml"


def define_flags(fv: flags.FlagValues) -> None:
    """python -m codex_ml's own flags (the command's follow its name)."""
    flags.DEFINE_bool("version", False, "print the version and the active backends, and exit", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    """Prints the version or runs a subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # The command's own flags are not ours: hand everything after the command name over untouched.
    split = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    doc = __doc__ + "\ncommands: " + ", ".join(sorted(COMMANDS)) + "\n"
    args, commands = parse_flags(PROG, doc, define_flags, argv[:split], max_args=1)
    if args.version:
        from codex_ml.ops.dispatch import backends

        print(f"codex_ml {codex_ml.__version__}")
        for name, state in backends().items():
            print(f"{name}: {state}")
        return 0
    if not commands:
        usage_error(PROG, f"the following arguments are required: command (one of {', '.join(sorted(COMMANDS))})")
    if commands[0] not in COMMANDS:
        usage_error(PROG, f"argument command: invalid choice: {commands[0]!r} (choose from "
                          f"{', '.join(sorted(COMMANDS))})")
    command = commands[0]
    module_name, function_name = COMMANDS[command].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"{PROG}: {command} is not available in this build ({module_name} is missing)", file=sys.stderr)
        return 2
    sys.argv = [f"codex-{command}", *argv[split:]]
    return getattr(module, function_name)() or 0


if __name__ == "__main__":
    sys.exit(main())
