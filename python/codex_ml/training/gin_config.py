"""Gin registrations of the training area (imported by the CLI only; the training code does not know gin).

TrainerConfig is made configurable in place under the name `Trainer`, so `TrainerConfig()` takes the
`Trainer.*` bindings (`Trainer.max_steps = 50`); `train` is the configured entry point the CLI calls. Data
and model come in by reference, e.g. `train.data_fn = @prepare_data` (a reference without a call passes
the configured function).
"""

import gin

from codex_ml.training import experiment
from codex_ml.training.config import TrainerConfig

# seed is train.seed: the experiment seeds model initialisation with it too.
Trainer = gin.configurable("Trainer", module="codex_ml.training", denylist=["seed"])(TrainerConfig)
train = gin.configurable("train", module="codex_ml.training",
                         denylist=["run_dir", "resume", "operative_config", "config", "process"])(experiment.train)
