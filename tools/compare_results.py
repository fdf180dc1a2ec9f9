"""Compares two benchmark result files of the same bench and preset, row by row.

    python3 tools/compare_results.py BEFORE.json AFTER.json [--where settings=as_shipped] [--tolerance=0.12]

Absolute times move with the machine and its load, so two runs are compared through ratios taken within each
run: for every row key (the bench's identifying fields: kernel, impl, shape, dtype, pass, ...) the row's
ours/reference time ratio in each file, and their quotient (AFTER's ratio over BEFORE's; 1.00 when nothing
changed, above 1 when AFTER's implementation got slower against the same reference).
- Kernel benches: time_ms / ref_time_ms of the row (the reference timed alternately with it in the same run).
- bench_train: codex_ml's time per token over each other implementation's in the same run and settings
  (from tokens_per_s_median, which resists load spikes), and whether each implementation's per-step losses
  are equal in the two files (the same seeds and data give the same losses unless the arithmetic changed).

A quotient outside [1 / (1 + tolerance), 1 + tolerance] is flagged. The default tolerance, 0.12, lies above
what one unchanged source tree shows between two runs minutes apart on an idle machine: up to 9% for the
committed repeat of bench_linear_cross_entropy --preset=cpu (bench_linear_cross_entropy-cpu.json against
bench_linear_cross_entropy-cpu.2.json), and up to 8% for bench_layers' rows whose both sides are PyTorch.
Losses are compared exactly. Exit status: 0 when nothing is flagged, 1 when something is, 2 when a file cannot
be read or the two files hold no rows to compare.

Both result-file forms are read: {"meta": ..., "rows": [...]} and the bare list of rows older benches wrote.
Only the standard library is used, so this runs with any Python 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The fields that identify a row (those a row has), in the order the key is printed.
KEY_FIELDS = ("kernel", "impl", "settings", "shape", "B", "H", "T", "D", "N", "V", "dtype", "causal", "pass")
TRAIN_OURS = "codex_ml"
DEFAULT_TOLERANCE = 0.12

Row = dict


class CompareError(ValueError):
    """A result file that cannot be compared (the message names which and why)."""


def load_rows(path: Path) -> tuple[dict, list[Row]]:
    """(meta, rows) of a result file; meta is empty for a bare list of rows."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: cannot read it as JSON ({e})") from e
    if isinstance(result, list):
        return {}, result
    if isinstance(result, dict) and isinstance(result.get("rows"), list):
        return result.get("meta") or {}, result["rows"]
    raise CompareError(f"{path}: expected a bench's result file (an object with 'rows', or a list of rows)")


def parse_where(items: list[str]) -> dict[str, str]:
    """--where FIELD=VALUE items as a dict."""
    where = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise CompareError(f"--where {item!r}: write it as FIELD=VALUE, e.g. settings=as_shipped")
        where[field] = value
    return where


def selected(rows: list[Row], where: dict[str, str]) -> list[Row]:
    """The rows that agree with every FIELD=VALUE of `where` (a row without the field agrees)."""
    return [r for r in rows if all(field not in r or str(r[field]) == value for field, value in where.items())]


def row_key(row: Row, skip: set[str]) -> tuple:
    return tuple((field, row[field]) for field in KEY_FIELDS if field in row and field not in skip)


def key_text(key: tuple) -> str:
    return " ".join(f"{field}={value}" for field, value in key)


def is_train(rows: list[Row]) -> bool:
    return bool(rows) and all("tokens_per_s_median" in r for r in rows)


def kernel_ratios(rows: list[Row], skip: set[str]) -> dict[tuple, float]:
    """Row key -> time_ms / ref_time_ms."""
    return {row_key(r, skip): r["time_ms"] / r["ref_time_ms"] for r in rows
            if r.get("time_ms") is not None and r.get("ref_time_ms")}


def train_ratios(rows: list[Row], skip: set[str]) -> dict[tuple, float]:
    """Key (codex_ml's key + the reference impl) -> codex_ml's time per token over the reference's."""
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        key = row_key(r, skip | {"impl"})
        groups.setdefault(key, {})[r["impl"]] = r
    ratios = {}
    for key, by_impl in groups.items():
        ours = by_impl.get(TRAIN_OURS)
        if ours is None:
            continue
        for impl, ref in by_impl.items():
            if impl != TRAIN_OURS:
                ratio = ref["tokens_per_s_median"] / ours["tokens_per_s_median"]
                ratios[(("impl", TRAIN_OURS),) + key + (("vs", impl),)] = ratio
    return ratios


