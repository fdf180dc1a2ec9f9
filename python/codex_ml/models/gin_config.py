"""Gin configurables of the models area (the model code stays gin-free)."""

import gin

from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.models.hf import HFCausalLM, HFModelConfig

gin.external_configurable(GPTConfig, module="codex_ml.models")
# train() builds the model from train.model_config: a binding of GPT.config would be ignored.
gin.external_configurable(GPT, module="codex_ml.models", denylist=["config"])
gin.external_configurable(HFModelConfig, module="codex_ml.models")
gin.external_configurable(HFCausalLM, module="codex_ml.models", denylist=["config"])
