"""Hugging Face causal LMs on codex_ml: local loading, LoRA through peft, and the fused kernels.

- `load_hf_model` loads a model from a local folder with a dtype and a device; the Hugging Face Hub is never
  contacted unless allow_hub (HF_HUB_OFFLINE is set before transformers or peft is imported, and every load is
  local_files_only).
- `use_codex_attention` routes the model's attention through codex_ml.ops.attention where the call is
  plain causal self-attention (training, prefill); masked or cached calls keep HF's SDPA path.
- `patch_fused_loss` replaces the loss of supported architectures with codex_ml.ops.linear_cross_entropy,
  as Liger-Kernel patches models: with labels, the [tokens, vocabulary] logits are never materialized.
- `patch_fused_layers` runs the RMSNorms and SiLU-gated MLPs of Llama-like models on codex_ml.ops.rms_norm
  and swiglu (HFModelConfig.fused_layers, on by default).
- `apply_lora` / `save_adapter` / `merge_lora`: peft adapters that train, save and load on their own.
- `HFCausalLM` adapts all of it to codex_ml's Trainer: forward(input_ids, targets) -> (logits, loss), where
  targets are already shifted (the data pipeline's convention), and checkpoints hold only the trainable
  (adapter) weights when LoRA is on: the base weights are those of the folder it was loaded from, pinned by the
  SHA-256 of its weight files (a different base of the same architecture is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from codex_ml import ops
from codex_ml._files import file_sha256
from codex_ml._hub import hub_offline
from codex_ml.ops.attention import HEAD_DIMS

# Architectures whose causal-LM head is `lm_head(model(...).last_hidden_state)` with nothing in between
# (no logit scaling or softcapping), so the fused loss computes exactly what their forward does.
FUSED_LOSS_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")
# LoRA target modules per architecture when none are given: the attention and MLP projections.
DEFAULT_LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_INFO = "codex_ml_adapter.json"
ATTENTION_NAME = "codex_ml"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class HFModelError(ValueError):
    """A Hugging Face model folder, adapter or setting that cannot be used; the message says why and what to do."""


def resolve_device(device: str, error: type[Exception] | None = None) -> torch.device:
    """"auto" (CUDA where there is one, else the CPU), or the named device, which must exist here; otherwise
    `error` (default HFModelError) says so."""
    error = error or HFModelError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise error(f"device={device!r} is not a device: use cpu, cuda, cuda:N or auto.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device={device!r} but no CUDA device is available: use cpu or auto.")
    return dev


def _check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise HFModelError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype == "float16" and device.type == "cpu":
        raise HFModelError("dtype='float16' is not supported on the CPU (no fp16 matmul kernels worth using "
                           "there): use 'bfloat16' or 'float32', or a CUDA device.")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HFModelError("dtype='bfloat16' needs a GPU of compute capability 8.0 or newer: use 'float16'.")
    return DTYPES[dtype]


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise HFModelError(f"Hugging Face model folder {path} does not exist: give a local folder made by "
                           "`save_pretrained` (or `codex-export`); nothing is downloaded.")
    if not (path / "config.json").is_file():
        raise HFModelError(f"{path} has no config.json, so it is not a Hugging Face model folder.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise HFModelError(f"{path} has a config.json but no weights (*.safetensors): the folder is partial; "
                           "copy the weight files too.")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (*.safetensors, *.bin), sorted by name."""
    return sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()})


@functools.lru_cache(maxsize=8)
def _weights_digest(signature: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in signature:
        digest.update(f"{Path(path).name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def base_weights_sha256(folder: str | os.PathLike) -> str:
    """The SHA-256 of a model folder's weight files (names and contents), computed once per process while the
    files stay unchanged (same sizes and modification times)."""
    files = weight_files(Path(folder).resolve())
    return _weights_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def load_hf_model(path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                  attention: str = ATTENTION_NAME, allow_hub: bool = False) -> nn.Module:
    """A causal LM from a local folder, offline. `attention`: "codex_ml" (our kernels where they apply), or
    any implementation transformers knows ("sdpa", "eager"). allow_hub: let transformers reach the Hugging Face
    Hub (for remote code or files the folder lacks); off by default, the folder must be complete."""
    hub_offline(allow_hub)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in training logs

    path = Path(path)
    _check_folder(path)
    dev = resolve_device(device)
    torch_dtype = _check_dtype(dtype, dev)
    torch.manual_seed(seed)  # weights missing from the folder (a fresh head) are initialized reproducibly
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=not allow_hub)
    except (OSError, ValueError, KeyError) as e:
        raise HFModelError(f"{path}/config.json cannot be read by transformers ({e}).") from e
    if attention == ATTENTION_NAME:
        register_codex_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype,
                                                     local_files_only=not allow_hub, attn_implementation=attention)
    except ValueError as e:
        if "attn_implementation" not in str(e):
            raise
        raise HFModelError(f"HFModelConfig.attention = {attention!r} is not an attention transformers can run for "
                           f"this model: use '{ATTENTION_NAME}', 'sdpa' or 'eager' ({e}).") from e
    except (SafetensorError, OSError) as e:  # a truncated or damaged weight file
        raise HFModelError(f"The weights in {path} cannot be read ({str(e)[:200]}): a weight file is truncated or "
                           "damaged; copy the model folder again.") from e
    model._codex_base_folder = str(path.resolve())  # for the adapter's record of its base weights
    return model.to(dev)


