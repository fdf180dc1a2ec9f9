"""The native GPT: shapes, loss through the fused op, the KV cache, parameter and FLOP counts."""

import pytest
import torch
import torch.nn.functional as F

from codex_ml.models import GPT, GPTConfig, GPTConfigError, KVCache


def tiny(**overrides) -> GPT:
    config = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=48)
    config.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**config))


def test_fused_loss_equals_cross_entropy_of_full_logits():
    model = tiny()
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[0, :5] = -100
    logits, none = model(idx)
    assert none is None and logits.shape == (3, 20, 97)
    _, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_gives_the_same_logits_and_greedy_tokens(tie):
    model = tiny(tie_embeddings=tie).eval()
    prompt = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        full, _ = model(prompt)
        cache = KVCache(model.config.n_layer)
        first, _ = model(prompt[:, :4], cache=cache)
        rest, _ = model(prompt[:, 4:], cache=cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
        # Greedy decoding: with and without the cache, the same tokens.
        seq, cached_seq, cache = prompt, prompt, KVCache(model.config.n_layer)
        step_input = prompt
        for _ in range(15):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
            nxt = model(step_input, cache=cache)[0][:, -1].argmax(-1, keepdim=True)
            cached_seq, step_input = torch.cat([cached_seq, nxt], 1), nxt
        assert torch.equal(seq, cached_seq)


def test_counts_and_initialization():
    model = tiny()
    c = model.config
    per_layer = 4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * c.ffn_hidden + 2 * 64
    assert model.num_params() == 97 * 64 + 2 * per_layer + 64  # tied embeddings counted once
    assert tiny(tie_embeddings=False).num_params() == model.num_params() + 97 * 64
    attention = 12 * c.n_layer * 64 * 48
    # The output projection does matmul work whether or not it shares the embedding's weight: same FLOPs either way.
    assert model.flops_per_token(48) == 6 * model.num_params() + attention
    assert tiny(tie_embeddings=False).flops_per_token(48) == model.flops_per_token(48)
    std = model.blocks[0].attn.o_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * c.n_layer) ** 0.5, rel=0.15)


def test_bad_config_and_overlong_input_are_refused():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(d_model=66, n_head=4)
    with pytest.raises(ValueError, match="longer than the model's context"):
        tiny()(torch.zeros(1, 49, dtype=torch.long))


def test_config_round_trips_through_a_dict():
    config = tiny().config
    assert GPTConfig.from_dict(config.to_dict()) == config
    rebuilt = GPT.from_config_dict({**config.to_dict(), "architecture": "codex_ml.GPT"})
    assert rebuilt.config == config


@pytest.mark.parametrize("bad, message", [
    (dict(n_kv_head=0), "n_kv_head must be a positive integer"),
    (dict(n_head=0), "n_head must be a positive integer"),
    (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
    (dict(init_std=-0.1), "must be positive"),
    (dict(d_model=96, n_head=4), "head dim the attention kernels run"),
    (dict(ffn_hidden=0), "ffn_hidden must be a positive integer"),
])
def test_bad_configs_fail_at_construction(bad, message):
    # GPTConfigError (a ValueError): the train command prints it as a usage error, not a traceback.
    with pytest.raises(GPTConfigError, match=message):
        GPTConfig(**bad)
