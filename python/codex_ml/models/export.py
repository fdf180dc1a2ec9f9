"""Export of a native codex_ml GPT checkpoint to a Hugging Face Llama folder.

The native GPT is a Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU, no biases), so the export only renames
weights and writes a LlamaConfig: `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` then loads a
LlamaForCausalLM, offline, with the native model's logits (tests/models/export_test.py checks this).

The folder holds config.json, generation_config.json, model.safetensors, the tokenizer (when the checkpoint
has one: tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json) and
codex_ml_export.json (where it came from).

Tokenizer: tokenizer.json is transformers' own conversion of the SentencePiece model file, made (and checked)
at export time rather than at every load; tokenizer.model is kept as the reference. For BPE models (codex_ml's
default) its ids equal `Tokenizer.encode` exactly, with two settings that matter: no BOS is added (training
data has none: documents are only separated by EOS), and `split_special_tokens` is on, so text such as "<s>"
is encoded as characters, as SentencePiece does, never as the special id. For unigram models, transformers breaks ties
between equal-score segmentations differently: runs of whitespace may come out as the same pieces in
another order (same count, different ids). The export encodes probe texts both ways and records whether
they agreed in codex_ml_export.json ("tokenizer_ids_match"), with a warning when they did not.

The command: codex-export (codex_ml/cli/export.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from codex_ml.checkpoint.core import MANIFEST, latest_valid_checkpoint
from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.models.native import load_native
from codex_ml.tokenization.tokenizer import SPECIAL_IDS, Tokenizer, blocking_file, file_sha256

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TMP_PREFIX = ".tmp-"
# Encoded by both tokenizers at export time; code with indentation, digits, unicode and special-token text.
_PROBES = (
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b  # 12345\n\n\tpass\r\n",
    "  class  Foo(Bar):\n        x = [1, 2, 3]\n",
    "print('héllo ✓ 你好 🚀', end='')\n",
    "<s> </s> <unk> <pad> text",
)


class ExportError(ValueError):
    """The export cannot proceed (bad dtype, existing output, mismatched tokenizer); the message says the fix."""


def llama_weight_names(config: GPTConfig) -> dict[str, str]:
    """codex_ml GPT parameter name -> LlamaForCausalLM's, for a GPT of `config`.

    A tied lm_head has no entry: LlamaForCausalLM with tie_word_embeddings=True ties it to embed_tokens on load.
    """
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for p in ("q", "k", "v", "o"):
            names[f"{ours}attn.{p}_proj.weight"] = f"{theirs}self_attn.{p}_proj.weight"
        for p in ("gate", "up", "down"):
            names[f"{ours}mlp.{p}_proj.weight"] = f"{theirs}mlp.{p}_proj.weight"
    return names


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM names (llama_weight_names), cast to `dtype`, contiguous, each
    stored once."""
    c = model.config
    src = model.state_dict()
    names = llama_weight_names(c)
    leftover = set(src) - set(names) - ({"lm_head.weight"} if c.tie_embeddings else set())
    if leftover:  # a new GPT parameter this mapping does not know would silently be dropped
        raise ExportError(f"GPT parameters without a Llama name: {sorted(leftover)}; extend hf_state_dict.")
    return {theirs: src[ours].detach().to("cpu", dtype).contiguous() for ours, theirs in names.items()}


