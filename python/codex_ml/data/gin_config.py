"""Gin configurables of the data area (the core modules stay gin-free)."""

import gin

from codex_ml.data.pipeline import prepare_data

# train() passes cache_dir (bind train.cache_dir) and log itself: a binding of them would be ignored.
gin.external_configurable(prepare_data, module="codex_ml.data", denylist=["cache_dir", "log"])
