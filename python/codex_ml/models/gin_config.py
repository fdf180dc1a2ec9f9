"""Gin configurables of the models area (the model code stays gin-free)."""

import gin

from codex_ml.models.gpt import GPT, GPTConfig

gin.external_configurable(GPTConfig, module="codex_ml.models")
gin.external_configurable(GPT, module="codex_ml.models")
