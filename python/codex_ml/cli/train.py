"""Trains a model from gin configs.

    tools/bazel run //python:train -- --gin_file=configs/default.gin
    tools/bazel run //python:train -- --gin_file=configs/smoke.gin --gin_bindings='Trainer.max_steps = 50'
    torchrun --nproc_per_node=2 -m codex_ml.cli.train --gin_file=configs/default.gin --run_dir=runs/ddp

Later --gin_file flags override earlier ones; --gin_bindings are applied last. Exit codes: 0 finished or
stopped by a signal (after a checkpoint), 1 stopped on a non-finite loss, 2 bad input (or another live run holds
--run_dir), 130 Ctrl-C before training started (data preparation) or a second Ctrl-C, 143 SIGTERM before
training started.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import logging
import os
import pkgutil
import re
import signal
import sys
import tempfile
import types
import typing
from pathlib import Path

import gin
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "A gin config file (repeatable; later files override earlier ones).")
flags.DEFINE_multi_string("gin_bindings", [], "A gin binding such as 'Trainer.max_steps = 100' (repeatable).")
flags.DEFINE_list("gin_search_paths", [], "Directories searched for --gin_file and gin `include` paths.")
flags.DEFINE_string("run_dir", None, "The run directory (default: a new runs/<config name>-<timestamp>-<random>). "
                    "One run at a time trains into it: a second is refused while the first lives.")
flags.DEFINE_string("resume", "auto", "auto (the newest valid checkpoint in --run_dir), never, or a checkpoint path.")
flags.DEFINE_bool("gin_help", False, "List every gin configurable and its parameters, then exit.")



class UsageError(Exception):
    """Bad input from the command line or a config file: reported in one paragraph, exit code 2."""


def import_configurables() -> list[types.ModuleType]:
    """Imports every codex_ml.<area>.gin_config module: each area registers its configurables there."""
    import codex_ml

    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(codex_ml.__path__, "codex_ml.")
            if info.name.rsplit(".", 1)[-1] == "gin_config"]


def _configurable(selector: str) -> gin.config.Configurable | None:
    """gin's record (name, selector, wrapped function or class, denylist) of a configurable, or None."""
    from gin.config import ParseContext

    try:
        return ParseContext().get_configurable(selector)
    except ValueError:  # a name that matches several configurables
        return None


def configurables() -> list[gin.config.Configurable]:
    """Every gin configurable of codex_ml, sorted by selector. gin keeps no public list: these are the names that
    the gin_config modules define or import and that gin resolves to that same function or class."""
    found = {}
    for module in import_configurables():
        for name, value in vars(module).items():
            configurable = None if name.startswith("_") or not callable(value) else _configurable(name)
            if configurable is not None and any(value is c for c in (configurable.wrapper, configurable.wrapped)):
                found[configurable.selector] = configurable
    return [found[selector] for selector in sorted(found)]


