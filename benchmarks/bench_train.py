"""End-to-end training benchmark: codex_ml's Trainer against the Hugging Face Trainer and a plain PyTorch loop.

    tools/bazel run //benchmarks:bench_train -- --preset=cpu --json=runs/bench_train/cpu.json

(`//python:bench_train` is the same target.) One decoder model is trained three ways (train_bench/runners.py):
- codex_ml:    codex_ml.training.Trainer on codex_ml.models.GPT (attention and loss on codex_ml.ops kernels);
- hf_trainer:  transformers.Trainer on LlamaForCausalLM of the same shape (SDPA attention, full logits);
- plain_torch: a nanoGPT-style loop over train_bench/plain_gpt.py (F.scaled_dot_product_attention with
               enable_gqa) with the loss a careful user writes with PyTorch alone (--plain_loss):
               torch_chunked, PyTorch's chunked F.linear_cross_entropy in chunks of 1,024 tokens, which never
               holds the logits, or full_logits, F.cross_entropy on the full [tokens, vocabulary] logits.
               torch_chunked is the default (where PyTorch has it; full_logits otherwise): of the loss references
               of //kernels:bench_linear_cross_entropy it is the one that needs no torch.compile (nothing here is
               compiled), and it is faster than the full logits at the cpu preset's shape (docs/kernels.md); its
               "auto" chunking would be several times slower there on the CPU (train_bench/runners.py,
               PLAIN_CHUNK_TOKENS).

Two comparisons in one run (--settings), each with its own ratios:
- as_shipped: each framework as its users run it. codex_ml sets glibc to keep freed blocks (its Trainer's
  keep_freed_memory, part of its speed) and its fp32 CPU products (its projections, through codex_ml.ops.linear,
  and its fused loss) go to oneDNN on AVX-512 CPUs that are not Intel's (kernels/common/cpu_gemm.h; elsewhere to
  ATen's MKL); the HF Trainer and the plain loop keep glibc's defaults and PyTorch's products (ATen's MKL).
- same_settings: the process settings identical for all three, so the difference is codex_ml's own kernels and
  trainer: glibc keeps freed blocks in all three, and all three products go to ATen (MKL): CODEX_CPU_GEMM=aten
  for codex_ml, since PyTorch's own fp32 layers have no switch to oneDNN that keeps fp32 numerics.
Each row records what it ran with: `settings`, `allocator` ("keep_freed" or "glibc_default") and `cpu_gemm`
("onednn" or "aten"; null on CUDA). On CUDA only the allocator part applies (to the CPU side of the process).

Fairness, by construction:
- Same model math and the same initial weights: the driver initializes one codex_ml GPT (fixed seed) and every
  implementation loads those weights (renamed for Llama by codex_ml.models.export.llama_weight_names), so the
  first losses agree to float rounding.
- Same data: a deterministic synthetic corpus (Zipf-distributed "phrases" repeated with 5% noise, so the loss
  falls) cut into identical (input_ids, targets) batches, in the same order, for all three. The HF Trainer
  gets `shift_labels` = targets, so it solves the same next-token problem over all seq_len positions.
- Same optimizer and schedule: AdamW (weight decay on matrices only, PyTorch's fused kernel), the same
  lr/betas/weight decay, linear warmup then constant lr, gradient clipping at the same norm, the same number
  of steps, no gradient accumulation, no evaluation, no MLflow, no checkpoints except the final one the codex_ml
  Trainer always writes (after the last step: outside the timing, inside its process's peak RSS).
- Same threads (torch.set_num_threads; each row records the count after training) and precision (fp32 on CPU,
  bf16 autocast on CUDA). Nothing is compiled.
- Not the same, on purpose: each computes its loss its own way (codex_ml's fused kernel, the HF model's full
  logits, the plain loop's --plain_loss; with full_logits it holds them through the backward pass, as a
  nanoGPT-style `logits, loss = model(x, y)` loop does).

Measurements. Each implementation runs, under each settings, in its own fresh Python process
(train_bench/worker.py). The three processes of one settings are alive at once but run in lockstep
(train_bench/lockstep.py): an optimizer step hook hands the turn back to the driver after every step, and the
driver lets one process at a time run its next step, rotating the order each step. So only one computes at any
moment (with all the threads), and load from other jobs on a shared machine falls on all of them alike instead of
on whichever happened to run during it. The settings run one after the other, and the result file is rewritten
after each, so a run stopped early keeps the rows of the settings it finished: the cpu preset needs about 5 GB of
memory.
- tokens_per_s: batch * seq_len * timed steps / their summed durations, over the steps after the first
  `timing_warmup`. A step's duration runs from the process getting its turn to the end of its optimizer step,
  so the framework's work between steps (data, logging, zeroing gradients, clipping) is included and start-up,
  the warmup steps and the final checkpoint are not. tokens_per_s_median and tokens_per_s_best use the median
  and the shortest timed step: other jobs only add time, so these resist them (step_s holds every timed step's
  seconds); load_avg_1m (the 1-minute load average when the process started and ended) shows whether there
  were any.
- peak_rss_mb: the process's resident-set high-water mark (VmHWM in /proc/self/status) when it exits, i.e.
  imports, model, optimizer state and training together. Not ru_maxrss: Linux carries that across execve,
  so a child would report at least its parent's size. train_peak_rss_mb is VmHWM right after the last
  optimizer step and base_rss_mb the resident set when the worker starts (torch imported, the framework of the
  implementation not yet: the HF side's transformers and accelerate add about 230 MB to its peak after it).
- final_loss: the training loss of the last step (the same batch for all three); losses: every step's.
- plain_loss: the plain loop's loss (--plain_loss) in its rows, null in the others.

Distributed presets (dist_quick, dist; dist_gpu on 8 GPUs with nccl): four trainings, each spec.world_size
processes under torchrun (gloo on 127.0.0.1 on the CPU, one thread per process), run one after another rather than
in lockstep (train_bench/dist.py): codex_ml_ddp, codex_ml_fsdp (Trainer.parallelism = 'fsdp': FSDP2's
fully_shard per block and at the root), codex_ml_fsdp_ac (also Trainer.activation_checkpointing) and
hf_trainer_fsdp (the HF Trainer with its FSDP2 integration, accelerate's FSDP plugin with fsdp_version=2). The
same initial weights, global batches (process r reads rows [r * B / N, (r + 1) * B / N) of each), optimizer and
schedule as above; settings default to as_shipped, with the HF Trainer's FSDP2 also run under same_settings
(codex_ml's allocator setting, which under FSDP returns freed blocks to the system). Each row is one training:
tokens_per_s counts the global batch over steps that last until the slowest process finishes them;
peak_rss_mb_per_rank and train_peak_rss_mb_per_rank hold each process's VmHWM (peak_rss_mb, the largest),
peak_gpu_mb_per_rank CUDA's max allocated; the losses are rank 0's (the mean over the processes, as both frameworks
log it); the codex_ml rows hold their ratios against every other training (speedup_vs_*, rss_ratio_vs_*,
loss_diff_vs_*).

The result file (--json; default runs/bench_train/<preset>.json) is codex_ml.kernels.bench.record's format:
{"meta": {...}, "rows": [...]}, one row per implementation and settings; a PNG plot is written beside it.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from absl import flags

from benchmarks.train_bench.dist import run_distributed
from benchmarks.train_bench.lockstep import run_lockstep
from benchmarks.train_bench.report import (
    DIST_TABLE_KEYS,
    TABLE_KEYS,
    make_dist_rows,
    make_rows,
    print_table,
    write_plot,
)
from benchmarks.train_bench.spec import (
    DIST_IMPLS,
    IMPLS,
    PLAIN_LOSSES,
    PRESETS,
    SETTINGS,
    BenchSpec,
    chunked_loss_available,
    gpt_config,
)
from codex_ml.cli.common import enter_working_directory, parse_flags, usage_error
from codex_ml.kernels.bench.record import ResultFile

PROG = "bench_train"


def define_flags(fv: flags.FlagValues) -> None:
    """bench_train's flags."""
    flags.DEFINE_enum("preset", "quick", list(PRESETS),
                      "quick (seconds, tiny model), cpu (the CPU target, minutes), gpu (CUDA, bf16); distributed: "
                      "dist_quick (seconds), dist (2 CPU processes on gloo, minutes), dist_gpu (8 GPUs on nccl)",
                      flag_values=fv)
    flags.DEFINE_string("json", None, "the result file; default runs/bench_train/<preset>.json", flag_values=fv)
    flags.DEFINE_string("plot", None, "PNG of loss and throughput; default: --json with .png", flag_values=fv)
    flags.DEFINE_list("impls", None, "comma-separated subset of " + ", ".join(IMPLS) + " (default: all); with a "
                      "distributed preset, of " + ", ".join(DIST_IMPLS), flag_values=fv)
    flags.DEFINE_list("settings", None, "comma-separated subset of " + ", ".join(SETTINGS) + " (see the "
                      "description above; default: both, as_shipped with a distributed preset)", flag_values=fv)
    flags.DEFINE_integer("steps", None, "override the preset's optimizer steps", flag_values=fv)
    flags.DEFINE_integer("threads", None, "torch threads in every process", flag_values=fv)
    flags.DEFINE_enum("plain_loss", BenchSpec.plain_loss if chunked_loss_available() else "full_logits",
                      list(PLAIN_LOSSES), "the plain loop's loss: torch_chunked (PyTorch's chunked "
                      "F.linear_cross_entropy; the default where PyTorch has it) or full_logits (F.cross_entropy on "
                      "the full logits)", flag_values=fv)
    flags.DEFINE_string("work_dir", None,
                        "keep the children's logs and run directories here (default: a temporary directory)",
                        flag_values=fv)


