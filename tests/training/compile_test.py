"""torch.compile with its default backend (Inductor) on the CPU: the native GPT's training step compiles into one
graph with codex_ml's custom ops inside, and Trainer.compile = True trains as eager does.

Tolerance: Inductor fuses and reorders float32 reductions, which moves results by a few ulps; losses agree to
rel 1e-4 and gradients to atol 1e-5 (their entries are of order 1e-2 at this size).
"""

import pytest
import torch
from standins import make_trainer

from codex_ml.models.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16)


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY)


def test_native_gpt_training_step_compiles_with_inductor_in_one_graph():
    from torch._dynamo.utils import counters

    model = _tiny_gpt()
    idx, targets = torch.randint(0, 32, (2, 16)), torch.randint(0, 32, (2, 16))
    _, eager_loss = model(idx, targets)
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error, not a fallback
    _, loss = compiled(idx, targets)
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1  # Inductor ran
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_trainer_compile_trains_as_eager_does(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    options = dict(max_steps=3, batch_size=2, seq_len=16, eval_batches=0, warmup_steps=0, device="cpu")
    eager = make_trainer(tmp_path / "eager", model=_tiny_gpt(), **options).fit()
    counters.clear()
    compiled = make_trainer(tmp_path / "compiled", model=_tiny_gpt(), compile=True, **options).fit()
    assert counters["stats"]["unique_graphs"] >= 1  # the step ran compiled
    assert compiled.status == eager.status == "finished"
    assert sorted(compiled.train_losses) == [1, 2, 3]
    for step, loss in eager.train_losses.items():
        assert compiled.train_losses[step] == pytest.approx(loss, rel=1e-4)
