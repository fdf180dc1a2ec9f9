"""Renders the benchmark tables of README.md and docs/benchmarks.md from the result files in benchmarks/results/.

    python3 tools/bench_tables.py            # rewrite the tables in place
    python3 tools/bench_tables.py --check    # exit 1, naming each table that differs from its result file

A table lives between two marker comments in a Markdown file:

    <!-- bench:bench_train-cpu:headline -->
    ...generated, never edited by hand...
    <!-- /bench -->

`bench_train-cpu` names the result file (benchmarks/results/bench_train-cpu.json, written by a bench target's
--json flag); the optional `:view` picks how it is shown (`table`, the default, or `headline`). Every figure,
ratio included, comes from one result file: a ratio compares rows of the same run, never two runs, because
absolute times move with the machine and its load. Under each table: when, on what machine, at which commit
and under which load the file was measured. Only the standard library is used, so this runs with any Python 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path("benchmarks") / "results"
PAGES = ("README.md", "docs/benchmarks.md")
# A marker may be indented (inside a list item): the table is then indented as much.
MARKER = re.compile(r"^(?P<indent>[ \t]*)<!-- bench:(?P<name>[A-Za-z0-9_.-]+)(?::(?P<view>\w+))? -->\n"
                    r"(?P<body>.*?)^[ \t]*<!-- /bench -->", re.DOTALL | re.MULTILINE)
# The command that writes each bench's result file (run from the repository root).
COMMANDS = {
    "bench_train": "tools/bazel run //python:bench_train --",
    "bench_linear_cross_entropy": "tools/bazel run //kernels:bench_linear_cross_entropy --",
    "bench_attention": "tools/bazel run //kernels:bench_attention --",
    "bench_layers": "tools/bazel run //kernels:bench_layers --",
}
SETTINGS = {"as_shipped": "as shipped", "same_settings": "same process settings"}
IMPL_NAMES = {"hf_trainer": "the HF Trainer", "plain_torch": "the plain loop"}
# bench_train's distributed trainings (its dist presets: one row per training, memory per process).
DIST_NAMES = {"codex_ml_ddp": "codex_ml DDP", "codex_ml_fsdp": "codex_ml FSDP2",
              "codex_ml_fsdp_ac": "codex_ml FSDP2 + activation checkpointing", "hf_trainer_fsdp": "HF Trainer FSDP2"}

Row = dict
Table = list[list[str]]


class BenchTableError(ValueError):
    """A marker, or a result file it names, that cannot be rendered (the message names which and why)."""


def fmt(value: object, kind: str) -> str:
    """One cell: ms and MB with precision that suits their size, ratios as 0.00x, tokens/s as integers."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def markdown(header: list[str], body: Table) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def provenance(result: dict, name: str) -> str:
    """The line under a table: date, machine, commit, load average and the file the figures come from."""
    meta = result["meta"]
    machine = meta.get("machine") or {}
    cores = machine.get("cores")
    parts = [machine.get("cpu") or "unknown CPU", f"{cores} cores" if cores else None, machine.get("gpu") or "no GPU"]
    load = meta.get("load_avg") or []
    load_text = " → ".join(f"{x:.1f}" for x in load if x is not None) or "unknown"
    commit = meta.get("commit") or "unknown"
    return (f"_Measured {meta.get('date', 'at an unknown date')} on {', '.join(p for p in parts if p)}; commit "
            f"{commit}; load average {load_text}; versions {_versions(meta)}; from "
            f"`{(RESULTS / name).as_posix()}.json`._")


def _versions(meta: dict) -> str:
    versions = meta.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("torch", "triton", "transformers") and v) or "–"


def _group(rows: list[Row], key: str) -> dict[object, list[Row]]:
    groups: dict[object, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.get(key), []).append(row)
    return groups


def _by_impl(rows: list[Row]) -> dict[str, Row]:
    return {row.get("impl"): row for row in rows}


def _train_ratios(rows: list[Row]) -> dict[str, tuple[float | None, float | None]]:
    """codex_ml's tokens/s and peak RSS over each other implementation's, from the rows of one settings group."""
    impls = _by_impl(rows)
    ours = impls.get("codex_ml")
    if ours is None:
        return {}
    return {impl: (ratio(ours.get("tokens_per_s"), row.get("tokens_per_s")),
                   ratio(ours.get("peak_rss_mb"), row.get("peak_rss_mb")))
            for impl, row in impls.items() if impl != "codex_ml"}


def _settings_label(settings: object) -> str:
    return SETTINGS.get(settings, str(settings)) if settings is not None else "as shipped"


