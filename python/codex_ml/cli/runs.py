"""codex-runs: a table of training runs, from their run directories alone (no MLflow server needed).

    codex-runs list runs/                     every run directory in runs/ (or the runs named)
    codex-runs compare runs/a runs/b          the settings that differ, final metrics, tokens, training time
    tools/bazel run //python:runs -- compare sweeps/smoke-*/trial-*

An argument is a run directory (it holds metrics.ndjson or operative_config.gin) or a directory of them (a sweep
directory, runs/). Training time is the sum of each logged step's tokens / tokens_per_s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from codex_ml.cli.common import enter_working_directory, parse_flags, usage_error
from codex_ml.tracking.summary import RunSummary, is_run_dir, summarize

PROG = "codex-runs"
COMMANDS = ("list", "compare")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("metrics", ["train/loss", "val/loss"], "the final metrics shown (SPLIT/NAME)", flag_values=fv)


def find_runs(paths: list[str]) -> list[Path]:
    """The run directories named, and those directly inside the other directories named, in order."""
    runs = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            usage_error(PROG, f"{arg} is not a directory")
        found = [path] if is_run_dir(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not found:
            usage_error(PROG, f"{arg} is not a run directory (no metrics.ndjson nor operative_config.gin) and holds "
                              "none")
        runs += [p for p in found if p not in runs]
    return runs


def differing(summaries: list[RunSummary]) -> list[str]:
    """The bindings whose values are not the same in every run (a binding a run lacks counts as different)."""
    names = sorted({name for s in summaries for name in s.bindings})
    return [n for n in names if len({s.bindings.get(n) for s in summaries}) > 1]


def table(summaries: list[RunSummary], settings: list[str], metrics: list[str]) -> str:
    header = ["run", *settings, *metrics, "step", "tokens", "train_time"]
    rows = [[str(s.run_dir), *[s.bindings.get(n, "-") for n in settings],
             *[f"{s.metrics[m]:.4f}" if m in s.metrics else "-" for m in metrics],
             str(s.step), f"{s.tokens:,}", _duration(s.train_seconds)] for s in summaries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse_flags(PROG, __doc__, define_flags, argv, max_args=None)
    enter_working_directory()
    if not rest or rest[0] not in COMMANDS:
        usage_error(PROG, f"name a command: {' or '.join(COMMANDS)}, then run directories")
    command, paths = rest[0], rest[1:]
    if not paths:
        usage_error(PROG, f"{command}: name at least one run directory or a directory of runs")
    summaries = [summarize(run) for run in find_runs(paths)]
    if command == "compare" and len(summaries) < 2:
        usage_error(PROG, "compare needs at least two runs")
    settings = differing(summaries) if command == "compare" else []
    print(table(summaries, settings, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
