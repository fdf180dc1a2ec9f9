"""codex-sweep: trains one run per combination of gin settings and ranks them.

    tools/bazel run //python:sweep -- --gin_file=configs/smoke.gin \\
        --sweep="Trainer.learning_rate=[1e-3,3e-3,1e-2]" --sweep="GPTConfig.n_layer=[2,4]"
    codex-sweep --gin_file=configs/smoke.gin --sweep="Trainer.learning_rate=[1e-3,1e-2]" --random=4 --seed=1

Each --sweep is BINDING=[VALUE, ...] (Python literals: numbers, 'strings', True, None, tuples). Without --random
the sweep runs the full grid; --random=N runs N combinations drawn with --seed. Every trial is a codex-train run
in its own directory under --sweep_dir, all logging to one MLflow store there (sweep_dir/mlflow.db). A sweep is
resumable: run the same command again and it skips finished trials and resumes interrupted ones from their last
checkpoint. At the end it prints the trials sorted by --metric and writes sweep.csv and plots/sweep.png.
Exit codes: 0 every trial finished, 1 a trial failed (see its train.log), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from absl import flags

from codex_ml.cli.common import enter_working_directory, parse_flags, usage_error
from codex_ml.tracking.summary import summarize

PROG = "codex-sweep"


class SweepError(ValueError):
    """A sweep specification that cannot run: reported naming the --sweep flag, exit code 2, no trial started."""


@dataclass
class Trial:
    name: str
    bindings: dict[str, Any]  # binding -> value
    run_dir: Path
    status: str = "pending"  # pending, finished, failed, interrupted
    metric: float | None = None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("gin_file", [], "a gin config file (repeatable), as for codex-train", flag_values=fv)
    flags.DEFINE_multi_string("gin_bindings", [], "a gin binding applied to every trial (repeatable)", flag_values=fv)
    flags.DEFINE_multi_string("sweep", [], "BINDING=[VALUE, ...]: a setting to sweep (repeatable)", flag_values=fv)
    flags.DEFINE_integer("random", 0, "draw N combinations at random instead of the full grid (0: grid)",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "the seed of --random's draw", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "trials run at the same time", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("sweep_dir", None, "the sweep directory (default: sweeps/<config>-<digest of the sweep>, so "
                        "the same command finds the same directory)", flag_values=fv)
    flags.DEFINE_string("metric", "val/loss", "SPLIT/NAME from metrics.ndjson that ranks the trials (its last value)",
                        flag_values=fv)
    flags.DEFINE_enum("mode", "min", ["min", "max"], "whether a lower or a higher --metric is better", flag_values=fv)


def parse_spec(spec: str) -> tuple[str, list[Any]]:
    """'Trainer.learning_rate=[1e-3, 3e-3]' -> ('Trainer.learning_rate', [0.001, 0.003])."""
    name, sep, values_text = spec.partition("=")
    name = name.strip()
    if not sep or not name or "." not in name:
        raise SweepError(f"--sweep={spec!r}: expected BINDING=[VALUE, ...], e.g. "
                         "--sweep='Trainer.learning_rate=[1e-3,3e-3]'.")
    try:
        values = ast.literal_eval(values_text.strip())
    except (ValueError, SyntaxError) as e:
        raise SweepError(f"--sweep={spec!r}: cannot read {values_text.strip()!r} as a list of values "
                         f"({type(e).__name__}); write Python literals: numbers, 'strings' (quoted), True, None, "
                         "tuples.") from None
    if not isinstance(values, list):
        raise SweepError(f"--sweep={spec!r}: the values must be a list in brackets, e.g. {name}=[1, 2].")
    if not values:
        raise SweepError(f"--sweep={spec!r}: the list of values is empty; give at least one value.")
    return name, values


def gin_value(value: Any) -> str:
    return repr(value)


def _resolve_gin_file(file: str) -> Path:
    """As codex-train does: the directory the user ran from, then the packaged configs."""
    bases = [Path.cwd()]
    runfiles = os.environ.get("RUNFILES_DIR")
    if runfiles:
        bases.append(Path(runfiles) / "codex_ml")
    bases.append(Path(__file__).parents[3])  # the repository root when run from the source tree
    for base in bases:
        if (base / file).is_file():
            return (base / file).absolute()
    raise SweepError(f"Gin file {file!r} not found in {Path.cwd()} (the directory you ran from) nor among the "
                     "packaged configs.")


def check_specs(gin_files: list[Path], bindings: list[str], specs: dict[str, list[Any]], raw: dict[str, str]) -> None:
    """Parses the configuration with each swept value, as a trial will, and builds its TrainerConfig: an unknown
    binding, a value of the wrong type or out of range fails here, naming the --sweep, before any trial runs."""
    import gin

    from codex_ml.cli import train as train_cli
    from codex_ml.training import ConfigError, TrainerConfig

    train_cli.import_configurables()
    for name, values in specs.items():
        for value in values:
            gin.clear_config()
            try:
                gin.parse_config_files_and_bindings([str(f) for f in gin_files],
                                                    [*bindings, f"{name} = {gin_value(value)}"])
                TrainerConfig()
            except train_cli.UsageError as e:
                raise SweepError(f"--sweep={raw[name]!r}: {e}") from None
            except ConfigError as e:
                raise SweepError(f"--sweep={raw[name]!r}: {train_cli._first_paragraph(e)}") from None
            except Exception as e:  # noqa: BLE001 - gin's own errors: explained as codex-train does
                raise SweepError(f"--sweep={raw[name]!r}: {train_cli._explain_gin_error(e)}") from None
    gin.clear_config()


def plan(specs: dict[str, list[Any]], random_trials: int, seed: int) -> list[dict[str, Any]]:
    """The combinations to run: the grid in order, or `random_trials` distinct ones drawn from it with `seed`."""
    grid = [dict(zip(specs, combo)) for combo in itertools.product(*specs.values())]
    if not random_trials:
        return grid
    return random.Random(seed).sample(grid, min(random_trials, len(grid)))


def default_sweep_dir(gin_files: list[str], bindings: list[str], specs: list[str], random_trials: int,
                      seed: int) -> Path:
    digest = hashlib.sha256(json.dumps([gin_files, bindings, specs, random_trials, seed]).encode()).hexdigest()[:10]
    stem = Path(gin_files[-1]).stem if gin_files else "sweep"
    return Path("sweeps") / f"{stem}-{digest}"


class Sweep:
    def __init__(self, sweep_dir: Path, gin_files: list[Path], bindings: list[str], combos: list[dict[str, Any]],
                 parallel: int):
        self.sweep_dir, self.gin_files, self.bindings, self.parallel = sweep_dir, gin_files, bindings, parallel
        self.store = f"sqlite:///{(sweep_dir / 'mlflow.db').absolute()}"
        width = len(str(len(combos) - 1))
        self.trials = [Trial(f"trial-{i:0{width}d}", combo, sweep_dir / f"trial-{i:0{width}d}")
                       for i, combo in enumerate(combos)]
        self.stopping = threading.Event()
        self._running: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def write_plan(self) -> None:
        """sweep.json: the trials and their settings. A re-run must plan the same trials in the same directory."""
        plan_file = self.sweep_dir / "sweep.json"
        planned = {t.name: {k: repr(v) for k, v in t.bindings.items()} for t in self.trials}
        if plan_file.is_file():
            earlier = json.loads(plan_file.read_text())
            if earlier["trials"] != planned:
                raise SweepError(f"{self.sweep_dir} holds another sweep (its sweep.json plans other trials): choose "
                                 "another --sweep_dir, or repeat that sweep's flags to resume it.")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps({"gin_files": [str(f) for f in self.gin_files], "bindings": self.bindings,
                                         "trials": planned}, indent=2))

    def prepare_store(self) -> None:
        """Creates the shared MLflow store and its experiment once, before trials that start together race to."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from codex_ml.tracking import import_mlflow

        client = import_mlflow().MlflowClient(tracking_uri=self.store)
        if client.get_experiment_by_name("codex_ml") is None:
            client.create_experiment("codex_ml", artifact_location=(self.sweep_dir / "mlartifacts").as_uri())

    def run_trial(self, trial: Trial) -> None:
        if self.stopping.is_set():
            return
        marker = trial.run_dir / "trial.json"
        if marker.is_file() and json.loads(marker.read_text()).get("status") == "finished":
            trial.status = "finished"
            print(f"{trial.name}: finished earlier, skipped", flush=True)
            return
        trial.run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "codex_ml.cli.train", *[f"--gin_file={f}" for f in self.gin_files],
                   *[f"--gin_bindings={b}" for b in self.bindings],
                   *[f"--gin_bindings={k} = {gin_value(v)}" for k, v in trial.bindings.items()],
                   f"--gin_bindings=Trainer.tracking_uri = {self.store!r}",
                   f"--run_dir={trial.run_dir}", "--resume=auto"]
        settings = ", ".join(f"{k}={v!r}" for k, v in trial.bindings.items())
        print(f"{trial.name}: {settings} (log: {trial.run_dir / 'train.log'})", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with open(trial.run_dir / "train.log", "a") as log:
            # A process group of its own (setsid): a Ctrl-C at the terminal reaches the sweep only, which sends each
            # trial one SIGTERM (a trial's second signal would stop it without a checkpoint).
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self._lock:
                self._running[trial.name] = process
            code = process.wait()
            with self._lock:
                self._running.pop(trial.name, None)
        finished = code == 0 and "Done: finished" in (trial.run_dir / "train.log").read_text()
        trial.status = "finished" if finished else ("interrupted" if self.stopping.is_set() else "failed")
        if finished:
            marker.write_text(json.dumps({"status": "finished", "bindings": {k: repr(v)
                                                                           for k, v in trial.bindings.items()}}))
        elif trial.status == "failed":
            print(f"{trial.name}: failed with exit code {code}; see {trial.run_dir / 'train.log'}", flush=True)

    def stop(self, signum: int, _frame: Any) -> None:
        """First signal: no new trial starts and each running one gets SIGTERM (it checkpoints and exits)."""
        self.stopping.set()
        print(f"{PROG}: stopping: the running trials write a checkpoint; run the same command again to resume.",
              flush=True)
        with self._lock:
            for process in self._running.values():
                process.send_signal(signal.SIGTERM)

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            list(pool.map(self.run_trial, self.trials))


def report(trials: list[Trial], sweep_dir: Path, metric: str, mode: str) -> str:
    """The table of trials sorted by `metric` (best first; trials without it last); writes sweep.csv and
    plots/sweep.png."""
    for trial in trials:
        run = summarize(trial.run_dir)
        trial.metric, trial.steps, trial.tokens, trial.seconds = (run.metrics.get(metric), run.step, run.tokens,
                                                                  run.train_seconds)
    sign = 1 if mode == "min" else -1
    ranked = sorted(trials, key=lambda t: (t.metric is None or not math.isfinite(t.metric),
                                           sign * t.metric if t.metric is not None else 0.0))
    names = list(trials[0].bindings) if trials else []
    header = ["trial", *names, metric, "status", "step", "tokens", "train_s"]
    rows = [[t.name, *[repr(t.bindings[n]) for n in names], "" if t.metric is None else f"{t.metric:.6g}",
             t.status, str(t.steps), str(t.tokens), f"{t.seconds:.1f}"] for t in ranked]
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plot_sweep(trials, names, metric, sweep_dir / "plots" / "sweep.png")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def plot_sweep(trials: list[Trial], names: list[str], metric: str, path: Path) -> None:
    """The metric against each swept setting, one panel per setting (headless)."""
    from codex_ml.tracking.plots import pyplot, save_png

    done = [t for t in trials if t.metric is not None and math.isfinite(t.metric)]
    if not done or not names:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [t.bindings[name] for t in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [repr(v) for v in values]
        ax.scatter(xs, [t.metric for t in done])
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{path.parent.parent.name}: {metric}")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    save_png(fig, path, plt)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parse_flags(PROG, __doc__, define_flags, argv)
    enter_working_directory()
    if not args.sweep:
        usage_error(PROG, "give at least one --sweep=BINDING=[VALUE, ...]")
    if not args.gin_file:
        usage_error(PROG, "give at least one --gin_file, e.g. --gin_file=configs/smoke.gin")
    try:
        specs, raw = {}, {}
        for spec in args.sweep:
            name, values = parse_spec(spec)
            if name in specs:
                raise SweepError(f"--sweep={spec!r}: {name} is swept twice.")
            specs[name], raw[name] = values, spec
        gin_files = [_resolve_gin_file(f) for f in args.gin_file]
        check_specs(gin_files, args.gin_bindings, specs, raw)
        sweep_dir = Path(args.sweep_dir or default_sweep_dir(args.gin_file, args.gin_bindings, args.sweep,
                                                             args.random, args.seed)).absolute()
        sweep = Sweep(sweep_dir, gin_files, args.gin_bindings, plan(specs, args.random, args.seed), args.parallel)
        sweep.write_plan()
    except SweepError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"Sweep directory: {sweep_dir} ({len(sweep.trials)} trials, MLflow store {sweep.store})", flush=True)
    sweep.prepare_store()
    previous = {s: signal.signal(s, sweep.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.time()
    try:
        sweep.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(report(sweep.trials, sweep_dir, args.metric, args.mode))
    print(f"{len(sweep.trials)} trials in {time.time() - started:.0f}s; {sweep_dir / 'sweep.csv'}, "
          f"{sweep_dir / 'plots' / 'sweep.png'}; compare: codex-runs compare {sweep_dir}/trial-*; MLflow UI: "
          f"mlflow ui --backend-store-uri {sweep.store}")
    if sweep.stopping.is_set():
        return 130
    return 0 if all(t.status == "finished" for t in sweep.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
