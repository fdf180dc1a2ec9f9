"""codex_ml.cli.common.parse_flags: the one way every command reads its command line."""

import pytest
from absl import flags

from codex_ml.cli.common import parse_flags

DOC = """demo: a command for the tests.

  demo --name=X [--count=N] [--nocache] [ARG ...]
"""


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("name", None, "a name", flag_values=fv)
    flags.DEFINE_integer("count", 1, "how many", flag_values=fv)
    flags.DEFINE_bool("cache", True, "use the cache", flag_values=fv)
    flags.DEFINE_multi_string("stop", [], "repeatable", flag_values=fv)


def usage_error(capsys, argv, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_flags("demo", DOC, define, argv, **kwargs)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1, (exit_info.value.code, out, err)
    assert err.startswith("demo: error: ") and err.endswith(" (see demo --help)\n"), err
    return err


def test_flags_arguments_and_defaults():
    args, rest = parse_flags("demo", DOC, define, ["a", "--name=x", "--count", "3", "--stop=\n\n", "--stop=;", "b"],
                             max_args=None)
    assert (args.name, args.count, args.cache, args.stop, rest) == ("x", 3, True, ["\n\n", ";"], ["a", "b"])


def test_each_call_starts_from_the_defaults():
    assert parse_flags("demo", DOC, define, ["--count=5", "--nocache"])[0].count == 5
    args, _ = parse_flags("demo", DOC, define, [])
    assert (args.count, args.cache) == (1, True)


@pytest.mark.parametrize("negation", ["--nocache", "--no-cache", "--cache=false"])
def test_boolean_negations(negation):
    assert parse_flags("demo", DOC, define, [negation])[0].cache is False


def test_negative_numbers_and_everything_after_double_dash_are_arguments():
    _, rest = parse_flags("demo", DOC, define, ["-1", "--count=-2", "-0.5", "--", "--name=y", "-x"], max_args=None)
    assert rest == ["-1", "-0.5", "--name=y", "-x"]


def test_help_prints_the_docstring_and_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags("demo", DOC, define, ["--name=x", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("demo: a command for the tests.") and "--[no]cache: use the cache" in out
    assert "--count: how many" in out and "(default: '1')" in out


def test_usage_errors_are_one_line(capsys):
    assert "Unknown command line flag 'nmae'. Did you mean: name ?" in usage_error(capsys, ["--nmae=x"])
    assert "Unknown command line flag 'x'" in usage_error(capsys, ["-x"])
    assert "flag --count=many: invalid literal for int()" in usage_error(capsys, ["--count=many"])
    assert "the following arguments are required: --name" in usage_error(capsys, ["--count=2"], required=("name",))
    assert "unrecognized arguments: b c" in usage_error(capsys, ["a", "b", "c"], max_args=1)
    assert "unrecognized arguments: a" in usage_error(capsys, ["a"])
