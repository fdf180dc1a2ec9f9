"""The short table tools/gpu_check.sh prints last: the issues' target figures, read from the benchmarks' JSON rows.

    python3 tools/gpu_summary.py OUT_DIR     (OUT_DIR holds bench_*.json, as tools/gpu_check.sh writes them)

Ratios only compare rows measured in the same run. Each section says which target it answers.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load(out: Path, name: str) -> list[dict]:
    """The rows of a result file ({"meta": ..., "rows": [...]}, codex_ml/kernels/bench/record.py)."""
    path = out / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def loss_section(rows: list[dict]) -> None:
    if not rows:
        return
    first = rows[0]
    print(f"linear_cross_entropy N={first['N']} H={first['H']} V={first['V']} {first['dtype']} "
          "(issue 3: time <= 0.85x ref, memory <= 0.05x ref, time <= 1.00x liger)")
    liger = {r["pass"]: r["time_ms"] for r in rows if r["impl"] == "liger"}
    table = []
    for r in rows:
        vs_liger = r["time_ms"] / liger[r["pass"]] if r["pass"] in liger else None
        mem = r["peak_mem_mb"] / r["ref_peak_mem_mb"] if r["ref_peak_mem_mb"] else None
        table.append([r["impl"], r["pass"], f"{r['time_ms']:.2f}", _x(r["time_ms"] / r["ref_time_ms"]),
                      _x(r["time_ms"] / r["floor_time_ms"]), _x(mem), _x(vs_liger)])
    _table(["impl", "pass", "time_ms", "time/ref", "time/floor", "mem/ref", "time/liger"], table)


def attention_section(rows: list[dict]) -> None:
    if not rows:
        return
    peak = next((r["tflops"] for r in rows if r["kernel"] == "matmul_peak"), None)
    rows = [r for r in rows if r["kernel"] == "attention"]
    if peak:
        print(f"bf16 matmul peak measured: {peak:.0f} TFLOP/s")
    target = [r for r in rows if r["T"] == 4096 and r["D"] == 128 and r["causal"] and r["B"] * r["H"] >= 128]
    shown = target or rows
    print("attention, causal, T=4096, D=128 (issue 4: triton fwd >= 1.0x SDPA and >= 450 TFLOP/s, bwd >= 0.8x SDPA)"
          if target else "attention (every row)")
    _table(["impl", "B", "H", "pass", "time_ms", "TFLOP/s", "SDPA/ours"],
           [[r["impl"], str(r["B"]), str(r["H"]), r["pass"], f"{r['time_ms']:.3f}", f"{r['tflops']:.0f}",
             _x(r["ref_time_ms"] / r["time_ms"])] for r in shown])
    if target:
        for impl in sorted({r["impl"] for r in rows}):
            for pass_name in ("fwd", "bwd", "fwd+bwd"):
                ratios = [r["ref_time_ms"] / r["time_ms"] for r in rows if r["impl"] == impl and r["pass"] == pass_name]
                if ratios:
                    print(f"  all shapes, {impl} {pass_name}: SDPA/ours median {statistics.median(ratios):.2f}x, "
                          f"min {min(ratios):.2f}x over {len(ratios)} rows")


def tune_section(rows: list[dict]) -> None:
    print("tune_attention: the 3 fastest correct configs per pass, and the current default "
          "(block_m, block_n, warps, stages)")
    for pass_name in ("fwd", "bwd"):
        ok = [r for r in rows if r["pass"] == pass_name and r["status"] == "ok"]
        shown = sorted(ok, key=lambda r: r["time_ms"])[:3]
        shown += [r for r in rows if r["pass"] == pass_name and r["default"] and r not in shown]
        _table(["pass", "config", "default", "time_ms", "TFLOP/s", "SDPA/ours", "status"],
               [[r["pass"], f"{r['block_m']},{r['block_n']},{r['num_warps']},{r['num_stages']}", str(r["default"]),
                 "-" if r["time_ms"] is None else f"{r['time_ms']:.3f}",
                 "-" if r["tflops"] is None else f"{r['tflops']:.0f}", _x(r["ratio"]), r["status"][:40]]
                for r in shown])
        failed = [r for r in rows if r["pass"] == pass_name and r["status"] != "ok"]
        if failed:
            print(f"  {len(failed)} {pass_name} configs not ok: " + "; ".join(
                f"{r['block_m']},{r['block_n']},{r['num_warps']},{r['num_stages']} {r['status'][:30]}" for r in failed))


def layers_section(rows: list[dict]) -> None:
    if not rows:
        return
    print("layer ops (eager time / ours; above 1: faster than eager)")
    _table(["op", "impl", "dtype", "pass", "time_ms", "eager/ours"],
           [[r["kernel"], r["impl"], r["dtype"], r["pass"], f"{r['time_ms']:.3f}", _x(r["ratio"])] for r in rows])


def train_section(rows: list[dict]) -> None:
    if not rows:
        return
    first = rows[0]
    print(f"bench_train {first['params'] / 1e6:.1f}M params, {first['batch']}x{first['seq_len']} tokens, "
          f"{first['steps']} steps, {first['device']} {first['precision']} "
          "(issue 8: >= 1.3x hf_trainer tokens/s, <= 0.7x its memory, >= 1.1x plain_torch, equal loss)")
    table = []
    for r in rows:  # ratios against the HF Trainer under the same settings (as_shipped, same_settings)
        hf = next((h for h in rows if h["impl"] == "hf_trainer" and h["settings"] == r["settings"]), None)
        mem_key = "peak_gpu_mb" if r.get("peak_gpu_mb") is not None else "peak_rss_mb"
        vs_hf = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        mem_vs_hf = r[mem_key] / hf[mem_key] if hf and hf.get(mem_key) else None
        table.append([r["impl"], r["settings"], f"{r['tokens_per_s']:.0f}", _x(vs_hf),
                      f"{r[mem_key]:.0f} ({mem_key})", _x(mem_vs_hf), f"{r['final_loss']:.4f}"])
    _table(["impl", "settings", "tokens/s", "vs hf", "peak memory MB", "vs hf", "final loss"], table)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    out = Path(argv[1])
    sections = [(loss_section, "bench_linear_cross_entropy"), (attention_section, "bench_attention"),
                (tune_section, "tune_attention"), (layers_section, "bench_layers"), (train_section, "bench_train")]
    for section, name in sections:
        rows = _load(out, name)
        if not rows:
            print(f"{name}: no rows (not run, or failed: see {name}.log)")
            continue
        try:
            section(rows)
        except (KeyError, TypeError, ZeroDivisionError) as err:  # a summary must never hide the logs' figures
            print(f"{name}: could not summarize ({err!r}); the rows are in {name}.json")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
