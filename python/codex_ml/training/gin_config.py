"""Gin registrations of the training area (imported by the CLI only; the training code does not know gin).

Trainer is made configurable in place, so the Trainer that `train` builds takes its bindings; `train` is
the configured entry point the CLI calls. Data and model come in by reference, e.g.
`train.data_fn = @prepare_data` (a reference without a call passes the configured function).
"""

import gin

from codex_ml.training import experiment
from codex_ml.training.trainer import Trainer

gin.configurable(Trainer, module="codex_ml.training",
                 denylist=["run_dir", "model", "data", "seed", "operative_config", "model_config"])
train = gin.configurable("train", module="codex_ml.training",
                         denylist=["run_dir", "resume", "operative_config"])(experiment.train)
