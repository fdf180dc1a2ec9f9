"""The three trainings of bench_train, each run in its own process by worker.py: codex_ml's Trainer, the Hugging
Face Trainer and a plain PyTorch loop, from the same initial weights over the same batches.

Each runner takes the spec, the corpus, the shared initial weights and a run directory, attaches the StepClock
(which times the steps and hands the turn back to the driver) to its optimizer, trains, and returns the
parameter count, every step's loss and the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.train_bench.plain_gpt import PlainGPT
from benchmarks.train_bench.spec import BenchSpec, CorpusData, SyntheticCorpus, gpt_config, lr_factor, make_optimizer
from benchmarks.train_bench.step_clock import StepClock

Gate = tuple[int, int] | None


def run_codex(spec: BenchSpec, corpus: SyntheticCorpus, init: dict[str, torch.Tensor], run_dir: str,
              gate: Gate) -> dict[str, Any]:
    """codex_ml.training.Trainer on codex_ml.models.GPT, with the allocator setting it ships with."""
    from codex_ml.models.gpt import GPT

    model = GPT(gpt_config(spec))
    model.load_state_dict(init)
    return fit_codex(spec, model, CorpusData(corpus), run_dir, gate)


def fit_codex(spec: BenchSpec, model: torch.nn.Module, data: CorpusData, run_dir: str, gate: Gate,
              **settings: Any) -> dict[str, Any]:
    """Trains `model` with codex_ml's Trainer as the spec says (`settings`: further TrainerConfig fields, such as
    its parallelism) and checks that its optimizer is the one the others get."""
    from codex_ml.training import Trainer, TrainerConfig, setup_process

    config = TrainerConfig(seed=spec.seed, batch_size=spec.batch, seq_len=spec.seq_len, max_steps=spec.steps,
                           optimizer="adamw", learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
                           betas=spec.betas, schedule="constant", warmup_steps=spec.lr_warmup,
                           clip_grad_norm=spec.clip_grad_norm, precision=spec.precision, eval_every=0,
                           eval_batches=0, checkpoint_every=0, mlflow=False, device=spec.device,
                           keep_freed_memory=True, **settings)
    trainer = Trainer(config, model=model, data=data, run_dir=run_dir, process=setup_process(config))
    reference = make_optimizer(model, spec)  # the optimizer the other two get: the same hyperparameters?
    for ours, theirs in zip(trainer.optimizer.param_groups, reference.param_groups):
        differ = {k for k in theirs if k not in ("params", "lr", "initial_lr") and ours.get(k) != theirs[k]}
        if differ or len(ours["params"]) != len(theirs["params"]):
            raise RuntimeError(f"codex_ml's optimizer differs from the others' in {sorted(differ)}")
    del reference
    clock = StepClock(trainer.optimizer, spec, gate)
    result = trainer.fit(resume="never")
    losses = [result.train_losses[s] for s in range(1, spec.steps + 1)]
    return {"params": model.num_params(), "losses": losses, "clock": clock}


def llama_model(spec: BenchSpec, init: dict[str, torch.Tensor]) -> Any:
    """LlamaForCausalLM of the benchmark's shape (SDPA attention, tied output projection) with the shared initial
    weights (renamed by codex_ml.models.export.llama_weight_names)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from codex_ml.models.export import llama_weight_names

    transformers.logging.set_verbosity_warning()
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.ffn_hidden,
                         num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                         num_key_value_heads=spec.n_kv_head, max_position_embeddings=spec.seq_len,
                         rms_norm_eps=spec.norm_eps, tie_word_embeddings=True, use_cache=False,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    names = llama_weight_names(gpt_config(spec))
    state = {names.get(name, name): tensor for name, tensor in init.items() if name != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Llama weights do not map: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("LlamaForCausalLM's output projection is not tied to its embedding")
    return model


class CorpusRows(torch.utils.data.IterableDataset):
    """The corpus rows in order, for the HF Trainer; shift_labels = targets, so HF does not shift (and drop) a
    position. Under several processes accelerate hands process r rows [r * B / N, (r + 1) * B / N) of each global
    batch of B rows, as CorpusData does."""

    def __init__(self, spec: BenchSpec, corpus: SyntheticCorpus):
        self.spec, self.corpus = spec, corpus

    def __iter__(self):
        for i in range(self.spec.steps * self.spec.batch):
            row = self.corpus.row(i)
            yield {"input_ids": row[:-1], "labels": row[:-1], "shift_labels": row[1:]}


def hf_arguments(spec: BenchSpec, run_dir: str, **settings: Any) -> Any:
    """The HF Trainer's TrainingArguments for the spec (`settings`: further arguments, such as its FSDP ones)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=run_dir, max_steps=spec.steps, per_device_train_batch_size=spec.batch // spec.world_size,
        gradient_accumulation_steps=1, learning_rate=spec.learning_rate, max_grad_norm=spec.clip_grad_norm,
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        use_cpu=not spec.device.startswith("cuda"), bf16=spec.precision == "bf16", seed=spec.seed,
        remove_unused_columns=False, **settings,
    )


def loss_log(losses: dict[int, float]) -> Any:
    """A TrainerCallback that records every logged training loss in `losses` (by step)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    return LossLog()


def run_hf(spec: BenchSpec, corpus: SyntheticCorpus, init: dict[str, torch.Tensor], run_dir: str,
           gate: Gate) -> dict[str, Any]:
    """transformers.Trainer on LlamaForCausalLM of the same shape (SDPA attention, full logits)."""
    import transformers

    model = llama_model(spec, init)
    losses: dict[int, float] = {}
    optimizer = make_optimizer(model, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    clock = StepClock(optimizer, spec, gate)
    trainer = transformers.Trainer(model=model, args=hf_arguments(spec, run_dir),
                                   train_dataset=CorpusRows(spec, corpus), optimizers=(optimizer, schedule),
                                   callbacks=[loss_log(losses)])
    trainer.train()
    return {"params": model.num_parameters(), "losses": [losses[s] for s in range(1, spec.steps + 1)],
            "clock": clock}


# PyTorch's chunked loss in chunks of 1,024 tokens: on the CPU its "auto" chunking (chunks of a few dozen rows at the
# cpu preset's shape) is several times slower than the full logits, since grad_weight ([V, d_model]) is read and
# written once per chunk; 1,024-token chunks make it faster than them (docs/kernels.md).
PLAIN_CHUNK_TOKENS = 1024


def plain_loss(model: PlainGPT, x: torch.Tensor, y: torch.Tensor, spec: BenchSpec) -> torch.Tensor:
    """The plain loop's loss (spec.plain_loss): "torch_chunked", PyTorch's chunked F.linear_cross_entropy (chunks of
    PLAIN_CHUNK_TOKENS) on the hidden states and the output weight, which never holds the logits; "full_logits",
    F.cross_entropy on the full [tokens, vocabulary] logits, held through the backward pass as a nanoGPT-style
    `logits, loss = model(x, y)` loop holds them."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
        if spec.plain_loss == "torch_chunked":
            hidden = model.hidden(x)
            options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=PLAIN_CHUNK_TOKENS)
            return F.linear_cross_entropy(hidden.view(-1, hidden.size(-1)), model.lm_head.weight, y.view(-1),
                                          options=options)
        logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def run_plain(spec: BenchSpec, corpus: SyntheticCorpus, init: dict[str, torch.Tensor], run_dir: str,
              gate: Gate) -> dict[str, Any]:
    """A nanoGPT-style loop over PlainGPT with the loss of plain_loss."""
    device = torch.device(spec.device)
    model = PlainGPT(spec)
    model.load_state_dict(init)
    model.to(device).train()
    optimizer = make_optimizer(model, spec)
    clock = StepClock(optimizer, spec, gate)
    losses = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate * lr_factor(spec, step)
        batch = corpus.batch_at(step)
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        loss = plain_loss(model, x, y, spec)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"params": sum(p.numel() for p in model.parameters()), "losses": losses, "clock": clock}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"codex_ml": run_codex, "hf_trainer": run_hf,
                                                     "plain_torch": run_plain}
