"""bench_train's output: the JSON rows, the text table and the PNG plot."""

from __future__ import annotations

import os
from typing import Any

from benchmarks.train_bench.spec import SETTINGS, BenchSpec

LABELS = {"as_shipped": "as shipped", "same_settings": "same process settings"}


def make_rows(spec: BenchSpec, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows, one per implementation and settings; each codex_ml row also holds its ratios against the other
    two under the same settings."""
    rows = []
    for r in results:
        rows.append({
            "impl": r["impl"], "settings": r["settings"], "allocator": r["allocator"], "cpu_gemm": r["cpu_gemm"],
            "params": r["params"], "seq_len": spec.seq_len, "batch": spec.batch, "steps": spec.steps,
            "timed_steps": spec.steps - spec.timing_warmup, "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_median": r["tokens_per_s_median"], "tokens_per_s_best": r["tokens_per_s_best"],
            "peak_rss_mb": r["peak_rss_mb"], "train_peak_rss_mb": r["train_peak_rss_mb"],
            "base_rss_mb": r["base_rss_mb"], "peak_gpu_mb": r["peak_gpu_mb"], "first_loss": r["losses"][0],
            "final_loss": r["losses"][-1], "threads": r["threads"], "device": spec.device,
            "precision": spec.precision, "wall_s": r["wall_s"], "load_avg_1m": r["load_avg_1m"],
            "losses": r["losses"], "step_s": r["step_s"],
            "plain_loss": spec.plain_loss if r["impl"] == "plain_torch" else None,
        })
    for settings in SETTINGS:
        group = [row for row in rows if row["settings"] == settings]
        codex = next((row for row in group if row["impl"] == "codex_ml"), None)
        for other in group:
            if codex is None or other is codex:
                continue
            codex[f"speedup_vs_{other['impl']}"] = codex["tokens_per_s"] / other["tokens_per_s"]
            codex[f"speedup_median_vs_{other['impl']}"] = codex["tokens_per_s_median"] / other["tokens_per_s_median"]
            codex[f"speedup_best_vs_{other['impl']}"] = codex["tokens_per_s_best"] / other["tokens_per_s_best"]
            codex[f"rss_ratio_vs_{other['impl']}"] = codex["peak_rss_mb"] / other["peak_rss_mb"]
            codex[f"loss_diff_vs_{other['impl']}"] = codex["final_loss"] - other["final_loss"]
    return rows


def make_dist_rows(spec: BenchSpec, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows of a distributed preset, one per training and settings (dist.merge_ranks's measurements and the
    run's shape); each codex_ml row also holds its ratios against every other training under the same settings."""
    rows = [{**{k: v for k, v in r.items() if k not in ("losses", "step_s")}, "seq_len": spec.seq_len,
             "batch": spec.batch, "steps": spec.steps, "timed_steps": spec.steps - spec.timing_warmup,
             "first_loss": r["losses"][0], "final_loss": r["losses"][-1], "device": spec.device,
             "precision": spec.precision, "plain_loss": None, "losses": r["losses"], "step_s": r["step_s"]}
            for r in results]
    for settings in SETTINGS:
        group = [row for row in rows if row["settings"] == settings]
        for ours in group:
            if not ours["impl"].startswith("codex_ml"):
                continue
            for other in group:
                if other is not ours:
                    name = other["impl"]
                    ours[f"speedup_vs_{name}"] = ours["tokens_per_s"] / other["tokens_per_s"]
                    ours[f"rss_ratio_vs_{name}"] = ours["peak_rss_mb"] / other["peak_rss_mb"]
                    ours[f"loss_diff_vs_{name}"] = ours["final_loss"] - other["final_loss"]
    return rows


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return "/".join(_cell(key, v) for v in value)
    if isinstance(value, float):
        return f"{value:.4f}" if "loss" in key else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


TABLE_KEYS = ("impl", "allocator", "cpu_gemm", "params", "tokens_per_s", "tokens_per_s_median", "tokens_per_s_best",
              "peak_rss_mb", "train_peak_rss_mb", "base_rss_mb", "first_loss", "final_loss", "wall_s")
# Distributed rows: memory per process (rank 0/rank 1/...).
DIST_TABLE_KEYS = ("impl", "parallelism", "activation_checkpointing", "allocator", "params", "tokens_per_s",
                   "tokens_per_s_median", "peak_rss_mb_per_rank", "train_peak_rss_mb_per_rank", "first_loss",
                   "final_loss", "wall_s")


def print_table(rows: list[dict[str, Any]], keys: tuple[str, ...] = TABLE_KEYS) -> None:
    """For each settings: the `keys` columns as an aligned text table, then the codex_ml ratios (the rest is in
    the JSON)."""
    widths = [max(len(k), *(len(_cell(k, row[k])) for row in rows)) for k in keys]
    for settings in SETTINGS:
        group = [row for row in rows if row["settings"] == settings]
        if not group:
            continue
        print(f"\n{LABELS[settings]} ({settings}):")
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for row in group:
            print("  ".join(_cell(k, row[k]).ljust(w) for k, w in zip(keys, widths)))
        for row in group:
            ratios = {k: v for k, v in row.items() if k.startswith(("speedup", "rss_ratio_vs", "loss_diff_vs"))}
            if ratios:
                print(f"{row['impl']}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("load average (1 min) at start/end of each process: " + ", ".join(
        f"{row['impl']} ({row['settings']}) {row['load_avg_1m'][0]:.1f}/{row['load_avg_1m'][1]:.1f}"
        for row in rows))


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """PNG: training loss against tokens seen (left) and tokens/s (right), one colour per implementation, one
    line style (left) and bar group (right) per settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(row["impl"] for row in rows))
    settings = [s for s in SETTINGS if any(row["settings"] == s for row in rows)]
    colours = {impl: f"C{i}" for i, impl in enumerate(impls)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for row in rows:
        tokens = [(i + 1) * row["batch"] * row["seq_len"] for i in range(len(row["losses"]))]
        left.plot(tokens, row["losses"], label=f"{row['impl']} ({LABELS[row['settings']]})", linewidth=1.2,
                  color=colours[row["impl"]], linestyle="-" if row["settings"] == "as_shipped" else "--")
    left.set_xlabel("tokens")
    left.set_ylabel("training loss")
    left.set_title("loss vs tokens (same batches)")
    left.legend(fontsize=8)
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        group = {row["impl"]: row["tokens_per_s"] for row in rows if row["settings"] == s}
        xs = [j + (i - (len(settings) - 1) / 2) * width for j, impl in enumerate(impls) if impl in group]
        bars = right.bar(xs, [group[impl] for impl in impls if impl in group], width,
                         color=[colours[impl] for impl in impls if impl in group], alpha=1.0 if i == 0 else 0.55,
                         label=LABELS[s])
        right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(range(len(impls)), impls)
    right.set_ylabel("tokens/s")
    right.legend(fontsize=8)
    first = rows[0]
    right.set_title(f"throughput ({first['device']}, {first['precision']}, {first['threads']} threads)")
    fig.suptitle(f"{first['params'] / 1e6:.1f}M params, batch {first['batch']} x {first['seq_len']} tokens, "
                 f"{first['steps']} steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
