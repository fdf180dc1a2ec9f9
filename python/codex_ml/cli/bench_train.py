"""End-to-end training benchmark: codex_ml's Trainer against the Hugging Face Trainer and a plain PyTorch loop.

    tools/bazel run //python:bench_train -- --preset=cpu --json=runs/bench_train/cpu.json

One decoder model is trained three ways in one run:
- codex_ml:    codex_ml.training.Trainer on codex_ml.models.GPT (attention and loss on codex_ml.ops kernels);
- hf_trainer:  transformers.Trainer on LlamaForCausalLM of the same shape (SDPA attention, full logits);
- plain_torch: a nanoGPT-style loop over a small module defined here (F.scaled_dot_product_attention with
               enable_gqa, F.cross_entropy on the full [tokens, vocabulary] logits).

Fairness, by construction:
- Same model math and the same initial weights: the driver initializes one codex_ml GPT (fixed seed) and every
  implementation loads those weights (renamed for Llama), so the first losses agree to float rounding.
- Same data: a deterministic synthetic corpus (Zipf-distributed "phrases" repeated with 5% noise, so the loss
  falls) cut into identical (input_ids, targets) batches, in the same order, for all three. The HF Trainer
  gets `shift_labels` = targets, so it solves the same next-token problem over all seq_len positions.
- Same optimizer and schedule: AdamW (weight decay on matrices only, PyTorch's fused kernel), the same
  lr/betas/weight decay, linear warmup then constant lr, gradient clipping at the same norm, the same number
  of steps, no gradient accumulation, no evaluation, no MLflow, no checkpoints except the final one the codex_ml
  Trainer always writes (after the last step: outside the timing, inside its process's peak RSS).
- Same threads (torch.set_num_threads; each row records the count after training) and precision (fp32 on CPU,
  bf16 autocast on CUDA). Nothing is compiled.
- Not the same, on purpose: each side runs as its users run it. codex_ml's Trainer sets glibc to keep freed
  blocks (Trainer.keep_freed_memory, part of its speed); the other two keep glibc's defaults. codex_ml's fp32 CPU
  products (its projections, through codex_ml.ops.linear, and its fused loss) go to oneDNN on AVX-512 CPUs that
  are not Intel's (kernels/include/cpu_gemm.h), the other two's to PyTorch's default, MKL (elsewhere all three
  use MKL). The plain loop holds its logits through the backward pass, as a nanoGPT-style
  `logits, loss = model(x, y)` loop does.

Measurements. Each implementation runs in its own fresh Python process. The three processes are alive at once
but run in lockstep: an optimizer step hook hands the turn back to the driver after every step, and the driver
lets one process at a time run its next step, rotating the order each step. So only one computes at any moment
(with all the threads), and load from other jobs on a shared machine falls on all three alike instead of on
whichever happened to run during it.
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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("codex_ml", "hf_trainer", "plain_torch")


@dataclass(frozen=True)
class BenchSpec:
    """Everything that defines one benchmark run; every implementation gets the same."""

    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    seq_len: int
    batch: int
    steps: int
    timing_warmup: int  # optimizer steps excluded from the tokens/s timing
    learning_rate: float = 1e-3
    lr_warmup: int = 10  # linear lr warmup steps, then constant
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = 1.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    threads: int = 0  # torch.set_num_threads in every process (0: the driver's torch.get_num_threads())


PRESETS: dict[str, BenchSpec] = {
    # Seconds: for the test.
    "quick": BenchSpec(vocab_size=512, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=192, seq_len=64,
                       batch=4, steps=8, timing_warmup=2, learning_rate=3e-3, lr_warmup=2),
    # The CPU target: 18.6M parameters (12.3M of them the tied 32k x 384 embedding), 4 x 512 tokens;
    # about 8 minutes on the 2-core development machine (3-6 s a step per implementation).
    "cpu": BenchSpec(vocab_size=32000, d_model=384, n_layer=4, n_head=6, n_kv_head=2, ffn_hidden=1024, seq_len=512,
                     batch=4, steps=40, timing_warmup=5, learning_rate=6e-4, lr_warmup=10),
    # GPU scale (not yet run on a GPU): 100M parameters, 16 x 1024 tokens, bf16 autocast. The three processes
    # are alive at once (see run_lockstep), so the GPU must hold all three.
    "gpu": BenchSpec(vocab_size=32000, d_model=768, n_layer=12, n_head=12, n_kv_head=4, ffn_hidden=2048, seq_len=1024,
                     batch=16, steps=200, timing_warmup=20, learning_rate=6e-4, lr_warmup=20, device="cuda",
                     precision="bf16"),
}


# ------------------------------------------------------------------------------------------------- data
class SyntheticCorpus:
    """A deterministic, learnable token stream and the batches cut from it.

    2,048 "phrases" of 8-32 tokens (tokens Zipf-distributed over the vocabulary) are concatenated in a
    Zipf-distributed order, and 5% of the tokens replaced by uniform noise. Row i of the run (batch i // batch,
    position i % batch) is the window of seq_len + 1 tokens at a fixed random offset: input_ids = window[:-1],
    targets = window[1:].
    """

    def __init__(self, spec: BenchSpec):
        g = torch.Generator().manual_seed(spec.seed + 1)
        v, t = spec.vocab_size, spec.seq_len
        token_weights = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** 1.1
        token_ids = torch.randperm(v, generator=g)
        lengths = torch.randint(8, 33, (2048,), generator=g)
        phrases = [token_ids[torch.multinomial(token_weights, int(n), replacement=True, generator=g)]
                   for n in lengths]
        phrase_weights = 1.0 / torch.arange(1, len(phrases) + 1, dtype=torch.float64)
        length = max(1 << 18, 4 * (t + 1))
        order = torch.multinomial(phrase_weights, length // 8 + 1, replacement=True, generator=g)
        stream = torch.cat([phrases[i] for i in order.tolist()])[:length]
        noise = torch.rand(length, generator=g) < 0.05
        stream[noise] = torch.randint(0, v, (int(noise.sum()),), generator=g)
        self.stream = stream.to(torch.int32)
        self.starts = torch.randint(0, length - t - 1, (spec.steps * spec.batch,), generator=g)
        self.seq_len, self.batch = t, spec.batch

    def row(self, i: int) -> torch.Tensor:
        """Window i: seq_len + 1 tokens (int64)."""
        start = int(self.starts[i])
        return self.stream[start:start + self.seq_len + 1].long()

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of optimizer step `step` (0-based): input_ids and targets, int64 [batch, seq_len]."""
        rows = torch.stack([self.row(step * self.batch + b) for b in range(self.batch)])
        return {"input_ids": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()}


