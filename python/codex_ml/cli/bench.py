"""codex-bench: runs one of the kernel benchmarks shipped in codex_ml.kernels.bench.

    codex-bench --list
    codex-bench linear_cross_entropy --preset=quick --json=lce.json
    codex-bench attention --preset=cpu

The benchmark NAME is a module codex_ml/kernels/bench/bench_NAME.py (found at run time, so a new one needs no
change here); the flags after NAME are that benchmark's own (--preset=quick|cpu|gpu, --json=PATH, --repeats=N).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from absl import flags

from codex_ml.cli.common import parse_flags, usage_error

PREFIX = "bench_"


def available() -> list[str]:
    """The benchmark names found in codex_ml.kernels.bench, sorted."""
    try:
        package = importlib.import_module("codex_ml.kernels.bench")
    except ModuleNotFoundError:
        return []
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(package.__path__) if m.name.startswith(PREFIX))


def define_flags(fv: flags.FlagValues) -> None:
    """codex-bench's own flags (the benchmark's follow its NAME)."""
    flags.DEFINE_bool("list", False, "print the available benchmarks and exit", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark named by the first argument with the remaining arguments; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # Everything after NAME belongs to the benchmark.
    split = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args, names_given = parse_flags("codex-bench", __doc__, define_flags, argv[:split], max_args=1)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    if not names_given:
        usage_error("codex-bench", f"name a benchmark: one of {', '.join(names) or '(none installed)'}")
    name = names_given[0]
    if name not in names:
        usage_error("codex-bench", f"no benchmark {name!r}; available: {', '.join(names) or '(none installed)'}")
    module = importlib.import_module(f"codex_ml.kernels.bench.{PREFIX}{name}")
    # The benchmarks parse sys.argv themselves (they also run as scripts under `bazel run`).
    sys.argv = [f"codex-bench {name}", *argv[split:]]
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
