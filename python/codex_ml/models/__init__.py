"""Models: the native GPT (codex_ml.models.gpt) and loading of checkpoints."""

from codex_ml.models.gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
