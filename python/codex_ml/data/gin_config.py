"""Gin configurables of the data area (the core modules stay gin-free)."""

import gin

from codex_ml.data.pipeline import prepare_data

gin.external_configurable(prepare_data, module="codex_ml.data")
