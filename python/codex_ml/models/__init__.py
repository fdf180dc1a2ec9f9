"""Models: the native GPT (codex_ml.models.gpt) and loading of checkpoints."""

from codex_ml.models.gpt import GPT, GPTConfig, GPTConfigError, KVCache
from codex_ml.models.native import load_native

__all__ = ["GPT", "GPTConfig", "GPTConfigError", "KVCache", "load_native"]