def _is_distributed(result: dict) -> bool:
    return any((row.get("world_size") or 1) > 1 for row in result["rows"])


def _dist_memory(row: Row) -> tuple[list, float | None]:
    """A distributed row's peak memory per process and its largest: CUDA's on GPUs, the resident set's on CPUs."""
    if row.get("peak_gpu_mb_per_rank"):
        return row["peak_gpu_mb_per_rank"], row.get("peak_gpu_mb")
    return row.get("peak_rss_mb_per_rank") or [], row.get("peak_rss_mb")


def bench_train_dist_table(result: dict) -> str:
    """One line per distributed training; the ratios against codex_ml DDP (memory) and the HF Trainer's FSDP2
    (speed, loss) come from the rows of the same settings group."""
    gpu = any(row.get("peak_gpu_mb_per_rank") for row in result["rows"])
    header = ["settings", "training", "processes", "tokens/s", "median step tokens/s",
              f"peak {'GPU' if gpu else 'RSS'} MB per process", "final loss", "peak memory vs codex_ml DDP",
              "tokens/s vs HF Trainer FSDP2", "final loss − HF Trainer FSDP2's"]
    hf_alike = _hf_under_codex_ml_settings(result)
    if hf_alike:
        header.append("tokens/s vs HF Trainer FSDP2 under the same process settings")
    body = []
    for settings, rows in _group(result["rows"], "settings").items():
        impls = _by_impl(rows)
        ddp, hf = impls.get("codex_ml_ddp", {}), impls.get("hf_trainer_fsdp", {})
        for row in rows:
            impl = row.get("impl")
            per_rank, peak = _dist_memory(row)
            ours = str(impl).startswith("codex_ml")
            vs_ddp = ratio(peak, _dist_memory(ddp)[1]) if ours and row is not ddp else None
            vs_hf = ratio(row.get("tokens_per_s"), hf.get("tokens_per_s")) if ours else None
            loss_diff = row["final_loss"] - hf["final_loss"] if ours and "final_loss" in hf else None
            line = [_settings_label(settings), DIST_NAMES.get(impl, str(impl)), str(row.get("world_size")),
                    fmt(row.get("tokens_per_s"), "int"), fmt(row.get("tokens_per_s_median"), "int"),
                    " / ".join(fmt(mb, "int") for mb in per_rank), fmt(row.get("final_loss"), "loss"),
                    fmt(vs_ddp, "ratio"), fmt(vs_hf, "ratio"), fmt(loss_diff, "loss")]
            if hf_alike:
                alike = ours and settings == "as_shipped" and row.get("allocator") == hf_alike.get("allocator")
                line.append(fmt(ratio(row.get("tokens_per_s"), hf_alike.get("tokens_per_s")) if alike else None,
                                "ratio"))
            body.append(line)
    return markdown(header, body)


def _hf_under_codex_ml_settings(result: dict) -> Row:
    """The HF Trainer's FSDP2 row run under codex_ml's FSDP process settings (settings 'same_settings'), if the file
    has one: codex_ml's as-shipped rows with the same allocator setting compare with it like for like."""
    return next((row for row in result["rows"]
                 if row.get("impl") == "hf_trainer_fsdp" and row.get("settings") == "same_settings"), {})


def bench_train_dist_headline(result: dict) -> str:
    """One line per codex_ml FSDP2 training: its peak memory per process against codex_ml DDP's and its tokens/s
    against the HF Trainer's FSDP2, from one run."""
    lines = []
    for settings, rows in _group(result["rows"], "settings").items():
        impls = _by_impl(rows)
        ddp, hf = impls.get("codex_ml_ddp", {}), impls.get("hf_trainer_fsdp", {})
        for impl in ("codex_ml_fsdp", "codex_ml_fsdp_ac"):
            row = impls.get(impl)
            if row is None:
                continue
            memory = fmt(ratio(_dist_memory(row)[1], _dist_memory(ddp)[1]), "ratio")
            speed = fmt(ratio(row.get("tokens_per_s"), hf.get("tokens_per_s")), "ratio")
            loss = fmt(abs(row["final_loss"] - hf["final_loss"]) if "final_loss" in hf else None, "loss")
            alike = _hf_under_codex_ml_settings(result) if settings == "as_shipped" else {}
            alike = alike if alike.get("allocator") == row.get("allocator") else {}
            alike_speed = (f" as shipped and {fmt(ratio(row.get('tokens_per_s'), alike.get('tokens_per_s')), 'ratio')}"
                           " under the same process settings") if alike else ""
            lines.append(f"- {DIST_NAMES[impl]} ({_settings_label(settings)}, {row.get('world_size')} processes): "
                         f"{memory} codex_ml DDP's peak memory per process, {speed} the HF Trainer FSDP2's tokens/s"
                         f"{alike_speed} at final losses {loss} apart.")
    return "\n".join(lines)


