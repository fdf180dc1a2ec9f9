"""Generation: KV cache vs none, sampling options, stop strings, streaming, the secret filter, loading of
native checkpoints, Hugging Face folders and LoRA adapters, bad input, and the CLI."""

import hashlib
import json
import os
import random
import subprocess
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from codex_ml.checkpoint.core import CheckpointError, save_checkpoint
from codex_ml.data.secrets import find_secret
from codex_ml.models import GPT, GPTConfig
from codex_ml.models.generation import GenerationError, SamplingConfig, _SecretFilter, generate, load_model, stream
from codex_ml.models.hf import apply_lora, load_hf_model, save_adapter
from codex_ml.tokenization import Tokenizer, TokenizerError

CODE = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.path.join('a', 'b'))\n",
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"] * 10
# Secrets assembled at run time so that this file itself holds none.
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5" * 4
KEY_HEADER = "-----BEGIN RSA " + "PRIVATE KEY-----"
KEY_FOOTER = "-----END RSA " + "PRIVATE KEY-----"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.train(CODE, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=300)


def native_model(tokenizer, seed=0, max_seq_len=64):
    torch.manual_seed(seed)
    # A large init spreads the logits, so greedy decoding of an untrained model does not just repeat a token.
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                         max_seq_len=max_seq_len, init_std=0.5)).eval()


def test_kv_cache_gives_identical_greedy_output(tokenizer):
    model = native_model(tokenizer)
    prompt = "def add(a, b):"  # an odd number of tokens
    cached = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=40, filter_secrets=False))
    full = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=40, use_cache=False, filter_secrets=False))
    assert len(set(cached.token_ids)) > 3  # a varied sequence, so the comparison means something
    assert cached.token_ids == full.token_ids
    assert cached.text == full.text == tokenizer.decode(cached.token_ids)


def test_sampling_options(tokenizer):
    model = native_model(tokenizer)
    greedy = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, filter_secrets=False))
    top1 = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=1,
                                                                filter_secrets=False))
    nucleus = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=1e-6,
                                                                   filter_secrets=False))
    assert top1.token_ids == greedy.token_ids == nucleus.token_ids  # top-1 and a tiny nucleus are greedy
    a = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3))
    b = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3))
    c = generate(model, tokenizer, "import", SamplingConfig(max_new_tokens=20, temperature=1.0, seed=4))
    assert a.token_ids == b.token_ids != c.token_ids
    # top_k restricts every sampled token to the k likeliest.
    config = SamplingConfig(max_new_tokens=1, temperature=2.0, top_k=3)
    logits = torch.randn(50)
    allowed = set(logits.topk(3).indices.tolist())
    from codex_ml.models.generation import sample_next

    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, config, generator) for _ in range(200)} == allowed


def test_stop_strings_and_streaming(tokenizer):
    model = native_model(tokenizer)
    full = generate(model, tokenizer, "class", SamplingConfig(max_new_tokens=40, filter_secrets=False))
    assert full.finish_reason == "length" and len(full.text) > 10
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    config = SamplingConfig(max_new_tokens=40, stop=(stop,), filter_secrets=False)
    stopped = generate(model, tokenizer, "class", config)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.find(stop)]
    pieces = list(stream(model, tokenizer, "class", SamplingConfig(max_new_tokens=40, filter_secrets=False)))
    assert len(pieces) > 5 and "".join(pieces) == full.text  # token by token, not at the end


def test_prompt_longer_than_context(tokenizer):
    model = native_model(tokenizer, max_seq_len=16)
    with pytest.raises(GenerationError, match="shorten the prompt"):
        generate(model, tokenizer, "def add(a, b):\n    return a + b\n" * 4)
    ends = generate(model, tokenizer, "import os", SamplingConfig(max_new_tokens=100))
    assert ends.finish_reason == "context"
    with pytest.raises(GenerationError, match="top_p"):
        SamplingConfig(top_p=0)


# ---------------------------------------------------------------------------------------- secret filter
class CharTokenizer:
    """One token per character (id = code point + 1); id 0 is eos."""

    eos_id, bos_id = 0, None

    def encode(self, text):
        return [ord(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 1) for i in ids if i > 0)


class ScriptedModel(torch.nn.Module):
    """An HF-style model whose greedy continuation is a fixed text (ignores its input)."""

    def __init__(self, text):
        super().__init__()
        self.script = [ord(c) + 1 for c in text] + [0]
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_position_embeddings=100_000)
        self.position = 0

    def forward(self, input_ids, cache=None, use_cache=False):
        if cache is None:
            self.position = 0
        logits = torch.full((1, input_ids.shape[1], 0x3000), -1e9)
        logits[0, -1, self.script[min(self.position, len(self.script) - 1)]] = 0.0
        self.position += 1
        return types.SimpleNamespace(logits=logits, cache=self.position)


