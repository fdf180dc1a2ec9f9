"""load_native: round trip of a checkpoint, run directories, and clear errors on bad checkpoints."""

import os

import pytest
import torch

from codex_ml.checkpoint.core import CheckpointError, save_checkpoint
from codex_ml.models import GPT, GPTConfig
from codex_ml.models.native import load_native


def save(path, model, architecture="codex_ml.GPT"):
    config = {**model.config.to_dict(), "architecture": architecture}
    return save_checkpoint(path, model_state=model.state_dict(), model_config=config)


def test_round_trip_and_errors():
    tmp = os.path.join(os.environ.get("TEST_TMPDIR", "/tmp"), "native")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16))
    save(os.path.join(tmp, "run", "checkpoints", "step_00000001"), model)
    loaded, tokenizer = load_native(os.path.join(tmp, "run"))
    idx = torch.randint(0, 50, (1, 8))
    assert tokenizer is None
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
    with pytest.raises(CheckpointError, match="architecture"):
        load_native(save(os.path.join(tmp, "other"), model, architecture="gpt2"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_native(os.path.join(tmp, "missing"))