def llama_config(model: GPT, special_ids: dict[str, int | None], dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM.

    RoPE theta is written both as transformers 5's `rope_parameters` and as the older top-level `rope_theta`
    (5.x folds the latter in; 4.x reads only it), and the dtype both as `dtype` and `torch_dtype`, so the folder
    loads in either major version.
    """
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_theta": float(c.rope_theta),
        "rms_norm_eps": c.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "use_cache": True,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def _special_ids(model: GPT, tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """The tokenizer's ids; without one, codex_ml's fixed ids (every codex_ml tokenizer has them)."""
    if tokenizer is not None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ExportError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                              f"{model.config.vocab_size} embeddings: the checkpoint is inconsistent.")
        ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": tokenizer.unk_id}
        return {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
    return {k: (v if v < model.config.vocab_size else None) for k, v in SPECIAL_IDS.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int) -> bool | None:
    """Writes the tokenizer files; returns whether transformers' ids matched ours on the probes (None: unchecked)."""
    import sentencepiece as spm

    shutil.copyfile(tokenizer.model_path, folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
    pieces = {name: (sp.IdToPiece(i) if i is not None and i >= 0 else None) for name, i in
              (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unk", tokenizer.unk_id),
               ("pad", tokenizer.pad_id))}
    special = {f"{k}_token": v for k, v in pieces.items() if v is not None}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        # PreTrainedTokenizerFast: a plain tokenizer.json tokenizer in transformers 4.x, TokenizersBackend in 5.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "right",
    })
    try:
        from transformers import AutoTokenizer
    except ImportError:  # transformers 5 still converts tokenizer.model when loading; only slower, and unchecked
        log.warning("transformers is not installed: tokenizer.json not written, tokenizer ids not checked.")
        return None
    converted = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    converted.backend_tokenizer.save(str(folder / "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    mismatched = [t for t in _PROBES
                  if reloaded.encode(t, add_special_tokens=False, verbose=False) != tokenizer.encode(t)]
    if mismatched:
        log.warning("The exported Hugging Face tokenizer encodes %d of %d probe texts differently from the "
                    "SentencePiece model (e.g. %r); tokenizer.model is the reference.",
                    len(mismatched), len(_PROBES), mismatched[0])
    return not mismatched


def _resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory load_native will read (the newest valid one of a run directory)."""
    if not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        return latest_valid_checkpoint(path) or path  # None: load_native raises the clear error
    return path


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty directory: choose another --out, "
                          "or delete it to export again.")
    blocker = blocking_file(out_dir)
    if blocker is not None:  # mkdir would only say "File exists" (or "Not a directory")
        raise ExportError(f"cannot create {out_dir}: {blocker} is a file, not a directory; choose another --out.")


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Writes a Hugging Face LlamaForCausalLM folder at `out_dir` from a native checkpoint (or run) directory.

    The folder is built beside `out_dir` and renamed into place, so `out_dir` is either absent or complete.
    `dtype` ("float32", "bfloat16", "float16") is the dtype of the stored weights. Raises ExportError when
    `out_dir` exists and is not empty, and CheckpointError (from load_native) for a missing, corrupt or
    non-native checkpoint. Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    source = _resolve_checkpoint(Path(checkpoint))
    model, tokenizer = load_native(source)
    manifest = json.loads((source / MANIFEST).read_text())
    special = _special_ids(model, tokenizer)

    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{_TMP_PREFIX}{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(hf_state_dict(model, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(model, special, dtype))
        _write_json(tmp / "generation_config.json", {
            k + "_token_id": special[k] for k in ("bos", "eos", "pad") if special[k] is not None})
        ids_match = None
        if tokenizer is not None:
            ids_match = _write_tokenizer(tokenizer, tmp, model.config.max_seq_len)
        _write_json(tmp / "codex_ml_export.json", {
            "source_checkpoint": str(source.resolve()),
            "source_model_sha256": manifest["files"].get("model.safetensors"),
            "source_step": manifest.get("step"),
            "source_git_commit": manifest.get("git_commit"),
            "tokenizer_sha256": tokenizer.sha256 if tokenizer is not None else None,
            "tokenizer_ids_match": ids_match,
            "dtype": dtype,
            "model_sha256": file_sha256(tmp / "model.safetensors"),
        })
        try:
            os.rename(tmp, out_dir)  # replaces an empty directory; fails if something appeared there since
        except OSError as err:
            raise ExportError(f"could not move the export into {out_dir} ({err}): it must be absent or empty.") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
