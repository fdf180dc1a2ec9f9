"""The experiment: prepares data (tokenizer + shards, cached), builds the model, trains, prints a sample."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from codex_ml.data.secrets import redact_model_output
from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.models.hf import HFCausalLM, HFModelConfig
from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.setup import ProcessInfo, seed_everything
from codex_ml.training.trainer import Trainer, TrainResult

# Each model class and the config type it takes: a mix-up would fail deep inside the model with an AttributeError.
_MODEL_PAIRS = ((GPT, GPTConfig), (HFCausalLM, HFModelConfig))


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 80,
                temperature: float = 0.8, top_k: int = 40, seed: int = 0, max_seq_len: int | None = None) -> str:
    """Samples a continuation of `prompt` (top-k, temperature; greedy when temperature is 0)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(tokenizer.encode(prompt)) or [tokenizer.eos_id]
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-max_seq_len:] if max_seq_len else ids], device=device)
            logits, _ = model(context)
            logits = logits[0, -1].float()
            if temperature <= 0:
                next_id = int(logits.argmax())
            else:
                values, indices = logits.topk(min(top_k, logits.numel()))
                probs = torch.softmax(values / temperature, dim=-1)
                next_id = int(indices[torch.multinomial(probs, 1, generator=generator)])
            if next_id == tokenizer.eos_id:
                break
            ids.append(next_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids)


def train(
    run_dir: str | os.PathLike,
    *,
    config: TrainerConfig,
    process: ProcessInfo,
    resume: str = "auto",
    operative_config: str | Callable[[], str] = "",
    seed: int = 0,
    cache_dir: str = ".cache/codex_ml",
    data_fn: Callable[..., Any] | None = None,
    model_fn: Callable[..., torch.nn.Module] | None = None,
    model_config: Any = None,
    sample_prompt: str | None = "def ",
    sample_tokens: int = 120,
) -> TrainResult:
    """Trains a model end to end and returns the TrainResult.

    Args:
      run_dir: where metrics, the operative config and checkpoints go.
      config: the Trainer's settings (its seed is replaced by `seed`).
      process: what setup_process(config) returned.
      resume: "auto", "never" or a checkpoint path (see Trainer.fit).
      seed: seeds Python, NumPy and torch before the model is built (and the data order, via Trainer).
      cache_dir: the data cache (tokenizer and token shards, reused by later runs); relative to the current
        directory, which the CLI sets to the directory Bazel was run from.
      data_fn: cache_dir=..., log=... -> the prepared data (gin: `train.data_fn = @prepare_data`).
      model_fn: model_config -> nn.Module (gin: `train.model_fn = @GPT`).
      model_config: the model's config (gin: `train.model_config = @GPTConfig()`); its vocab_size is set
        from the tokenizer.
      sample_prompt: printed with a sampled continuation at the end; None to skip.
    """
    _check_bindings(data_fn, model_fn, model_config)
    config = dataclasses.replace(config, seed=seed)  # checks the seed: these before the data, which can take long
    say = print if process.is_main else (lambda *args, **kwargs: None)
    data = data_fn(cache_dir=str(Path(cache_dir).expanduser()), log=say)
    model = _build_model(model_fn, model_config, data.tokenizer, seed, say)
    trainer = Trainer(config, model=model, data=data, run_dir=run_dir, process=process,
                      operative_config=operative_config)
    result = trainer.fit(resume=resume)
    sharded = trainer.train_step.sharded  # FSDP: every forward pass gathers parameters from every process
    if process.is_main and result.status == "finished" and callable(getattr(model, "save_adapter", None)):
        if sharded:
            say(f"The LoRA adapter is in the run's sharded checkpoints: codex-generate --checkpoint={run_dir} "
                "loads it with its base model.")
        else:
            say(f"LoRA adapter saved to {model.save_adapter(Path(run_dir) / 'adapter')} (load it with "
                "HFModelConfig.peft_path or codex-generate --adapter).")
    # Under FSDP every process samples (the same tokens, from the same seed), rank 0 prints.
    if (process.is_main or sharded) and sample_prompt is not None and result.status == "finished":
        max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
        text = sample_text(model, data.tokenizer, sample_prompt, max_new_tokens=sample_tokens, seed=seed,
                           max_seq_len=max_len)
        text, withheld = redact_model_output(text)  # as generation does: a model may reproduce a secret
        note = f"\n[{len(withheld)} secret(s) withheld: {', '.join(sorted(set(withheld)))}]" if withheld else ""
        say("Sample from the trained model:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60 + note)
    return result


def _check_bindings(data_fn: Any, model_fn: Any, model_config: Any) -> None:
    for name, value, example in (("data_fn", data_fn, "@prepare_data"), ("model_fn", model_fn, "@GPT"),
                                 ("model_config", model_config, "@GPTConfig()")):
        if value is None:
            raise ConfigError(f"train.{name} is not set: bind it in the gin file, e.g. `train.{name} = {example}` "
                              "(configs/default.gin shows a complete configuration).")
    for model_cls, config_cls in _MODEL_PAIRS:
        if isinstance(model_fn, type) and issubclass(model_fn, model_cls) and not isinstance(model_config, config_cls):
            raise ConfigError(
                f"train.model_fn = @{model_cls.__name__} needs train.model_config = @{config_cls.__name__}(), but it "
                f"is a {type(model_config).__name__}: bind a matching pair (GPT with GPTConfig as in "
                "configs/default.gin, HFCausalLM with HFModelConfig as in configs/lora.gin)."
            )


def _build_model(model_fn: Callable[..., torch.nn.Module], model_config: Any, tokenizer: Any, seed: int,
                 say: Callable[[str], None]) -> torch.nn.Module:
    """The model for this tokenizer (its vocab_size is set from it), initialised right after seeding."""
    fields = {f.name for f in dataclasses.fields(model_config)} if dataclasses.is_dataclass(model_config) else ()
    if "vocab_size" in fields and model_config.vocab_size != tokenizer.vocab_size:
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    seed_everything(seed)
    model = model_fn(model_config)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None and hasattr(model, "hf_model"):
        embeddings = model.hf_model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.shape[0] < tokenizer.vocab_size:
        raise ConfigError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                          f"{embeddings.weight.shape[0]}: use the model's own tokenizer "
                          "(prepare_data.tokenizer_path = the model folder).")
    num_params = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = f" ({trainable / 1e6:.3f}M trainable)" if trainable < num_params else ""
    say(f"Model: {type(model).__name__} with {num_params / 1e6:.2f}M parameters{frozen}; tokenizer vocabulary "
        f"{tokenizer.vocab_size}.")
    return model