# ------------------------------------------------------------------------------------------- attention
def _codex_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        # Attention sinks (GPT-OSS and others) change the softmax: neither our kernel nor SDPA computes them.
        raise HFModelError(f"{type(module).__name__} uses attention sinks, which attn_implementation="
                           f"'{ATTENTION_NAME}' does not compute: load the model with attention='eager'.")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom op sits outside autocast, and HF's rotary embedding (bf16 q/k times fp32 tables) hands over q
        # and k in fp32 with v in bf16: all three in autocast's dtype, as SDPA would compute them.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    plain = (attention_mask is None and causal and dropout == 0.0 and query.shape[2] == key.shape[2]
             and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and query.shape[-1] in HEAD_DIMS and query.dtype == key.dtype == value.dtype)
    if not plain:  # padding masks, KV-cache decoding, dropout, other head dims: HF's own path
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = ops.attention(query, key, value, causal=True, scale=scaling, window=window)
    return out.transpose(1, 2).contiguous(), None


def register_codex_attention() -> None:
    """Registers attn_implementation="codex_ml" with transformers (idempotent)."""
    hub_offline()
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _codex_attention)
    # SDPA's mask builder returns None for plain causal batches, which is what selects our kernel above.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


# ------------------------------------------------------------------------------------------ fused loss
def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_fused_loss(model: nn.Module) -> bool:
    """True when the fused loss computes exactly this model's loss (architecture known, plain linear head)."""
    base = _base_model(model)
    head = getattr(base, "lm_head", None)
    return (getattr(base.config, "model_type", None) in FUSED_LOSS_ARCHITECTURES and type(head) is nn.Linear
            and head.bias is None and hasattr(base, "model"))


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = -100, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """HF's causal-LM loss (labels shifted left by one, mean over labels != ignore_index, or a sum over
    num_items_in_batch under gradient accumulation) through the fused linear cross-entropy."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        return ops.linear_cross_entropy(h, weight, y, ignore_index=ignore_index)
    total = ops.linear_cross_entropy(h, weight, y, ignore_index=ignore_index, reduction="sum")
    return total / num_items_in_batch


def patch_fused_loss(model: nn.Module) -> nn.Module:
    """Makes forward(..., labels=...) compute the loss with the fused kernel (logits come back as None then).

    Only this instance is patched. Raises HFModelError for architectures where that would change the result.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if not supports_fused_loss(model):
        base = _base_model(model)
        raise HFModelError(f"the fused loss does not support model_type={getattr(base.config, 'model_type', None)!r}"
                           f" with a {type(getattr(base, 'lm_head', None)).__name__} head (supported: "
                           f"{', '.join(FUSED_LOSS_ARCHITECTURES)}); set fused_loss=False.")
    base = _base_model(model)
    original = base.forward
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        # Arguments named as the original forward names them, positional ones included (position_ids is HF's
        # third), its **kwargs (num_items_in_batch, ...) flattened in.
        named = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(name, {}))
        labels, num_items_in_batch = named.pop("labels", None), named.pop("num_items_in_batch", None)
        if labels is None:
            return original(*args, **kwargs)
        named.pop("logits_to_keep", None)
        named.pop("return_dict", None)
        out = base.model(**named)
        loss = causal_lm_loss(out.last_hidden_state, base.lm_head.weight, labels,
                              num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, cache=out.cache)

    base.forward = forward
    base._codex_fused_loss = True
    return model


