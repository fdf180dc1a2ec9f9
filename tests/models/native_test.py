"""load_native: round trip of a checkpoint, run directories, and clear errors on bad checkpoints."""

import hashlib
import json
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


def test_checkpoint_made_with_another_tokenizer_is_refused(tmp_path):
    from codex_ml.tokenization import Tokenizer

    texts = ["def f(x):\n    return x\n" * 20, "import os\nprint(os.sep)\n" * 20]
    tok_a = Tokenizer.train(texts, tmp_path / "a.model", vocab_size=300)
    tok_b = Tokenizer.train(texts[::-1] + ["class C:\n    pass\n" * 20], tmp_path / "b.model", vocab_size=310)
    assert tok_a.sha256 != tok_b.sha256
    model = GPT(GPTConfig(vocab_size=310, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16))
    config = {**model.config.to_dict(), "architecture": "codex_ml.GPT"}
    good = save_checkpoint(tmp_path / "good", model_state=model.state_dict(), model_config=config,
                           tokenizer_path=tok_b.model_path, manifest_extra={"tokenizer_sha256": tok_b.sha256})
    assert load_native(good)[1].sha256 == tok_b.sha256
    # Trained with tokenizer b, but tokenizer a was stored beside it: its ids would decode to other text.
    bad = save_checkpoint(tmp_path / "bad", model_state=model.state_dict(), model_config=config,
                          tokenizer_path=tok_a.model_path, manifest_extra={"tokenizer_sha256": tok_b.sha256})
    with pytest.raises(CheckpointError, match="differs from the tokenizer it was trained with"):
        load_native(bad)


def test_a_model_config_that_is_not_an_object_is_named(tmp_path):
    """One that matches a hand-edited manifest (verification passes) but is a list: it raised AttributeError."""
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16))
    path = save(tmp_path / "ckpt", model)
    (path / "model_config.json").write_text("[1, 2]")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model_config.json"] = hashlib.sha256(b"[1, 2]").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model_config.json is not a JSON object"):
        load_native(path)