def bench_train_table(result: dict) -> str:
    if _is_distributed(result):
        return bench_train_dist_table(result)
    header = ["settings", "impl", "tokens/s", "median step tokens/s", "peak RSS MB", "final loss",
              "tokens/s vs HF Trainer", "peak RSS vs HF Trainer", "tokens/s vs plain loop"]
    body = []
    for settings, rows in _group(result["rows"], "settings").items():
        ratios = _train_ratios(rows)
        for row in rows:
            is_ours = row.get("impl") == "codex_ml"
            hf = ratios.get("hf_trainer", (None, None)) if is_ours else (None, None)
            plain = ratios.get("plain_torch", (None, None)) if is_ours else (None, None)
            body.append([_settings_label(settings), str(row.get("impl")), fmt(row.get("tokens_per_s"), "int"),
                         fmt(row.get("tokens_per_s_median"), "int"), fmt(row.get("peak_rss_mb"), "int"),
                         fmt(row.get("final_loss"), "loss"), fmt(hf[0], "ratio"), fmt(hf[1], "ratio"),
                         fmt(plain[0], "ratio")])
    return markdown(header, body)


def bench_train_headline(result: dict) -> str:
    """One line per settings group: codex_ml's throughput and memory against the other two, from one run."""
    if _is_distributed(result):
        return bench_train_dist_headline(result)
    lines = []
    for settings, rows in _group(result["rows"], "settings").items():
        ratios = _train_ratios(rows)
        hf_speed, hf_rss = ratios.get("hf_trainer", (None, None))
        others = [f"{fmt(speed, 'ratio')} {IMPL_NAMES.get(impl, impl)}'s tokens/s"
                  for impl, (speed, _) in ratios.items() if impl != "hf_trainer"]
        text = f"- {_settings_label(settings)}: {fmt(hf_speed, 'ratio')} the HF Trainer's tokens/s at " \
               f"{fmt(hf_rss, 'ratio')} its peak memory"
        lines.append(text + "".join(f", {o}" for o in others) + ";")
    if lines:
        lines[-1] = lines[-1][:-1] + "."
    return "\n".join(lines)


def linear_cross_entropy_table(result: dict) -> str:
    header = ["impl", "N × H × V", "dtype", "pass", "ours ms", "reference ms", "compiled reference ms", "floor ms",
              "ours / reference", "ours / floor", "ours peak MB", "reference peak MB"]
    body = [[str(r.get("impl")), f"{r.get('N')} × {r.get('H')} × {r.get('V')}", str(r.get("dtype")),
             str(r.get("pass")), fmt(r.get("time_ms"), "ms"), fmt(r.get("ref_time_ms"), "ms"),
             fmt(r.get("compiled_ref_time_ms"), "ms"), fmt(r.get("floor_time_ms"), "ms"),
             fmt(ratio(r.get("time_ms"), r.get("ref_time_ms")), "ratio"),
             fmt(ratio(r.get("time_ms"), r.get("floor_time_ms")), "ratio"), fmt(r.get("peak_mem_mb"), "mb"),
             fmt(r.get("ref_peak_mem_mb"), "mb")]
            for r in result["rows"]]
    return markdown(header, body)


def attention_table(result: dict) -> str:
    header = ["impl", "B × H × T × D", "dtype", "causal", "pass", "ours ms", "SDPA ms", "ours / SDPA",
              "TFLOP/s", "ours peak MB", "SDPA peak MB"]
    body = [[str(r.get("impl")), f"{r.get('B')} × {r.get('H')} × {r.get('T')} × {r.get('D')}", str(r.get("dtype")),
             fmt(r.get("causal"), ""), str(r.get("pass")), fmt(r.get("time_ms"), "ms"),
             fmt(r.get("ref_time_ms"), "ms"), fmt(ratio(r.get("time_ms"), r.get("ref_time_ms")), "ratio"),
             fmt(r.get("tflops"), "ms"), fmt(r.get("peak_mem_mb"), "mb"), fmt(r.get("ref_peak_mem_mb"), "mb")]
            for r in result["rows"] if r.get("kernel", "attention") == "attention"]
    table = markdown(header, body)
    peak = [r for r in result["rows"] if r.get("kernel") == "matmul_peak"]
    if peak:
        table += f"\n\nA bf16 8192³ matrix product in the same run: {fmt(peak[0].get('tflops'), 'ms')} TFLOP/s."
    return table