def test_secret_filter_withholds_secrets_and_keeps_the_rest():
    text = (f"token = '{GITHUB_TOKEN}'\nprint(token)\n{KEY_HEADER}\nMIIEowIBAAKCAQEA7\nQWERTY\n{KEY_FOOTER}\n"
            "done = True\n")
    model = ScriptedModel(text)
    info = {}
    pieces = list(stream(model, CharTokenizer(), "x", SamplingConfig(max_new_tokens=len(text) + 5), result=info))
    out = "".join(pieces)
    assert find_secret(out) is None and "MIIEowIBAAKCAQEA7" not in out
    assert "print(token)" in out and "done = True" in out
    assert "[withheld: github_token]" in out and "[withheld: private_key_block]" in out
    assert sorted(set(info["withheld"])) == ["github_token", "private_key_block"]
    assert info["finish_reason"] == "eos"
    assert len(pieces) > 3  # released word by word, still streaming
    # No released piece ever holds part of the token: the filter waits for the word to end.
    assert not any(GITHUB_TOKEN[:8] in p for p in pieces)
    unfiltered = "".join(stream(model, CharTokenizer(), "x", SamplingConfig(max_new_tokens=len(text) + 5,
                                                                          filter_secrets=False)))
    assert unfiltered == text


def _filtered_in_chunks(text: str, rng: random.Random) -> str:
    """`text` through a fresh secret filter, fed in chunks of 1 to 7 characters, then flushed."""
    f, out, i = _SecretFilter(True), [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(f.feed(text[i:i + n]))
        i += n
    out.append(f.feed("", final=True))
    return "".join(out)


def test_secret_filter_any_chunking():
    text = f"a {GITHUB_TOKEN} b\n{KEY_HEADER}\nsecretbody\n{KEY_FOOTER}\nc"
    rng = random.Random(0)
    for _ in range(50):
        result = _filtered_in_chunks(text, rng)
        assert result == "a [withheld: github_token] b\n[withheld: private_key_block]c"


def test_a_secret_cut_off_by_max_new_tokens_is_withheld():
    text = f"key = '{GITHUB_TOKEN}'\n"
    for cut in (11, 14, 20, 35):  # mid-token (from "ghp_" on): too short for the token rule
        out = generate(ScriptedModel(text), CharTokenizer(), "x", SamplingConfig(max_new_tokens=cut))
        assert out.finish_reason == "length"
        assert "ghp_" not in out.text and GITHUB_TOKEN[4:10] not in out.text, (cut, out.text)
        assert out.text.endswith("[withheld: truncated_secret]") and out.withheld == ["truncated_secret"]
    password = "DB_PASSWORD=" + "Hx7kq2Lm" + "Zp3w\n"
    out = generate(ScriptedModel(password), CharTokenizer(), "x", SamplingConfig(max_new_tokens=16))
    assert out.text == "DB_[withheld: truncated_secret]" and out.withheld == ["truncated_secret"]
    whole = generate(ScriptedModel("done = True\n"), CharTokenizer(), "x", SamplingConfig(max_new_tokens=8))
    assert whole.text == "done = T" and whole.withheld == []  # ordinary text cut off is released as it is


def test_secret_filter_new_formats_any_chunking():
    # Formats whose matches span whitespace (a key, "=", a value) or a multi-line key file.
    env = "DB_PASSWORD = " + "Hx7kq2Lm" + "Zp3w"
    url = "postgres://admin:" + "Hx7kq2Lm" + "@db:5432/app"
    putty = "PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\nAAAAQ" + "zq9" + "\nPrivate-MAC: 0af1\n"
    ssh2 = ("---- BEGIN SSH2 ENCRYPTED " + "PRIVATE KEY ----\nAAAA" + "zq9" + "\n---- END SSH2 ENCRYPTED "
            + "PRIVATE KEY ----\n")
    text = f"a\n{env}\nb {url} c\n{putty}d\n{ssh2}e"
    rng = random.Random(0)
    for _ in range(50):
        result = _filtered_in_chunks(text, rng)
        assert "Hx7k" not in result and "zq9" not in result and "admin:" not in result, result
        assert result.startswith("a\n") and "\nb " in result and " c\n" in result
        assert result.endswith("d\n[withheld: private_key_block]e")


# ------------------------------------------------------------------------------------------- loading
def save_native(tmp_path, tokenizer):
    model = native_model(tokenizer)
    config = {**model.config.to_dict(), "architecture": "codex_ml.GPT"}
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", model_state=model.state_dict(),
                           model_config=config, tokenizer_path=tokenizer.model_path,
                           manifest_extra={"tokenizer_sha256": tokenizer.sha256})
    return model, path


