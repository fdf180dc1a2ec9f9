"""Tiny stand-ins for the data pipeline and the model, so the loop can be tested in seconds.

StandinData follows the PreparedData.batches contract: rows of the global batch are a deterministic
function of (seed, row index), and rank r of N reads rows [r*B/N, (r+1)*B/N) of each global batch, so
N processes together see exactly what one process sees.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


class StandinBatches:
    def __init__(self, tokens, batch_size, seq_len, seed, rank, world_size, signals=()):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0
        self.shards_sha256 = None  # set by StandinData: stands for the digest of a prepared split's shards
        self.signals = dict(signals)  # position -> list of signals to send to this process at that position

    def __iter__(self):
        return self

    def __next__(self):
        for signum in self.signals.get(self.position, ()):
            os.kill(os.getpid(), signum)
        global_batch = self.batch_size * self.world_size
        rows = []
        for i in range(self.batch_size):
            row = self.position * global_batch + self.rank * self.batch_size + i
            start = (row * 7919 + self.seed * 104729) % (len(self.tokens) - self.seq_len - 1)
            rows.append(self.tokens[start : start + self.seq_len + 1])
        self.position += 1
        rows = torch.stack(rows)
        return {"input_ids": rows[:, :-1].clone(), "targets": rows[:, 1:].clone()}

    def state_dict(self):
        state = {"position": self.position}
        if self.shards_sha256 is not None:
            state["shards_sha256"] = self.shards_sha256
        return state

    def load_state_dict(self, state):
        self.position = state["position"]


class StandinData:
    """A token stream with learnable structure (a noisy repeating pattern) over `vocab_size` tokens."""

    def __init__(self, vocab_size=32, length=5000, signals=None, shards_sha256=None):
        g = torch.Generator().manual_seed(1234)
        pattern = torch.randint(0, vocab_size, (37,), generator=g)
        self.tokens = pattern.repeat(length // 37 + 1)[:length].clone()
        noise = torch.rand(length, generator=g) < 0.1
        self.tokens[noise] = torch.randint(0, vocab_size, (int(noise.sum()),), generator=g)
        self.val_tokens = self.tokens.roll(11)
        self.signals = signals or {}
        self.shards_sha256 = shards_sha256
        self.tokenizer = None

    def batches(self, split, *, batch_size, seq_len, seed, rank=0, world_size=1):
        if split == "train":
            batches = StandinBatches(self.tokens, batch_size, seq_len, seed, rank, world_size, self.signals)
            batches.shards_sha256 = self.shards_sha256
            return batches
        return StandinBatches(self.val_tokens, batch_size, seq_len, seed + 1, rank, world_size)


@dataclass
class TinyConfig:
    vocab_size: int = 32
    d_model: int = 16
    dropout: float = 0.1

    def to_dict(self):
        return asdict(self)


class TinyLM(torch.nn.Module):
    """Embedding -> MLP with dropout -> tied head; forward(idx, targets) -> (logits, loss)."""

    def __init__(self, config: TinyConfig, nan_at_call: int | None = None):
        super().__init__()
        self.config = config
        self.embedding = torch.nn.Embedding(config.vocab_size, config.d_model)
        hidden = 4 * config.d_model
        self.mlp = torch.nn.Sequential(torch.nn.Linear(config.d_model, hidden), torch.nn.GELU(),
                                       torch.nn.Dropout(config.dropout), torch.nn.Linear(hidden, config.d_model))
        self.norm = torch.nn.LayerNorm(config.d_model)
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, idx, targets=None):
        h = self.embedding(idx)
        h = self.norm(h + self.mlp(h))
        logits = h @ self.embedding.weight.T
        if targets is None:
            return logits, None
        self.calls += 1
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return None, loss

    def flops_per_token(self, seq_len):
        return 6 * sum(p.numel() for p in self.parameters())


def tiny_gpt():
    """The native GPT (fused ops, transformer blocks), as small as it goes, over the stand-in vocabulary."""
    from codex_ml.models import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16))


def exported_tiny_gpt(folder: Path) -> Path:
    """A tiny native GPT checkpoint with its tokenizer (trained on 40 stdlib files), exported to a Hugging Face
    folder under `folder`: the path docs/models.md shows."""
    from codex_ml.checkpoint.core import save_checkpoint
    from codex_ml.data import read_corpus
    from codex_ml.models import GPT, GPTConfig
    from codex_ml.models.export import export_hf
    from codex_ml.tokenization import Tokenizer

    tok = Tokenizer.train((d.text for d in read_corpus(None).documents[:40]), folder / "tokenizer.model",
                          vocab_size=400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64))
    checkpoint = save_checkpoint(folder / "native", model_state=model.state_dict(),
                                 model_config={**model.config.to_dict(), "architecture": "codex_ml.GPT"},
                                 tokenizer_path=tok.model_path, manifest_extra={"tokenizer_sha256": tok.sha256})
    return export_hf(checkpoint, folder / "exported")


def make_trainer(run_dir, *, seed=0, dropout=0.1, data=None, model=None, operative_config="", **settings):
    """A Trainer over the stand-ins, set up as the command line does: the config (TrainerConfig fields as keyword
    arguments), then the process, then the model, built right after seeding as the experiment does. model="gpt":
    tiny_gpt() instead of TinyLM."""
    from codex_ml.training import Trainer, TrainerConfig, seed_everything, setup_process

    defaults = dict(batch_size=4, seq_len=16, max_steps=8, learning_rate=1e-2, warmup_steps=2, eval_every=0,
                    eval_batches=2, checkpoint_every=0, log_every=1, mlflow=False, device="cpu")
    config = TrainerConfig(seed=seed, **{**defaults, **settings})
    process = setup_process(config)
    seed_everything(seed)
    if model == "gpt":
        model = tiny_gpt()
    model = model or TinyLM(TinyConfig(dropout=dropout))
    return Trainer(config, model=model, data=data or StandinData(), run_dir=run_dir, process=process,
                   operative_config=operative_config)


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


def free_port():
    """A TCP port free on 127.0.0.1 (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir, options, nproc=2, timeout=150):
    """train_standin_main.py (options: its JSON options) under torchrun with `nproc` CPU processes (gloo on
    127.0.0.1); returns the finished process."""
    here = Path(__file__).absolute().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), *sys.path]), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(here / "train_standin_main.py"), str(run_dir), json.dumps(options)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def train_records(run_dir):
    """step -> the train record of metrics.ndjson."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.ndjson").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == "train"}