def losses_line(key: tuple, before: Row, after: Row) -> tuple[str, bool]:
    """One line saying whether the two rows' per-step losses are equal; True when they differ."""
    a, b = before.get("losses"), after.get("losses")
    if a is None or b is None:
        return f"{key_text(key)}: losses missing in {'BEFORE' if a is None else 'AFTER'}", True
    if len(a) != len(b):
        return f"{key_text(key)}: losses DIFFER: {len(a)} steps against {len(b)}", True
    diffs = [(abs(x - y), step) for step, (x, y) in enumerate(zip(a, b)) if x != y]
    if not diffs:
        return f"{key_text(key)}: losses equal ({len(a)} steps, final {a[-1]:.6f})", False
    worst, step = max(diffs)
    return (f"{key_text(key)}: losses DIFFER at {len(diffs)} of {len(a)} steps (first at step {diffs[0][1]}, "
            f"largest |difference| {worst:.3g} at step {step}; final {a[-1]:.6f} against {b[-1]:.6f})"), True


def describe(label: str, path: Path, meta: dict) -> str:
    if not meta:
        return f"{label}: {path} (no metadata: a bare list of rows)"
    return (f"{label}: {path} ({meta.get('bench')} --preset={meta.get('preset')}, commit {meta.get('commit')}, "
            f"{meta.get('date')}, load average {meta.get('load_avg')})")


def compare(before_path: Path, after_path: Path, where: dict[str, str], tolerance: float) -> tuple[list[str], int]:
    """The report's lines and the number of flagged differences."""
    before_meta, before_all = load_rows(before_path)
    after_meta, after_all = load_rows(after_path)
    before, after = selected(before_all, where), selected(after_all, where)
    if not before or not after:
        raise CompareError(f"no rows to compare ({len(before)} in {before_path}, {len(after)} in {after_path}"
                           + (f" with {', '.join(f'{k}={v}' for k, v in where.items())})" if where else ")"))
    train = is_train(before) and is_train(after)
    skip = set(where)
    ratios = train_ratios if train else kernel_ratios
    ratio_before, ratio_after = ratios(before, skip), ratios(after, skip)
    bound = math.log1p(tolerance)
    lines = [describe("BEFORE", before_path, before_meta), describe("AFTER ", after_path, after_meta),
             f"ours/reference time ratio in each run; quotient AFTER/BEFORE flagged outside "
             f"[{1 / (1 + tolerance):.3f}, {1 + tolerance:.3f}]"]
    keys = [k for k in ratio_before if k in ratio_after]
    width = max((len(key_text(k)) for k in keys), default=3)
    lines.append(f"{'row':<{width}}  {'BEFORE':>7}  {'AFTER':>7}  {'quotient':>8}")
    flagged = 0
    for key in keys:
        quotient = ratio_after[key] / ratio_before[key]
        beyond = abs(math.log(quotient)) > bound
        flagged += beyond
        lines.append(f"{key_text(key):<{width}}  {ratio_before[key]:7.3f}  {ratio_after[key]:7.3f}  "
                     f"{quotient:8.3f}" + ("  DIFFERENT" if beyond else ""))
    for label, only in (("BEFORE", ratio_before.keys() - ratio_after.keys()),
                        ("AFTER", ratio_after.keys() - ratio_before.keys())):
        lines += sorted(f"{key_text(key)}: only in {label}" for key in only)
    if train:
        after_rows = {row_key(r, skip): r for r in after}
        for r in before:
            key = row_key(r, skip)
            if key in after_rows:
                line, differ = losses_line(key, r, after_rows[key])
                flagged += differ
                lines.append(line)
    lines.append(f"{flagged} difference(s) flagged" if flagged else "no difference beyond the bound")
    return lines, flagged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the first result file")
    parser.add_argument("after", type=Path, help="the second result file (its ratios are divided by the first's)")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                        help="compare only rows with this value (rows without the field take part); repeatable")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="relative change of a ratio flagged as a difference (default %(default)s)")
    args = parser.parse_args(argv)
    if args.tolerance <= 0:
        parser.error("--tolerance must be above 0")
    try:
        lines, flagged = compare(args.before, args.after, parse_where(args.where), args.tolerance)
    except CompareError as e:
        print(f"compare_results: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