def layers_table(result: dict) -> str:
    header = ["kernel", "impl", "shape", "dtype", "pass", "ours ms", "eager ms", "ours / eager", "ours peak MB",
              "eager peak MB"]
    body = [[str(r.get("kernel")), str(r.get("impl")), f"`{r.get('shape')}`", str(r.get("dtype")),
             str(r.get("pass")), fmt(r.get("time_ms"), "ms"), fmt(r.get("ref_time_ms"), "ms"),
             fmt(ratio(r.get("time_ms"), r.get("ref_time_ms")), "ratio"), fmt(r.get("peak_mem_mb"), "mb"),
             fmt(r.get("ref_peak_mem_mb"), "mb")]
            for r in result["rows"]]
    return markdown(header, body)


RENDERERS: dict[tuple[str, str], Callable[[dict], str]] = {
    ("bench_train", "table"): bench_train_table,
    ("bench_train", "headline"): bench_train_headline,
    ("bench_linear_cross_entropy", "table"): linear_cross_entropy_table,
    ("bench_attention", "table"): attention_table,
    ("bench_layers", "table"): layers_table,
}


def bench_of(name: str) -> tuple[str, str]:
    """(bench, preset) of a result file name such as bench_train-cpu (a further run of the same preset, kept to
    show that figures repeat: bench_train-cpu.2)."""
    bench, sep, preset = name.split(".")[0].rpartition("-")
    if not sep or bench not in COMMANDS:
        raise BenchTableError(f"table {name!r}: name a result file as <bench>-<preset>, <bench> one of "
                              f"{', '.join(COMMANDS)}")
    return bench, preset


def load(root: Path, name: str) -> dict | None:
    """The result file's object, or None when there is none yet."""
    path = root / RESULTS / f"{name}.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchTableError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(result, dict) or not isinstance(result.get("meta"), dict) \
            or not isinstance(result.get("rows"), list):
        raise BenchTableError(f"{path}: expected an object with 'meta' and 'rows' (written by the bench's --json); "
                              "rerun the bench")
    return result


def render(root: Path, name: str, view: str | None) -> str:
    """The text between the markers for result file `name` shown as `view`."""
    bench, preset = bench_of(name)
    renderer = RENDERERS.get((bench, view or "table"))
    if renderer is None:
        views = sorted(v for b, v in RENDERERS if b == bench)
        raise BenchTableError(f"table {name}:{view}: {bench} has the views {', '.join(views)}")
    result = load(root, name)
    if result is None:
        return (f"_No result file yet: run `{COMMANDS[bench]} --preset={preset} "
                f"--json=$PWD/{(RESULTS / name).as_posix()}.json`, then `python3 tools/bench_tables.py`._\n")
    return f"{renderer(result)}\n\n{provenance(result, name)}\n"


def render_page(root: Path, text: str) -> tuple[str, list[str]]:
    """The page with every marked table rendered afresh, and the names of the tables whose text changed."""
    changed = []

    def replace(match: re.Match) -> str:
        label = match["name"] + (f":{match['view']}" if match["view"] else "")
        indent = match["indent"]
        body = "".join(indent + line if line.strip() else line
                       for line in render(root, match["name"], match["view"]).splitlines(keepends=True))
        if body != match["body"]:
            changed.append(label)
        return f"{indent}<!-- bench:{label} -->\n{body}{indent}<!-- /bench -->"

    return MARKER.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY")
                                                          or Path(__file__).resolve().parent.parent),
                        help="the repository root (default: this file's checkout)")
    parser.add_argument("pages", nargs="*", default=list(PAGES), help="Markdown files, relative to --root")
    args = parser.parse_args(argv)
    stale = []
    try:
        for page in args.pages:
            path = args.root / page
            text = path.read_text()
            rendered, changed = render_page(args.root, text)
            stale += [f"{page}: table bench:{label}" for label in changed]
            if changed and not args.check:
                path.write_text(rendered)
    except BenchTableError as e:
        print(f"bench_tables: {e}", file=sys.stderr)
        return 2
    for line in stale:
        print(f"{line} {'differs from its result file' if args.check else 'rewritten'}",
              file=sys.stderr if args.check else sys.stdout)
    if stale and args.check:
        print("bench_tables: run `python3 tools/bench_tables.py` to regenerate them from benchmarks/results/",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
