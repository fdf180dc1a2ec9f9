"""Text generation for native checkpoints, Hugging Face folders and LoRA adapters.

    model, tokenizer = load_model("runs/default-.../")            # or an HF folder, adapter=...
    for piece in stream(model, tokenizer, "def fib(n):", SamplingConfig(max_new_tokens=64)):
        print(piece, end="", flush=True)

Greedy when temperature is 0, else temperature sampling with optional top-k and top-p (nucleus). The native
model decodes with its KV cache (identical greedy output to recomputing the whole context, tested);
Hugging Face models with theirs. Output passes a secret filter (on by default) that withholds text matching
the patterns the data pipeline excludes (codex_ml.data.secrets): text is released a word at a time (a line at a
time after a secret-named key), so a secret is never printed in part before it is recognized, and a secret cut off
by max_new_tokens is withheld too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from codex_ml.checkpoint.core import CheckpointError, latest_valid_checkpoint, load_model_state, verify_checkpoint
from codex_ml.data.secrets import SECRET_KEY, redact_model_output, redact_secrets
from codex_ml.models.gpt import GPT, KVCache


class GenerationError(ValueError):
    """Bad generation input (prompt, settings, model path); the message names the problem and the fix."""


@dataclasses.dataclass
class SamplingConfig:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    use_cache: bool = True
    filter_secrets: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if not 0 <= self.temperature < math.inf:  # (NaN fails too)
            raise GenerationError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}.")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:  # torch.Generator overflows past 64 bits
            raise GenerationError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed}.")
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop  # one string is one stop string
        self.stop = tuple(s for s in stops if s)


@dataclasses.dataclass
class Generation:
    text: str  # the generated continuation (after filtering and stop strings), without the prompt
    token_ids: list[int]  # every generated token id (the stop string's tokens included)
    finish_reason: str  # "length", "stop" (a stop string), "eos", or "context" (the model's context is full)
    withheld: list[str]  # names of the secret rules whose matches were withheld


# --------------------------------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """The next token id from logits [V]."""
    logits = logits.float()
    if config.temperature == 0:
        return int(logits.argmax())
    # Shifted so that the largest is 0 before dividing: a tiny temperature then gives -inf, never inf - inf.
    logits = (logits - logits.max()) / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= config.top_p  # keep the smallest set reaching p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Decoder:
    """Next-token logits for a growing sequence, with or without a KV cache, for native or HF models."""

    def __init__(self, model: torch.nn.Module, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.native = isinstance(model, GPT)
        self.device = next(model.parameters()).device
        self.cache: Any = KVCache(model.config.n_layer) if self.native else None
        self.ids: list[int] = []

    def __call__(self, new_ids: list[int]) -> torch.Tensor:
        # Eval mode and no grad only for the model's call: a paused stream leaves the caller's state alone.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._next_logits(new_ids)
        finally:
            self.model.train(was_training)

    def _next_logits(self, new_ids: list[int]) -> torch.Tensor:
        self.ids += new_ids
        if self.use_cache:
            x = torch.tensor([new_ids], device=self.device)
            if self.native:
                logits, _ = self.model(x, cache=self.cache)
            else:
                out = self.model(input_ids=x, cache=self.cache, use_cache=True)  # `cache`: transformers >= 5.20
                self.cache, logits = out.cache, out.logits
        else:
            x = torch.tensor([self.ids], device=self.device)
            logits = self.model(x)[0] if self.native else self.model(input_ids=x, use_cache=False).logits
        return logits[0, -1]


def context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None)


# ------------------------------------------------------------------------------------------ the filter
class _SecretFilter:
    """Releases text only where no secret can still be forming: up to the last whitespace (the token rules match
    runs without whitespace), not past a secret-named key on a line that has not ended (an assignment's value may
    follow), and nothing from a private-key header to its end line. What is left when generation stops goes
    through redact_model_output, which also withholds a secret cut off by the token limit."""

    _key_start = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY|---- BEGIN SSH2 ENCRYPTED PRIVATE KEY|PuTTY-User-Key-File-")
    _key_end = re.compile(r"-----END [A-Z ]*PRIVATE KEY(?: BLOCK)?-----[^\n]*\n?"
                          r"|---- END SSH2 ENCRYPTED PRIVATE KEY ----[^\n]*\n?|Private-MAC:[^\n]*\n")
    _header = re.compile(r"-{4,}[^\n]*\Z")  # a key header may be forming ("---- BEGIN SSH2 ..." has spaces)

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.pending = ""
        self.in_key = False
        self.withheld: list[str] = []

    def _release(self, text: str, final: bool = False) -> str:
        out = []
        while text:
            if self.in_key:
                end = self._key_end.search(text)
                if end is None:  # key material, dropped; a last partial line may be the end line forming
                    self.pending = text[text.rfind("\n") + 1:] + self.pending
                    return "".join(out)
                text, self.in_key = text[end.end():], False
                continue
            start = self._key_start.search(text)
            if start is None:
                clean, found = redact_model_output(text) if final else redact_secrets(text)
                self.withheld += found
                out.append(clean)
                break
            clean, found = redact_secrets(text[:start.start()])
            self.withheld += found + ["private_key_block"]
            out.append(clean + "[withheld: private_key_block]")
            text, self.in_key = text[start.end():], True
        return "".join(out)

    def feed(self, text: str, final: bool = False) -> str:
        if not self.enabled:
            return text
        self.pending += text
        if final:
            cut = len(self.pending)
            if self.in_key:  # a key block that never ended: all of it stays withheld
                self.pending = ""
                return ""
        else:
            cut = max(self.pending.rfind(c) for c in " \t\n") + 1
            line_start = self.pending.rfind("\n") + 1
            for held in (self._header.search(self.pending, line_start), SECRET_KEY.search(self.pending, line_start)):
                if held is not None:
                    cut = min(cut, held.start())
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return self._release(ready, final)


# ------------------------------------------------------------------------------------------ generation
def _decode_new(tokenizer: Any, prompt_ids: list[int], new_ids: list[int], prompt_text: str) -> str:
    """The text of new_ids as it reads after the prompt (decoding them alone can drop a leading space)."""
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(prompt_text):] if full.startswith(prompt_text) else tokenizer.decode(new_ids)


def stream(model: torch.nn.Module, tokenizer: Any, prompt: str, config: SamplingConfig | None = None,
           result: dict | None = None) -> Iterator[str]:
    """Yields the continuation of `prompt` piece by piece as tokens come. If `result` is a dict, it receives
    the Generation fields when the stream ends.

    A bad prompt (not UTF-8, too long for the context) raises here, when stream() is called, not at the first
    next(): a caller that prints the prompt before the continuation prints nothing for an error.
    """
    config = config or SamplingConfig()
    prompt_ids = list(tokenizer.encode(prompt))
    if not prompt_ids:
        prompt_ids = [tokenizer.bos_id if getattr(tokenizer, "bos_id", None) not in (None, -1) else tokenizer.eos_id]
    limit = context_length(model)
    if limit is not None and len(prompt_ids) >= limit:
        raise GenerationError(f"The prompt is {len(prompt_ids)} tokens and the model's context is {limit}: shorten "
                              "the prompt to leave room for new tokens.")
    return _stream(model, tokenizer, prompt_ids, limit, config, result)


def _stream(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], limit: int | None,
            config: SamplingConfig, result: dict | None) -> Iterator[str]:
    prompt_text = tokenizer.decode(prompt_ids)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    decoder = _Decoder(model, config.use_cache)
    secret_filter = _SecretFilter(config.filter_secrets)
    new_ids: list[int] = []
    emitted_raw = ""  # text released by stop-string handling, before the secret filter
    finish = "length"
    hold = max((len(s) for s in config.stop), default=1) - 1
    logits = decoder(prompt_ids)
    for _ in range(config.max_new_tokens):
        next_id = sample_next(logits.cpu(), config, generator)
        if next_id == tokenizer.eos_id:
            finish = "eos"
            break
        new_ids.append(next_id)
        text = _decode_new(tokenizer, prompt_ids, new_ids, prompt_text)
        hits = [text.find(s, max(0, len(emitted_raw) - len(s))) for s in config.stop]
        hits = [h for h in hits if h != -1]
        if hits:
            finish, text = "stop", text[:min(hits)]
            piece = secret_filter.feed(text[len(emitted_raw):])
            emitted_raw = text
            if piece:
                yield piece
            break
        # A partial UTF-8 sequence decodes to U+FFFD: held back, and before it as many characters as a
        # stop string still forming could have (counted from the last whole character).
        safe = len(text.rstrip("\ufffd")) - (hold if config.stop else 0)
        if safe > len(emitted_raw):
            piece = secret_filter.feed(text[len(emitted_raw):safe])
            emitted_raw = text[:safe]
            if piece:
                yield piece
        if limit is not None and len(prompt_ids) + len(new_ids) >= limit:
            finish = "context"
            break
        logits = decoder([next_id])
    if finish != "stop":
        text = _decode_new(tokenizer, prompt_ids, new_ids, prompt_text)
        piece = secret_filter.feed(text[len(emitted_raw):])
        emitted_raw = text
        if piece:
            yield piece
    tail = secret_filter.feed("", final=True)
    if tail:
        yield tail
    if result is not None:
        result.update(token_ids=new_ids, finish_reason=finish, withheld=secret_filter.withheld)


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, config: SamplingConfig | None = None) -> Generation:
    """The whole continuation of `prompt` at once (see `stream`)."""
    info: dict = {}
    text = "".join(stream(model, tokenizer, prompt, config, result=info))
    return Generation(text=text, **info)


# --------------------------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike, *, adapter: str | os.PathLike | None = None, device: str = "cpu",
               dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for generation from any of:
    - a native checkpoint directory, or a run directory (its newest valid checkpoint);
    - a checkpoint of a Hugging Face + LoRA run (configs/lora.gin): the base folder plus the saved adapter;
    - a Hugging Face model folder (config.json + *.safetensors + tokenizer), optionally with `adapter`, a
      LoRA adapter folder.
    """
    from codex_ml.models.native import ARCHITECTURE, load_native, read_model_config

    path = Path(path)
    if not path.exists():
        raise GenerationError(f"{path} does not exist: give a run directory, a checkpoint directory or a Hugging "
                              "Face model folder.")
    if (path / "config.json").is_file() and not (path / "manifest.json").exists():
        return _load_hf(path, adapter, device, dtype)
    if adapter is not None:
        raise GenerationError("--adapter applies to Hugging Face model folders; a checkpoint or run directory "
                              "brings its own adapter, if it has one: leave --adapter unset.")
    if dtype != "float32":  # rather than ignore it
        raise GenerationError(f"--dtype={dtype} applies to Hugging Face model folders; a checkpoint or run directory "
                              "loads in the dtype it was trained with: leave --dtype unset.")
    checkpoint = path
    if not (path / "manifest.json").exists() and (path / "checkpoints").is_dir():
        checkpoint = latest_valid_checkpoint(path)
        if checkpoint is None:
            raise CheckpointError(f"Run directory {path} holds no valid checkpoint under checkpoints/.")
    if not (checkpoint / "manifest.json").exists():
        if (checkpoint / "model.safetensors").exists() or (checkpoint / "model_config.json").exists():
            verify_checkpoint(checkpoint)  # a checkpoint interrupted while written: says it is partial
        raise GenerationError(f"{path} is neither a checkpoint (no manifest.json), a run directory (no "
                              "checkpoints/) nor a Hugging Face folder (no config.json).")
    manifest = verify_checkpoint(checkpoint)  # before any of its files is read: a corrupt one is named
    has_config = "model_config.json" in manifest["files"]
    architecture = read_model_config(checkpoint).get("architecture") if has_config else None
    if architecture == "codex_ml.HFCausalLM":
        return _load_hf_run_checkpoint(checkpoint, device, manifest)
    if architecture not in (None, ARCHITECTURE):
        raise CheckpointError(f"Checkpoint {checkpoint} holds architecture {architecture!r}, which codex_ml "
                              "cannot generate with.")
    from codex_ml.models.hf import resolve_device  # (hf.py imports transformers only when a model is loaded)

    model, tokenizer = load_native(checkpoint, device=resolve_device(device, GenerationError), manifest=manifest)
    if tokenizer is None:
        raise CheckpointError(f"Checkpoint {checkpoint} has no tokenizer.model, so its ids cannot be decoded.")
    return model, tokenizer


