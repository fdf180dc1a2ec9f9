"""Hugging Face models: local loading, codex attention, the fused-loss patch, LoRA through peft, bad input.

Tiny Llama models are built from configs and saved under the test's temporary directory; nothing is
downloaded. Tolerances (float32): logits and losses within 1e-5 relative, gradients within 1e-4 relative to
their largest element; the two paths differ only in the order of floating-point reductions.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from codex_ml.models import hf
from codex_ml.models.hf import (
    HFCausalLM,
    HFModelConfig,
    HFModelError,
    apply_lora,
    load_hf_model,
    merge_lora,
    patch_fused_loss,
    save_adapter,
)

VOCAB = 97


def tiny_llama(folder, hidden=64, seed=0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(folder)
    return folder


def test_codex_attention_matches_eager(llama_dir, monkeypatch):
    ours = load_hf_model(llama_dir)  # attention="codex_ml"
    eager = load_hf_model(llama_dir, attention="eager")
    assert ours.config._attn_implementation == "codex_ml"
    calls = []
    original = hf.ops.attention
    monkeypatch.setattr(hf.ops, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(0, VOCAB, (2, 13))
    torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # both layers ran on codex_ml.ops.attention
    # A padding mask takes HF's own path and still agrees.
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[1],
                               eager(input_ids=ids, attention_mask=mask).logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_fused_loss_patch_matches_unpatched(tmp_path, tie):
    tiny_llama(tmp_path, tie=tie)
    plain = load_hf_model(tmp_path, attention="eager")
    fused = patch_fused_loss(load_hf_model(tmp_path, attention="eager"))
    ids = torch.randint(0, VOCAB, (3, 11))
    labels = ids.clone()
    labels[0, 4:7] = -100
    for kwargs in ({}, {"num_items_in_batch": 25}):
        plain.zero_grad()
        fused.zero_grad()
        expected = plain(input_ids=ids, labels=labels, **kwargs).loss
        out = fused(input_ids=ids, labels=labels, **kwargs)
        assert out.logits is None  # the [tokens, vocabulary] logits were never built
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
        expected.backward()
        out.loss.backward()
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            scale = p.grad.abs().max()
            torch.testing.assert_close(q.grad / scale, p.grad / scale, rtol=0, atol=1e-4, msg=name)
    # Without labels the patched model is the original one.
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_lora_trains_only_adapters_and_round_trips(llama_dir, tmp_path):
    model = HFCausalLM(HFModelConfig(path=str(llama_dir), lora_r=4, lora_dropout=0.0))
    assert model.fused
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 17))
    losses = []
    for _ in range(5):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    # Checkpoints hold the adapter alone, and load back exactly.
    state = model.state_dict()
    assert set(state) == trainable
    logits = model(ids)[0]
    fresh = HFCausalLM(HFModelConfig(path=str(llama_dir), lora_r=4, lora_dropout=0.0))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(ids)[0], logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="adapter weights do not match"):
        fresh.load_state_dict({k: v for k, v in list(state.items())[1:]})

    # The adapter saves and loads on its own (peft_path), and merges into the base for export.
    adapter = save_adapter(model.model, tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    loaded = HFCausalLM(HFModelConfig(path=str(llama_dir), peft_path=str(adapter)))
    torch.testing.assert_close(loaded(ids)[0], logits, rtol=0, atol=0)
    merged = merge_lora(loaded.model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_model_is_refused(llama_dir, tmp_path):
    model = apply_lora(load_hf_model(llama_dir), r=2)
    adapter = save_adapter(model, tmp_path / "adapter")
    other = tmp_path / "other"
    tiny_llama(other, hidden=96)
    with pytest.raises(HFModelError, match="trained on another base model"):
        apply_lora(load_hf_model(other), peft_path=adapter)
    (adapter / "codex_ml_adapter.json").unlink()  # an adapter made elsewhere: peft's own size check, reworded
    with pytest.raises(HFModelError, match="does not fit this base model"):
        apply_lora(load_hf_model(other), peft_path=adapter)
    with pytest.raises(HFModelError, match="not a LoRA adapter folder"):
        apply_lora(load_hf_model(llama_dir), peft_path=tmp_path)


def test_bad_folders_and_settings(llama_dir, tmp_path):
    with pytest.raises(HFModelError, match="does not exist"):
        load_hf_model(tmp_path / "missing")
    with pytest.raises(HFModelError, match="no config.json"):
        load_hf_model(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(HFModelError, match="partial"):
        load_hf_model(partial)
    with pytest.raises(HFModelError, match="float16' is not supported on the CPU"):
        load_hf_model(llama_dir, dtype="float16", device="cpu")
    with pytest.raises(HFModelError, match="not one of"):
        load_hf_model(llama_dir, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(HFModelError, match="no CUDA device"):
            load_hf_model(llama_dir, device="cuda")
    model = load_hf_model(llama_dir, attention="eager")
    for option, message in ((dict(r=0), "lora_r = 0 must be a positive integer"),
                            (dict(alpha=-1.0), "lora_alpha = -1.0 must be a finite number > 0"),
                            (dict(dropout=1.5), "lora_dropout = 1.5 must be a number in \\[0, 1\\)")):
        with pytest.raises(HFModelError, match=message):  # peft's own errors blamed the target modules
            apply_lora(model, **option)
    with pytest.raises(HFModelError, match="HFModelConfig.attention = 'bogus' is not an attention"):
        load_hf_model(llama_dir, attention="bogus")
    with pytest.raises(HFModelError, match="HFModelConfig.path is not set"):
        HFCausalLM(HFModelConfig())
    bf16 = load_hf_model(llama_dir, dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_fused_layers_patch_matches_unpatched(llama_dir, monkeypatch):
    plain = load_hf_model(llama_dir, attention="eager")
    fused = load_hf_model(llama_dir, attention="eager")
    # 2 layers x (2 norms + 1 MLP) + the final norm
    assert hf.patch_fused_layers(fused) == 7
    calls = []
    for op in ("rms_norm", "swiglu"):
        original = getattr(hf.ops, op)
        monkeypatch.setattr(hf.ops, op, lambda *a, _op=original, _name=op, **k: calls.append(_name) or _op(*a, **k))
    ids = torch.randint(0, VOCAB, (2, 13))
    expected, out = plain(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert calls.count("rms_norm") == 5 and calls.count("swiglu") == 2
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    expected.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max()
        torch.testing.assert_close(q.grad / scale, p.grad / scale, rtol=0, atol=1e-5, msg=name)


def test_fused_layers_leave_other_architectures_alone(llama_dir):
    model = load_hf_model(llama_dir, attention="eager")
    model.config.model_type = "olmo2"  # its RMSNorm rounds in another order
    assert hf.patch_fused_layers(model) == 0


def test_codex_attention_under_bf16_autocast_matches_sdpa(llama_dir):
    """HF's rotary embedding hands fp32 q/k and bf16 v to the attention under autocast: ours computes them as
    SDPA does (in autocast's dtype) instead of refusing the mix."""
    ids = torch.randint(3, VOCAB, (2, 13))
    losses = {}
    for attention in ("sdpa", "codex_ml"):
        model = HFCausalLM(HFModelConfig(path=str(llama_dir), attention=attention, fused_loss=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses[attention] = loss.item()
    assert losses["codex_ml"] == pytest.approx(losses["sdpa"], rel=2e-2)


def test_attention_sinks_and_positional_arguments_are_not_misread(llama_dir):
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    module = torch.nn.Module()
    with pytest.raises(HFModelError, match="attention sinks"):
        hf._codex_attention(module, q, k, v, None, s_aux=torch.zeros(4))
    model = patch_fused_loss(load_hf_model(llama_dir))
    ids = torch.randint(3, VOCAB, (1, 9))
    positions = torch.arange(9)[None]
    out = model(ids, torch.ones_like(ids), positions)  # HF's order: input_ids, attention_mask, position_ids
    assert out.loss is None and out.logits.shape == (1, 9, VOCAB)
    plain = load_hf_model(llama_dir)
    expected = plain(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(model(ids, None, positions, labels=ids).loss, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- egress and base pinning
EGRESS = """
import json, os, socket, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")):
        attempts.append(repr(address))
    return real_connect(self, address)
socket.socket.connect = connect
from codex_ml.models.hf import HFCausalLM, HFModelConfig, save_adapter
model = HFCausalLM(HFModelConfig(path=sys.argv[1], lora_r=2, **({"allow_hub": True} if sys.argv[3] == "hub" else {})))
save_adapter(model.model, sys.argv[2])
HFCausalLM(HFModelConfig(path=sys.argv[1], peft_path=sys.argv[2]))
import huggingface_hub.constants
print(json.dumps({"offline": huggingface_hub.constants.HF_HUB_OFFLINE, "attempts": attempts}))
"""


@pytest.mark.parametrize("mode", ["default", "hub"])
def test_hugging_face_loads_are_offline_unless_the_hub_is_allowed(llama_dir, tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", EGRESS, str(llama_dir), str(tmp_path / "adapter"), mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    # Set before transformers and peft were imported (they read it then), or left alone when the Hub is allowed.
    assert result["offline"] is (mode == "default")


def test_an_adapter_folder_without_weights_is_named_and_nothing_is_fetched(llama_dir, tmp_path):
    adapter = save_adapter(apply_lora(load_hf_model(llama_dir), r=2), tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(HFModelError, match="adapter_config.json but no adapter_model.safetensors: the folder is "
                                           "partial"):
        apply_lora(load_hf_model(llama_dir), peft_path=adapter)


def test_an_adapter_on_a_swapped_base_of_the_same_architecture_is_refused(llama_dir, tmp_path, monkeypatch):
    swapped = tmp_path / "swapped"
    tiny_llama(swapped, seed=1)  # same architecture and shapes, other weights
    monkeypatch.chdir(llama_dir.parent)
    model = HFCausalLM(HFModelConfig(path=llama_dir.name, lora_r=2))  # a relative path
    recorded = model.config.to_dict()
    assert recorded["path"] == str(llama_dir) and recorded["base_weights_sha256"] == hf.base_weights_sha256(llama_dir)
    adapter = model.save_adapter(tmp_path / "adapter")
    info = json.loads((adapter / "codex_ml_adapter.json").read_text())
    assert info["base_path"] == str(llama_dir.resolve()) and info["base_weights_sha256"] == recorded[
        "base_weights_sha256"]
    with pytest.raises(HFModelError, match="holds other weights .* of the same architecture"):
        apply_lora(load_hf_model(swapped), peft_path=adapter)
    # A checkpoint's config (what resume and generation rebuild the model from) refuses the swapped folder too.
    with pytest.raises(HFModelError, match=f"{swapped} holds other weights .*restore that base model folder"):
        HFCausalLM(HFModelConfig(**{**recorded, "path": str(swapped), "lora_target_modules": None}))
    HFCausalLM(HFModelConfig(**{**recorded, "lora_target_modules": None}))  # the right base loads


def test_a_truncated_weight_file_is_a_clear_error(llama_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HFModelError, match="truncated or damaged; copy the model folder again"):
        load_hf_model(folder)