def _subset(flag: str, given: list[str], choices: tuple[str, ...]) -> list[str]:
    """The chosen names in their canonical order; a usage error for an empty list or an unknown name."""
    if not given or set(given) - set(choices):
        usage_error(PROG, f"--{flag} must name some of {', '.join(choices)}, got {','.join(given)!r}")
    return [c for c in choices if c in given]


def resolve_spec(args: flags.FlagValues) -> BenchSpec:
    """The preset with the command line's overrides; a usage error for a run that cannot be made."""
    spec = PRESETS[args.preset]
    if args.steps is not None:
        spec = replace(spec, steps=args.steps)
    spec = replace(spec, threads=args.threads or spec.threads or torch.get_num_threads(), plain_loss=args.plain_loss)
    if spec.timing_warmup < 1 or spec.steps <= spec.timing_warmup:
        usage_error(PROG, f"--steps must exceed the {spec.timing_warmup} untimed warmup steps")
    if spec.plain_loss == "torch_chunked" and not chunked_loss_available():
        usage_error(PROG, f"--plain_loss=torch_chunked needs PyTorch's chunked F.linear_cross_entropy, which torch "
                          f"{torch.__version__} does not have: use --plain_loss=full_logits")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        usage_error(PROG, f"--preset={args.preset} needs a CUDA device and none is available")
    if spec.device.startswith("cuda") and torch.cuda.device_count() < spec.world_size:
        usage_error(PROG, f"--preset={args.preset} needs {spec.world_size} CUDA devices and this machine has "
                          f"{torch.cuda.device_count()}")
    return spec