def _hf_tokenizer(folder: Path) -> Any:
    from codex_ml.tokenization import load_tokenizer

    return load_tokenizer(folder)


def _load_hf(folder: Path, adapter: str | os.PathLike | None, device: str, dtype: str) -> tuple[Any, Any]:
    from codex_ml.models.hf import apply_lora, load_hf_model

    model = load_hf_model(folder, dtype=dtype, device=device)
    if adapter is not None:
        model = apply_lora(model, peft_path=adapter)
    return model.eval(), _hf_tokenizer(folder)


def _load_hf_run_checkpoint(checkpoint: Path, device: str, manifest: dict) -> tuple[Any, Any]:
    """manifest: verify_checkpoint(checkpoint), just checked by the caller."""
    from codex_ml.models.hf import HFCausalLM, HFModelConfig
    from codex_ml.models.native import read_model_config

    saved = read_model_config(checkpoint)
    fields = {f.name for f in dataclasses.fields(HFModelConfig)}
    config = HFModelConfig(**{k: v for k, v in saved.items() if k in fields})
    config.device = device
    wrapper = HFCausalLM(config)
    wrapper.load_state_dict(load_model_state(checkpoint, device))
    tokenizer = _hf_tokenizer(Path(config.path))
    expected = manifest.get("tokenizer_sha256")
    if expected and tokenizer.sha256 != expected:
        if (Path(config.path) / "tokenizer.model").is_file():
            from codex_ml.tokenization import Tokenizer

            tokenizer = Tokenizer.load(Path(config.path) / "tokenizer.model")
        if tokenizer.sha256 != expected:
            raise CheckpointError(f"Checkpoint {checkpoint} was trained with another tokenizer than the one in "
                                  f"{config.path}.")
    return wrapper.model.eval(), tokenizer
