"""What every command shares: flag parsing (absl), usage errors, and the working directory under `bazel run`.

Each command defines its flags on a fresh absl FlagValues (not the process-wide FLAGS, so commands never clash and
a command can run twice in one process) and parses them with parse_flags, which gives every command the same
behaviour:
- --help (-h, --helpshort, -?) prints the command's docstring and its flags, exit status 0;
- bad input on the command line is one line, `PROG: error: MESSAGE (see PROG --help)`, exit status 2;
- a boolean flag is --NAME / --noNAME, and --no-NAME is read as --noNAME;
- an argument that looks like a negative number (-1, -0.5) is an argument, not a flag.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags

HELP = ("--help", "-h", "--helpshort", "-?")
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")


def usage_error(prog: str, message: str) -> NoReturn:
    """Reports bad command-line input in one line naming --help and exits with status 2."""
    sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
    raise SystemExit(2)


def help_text(doc: str, flag_values: flags.FlagValues) -> str:
    """The command's docstring, then its flags with their help and defaults."""
    # absl groups the flags under the defining module's name (a file path for __main__): one list is enough.
    listing = [line for line in flag_values.get_help(include_special_flags=False).splitlines() if line[:1] == " "]
    return doc.strip() + "\n\nflags:\n" + "\n".join(listing) + "\n" if listing else doc.strip() + "\n"


def _negations(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """--no-NAME -> --noNAME for boolean flags (absl's spelling of the negation)."""
    booleans = {name for name in flag_values if flag_values[name].boolean}
    return [f"--no{arg[5:]}" if arg.startswith("--no-") and arg[5:] in booleans else arg for arg in argv]


def parse_flags(prog: str, doc: str, define: Callable[[flags.FlagValues], None], argv: Sequence[str], *,
                required: Sequence[str] = (), max_args: int | None = 0) -> tuple[flags.FlagValues, list[str]]:
    """Parses `argv` (without the program name) into a new FlagValues that `define` fills with the command's flags.

    Returns the parsed flags and the remaining arguments (at most `max_args` of them; None: any number). Prints the
    help and exits 0 for --help; exits 2 with one line for an unknown flag, a bad value, a missing `required` flag
    or too many arguments.
    """
    flag_values = flags.FlagValues()
    define(flag_values)
    argv = list(argv)
    options = argv[:argv.index("--")] if "--" in argv else argv
    if any(arg in HELP for arg in options):
        sys.stdout.write(help_text(doc, flag_values))
        raise SystemExit(0)
    try:
        rest = flag_values([prog, *_negations(argv, flag_values)], known_only=True)[1:]
    except flags.Error as e:
        usage_error(prog, str(e))
    args, options_done = [], False
    for arg in rest:
        if arg == "--" and not options_done:
            options_done = True
        elif options_done or not arg.startswith("-") or arg == "-" or _NEGATIVE_NUMBER.fullmatch(arg):
            args.append(arg)
        else:
            name = arg.lstrip("-").split("=", 1)[0]
            close = difflib.get_close_matches(name, list(flag_values), n=3, cutoff=0.6)
            usage_error(prog, str(flags.UnrecognizedFlagError(name, arg, suggestions=close)))
    missing = [f"--{name}" for name in required if flag_values[name].value is None]
    if missing:
        usage_error(prog, f"the following arguments are required: {', '.join(missing)}")
    if max_args is not None and len(args) > max_args:
        usage_error(prog, f"unrecognized arguments: {' '.join(args[max_args:])}")
    return flag_values, args


def enter_working_directory() -> None:
    """Under `bazel run`, changes to the directory Bazel was run from, so relative paths mean what the user typed."""
    directory = os.environ.get("BUILD_WORKING_DIRECTORY")
    if directory:
        os.chdir(directory)