def save_init(spec: BenchSpec, path: Path) -> None:
    """The shared initial weights: a codex_ml GPT initialized from the seed."""
    from codex_ml.models.gpt import GPT

    torch.manual_seed(spec.seed)
    torch.save(GPT(gpt_config(spec)).state_dict(), path)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark on `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = parse_flags(PROG, __doc__, define_flags, argv)
    spec = resolve_spec(args)
    impls = _subset("impls", spec.impls if args.impls is None else args.impls, spec.impls)
    default_settings = ["as_shipped"] if spec.distributed else list(SETTINGS)
    settings = _subset("settings", default_settings if args.settings is None else args.settings, SETTINGS)
    enter_working_directory()  # under `bazel run`: outputs where the user ran it
    json_path = args.json or os.path.join("runs", "bench_train", f"{args.preset}.json")
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    results = ResultFile(json_path, PROG, args.preset, argv)
    print(f"{PROG} --preset={args.preset}: {spec.n_layer} layers x d_model {spec.d_model}, vocab "
          f"{spec.vocab_size}, batch {spec.batch} x {spec.seq_len} tokens, {spec.steps} steps "
          f"({spec.timing_warmup} untimed), {spec.threads} threads, {spec.device} {spec.precision}"
          f"{f', {spec.world_size} processes each' if spec.distributed else ''}; {', '.join(impls)} under "
          f"{', '.join(settings)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        init_path = work / "init.pt"
        save_init(spec, init_path)
        if spec.distributed:
            runs = [(impl, s) for s in settings for impl in impls]
            if "hf_trainer_fsdp" in impls and "same_settings" not in settings:
                # As shipped, codex_ml's FSDP returns freed blocks to the system and the HF Trainer keeps glibc's
                # defaults: its FSDP2 under codex_ml's process settings too, so that allocator is compared alike.
                runs.append(("hf_trainer_fsdp", "same_settings"))
            measured = run_distributed(runs, spec, work, init_path)
        else:
            measured = []
            for group in settings:
                measured += run_lockstep([(impl, group) for impl in impls], spec, work, init_path)
                results.write(make_rows(spec, measured))  # the rows so far
    rows = make_dist_rows(spec, measured) if spec.distributed else make_rows(spec, measured)
    for row in rows:
        if not all(math.isfinite(x) for x in row["losses"]):
            print(f"warning: {row['impl']} ({row['settings']}) had a non-finite loss", file=sys.stderr)
    print_table(rows, DIST_TABLE_KEYS if spec.distributed else TABLE_KEYS)
    results.write(rows)
    write_plot(rows, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
