"""bench_train's distributed presets (dist_quick, dist, dist_gpu): each training is spec.world_size processes
under torchrun, as users launch them; the trainings run one after another.

    python -m torch.distributed.run --nproc_per_node=N --master_addr=127.0.0.1 --master_port=PORT \\
        -m benchmarks.train_bench.dist IMPL TASK_JSON OUT_PREFIX

runs one training (one of DIST_IMPLS) in each of the N processes; process r writes its measurements to
OUT_PREFIX.rank<r>.json. The driver's side (run_distributed) starts one torchrun per training and merges its
processes' measurements into one result: a step lasts until its slowest process has finished it.

One training at a time, not in lockstep as the one-process presets: a distributed training's processes compute
together, and the memory of every training at once would be the sum of their peaks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_bench.lockstep import child_env
from benchmarks.train_bench.runners import CorpusRows, fit_codex, hf_arguments, llama_model, loss_log
from benchmarks.train_bench.spec import BenchSpec, CorpusData, SyntheticCorpus, gpt_config, lr_factor, make_optimizer
from benchmarks.train_bench.step_clock import StepClock, rss_mb
from benchmarks.train_bench.worker import apply_allocator_setting, cpu_gemm_backend

# Each training's parallelism and whether it checkpoints activations (recomputes each block in the backward pass).
PARALLELISM = {"codex_ml_ddp": ("ddp", False), "codex_ml_fsdp": ("fsdp", False),
               "codex_ml_fsdp_ac": ("fsdp", True), "hf_trainer_fsdp": ("fsdp", False)}


def _framework(impl: str) -> str:
    return "codex_ml" if impl.startswith("codex_ml") else "hf_trainer"


def _load_init(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_codex_dist(impl: str, spec: BenchSpec, corpus: SyntheticCorpus, init_path: str,
                   run_dir: str) -> dict[str, Any]:
    """codex_ml's Trainer on its GPT under Trainer.parallelism (and Trainer.activation_checkpointing)."""
    from codex_ml.models.gpt import GPT

    model = GPT(gpt_config(spec))
    model.load_state_dict(_load_init(init_path))  # the state dict is freed here, before training
    parallelism, checkpointing = PARALLELISM[impl]
    settings = {} if parallelism == "ddp" else {"parallelism": parallelism,
                                                "activation_checkpointing": checkpointing}
    return fit_codex(spec, model, CorpusData(corpus), run_dir, None, **settings)