def hf_folder(folder):
    """A tiny Llama with a word-level fast tokenizer, saved as any Hugging Face folder is."""
    words = sorted({w for text in CODE for w in text.split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def test_load_native_run_and_errors(tmp_path, tokenizer):
    model, path = save_native(tmp_path, tokenizer)
    loaded, tok = load_model(tmp_path / "run")
    assert tok.sha256 == tokenizer.sha256
    config = SamplingConfig(max_new_tokens=12, filter_secrets=False)
    assert generate(loaded, tok, "def", config).token_ids == generate(model, tokenizer, "def", config).token_ids
    with pytest.raises(GenerationError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(GenerationError, match="neither a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(GenerationError, match="--adapter applies to Hugging Face model folders"):
        load_model(path, adapter=tmp_path)
    with pytest.raises(GenerationError, match="--dtype=bfloat16 applies to Hugging Face model folders"):
        load_model(path, dtype="bfloat16")  # it was silently ignored
    (path / "model.safetensors").write_bytes(b"truncated")  # a corrupted checkpoint
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    (path / "manifest.json").unlink()  # one interrupted while written
    with pytest.raises(CheckpointError, match="partial"):
        load_model(path)


def test_loading_a_hugging_face_folder_sets_offline_mode_before_transformers_is_imported(tmp_path):
    hf_folder(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    script = ("import sys\nfrom codex_ml.models.generation import load_model\nload_model(sys.argv[1])\n"
              "import huggingface_hub.constants as c\nprint(c.HF_HUB_OFFLINE, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True"]  # (the model and its tokenizer both loaded)


def test_hf_folder_and_adapter(tmp_path):
    reference = hf_folder(tmp_path / "hf")
    model, tok = load_model(tmp_path / "hf")
    prompt = "def add(a, b):"
    ids = torch.tensor([tok.encode(prompt)])
    expected = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = expected[0, ids.shape[1]:].tolist()
    expected = expected[:expected.index(2)] if 2 in expected else expected  # we stop at eos (id 2)
    assert len(expected) >= 4
    for use_cache in (True, False):
        config = SamplingConfig(max_new_tokens=10, use_cache=use_cache, filter_secrets=False)
        assert generate(model, tok, prompt, config).token_ids == expected  # HF's own greedy decoding

    lora = apply_lora(load_hf_model(tmp_path / "hf"), r=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter, so it changes the output
    save_adapter(lora, tmp_path / "adapter")
    adapted, tok = load_model(tmp_path / "hf", adapter=tmp_path / "adapter")
    config = SamplingConfig(max_new_tokens=10, filter_secrets=False)
    assert generate(adapted, tok, prompt, config).token_ids == generate(lora, tok, prompt, config).token_ids
    assert generate(adapted, tok, prompt, config).token_ids != expected


def test_cli(tmp_path, tokenizer):
    model, _ = save_native(tmp_path, tokenizer)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "codex_ml.cli.generate", f"--checkpoint={tmp_path / 'run'}", "--prompt=def",
               "--max_new_tokens=12", "--json", "--no-filter_secrets"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = generate(model, tokenizer, "def", SamplingConfig(max_new_tokens=12, filter_secrets=False))
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    streamed = subprocess.run(command[:-2], env=env, capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout.startswith("def")
    bad = subprocess.run(command[:5] + ["--top_p=2"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
    long_prompt = subprocess.run(command[:4] + ["--prompt=" + "x = 1\n" * 100], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert long_prompt.returncode == 2 and "shorten the prompt" in long_prompt.stderr


class ByteTokenizer:
    """Byte-level ids (as SentencePiece's byte fallback gives for rare characters): a multi-byte character
    takes several tokens, and decoding a prefix can end in U+FFFD."""
    eos_id, bos_id = 0, None

    def encode(self, text):
        return [b + 1 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


class ScriptedBytes(ScriptedModel):
    def __init__(self, text):
        super().__init__("")
        self.script = [b + 1 for b in text.encode()] + [0]


@pytest.mark.parametrize("stop", ["a→", "= a→", "→b", "b\n"])
def test_stop_strings_with_characters_split_across_tokens(stop):
    text = "value = a→b\n"
    pieces = list(stream(ScriptedBytes(text), ByteTokenizer(), "x",
                         SamplingConfig(max_new_tokens=50, stop=(stop,), filter_secrets=False)))
    assert "".join(pieces) == text[:text.find(stop)]  # nothing of the stop string leaks, even streamed


def test_a_paused_stream_leaves_grad_mode_and_training_mode_alone(tokenizer):
    model = native_model(tokenizer).train()
    pieces = stream(model, tokenizer, "def", SamplingConfig(max_new_tokens=5, filter_secrets=False))
    next(pieces)
    assert torch.is_grad_enabled() and model.training
    assert model(torch.tensor([[1, 2]]))[0].requires_grad
    list(pieces)
    assert torch.is_grad_enabled() and model.training


def test_sampling_config_errors_and_one_stop_string():
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(GenerationError, match="temperature must be a finite"):
            SamplingConfig(temperature=bad)
    assert SamplingConfig(stop="ab").stop == ("ab",)
    from codex_ml.models.generation import sample_next

    logits = torch.tensor([3.0, 1.0, 2.0]) * 100
    assert sample_next(logits, SamplingConfig(temperature=1e-45), torch.Generator().manual_seed(0)) == 0


def test_native_devices(tmp_path, tokenizer):
    save_native(tmp_path, tokenizer)
    model, _ = load_model(tmp_path / "run", device="auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GenerationError, match="is not a device"):
        load_model(tmp_path / "run", device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(GenerationError, match="no CUDA device"):
            load_model(tmp_path / "run", device="cuda")


def test_a_corrupt_model_config_is_named_before_it_is_read(tmp_path, tokenizer):
    """model_config.json is verified against the manifest before it is parsed (it raised JSONDecodeError or
    AttributeError); one that matches an edited manifest but is not a JSON object is named too."""
    _, path = save_native(tmp_path, tokenizer)
    for text in ('{"n_layer": ', "[1, 2]"):
        (path / "model_config.json").write_text(text)
        with pytest.raises(CheckpointError, match="model_config.json is corrupt"):
            load_model(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model_config.json"] = hashlib.sha256(b"[1, 2]").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model_config.json is not a JSON object"):
        load_model(path)


def test_bad_prompt_and_seed_raise_when_the_stream_is_made(tokenizer):
    model = native_model(tokenizer, max_seq_len=16)
    with pytest.raises(GenerationError, match="shorten the prompt"):
        stream(model, tokenizer, "x = 1\n" * 20)  # no next(): a caller that echoes the prompt first echoes nothing
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        stream(model, tokenizer, "a\udcffb")
    for seed in (-1, 2**63, 10**23):
        with pytest.raises(GenerationError, match=r"seed must be an integer from 0 to 2\*\*63 - 1"):
            SamplingConfig(seed=seed)
    assert generate(model, tokenizer, "x", SamplingConfig(max_new_tokens=2, temperature=1.0, seed=2**63 - 1))


def test_hf_tokenizer_names_text_that_is_not_utf8(tmp_path):
    from codex_ml.tokenization import HFTokenizer

    hf_folder(tmp_path / "hf")
    tok = HFTokenizer(tmp_path / "hf")
    with pytest.raises(TokenizerError, match="the text is not valid UTF-8"):
        tok.encode("def \udcff")
    with pytest.raises(TokenizerError, match="text 0 is not valid UTF-8"):
        tok.encode_many(["def \udcff"])


def test_cli_bad_input_is_one_line_and_prints_nothing(tmp_path, tokenizer):
    save_native(tmp_path, tokenizer)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    base = [sys.executable, "-m", "codex_ml.cli.generate", f"--checkpoint={tmp_path / 'run'}", "--max_new_tokens=4"]
    cases = [
        ([b"--prompt=a\xffb"], None, "--prompt is not valid UTF-8"),
        (["--prompt=-"], b"a\xffb", "the prompt on standard input is not valid UTF-8"),
        (["--prompt=x", "--seed=99999999999999999999999", "--temperature=1"], None, "seed must be an integer"),
        (["--prompt=" + "x = 1\n" * 100], None, "shorten the prompt"),  # raised after the model loads
    ]
    for extra, stdin, message in cases:
        proc = subprocess.run(base + extra, env=env, input=stdin, capture_output=True, timeout=120)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and proc.stdout == b"", (extra, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)
