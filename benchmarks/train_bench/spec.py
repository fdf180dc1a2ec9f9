"""What one bench_train run is: its settings (BenchSpec, PRESETS), its data and the parts all trainings share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

IMPLS = ("codex_ml", "hf_trainer", "plain_torch")
# The distributed presets' trainings (world_size processes each): codex_ml's Trainer with each parallelism, and the
# Hugging Face Trainer with its FSDP2 integration (accelerate's FSDP plugin, fsdp_version=2).
DIST_IMPLS = ("codex_ml_ddp", "codex_ml_fsdp", "codex_ml_fsdp_ac", "hf_trainer_fsdp")
# as_shipped: each framework as its users run it; same_settings: the process settings identical for all three.
SETTINGS = ("as_shipped", "same_settings")
# The plain loop's loss: PyTorch's chunked F.linear_cross_entropy, or F.cross_entropy on the full logits.
PLAIN_LOSSES = ("torch_chunked", "full_logits")


def chunked_loss_available() -> bool:
    """Whether this PyTorch has the chunked F.linear_cross_entropy (LinearCrossEntropyOptions)."""
    return hasattr(torch.nn, "LinearCrossEntropyOptions")


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
    plain_loss: str = "torch_chunked"  # one of PLAIN_LOSSES
    world_size: int = 1  # processes per training (torchrun --nproc_per_node); batch is the global batch

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def impls(self) -> tuple[str, ...]:
        """The trainings this spec compares."""
        return DIST_IMPLS if self.distributed else IMPLS


PRESETS: dict[str, BenchSpec] = {
    # Seconds: for the test.
    "quick": BenchSpec(vocab_size=512, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=192, seq_len=64,
                       batch=4, steps=8, timing_warmup=2, learning_rate=3e-3, lr_warmup=2),
    # The CPU target: 18.6M parameters (12.3M of them the tied 32k x 384 embedding), 4 x 512 tokens; 3-6 s a step
    # per implementation and setting on 2 cores.
    "cpu": BenchSpec(vocab_size=32000, d_model=384, n_layer=4, n_head=6, n_kv_head=2, ffn_hidden=1024, seq_len=512,
                     batch=4, steps=40, timing_warmup=5, learning_rate=6e-4, lr_warmup=10),
    # GPU scale: 100M parameters, 16 x 1024 tokens, bf16 autocast. Every process of the run is alive at once
    # (see lockstep.py), so the GPU must hold all of them.
    "gpu": BenchSpec(vocab_size=32000, d_model=768, n_layer=12, n_head=12, n_kv_head=4, ffn_hidden=2048, seq_len=1024,
                     batch=16, steps=200, timing_warmup=20, learning_rate=6e-4, lr_warmup=20, device="cuda",
                     precision="bf16"),
    # Distributed, seconds: for the test. Each training is 2 processes on gloo.
    "dist_quick": BenchSpec(vocab_size=512, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=192,
                            seq_len=64, batch=4, steps=6, timing_warmup=2, learning_rate=3e-3, lr_warmup=2,
                            threads=1, world_size=2),
    # Distributed on the CPU: 2 processes on gloo, one thread each. 82M parameters (12 blocks of d_model 768, an
    # 8k tied embedding) over 4 x 128 tokens a step: AdamW's two moments (2 x 328 MB) and the gradients outweigh
    # the activations, which is where sharding pays.
    "dist": BenchSpec(vocab_size=8192, d_model=768, n_layer=12, n_head=12, n_kv_head=4, ffn_hidden=2048,
                      seq_len=128, batch=4, steps=12, timing_warmup=2, learning_rate=6e-4, lr_warmup=4, threads=1,
                      world_size=2),
    # 8 GPUs on nccl, bf16: 1.2B parameters (24 blocks of d_model 2048), 64 x 2048 tokens a step.
    "dist_gpu": BenchSpec(vocab_size=32000, d_model=2048, n_layer=24, n_head=16, n_kv_head=8, ffn_hidden=5632,
                          seq_len=2048, batch=64, steps=100, timing_warmup=10, learning_rate=3e-4, lr_warmup=10,
                          device="cuda", precision="bf16", world_size=8),
}


def gpt_config(spec: BenchSpec) -> Any:
    """The codex_ml GPTConfig of the benchmark model (the other two build the same shape from the spec)."""
    from codex_ml.models.gpt import GPTConfig

    return GPTConfig(vocab_size=spec.vocab_size, n_layer=spec.n_layer, n_head=spec.n_head, n_kv_head=spec.n_kv_head,
                     d_model=spec.d_model, ffn_hidden=spec.ffn_hidden, max_seq_len=spec.seq_len,
                     rope_theta=spec.rope_theta, norm_eps=spec.norm_eps, tie_embeddings=True)


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

    def batch_at(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Process `rank`'s part of the batch of optimizer step `step` (0-based): input_ids and targets, int64
        [batch / world_size, seq_len], rows [rank * batch / world_size, (rank + 1) * batch / world_size) of it."""
        per_rank = self.batch // world_size
        first = step * self.batch + rank * per_rank
        rows = torch.stack([self.row(first + b) for b in range(per_rank)])
        return {"input_ids": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()}


class _CorpusBatches:
    """The iterator codex_ml's Trainer reads (state_dict/load_state_dict for its checkpoints)."""

    def __init__(self, corpus: SyntheticCorpus, rank: int = 0, world_size: int = 1):
        self.corpus, self.rank, self.world_size, self.position = corpus, rank, world_size, 0

    def __iter__(self) -> _CorpusBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.corpus.batch_at(self.position, self.rank, self.world_size)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class CorpusData:
    """codex_ml's data contract (`batches(split, ...)`) over a SyntheticCorpus; train split only. Process r of N
    reads rows [r * B / N, (r + 1) * B / N) of each global batch of B rows, so together they read what one does."""

    tokenizer = None

    def __init__(self, corpus: SyntheticCorpus):
        self.corpus = corpus

    def batches(self, split: str, *, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                world_size: int = 1) -> _CorpusBatches:
        if (batch_size * world_size, seq_len) != (self.corpus.batch, self.corpus.seq_len):
            raise ValueError("the benchmark corpus was cut for another batch, sequence length or process count")
        return _CorpusBatches(self.corpus, rank, world_size)


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