def run_hf_fsdp(spec: BenchSpec, corpus: SyntheticCorpus, init_path: str, run_dir: str) -> dict[str, Any]:
    """The HF Trainer on LlamaForCausalLM with its FSDP2 integration: TrainingArguments(fsdp=..., fsdp_config=
    {"version": 2, ...}), i.e. accelerate's FSDP plugin with fsdp_version=2, which applies fully_shard per decoder
    layer and at the root (gloo on the CPU, nccl on GPUs).

    accelerate enables its FSDP plugin on accelerators only: on the CPU (its MULTI_CPU mode) it keeps the plugin
    unused and the HF Trainer falls back to DistributedDataParallel. There the benchmark switches the plugin on
    itself, right after the Trainer made its Accelerator, so the CPU runs the same accelerate FSDP2 code
    (fsdp2_prepare_model) that GPUs run; the run fails if the model's parameters did not come out sharded."""
    import transformers
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor

    model = llama_model(spec, _load_init(init_path))
    clocks: list[StepClock] = []

    class BenchTrainer(transformers.Trainer):
        """The shared optimizer and schedule: with FSDP the HF Trainer makes them itself (accelerate then swaps
        the optimizer's parameters for the sharded ones), so they are made here rather than passed in. And FSDP
        on the CPU (see above)."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = make_optimizer(model if model is not None else self.model, spec)
                clocks.append(StepClock(self.optimizer, spec, None))
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer, lambda step: lr_factor(spec, step))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    cuda = spec.device.startswith("cuda")
    args = hf_arguments(spec, run_dir, ddp_backend="nccl" if cuda else "gloo", fsdp="full_shard",
                        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                     "reshard_after_forward": True, "activation_checkpointing": False})
    losses: dict[int, float] = {}
    trainer = BenchTrainer(model=model, args=args, train_dataset=CorpusRows(spec, corpus),
                           callbacks=[loss_log(losses)])
    trainer.train()
    if not all(isinstance(p, DTensor) for p in trainer.model.parameters()):
        raise RuntimeError("the HF Trainer did not shard the model (FSDP2 gives DTensor parameters)")
    return {"params": sum(p.numel() for p in trainer.model.parameters()),
            "losses": [losses[s] for s in range(1, spec.steps + 1)], "clock": clocks[0]}


def worker_main(impl: str, task_path: str, out_prefix: str) -> None:
    """One process of a distributed training (under torchrun): trains and writes its measurements."""
    from codex_ml.training import shutdown_distributed

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    task = json.loads(Path(task_path).read_text())
    spec = BenchSpec(**{**task["spec"], "betas": tuple(task["spec"]["betas"])})
    rank = int(os.environ["RANK"])
    torch.set_num_threads(spec.threads)
    base_rss = rss_mb("VmRSS")
    allocator = apply_allocator_setting(_framework(impl), task["settings"], spec, PARALLELISM[impl][0])
    corpus = SyntheticCorpus(spec)
    if impl == "hf_trainer_fsdp":
        result = run_hf_fsdp(spec, corpus, task["init_path"], task["run_dir"])
    else:
        result = run_codex_dist(impl, spec, corpus, task["init_path"], task["run_dir"])
    shutdown_distributed()
    clock: StepClock = result.pop("clock")
    if clock.count != spec.steps:
        raise RuntimeError(f"{impl}: {clock.count} optimizer steps seen, expected {spec.steps}")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None
    Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps({
        **result, "rank": rank, "allocator": allocator, "cpu_gemm": cpu_gemm_backend(_framework(impl), spec),
        "step_s": clock.step_s[spec.timing_warmup - 1:], "peak_rss_mb": rss_mb("VmHWM"),
        "train_peak_rss_mb": clock.train_peak_rss_mb, "base_rss_mb": base_rss, "peak_gpu_mb": peak_gpu,
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_ranks(impl: str, settings: str, spec: BenchSpec, ranks: list[dict[str, Any]],
                wall_s: float) -> dict[str, Any]:
    """One training's measurements from its processes' (in rank order): a step's duration is the longest of its
    processes' (tokens/s counts the global batch), memory is per process, the losses are rank 0's (the mean over
    the processes, as both frameworks log it)."""
    step_s = [max(steps) for steps in zip(*(r["step_s"] for r in ranks))]
    ranked, tokens = sorted(step_s), spec.batch * spec.seq_len
    first = ranks[0]
    gpu = [r["peak_gpu_mb"] for r in ranks]
    parallelism, checkpointing = PARALLELISM[impl]
    return {
        "impl": impl, "settings": settings, "parallelism": parallelism, "activation_checkpointing": checkpointing,
        "world_size": spec.world_size, "backend": "nccl" if spec.device.startswith("cuda") else "gloo",
        "allocator": first["allocator"], "cpu_gemm": first["cpu_gemm"], "params": first["params"],
        "losses": first["losses"], "tokens_per_s": tokens * len(step_s) / sum(step_s),
        "tokens_per_s_median": tokens / ranked[len(ranked) // 2], "tokens_per_s_best": tokens / ranked[0],
        "timed_s": sum(step_s), "step_s": step_s,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
        "train_peak_rss_mb": max(r["train_peak_rss_mb"] for r in ranks),
        "train_peak_rss_mb_per_rank": [r["train_peak_rss_mb"] for r in ranks],
        "base_rss_mb": max(r["base_rss_mb"] for r in ranks),
        "peak_gpu_mb": max(gpu) if None not in gpu else None, "peak_gpu_mb_per_rank": gpu if None not in gpu else None,
        "threads": first["threads"], "wall_s": wall_s,
        "load_avg_1m": [min(r["load_avg_1m"][0] for r in ranks), max(r["load_avg_1m"][1] for r in ranks)],
    }


def run_distributed(runs: list[tuple[str, str]], spec: BenchSpec, work: Path, init_path: Path) -> list[dict[str, Any]]:
    """Runs every (implementation, settings) pair as one torchrun of spec.world_size processes on this machine,
    one after another; returns each one's merged measurements, in the order of `runs`."""
    measured = []
    for impl, settings in runs:
        name = f"{impl}.{settings}"
        log_path, out_prefix, task_path = work / f"{name}.log", work / f"{name}.result", work / f"{name}.task.json"
        task_path.write_text(json.dumps({"spec": asdict(spec), "settings": settings, "init_path": str(init_path),
                                         "run_dir": str(work / f"run_{name}")}))
        env = child_env(settings)
        env["OMP_NUM_THREADS"] = str(spec.threads)
        if not spec.device.startswith("cuda"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the processes meet on 127.0.0.1
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   f"--nproc_per_node={spec.world_size}", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                   "-m", "benchmarks.train_bench.dist", impl, str(task_path), str(out_prefix)]
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        wall_s = time.perf_counter() - started
        outputs = [Path(f"{out_prefix}.rank{r}.json") for r in range(spec.world_size)]
        if proc.returncode != 0 or not all(p.is_file() for p in outputs):
            raise RuntimeError(f"{impl} ({settings}) failed (exit {proc.returncode}); end of {log_path}:\n"
                               f"{log_path.read_text()[-4000:]}")
        measured.append(merge_ranks(impl, settings, spec, [json.loads(p.read_text()) for p in outputs], wall_s))
        print(f"  {impl} ({settings}): {measured[-1]['tokens_per_s']:,.0f} tokens/s, peak RSS "
              f"{measured[-1]['peak_rss_mb']:,.0f} MB per process, {wall_s:.0f} s", flush=True)
    return measured


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