def _parameters(configurable: gin.config.Configurable) -> dict[str, inspect.Parameter]:
    target = configurable.wrapped
    signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    denied = set(configurable.denylist or ())
    return {name: p for name, p in signature.parameters.items()
            if name != "self" and name not in denied and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def gin_help() -> str:
    """Every configurable with its parameters and defaults."""
    lines = []
    for configurable in configurables():
        lines.append(f"{configurable.name}  ({configurable.selector})")
        for name, param in _parameters(configurable).items():
            default = "REQUIRED" if param.default is inspect.Parameter.empty else repr(param.default)
            lines.append(f"    {configurable.name}.{name} = {default}")
    return "\n".join(lines)


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _explain_gin_error(error: Exception) -> str:
    text = str(error)
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    location = next((line.strip() for line in text.splitlines()[1:] if line.strip().startswith("In ")), "")
    where = f" ({location[0].lower()}{location[1:]})" if location else ""
    missing = re.search(r"No configurable matching '([^']+)'", text)
    if missing:
        names = sorted({c.name for c in configurables()} | {c.selector for c in configurables()})
        return (f"Unknown configurable {missing.group(1)!r}{where}.{_suggest(missing.group(1), names)} "
                "Run with --gin_help to list every configurable and its parameters.")
    param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if param:
        owner = next((c for c in configurables() if param.group(1) in (c.name, c.selector)), None)
        valid = list(_parameters(owner)) if owner else []
        return (f"{param.group(1)} has no parameter {param.group(2)!r}{where}.{_suggest(param.group(2), valid)} "
                "Run with --gin_help to list every configurable and its parameters.")
    denied = re.search(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'", text)
    if denied:
        hint = f" Bind train.{denied.group(2)} instead." if denied.group(2) in ("cache_dir", "seed") else ""
        return (f"{denied.group(1)}.{denied.group(2)} cannot be bound: train passes it itself{where}.{hint} "
                "Run with --gin_help to list the parameters that can be bound.")
    return f"Invalid gin configuration: {first_line}{where}"


def _matches(value: object, hint: object) -> bool:
    """Whether a bound value fits a type annotation (the common cases; anything unusual is accepted)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else None
        return isinstance(value, (list, tuple)) and (item is None or all(_matches(v, item) for v in value))
    return True


def check_binding_types(config: dict) -> None:
    """Rejects bound values whose type contradicts the parameter's annotation, naming binding and type. A gin
    finalize hook: gin calls it with every binding, {(scope, selector): {parameter: value}}, after parsing."""
    for (_, selector), params in config.items():
        configurable = _configurable(selector)
        if configurable is None:
            continue
        target = configurable.wrapped
        try:
            hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against.
            continue
        for name, value in params.items():
            if type(value).__module__.startswith("gin") or name not in hints:
                continue  # References (@fn()) and macros are resolved by gin at call time.
            if not _matches(value, hints[name]):
                expected = getattr(hints[name], "__name__", None) or str(hints[name]).replace("typing.", "")
                raise UsageError(f"{configurable.name}.{name} = {value!r} has the wrong type: expected {expected}. "
                                 "Fix the value in the gin file or --gin_bindings.")


gin.config.register_finalize_hook(check_binding_types)


def _search_paths() -> list[str]:
    """Extra places to find configs: --gin_search_paths, then the packaged configs (runfiles or source tree)."""
    paths = [str(Path(p).expanduser()) for p in FLAGS.gin_search_paths]
    runfiles = os.environ.get("RUNFILES_DIR")
    if runfiles:
        paths.append(str(Path(runfiles) / "codex_ml"))
    paths.append(str(Path(__file__).parents[3]))  # The repository root when run from the source tree.
    return [p for p in paths if Path(p).is_dir()]


def parse_gin() -> None:
    search_paths = _search_paths()
    for path in search_paths:
        gin.add_config_file_search_path(path)
    # Resolved here rather than by gin: gin's fallback reader crashes on a directory that Python can import
    # as a namespace package (configs/ in Bazel runfiles).
    files = []
    for file in FLAGS.gin_file:
        found = [Path(base) / file for base in [os.getcwd(), *search_paths] if (Path(base) / file).is_file()]
        if not found:
            raise UsageError(f"Gin file {file!r} not found in {os.getcwd()} (the directory you ran from) nor in "
                             f"{', '.join(search_paths)}. Check the path, or add a directory with --gin_search_paths.")
        files.append(str(found[0].absolute()))
    logging.disable(logging.ERROR)  # gin logs every search-path miss as an error while it looks for files.
    try:
        gin.parse_config_files_and_bindings(files, FLAGS.gin_bindings)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - gin raises ValueError, SyntaxError, IOError...: all are config errors.
        raise UsageError(_explain_gin_error(e)) from e
    finally:
        logging.disable(logging.NOTSET)


def default_run_dir(process) -> Path:
    """runs/<config name>-<timestamp>-<random>, created by rank 0 (exclusively: two runs started in the same second
    get two directories) and the same on every process."""
    from codex_ml.training.run_dir import new_run_dir

    name = Path(FLAGS.gin_file[-1]).stem if FLAGS.gin_file else "run"
    run_dir = str(new_run_dir("runs", name).absolute()) if process.is_main else None
    if process.world_size > 1:
        import torch.distributed as dist

        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return Path(run_dir)


def _first_paragraph(error: Exception) -> str:
    """Gin appends "In call to configurable ..." lines to an error raised inside a configurable."""
    return str(error).split("\n  In call to configurable")[0]


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"Cannot write the run directory {run_dir}: {e.strerror or e}. "
                         "Choose a writable --run_dir.") from e


def _remove_unused(run_dir: Path) -> None:
    """Removes a run directory made for a run that never started (it holds only its lock file): no empty run is
    left behind. Called while the lock is held, so no other run is inside it."""
    from codex_ml.checkpoint import RunDirLock

    lock_file = run_dir / RunDirLock.FILE
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {lock_file.name}:
        lock_file.unlink(missing_ok=True)
        run_dir.rmdir()


def run() -> int:
    from codex_ml.checkpoint import CheckpointError
    from codex_ml.data import DataError
    from codex_ml.models import GPTConfigError
    from codex_ml.models.hf import HFModelError
    from codex_ml.tokenization import TokenizerError
    from codex_ml.training import ConfigError, TrainerConfig, setup_process
    from codex_ml.training.gin_config import train
    from codex_ml.training.run_dir import run_dir_lock

    import_configurables()
    if FLAGS.gin_help:
        print(gin_help())
        return 0
    if not FLAGS.gin_file and not FLAGS.gin_bindings:
        raise UsageError("No configuration given: pass --gin_file=configs/default.gin (or configs/smoke.gin for a "
                         "one-minute check), and optionally --gin_bindings. --gin_help lists every setting.")
    parse_gin()
    try:
        config = TrainerConfig()  # the Trainer.* bindings, validated
        process = setup_process(config)  # the device, the process group (torchrun), allocator and determinism
    except ConfigError as e:
        raise UsageError(_first_paragraph(e)) from e
    if FLAGS.run_dir:
        run_dir = Path(FLAGS.run_dir).expanduser().absolute()
        created = not run_dir.exists()
    else:
        run_dir, created = default_run_dir(process), True
    if process.is_main:
        check_writable(run_dir)
    errors = (ConfigError, CheckpointError, DataError, GPTConfigError, HFModelError, TokenizerError)
    try:
        # Held from before data preparation to the end: a second run on this directory is refused at once.
        with run_dir_lock(run_dir, process):
            if process.is_main:
                print(f"Run directory: {run_dir}\nGin configuration:\n{gin.config_str()}", flush=True)
            try:
                result = train(run_dir=run_dir, config=config, process=process, resume=FLAGS.resume,
                               operative_config=gin.operative_config_str)
            except (*errors, KeyboardInterrupt):  # Ctrl-C before the loop (data preparation): main() reports it
                if created and process.is_main:
                    _remove_unused(run_dir)
                raise
    except errors as e:
        raise UsageError(_first_paragraph(e)) from e
    if process.is_main:
        print(f"Done: {result.status} at step {result.step} ({result.tokens:,} tokens); run directory {run_dir}.")
    return 1 if result.status == "stopped_nonfinite" else 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the training loop (which handles it itself, with a checkpoint): ends the run as Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; every option is a --flag (see --help).", file=sys.stderr)
        return 2
    from codex_ml.cli.common import enter_working_directory

    enter_working_directory()
    # A scheduler's SIGTERM during data preparation unwinds like Ctrl-C (temporaries removed, one line), instead
    # of killing the process mid-write; the training loop installs its own handler while it runs.
    signal.signal(signal.SIGTERM, _raise_terminated)
    from codex_ml.training import ProcessGroupError

    try:
        return run()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ProcessGroupError as e:  # another process of the run is gone: one paragraph, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # in the training loop the first Ctrl-C/SIGTERM is handled there (exit 0)
        what = "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C"
        print(f"Interrupted ({what}): nothing half-written was kept (complete cache entries and checkpoints stay); "
              "run the same command again to go on.", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        from codex_ml.training import shutdown_distributed

        shutdown_distributed()


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with this module's own help (absl's shows the __main__ module's: none for a console
    script) and exit status 2 for a bad flag (absl exits 1, which here means a non-finite loss)."""
    if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
        print(__doc__ + "\n" + FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
        sys.exit(2)


def console_main() -> None:
    """The codex-train console script."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    console_main()
