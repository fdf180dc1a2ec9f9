"""codex-bench: runs one of the kernel benchmarks shipped in codex_ml.kernels.bench.

    codex-bench --list
    codex-bench linear_cross_entropy --preset=quick --json=lce.json
    codex-bench attention --preset=cpu

The benchmark NAME is a module codex_ml/kernels/bench/bench_NAME.py (the kernel engineers' benchmarks,
found at run time, so a new one needs no change here); the flags after NAME are that benchmark's own
(--preset=quick|cpu|gpu, --json=PATH, --repeats=N).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from codex_ml.cli.common import ArgumentParser

PREFIX = "bench_"


def available() -> list[str]:
    """The benchmark names found in codex_ml.kernels.bench, sorted."""
    try:
        package = importlib.import_module("codex_ml.kernels.bench")
    except ModuleNotFoundError:
        return []
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(package.__path__) if m.name.startswith(PREFIX))


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark named by the first argument with the remaining arguments; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="codex-bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="the benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="print the available benchmarks and exit")
    # Everything after NAME belongs to the benchmark (parse_known_args would also take its --json etc. apart).
    split = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser.parse_args(argv[:split])
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    if args.name is None:
        parser.error(f"name a benchmark: one of {', '.join(names) or '(none installed)'}")
    if args.name not in names:
        parser.error(f"no benchmark {args.name!r}; available: {', '.join(names) or '(none installed)'}")
    module = importlib.import_module(f"codex_ml.kernels.bench.{PREFIX}{args.name}")
    # The benchmarks parse sys.argv themselves (they also run as scripts under `bazel run`).
    sys.argv = [f"codex-bench {args.name}", *argv[split:]]
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
