"""The loop on a GPU: fp16 with a loss scaler and bf16 autocast train, and the scaler state is checkpointed."""

import pytest
import torch
from standins import make_trainer

from codex_ml.checkpoint import load_state_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_gpu(tmp_path, precision):
    result = make_trainer(tmp_path, device="cuda", precision=precision, max_steps=30, dropout=0.0).fit()
    assert result.status == "finished"
    assert result.train_losses[30] < result.train_losses[1] - 0.5
    if precision == "fp16":
        assert load_state_file(result.last_checkpoint, "scaler")["scale"] > 0