# ------------------------------------------------------------------------------------ fused layer ops
# Families whose RMSNorm is Llama's (weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), which is exactly
# codex_ml.ops.rms_norm) and whose MLP is down(act(gate(x)) * up(x)). OLMo-2 multiplies by the weight before
# rounding, Gemma by 1 + weight: not these.
FUSED_LAYER_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _fused_rms_norm_forward(norm: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    return forward


def _fused_mlp_forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(ops.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    return forward


def patch_fused_layers(model: nn.Module) -> int:
    """Runs this instance's RMSNorms and SiLU-gated MLPs on codex_ml.ops.rms_norm and swiglu (one fused kernel
    each way instead of five to ten ops), for the architectures in FUSED_LAYER_ARCHITECTURES; other models are
    left as they are. Returns the number of modules patched. Works before or after LoRA (the projections are
    called as modules)."""
    base = _base_model(model)
    config = base.config
    if getattr(config, "model_type", None) not in FUSED_LAYER_ARCHITECTURES:
        return 0
    silu = getattr(config, "hidden_act", None) == "silu" and not getattr(config, "mlp_bias", False)
    patched = 0
    for module in base.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
            module.forward = _fused_rms_norm_forward(module)
            patched += 1
        elif silu and name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = _fused_mlp_forward(module)
            patched += 1
    return patched


# ------------------------------------------------------------------------------------------------ LoRA
def _fingerprint(model: nn.Module) -> dict[str, Any]:
    """What an adapter must match in its base model: architecture, every weight's name and shape, and (for a
    model loaded from a folder) the folder's absolute path and the SHA-256 of its weight files."""
    base = _base_model(model)
    shapes = sorted((name.replace(".base_layer", ""), list(p.shape))  # as named before peft wrapped it
                    for name, p in base.named_parameters() if "lora_" not in name)
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    info = {"model_type": getattr(base.config, "model_type", None), "shapes_sha256": digest}
    folder = getattr(base, "_codex_base_folder", None)
    if folder is not None:
        info.update(base_path=folder, base_weights_sha256=base_weights_sha256(folder))
    return info


def _check_base(saved: dict[str, Any], current: dict[str, Any], adapter: Path) -> None:
    """HFModelError unless the base model described by `current` is the one the adapter (`saved`) was made on."""
    if (saved.get("model_type"), saved.get("shapes_sha256")) != (current["model_type"], current["shapes_sha256"]):
        raise HFModelError(f"The adapter {adapter} was trained on another base model ({saved.get('model_type')}, "
                           f"weights {str(saved.get('shapes_sha256'))[:12]}) than this one ({current['model_type']}, "
                           f"{current['shapes_sha256'][:12]}): load the base model it was made for.")
    expected, actual = saved.get("base_weights_sha256"), current.get("base_weights_sha256")
    if expected and actual and expected != actual:
        raise HFModelError(f"The adapter {adapter} was trained on the base model {saved.get('base_path')} with weights "
                           f"{expected[:12]}, but {current.get('base_path')} holds other weights ({actual[:12]}) of "
                           "the same architecture: load the base model it was made for.")


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
               target_modules: Sequence[str] | None = None, peft_path: str | os.PathLike | None = None) -> nn.Module:
    """Wraps `model` in a peft LoRA model: only the adapter weights train. With peft_path, that adapter is
    loaded (trainable) instead of a fresh one."""
    hub_offline()
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import SafetensorError

    if peft_path is not None:
        peft_path = Path(peft_path)
        if not (peft_path / "adapter_config.json").is_file():
            raise HFModelError(f"{peft_path} is not a LoRA adapter folder (no adapter_config.json): give a folder "
                               "written by save_adapter (a run's adapter/ folder).")
        if not any((peft_path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise HFModelError(f"{peft_path} has an adapter_config.json but no adapter_model.safetensors: the folder "
                               "is partial; copy the adapter's weights too (nothing is downloaded).")
        info_file = peft_path / ADAPTER_INFO
        if info_file.is_file():
            _check_base(json.loads(info_file.read_text()), _fingerprint(model), peft_path)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return PeftModel.from_pretrained(model, peft_path, is_trainable=True, local_files_only=True)
        except SafetensorError as e:
            raise HFModelError(f"The adapter weights in {peft_path} cannot be read ({e}): the file is truncated or "
                               "damaged; save or copy the adapter again.") from e
        except (RuntimeError, ValueError, KeyError) as e:
            raise HFModelError(f"The adapter {peft_path} does not fit this base model ({str(e)[:300]}): load the "
                               "base model it was made for.") from e
    # Checked here: peft's own errors for these name the target modules instead.
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise HFModelError(f"HFModelConfig.lora_r = {r!r} must be a positive integer (the adapters' rank), e.g. 8.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise HFModelError(f"HFModelConfig.lora_alpha = {alpha!r} must be a finite number > 0 (the update scales by "
                           "alpha / r), e.g. 16.")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise HFModelError(f"HFModelConfig.lora_dropout = {dropout!r} must be a number in [0, 1), e.g. 0.05.")
    model_type = getattr(model.config, "model_type", None)
    targets = list(target_modules) if target_modules else DEFAULT_LORA_TARGETS.get(model_type)
    if not targets:
        raise HFModelError(f"No default LoRA target modules for model_type={model_type!r}: set "
                           "HFModelConfig.lora_target_modules (names of its nn.Linear layers, e.g. 'q_proj').")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise HFModelError(f"LoRA target modules {targets} do not fit {model_type!r} ({e}).") from e


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Saves only the adapter (adapter_config.json, adapter_model.safetensors) plus the base fingerprint."""
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / ADAPTER_INFO).write_text(json.dumps(_fingerprint(model), indent=1) + "\n")
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """The base model with the adapter folded into its weights (for export with save_pretrained)."""
    merge = getattr(model, "merge_and_unload", None)
    if not callable(merge):
        raise HFModelError("merge_lora needs a peft model with a LoRA adapter.")
    return merge()


# -------------------------------------------------------------------------------------------- Trainer
@dataclasses.dataclass
class HFModelConfig:
    """A Hugging Face model for codex_ml's Trainer (gin: `train.model_config = @HFModelConfig()`)."""

    path: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    attention: str = ATTENTION_NAME
    fused_loss: bool = True
    fused_layers: bool = True
    lora: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    peft_path: str | None = None
    allow_hub: bool = False
    # Recorded by a LoRA run, not set by hand: the SHA-256 of the base folder's weight files (checkpoints hold
    # only the adapter, so a resumed run or generation must load the very same base).
    base_weights_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules) if self.lora_target_modules else None
        return d


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (optionally with LoRA) behind the native model's interface."""

    def __init__(self, config: HFModelConfig):
        super().__init__()
        if not config.path:
            raise HFModelError("HFModelConfig.path is not set: bind it to a local Hugging Face model folder, "
                               "e.g. `HFModelConfig.path = 'models/my-llama'`.")
        config.path = str(Path(config.path).absolute())  # recorded in checkpoints: valid from any directory
        self.config = config
        model = load_hf_model(config.path, dtype=config.dtype, device=config.device, seed=config.seed,
                              attention=config.attention, allow_hub=config.allow_hub)
        if config.lora or config.peft_path:
            digest = base_weights_sha256(config.path)
            if config.base_weights_sha256 not in (None, digest):
                raise HFModelError(f"The base model folder {config.path} holds other weights (SHA-256 {digest[:12]}) "
                                   f"than the run was trained on ({config.base_weights_sha256[:12]}): its checkpoints "
                                   "hold only the LoRA adapter; restore that base model folder.")
            config.base_weights_sha256 = digest
        if config.fused_layers:
            patch_fused_layers(model)
        if config.lora or config.peft_path:
            model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                               target_modules=config.lora_target_modules, peft_path=config.peft_path)
        self.model = model
        self.fused = config.fused_loss and supports_fused_loss(model)
        if config.fused_loss and not self.fused:
            print(f"Note: the fused loss does not support {type(_base_model(model)).__name__}; using its logits.")
        self.max_seq_len = getattr(_base_model(model).config, "max_position_embeddings", None)
        self._trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        self._partial = len(self._trainable) < len(list(self.parameters()))

    @property
    def hf_model(self) -> nn.Module:
        return self.model

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, mean loss over targets != -100) with (already shifted) targets."""
        base = _base_model(self.model)
        if targets is None:
            return self.model(input_ids=idx).logits, None
        if self.fused:
            h = base.model(input_ids=idx).last_hidden_state
            loss = ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), base.lm_head.weight, targets.reshape(-1))
            return None, loss
        logits = self.model(input_ids=idx).logits
        return None, ops.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= _base_model(self.model).get_input_embeddings().weight.numel()
        return n

    # With LoRA, checkpoints hold the adapter alone: the frozen base is the folder's, verified by config.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        if not self._partial:
            return full
        return {k: v for k, v in full.items() if k in self._trainable}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        if not self._partial:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        missing, unexpected = self._trainable - set(state_dict), set(state_dict) - self._trainable
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter weights do not match: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def save_adapter(self, out_dir: str | os.PathLike) -> Path:
        """The LoRA adapter alone, loadable with HFModelConfig.peft_path or peft's PeftModel.from_pretrained."""
        return save_adapter(self.model, out_dir)