class _CorpusBatches:
    """The iterator codex_ml's Trainer reads (state_dict/load_state_dict for its checkpoints)."""

    def __init__(self, corpus: SyntheticCorpus):
        self.corpus, self.position = corpus, 0

    def __iter__(self) -> _CorpusBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.corpus.batch_at(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class CorpusData:
    """codex_ml's data contract (`batches(split, ...)`) over a SyntheticCorpus; one process, train split only."""

    tokenizer = None

    def __init__(self, corpus: SyntheticCorpus):
        self.corpus = corpus

    def batches(self, split: str, *, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                world_size: int = 1) -> _CorpusBatches:
        if (batch_size, seq_len, world_size) != (self.corpus.batch, self.corpus.seq_len, 1):
            raise ValueError("the benchmark corpus was cut for another batch, sequence length or process count")
        return _CorpusBatches(self.corpus)


# ------------------------------------------------------------------------------------------ plain model
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).type_as(x)


class _PlainAttention(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = s.n_head, s.n_kv_head, s.d_model // s.n_head
        self.q_proj = nn.Linear(s.d_model, s.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(s.d_model, s.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(s.d_model, s.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_head * self.head_dim, s.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class _PlainMLP(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.gate_proj = nn.Linear(s.d_model, s.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(s.d_model, s.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(s.ffn_hidden, s.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _PlainBlock(nn.Module):
    def __init__(self, s: BenchSpec):
        super().__init__()
        self.attn_norm, self.attn = _RMSNorm(s.d_model, s.norm_eps), _PlainAttention(s)
        self.mlp_norm, self.mlp = _RMSNorm(s.d_model, s.norm_eps), _PlainMLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """nanoGPT-style decoder with codex_ml GPT's math and parameter names (so its state dict loads as is);
    forward(idx) -> full logits [B, T, V]."""

    def __init__(self, s: BenchSpec):
        super().__init__()
        self.embed = nn.Embedding(s.vocab_size, s.d_model)
        self.blocks = nn.ModuleList(_PlainBlock(s) for _ in range(s.n_layer))
        self.norm = _RMSNorm(s.d_model, s.norm_eps)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        head_dim = s.d_model // s.n_head
        inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(s.seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


# -------------------------------------------------------------------------------- shared training parts
def make_optimizer(model: nn.Module, spec: BenchSpec) -> torch.optim.AdamW:
    """AdamW as codex_ml's build_optimizer makes it (and as the HF Trainer's default "adamw_torch_fused"): decay on
    matrices only, PyTorch's fused kernel."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.learning_rate, betas=tuple(spec.betas), fused=True)


def lr_factor(spec: BenchSpec, step: int) -> float:
    """The lr of optimizer step `step` (0-based) over the peak: linear warmup, then constant (as LRSchedule)."""
    return (step + 1) / spec.lr_warmup if step < spec.lr_warmup else 1.0


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _StepClock:
    """Optimizer step hook: times every step, records the RSS high-water mark after the last one, and hands the
    turn back to the driver after each step, waiting for the next (the gate: file descriptors to read and write).

    step_s[i] is the duration of step i + 2 (1-based), from the moment this process got its turn after step i + 1
    to the end of optimizer step i + 2: forward, backward, clipping, the optimizer and whatever the framework
    does between steps. Step 1 is never timed (it starts with the setup)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: BenchSpec, gate: tuple[int, int] | None):
        self.step_s: list[float] = []
        self.count, self.train_peak_rss_mb = 0, float("nan")
        self.steps, self.cuda, self.gate = spec.steps, spec.device.startswith("cuda"), gate
        self._start: float | None = None
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.count += 1
        if self._start is not None:
            self.step_s.append(end - self._start)
        if self.count == self.steps:
            self.train_peak_rss_mb = _rss_mb("VmHWM")
        if self.gate is not None:
            os.write(self.gate[1], b".")
            if os.read(self.gate[0], 1) != b".":
                raise RuntimeError("the benchmark driver went away")
        self._start = time.perf_counter()


def _load_init(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ the three workers
def _run_codex(spec: BenchSpec, corpus: SyntheticCorpus, init_path: str, run_dir: str,
               gate: tuple[int, int] | None) -> dict[str, Any]:
    from codex_ml.models.gpt import GPT, GPTConfig
    from codex_ml.training import Trainer

    model = GPT(_gpt_config(spec, GPTConfig))
    model.load_state_dict(_load_init(init_path))
    trainer = Trainer(run_dir, model, CorpusData(corpus), seed=spec.seed, batch_size=spec.batch,
                      seq_len=spec.seq_len, max_steps=spec.steps, optimizer="adamw",
                      learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, betas=spec.betas,
                      schedule="constant", warmup_steps=spec.lr_warmup, clip_grad_norm=spec.clip_grad_norm,
                      precision=spec.precision, eval_every=0, eval_batches=0, checkpoint_every=0, mlflow=False,
                      device=spec.device)
    reference = make_optimizer(model, spec)  # the optimizer the other two get: the same hyperparameters?
    for ours, theirs in zip(trainer.optimizer.param_groups, reference.param_groups):
        differ = {k for k in theirs if k not in ("params", "lr", "initial_lr") and ours.get(k) != theirs[k]}
        if differ or len(ours["params"]) != len(theirs["params"]):
            raise RuntimeError(f"codex_ml's optimizer differs from the others' in {sorted(differ)}")
    del reference
    clock = _StepClock(trainer.optimizer, spec, gate)
    result = trainer.fit(resume="never")
    losses = [result.train_losses[s] for s in range(1, spec.steps + 1)]
    return {"params": model.num_params(), "losses": losses, "clock": clock}


def _run_hf(spec: BenchSpec, corpus: SyntheticCorpus, init_path: str, run_dir: str,
            gate: tuple[int, int] | None) -> dict[str, Any]:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_warning()
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.ffn_hidden,
                         num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                         num_key_value_heads=spec.n_kv_head, max_position_embeddings=spec.seq_len,
                         rms_norm_eps=spec.norm_eps, tie_word_embeddings=True, use_cache=False,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(llama_state_dict(_load_init(init_path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Llama weights do not map: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("LlamaForCausalLM's output projection is not tied to its embedding")

    class Rows(torch.utils.data.IterableDataset):
        """The corpus rows in order; shift_labels = targets, so HF does not shift (and drop) a position."""

        def __iter__(self):
            for i in range(spec.steps * spec.batch):
                row = corpus.row(i)
                yield {"input_ids": row[:-1], "labels": row[:-1], "shift_labels": row[1:]}

    losses: dict[int, float] = {}

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    args = TrainingArguments(
        output_dir=run_dir, max_steps=spec.steps, per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=1, learning_rate=spec.learning_rate, max_grad_norm=spec.clip_grad_norm,
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        use_cpu=not spec.device.startswith("cuda"), bf16=spec.precision == "bf16", seed=spec.seed,
        remove_unused_columns=False,
    )
    optimizer = make_optimizer(model, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    clock = _StepClock(optimizer, spec, gate)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(optimizer, schedule),
                                   callbacks=[LossLog()])
    trainer.train()
    return {"params": model.num_parameters(), "losses": [losses[s] for s in range(1, spec.steps + 1)],
            "clock": clock}


def _run_plain(spec: BenchSpec, corpus: SyntheticCorpus, init_path: str, run_dir: str,
               gate: tuple[int, int] | None) -> dict[str, Any]:
    device = torch.device(spec.device)
    model = PlainGPT(spec)
    model.load_state_dict(_load_init(init_path))
    model.to(device).train()
    optimizer = make_optimizer(model, spec)
    clock = _StepClock(optimizer, spec, gate)
    losses = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate * lr_factor(spec, step)
        batch = corpus.batch_at(step)
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"params": sum(p.numel() for p in model.parameters()), "losses": losses, "clock": clock}


WORKERS = {"codex_ml": _run_codex, "hf_trainer": _run_hf, "plain_torch": _run_plain}


def _gpt_config(spec: BenchSpec, config_cls: Any) -> Any:
    return config_cls(vocab_size=spec.vocab_size, n_layer=spec.n_layer, n_head=spec.n_head,
                      n_kv_head=spec.n_kv_head, d_model=spec.d_model, ffn_hidden=spec.ffn_hidden,
                      max_seq_len=spec.seq_len, rope_theta=spec.rope_theta, norm_eps=spec.norm_eps,
                      tie_embeddings=True)


def llama_state_dict(gpt_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """codex_ml GPT parameter names -> LlamaForCausalLM's (the tied lm_head.weight is left out)."""
    renames = (("blocks.", "model.layers."), (".attn_norm.", ".input_layernorm."),
               (".mlp_norm.", ".post_attention_layernorm."), (".attn.", ".self_attn."))
    out = {}
    for name, tensor in gpt_state.items():
        if name == "lm_head.weight":
            continue
        if name == "embed.weight":
            name = "model.embed_tokens.weight"
        elif name == "norm.weight":
            name = "model.norm.weight"
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def worker_main(impl: str, spec_path: str, out_path: str, gate: tuple[int, int] | None = None) -> None:
    """Runs one implementation in this (fresh) process and writes its measurements as JSON to out_path."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    raw = json.loads(Path(spec_path).read_text())
    spec = BenchSpec(**{**raw["spec"], "betas": tuple(raw["spec"]["betas"])})
    torch.set_num_threads(spec.threads)
    base_rss = _rss_mb("VmRSS")
    corpus = SyntheticCorpus(spec)
    result = WORKERS[impl](spec, corpus, raw["init_path"], raw["run_dir"], gate)
    clock: _StepClock = result.pop("clock")
    if clock.count != spec.steps:
        raise RuntimeError(f"{impl}: {clock.count} optimizer steps seen, expected {spec.steps}")
    step_s = clock.step_s[spec.timing_warmup - 1:]  # steps timing_warmup + 1 .. steps
    ranked, tokens = sorted(step_s), spec.batch * spec.seq_len
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None
    Path(out_path).write_text(json.dumps({
        **result, "impl": impl, "tokens_per_s": tokens * len(step_s) / sum(step_s),
        "tokens_per_s_median": tokens / ranked[len(ranked) // 2], "tokens_per_s_best": tokens / ranked[0],
        "timed_s": sum(step_s), "step_s": step_s, "peak_rss_mb": _rss_mb("VmHWM"),
        "train_peak_rss_mb": clock.train_peak_rss_mb, "base_rss_mb": base_rss, "peak_gpu_mb": peak_gpu,
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }))


# ------------------------------------------------------------------------------------------- the driver
def _save_init(spec: BenchSpec, path: Path) -> None:
    """The shared initial weights: a codex_ml GPT initialized from the seed."""
    from codex_ml.models.gpt import GPT, GPTConfig

    torch.manual_seed(spec.seed)
    torch.save(GPT(_gpt_config(spec, GPTConfig)).state_dict(), path)


class _Child:
    """One implementation's process and the two pipes of its gate (see _StepClock)."""

    def __init__(self, impl: str, spec: BenchSpec, work: Path, init_path: Path, env: dict[str, str]):
        self.impl, self.log_path = impl, work / f"{impl}.log"
        spec_path, self.out_path = work / f"{impl}.spec.json", work / f"{impl}.result.json"
        spec_path.write_text(json.dumps({"spec": asdict(spec), "init_path": str(init_path),
                                         "run_dir": str(work / f"run_{impl}")}))
        go_read, self.go = os.pipe()
        self.done, done_write = os.pipe()
        command = [sys.executable, "-m", "codex_ml.cli.bench_train", f"--_worker={impl}", f"--_spec={spec_path}",
                   f"--_out={self.out_path}", f"--_gate={go_read},{done_write}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)

    def failure(self, what: str) -> RuntimeError:
        self.proc.wait()
        tail = self.log_path.read_text()[-4000:]
        return RuntimeError(f"{self.impl} {what} (exit {self.proc.returncode}); end of {self.log_path}:\n{tail}")

    def wait_step(self) -> None:
        """Blocks until the child has finished its next optimizer step."""
        if os.read(self.done, 1) != b".":
            raise self.failure("stopped before its last step")

    def allow_step(self) -> None:
        try:
            os.write(self.go, b".")
        except BrokenPipeError:
            raise self.failure("stopped before its last step") from None

    def finish(self) -> dict[str, Any]:
        self.allow_step()  # past the last step: the child finishes and writes its results
        self.proc.wait()
        os.close(self.go)
        os.close(self.done)
        if self.proc.returncode != 0 or not self.out_path.is_file():
            raise self.failure("failed")
        return json.loads(self.out_path.read_text())


def run_lockstep(impls: list[str], spec: BenchSpec, work: Path, init_path: Path) -> dict[str, dict[str, Any]]:
    """Runs every implementation in its own process, all alive at once but only one computing at a time: after
    the first step (with the setup, concurrent and untimed) the driver lets each process run one optimizer step in
    turn, rotating the order every step, so other load on a shared machine falls on all of them alike."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    children = [_Child(impl, spec, work, init_path, env) for impl in impls]
    try:
        for child in children:
            child.wait_step()
        for step in range(2, spec.steps + 1):
            shift = step % len(children)
            for child in children[shift:] + children[:shift]:
                child.allow_step()
                child.wait_step()
            if step % 10 == 0 or step == spec.steps:
                print(f"  step {step}/{spec.steps}", flush=True)
        return {child.impl: child.finish() for child in children}
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()


def make_rows(spec: BenchSpec, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows, one per implementation; the codex_ml row also holds its ratios against the other two."""
    rows = []
    for impl, r in results.items():
        rows.append({
            "impl": impl, "params": r["params"], "seq_len": spec.seq_len, "batch": spec.batch, "steps": spec.steps,
            "timed_steps": spec.steps - spec.timing_warmup, "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_median": r["tokens_per_s_median"], "tokens_per_s_best": r["tokens_per_s_best"],
            "peak_rss_mb": r["peak_rss_mb"], "train_peak_rss_mb": r["train_peak_rss_mb"],
            "base_rss_mb": r["base_rss_mb"], "peak_gpu_mb": r["peak_gpu_mb"], "first_loss": r["losses"][0],
            "final_loss": r["losses"][-1], "threads": r["threads"], "device": spec.device,
            "precision": spec.precision, "wall_s": r["wall_s"], "load_avg_1m": r["load_avg_1m"],
            "losses": r["losses"], "step_s": r["step_s"],
        })
    codex = next((row for row in rows if row["impl"] == "codex_ml"), None)
    for other in rows:
        if codex is None or other is codex:
            continue
        codex[f"speedup_vs_{other['impl']}"] = codex["tokens_per_s"] / other["tokens_per_s"]
        codex[f"speedup_median_vs_{other['impl']}"] = codex["tokens_per_s_median"] / other["tokens_per_s_median"]
        codex[f"speedup_best_vs_{other['impl']}"] = codex["tokens_per_s_best"] / other["tokens_per_s_best"]
        codex[f"rss_ratio_vs_{other['impl']}"] = codex["peak_rss_mb"] / other["peak_rss_mb"]
        codex[f"loss_diff_vs_{other['impl']}"] = codex["final_loss"] - other["final_loss"]
    return rows


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if "loss" in key else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The main columns of the rows as an aligned text table, then the codex_ml ratios (the rest is in the JSON)."""
    keys = ("impl", "params", "tokens_per_s", "tokens_per_s_median", "tokens_per_s_best", "peak_rss_mb",
            "train_peak_rss_mb", "base_rss_mb", "first_loss", "final_loss", "wall_s")
    cells = [[_cell(k, row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    for row in rows:
        ratios = {k: v for k, v in row.items() if k.startswith(("speedup", "rss_ratio_vs", "loss_diff_vs"))}
        if ratios:
            print(f"{row['impl']}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("load average (1 min) at start/end of each process: " + ", ".join(
        f"{row['impl']} {row['load_avg_1m'][0]:.1f}/{row['load_avg_1m'][1]:.1f}" for row in rows))


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """PNG: training loss against tokens seen (left) and tokens/s (right), one colour per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        tokens = [(i + 1) * row["batch"] * row["seq_len"] for i in range(len(row["losses"]))]
        left.plot(tokens, row["losses"], label=row["impl"], linewidth=1.2)
    left.set_xlabel("tokens")
    left.set_ylabel("training loss")
    left.set_title("loss vs tokens (same batches)")
    left.legend()
    names = [row["impl"] for row in rows]
    bars = right.bar(names, [row["tokens_per_s"] for row in rows], color=["C0", "C1", "C2"][:len(rows)])
    right.bar_label(bars, fmt="%.0f")
    right.set_ylabel("tokens/s")
    first = rows[0]
    right.set_title(f"throughput ({first['device']}, {first['precision']}, {first['threads']} threads)")
    fig.suptitle(f"{first['params'] / 1e6:.1f}M params, batch {first['batch']} x {first['seq_len']} tokens, "
                 f"{first['steps']} steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                        help="quick (seconds, tiny model), cpu (the CPU target, minutes), gpu (CUDA, bf16)")
    parser.add_argument("--json", default=None,
                        help="result rows (a JSON list); default runs/bench_train/<preset>.json")
    parser.add_argument("--plot", default=None, help="PNG of loss and throughput; default: --json with .png")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process")
    parser.add_argument("--work_dir", default=None,
                        help="keep the children's logs and run directories here (default: a temporary directory)")
    parser.add_argument("--_worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_gate", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with the hidden --_worker flag, one implementation); returns the exit status."""
    args = parse_args(argv)
    if args._worker:
        gate = tuple(int(fd) for fd in args._gate.split(",")) if args._gate else None
        worker_main(args._worker, args._spec, args._out, gate)
        return 0
    if os.environ.get("BUILD_WORKING_DIRECTORY"):  # under `bazel run`: outputs where the user ran it
        os.chdir(os.environ["BUILD_WORKING_DIRECTORY"])
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or set(impls) - set(IMPLS):
        raise SystemExit(f"--impls must name some of {', '.join(IMPLS)}, got {args.impls!r}")
    spec = PRESETS[args.preset]
    if args.steps is not None:
        spec = replace(spec, steps=args.steps)
    spec = replace(spec, threads=args.threads or spec.threads or torch.get_num_threads())
    if spec.timing_warmup < 1 or spec.steps <= spec.timing_warmup:
        raise SystemExit(f"--steps must exceed the {spec.timing_warmup} untimed warmup steps")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--preset={args.preset} needs a CUDA device and none is available")
    json_path = args.json or os.path.join("runs", "bench_train", f"{args.preset}.json")
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    print(f"bench_train --preset={args.preset}: {spec.n_layer} layers x d_model {spec.d_model}, vocab "
          f"{spec.vocab_size}, batch {spec.batch} x {spec.seq_len} tokens, {spec.steps} steps "
          f"({spec.timing_warmup} untimed), {spec.threads} threads, {spec.device} {spec.precision}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        init_path = work / "init.pt"
        _save_init(spec, init_path)
        results = run_lockstep(impls, spec, work, init_path)
    rows = make_rows(spec, results)
    for row in rows:
        if not all(math.isfinite(x) for x in row["losses"]):
            print(f"warning: {row['impl']} had a non-finite loss", file=sys.stderr)
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    Path(json_path).write_text(json.dumps(rows, indent=2))
    write_plot(rows, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
