"""export_hf: a native checkpoint loads in transformers as LlamaForCausalLM, offline, with the same logits.

Tolerance (float32 weights and compute on both sides): max |HF logits - native logits| <= 1e-5 * max(1, max
|native logits|). The two differ only in the order of float32 operations (RoPE angles as a matmul vs an outer
product, attention kernels); a wrong name, a swapped norm or another RoPE theta is off by orders of magnitude
more, since every weight, norm included, is random here and theta is not the default.
"""

import json
import os
import sysconfig
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from codex_ml.checkpoint.core import CheckpointError, save_checkpoint  # noqa: E402
from codex_ml.cli.export import main  # noqa: E402
from codex_ml.models import GPT, GPTConfig  # noqa: E402
from codex_ml.models.export import ExportError, export_hf  # noqa: E402
from codex_ml.tokenization import Tokenizer  # noqa: E402

THETA = 5000.0
CODE = [
    "def add(a, b):\n    return a + b  # 42\n",
    "\tclass Foo:\n        x = [1, 2, 3]\r\n",
    "  s = 'héllo ✓ 你好 🚀'  \n\n",
    "if x <s> y:</s> pass",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))[:30]]
    return Tokenizer.train(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


def make_checkpoint(path: Path, tie: bool, vocab_size: int, tokenizer: Tokenizer | None = None,
                    architecture: str = "codex_ml.GPT") -> tuple[Path, GPT]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32,
                       rope_theta=THETA, norm_eps=1e-6, tie_embeddings=tie, init_std=0.1)
    model = GPT(config)
    with torch.no_grad():  # norms at 1 would hide a swapped or missing norm weight
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_checkpoint(path, model_state=model.state_dict(),
                    model_config={**config.to_dict(), "architecture": architecture},
                    tokenizer_path=tokenizer.model_path if tokenizer else None,
                    manifest_extra={"step": 7, **({"tokenizer_sha256": tokenizer.sha256} if tokenizer else {})})
    return path, model.eval()


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match(tmp_path, tokenizer, tie):
    """Tied, with a tokenizer, given a run directory; untied, without a tokenizer, given a checkpoint directory."""
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    ckpt, model = make_checkpoint(step, tie, tokenizer.vocab_size, tokenizer if tie else None)
    out = export_hf(tmp_path / "run" if tie else ckpt, tmp_path / "hf")
    hf = load_hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert hf.config.rope_parameters["rope_theta"] == THETA
    inv_freq = 1.0 / THETA ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, inv_freq)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    torch.manual_seed(1)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 13))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(input_ids=idx).logits
    scale = max(1.0, ours.abs().max().item())
    err = (theirs - ours).abs().max().item()
    print(f"tie={tie}: max |logit difference| {err:.3g}, logit scale {scale:.3g}")
    assert err <= 1e-5 * scale
    assert hf.generation_config.eos_token_id == 3 and hf.config.pad_token_id == 0
    info = json.loads((out / "codex_ml_export.json").read_text())
    manifest = json.loads((step / "manifest.json").read_text())
    assert info["source_checkpoint"] == str(step.resolve()) and info["source_step"] == 7
    assert info["source_model_sha256"] == manifest["files"]["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", True, tokenizer.vocab_size, tokenizer)
    out = export_hf(ckpt, tmp_path / "hf")
    assert Tokenizer.load(out / "tokenizer.model").sha256 == tokenizer.sha256
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in CODE:
        ids = hf_tok(text)["input_ids"]  # no BOS added, special-token text encoded as characters
        assert ids == tokenizer.encode(text), text
        assert hf_tok.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (2, 3, 0, 1)
    assert json.loads((out / "codex_ml_export.json").read_text())["tokenizer_ids_match"] is True


def test_bfloat16(tmp_path, tokenizer):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", False, 300)
    hf = load_hf(export_hf(ckpt, tmp_path / "hf", dtype="bfloat16"))
    assert hf.dtype == torch.bfloat16 and hf.lm_head.weight.dtype == torch.bfloat16


def test_bad_inputs(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", True, 300)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_hf(ckpt, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (export_hf(ckpt, tmp_path / "empty") / "config.json").is_file()  # an empty directory is filled
    with pytest.raises(ExportError, match="dtype"):
        export_hf(ckpt, tmp_path / "x", dtype="int8")
    other, _ = make_checkpoint(tmp_path / "other", True, 300, architecture="gpt2")
    with pytest.raises(CheckpointError, match="architecture"):
        export_hf(other, tmp_path / "y")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "ckpt", "empty", "other"]
    assert main([f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'z'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export: error:") and "\n" not in err
    assert main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'cli'}"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_out_under_a_file_and_a_checkpoint_that_is_an_empty_directory(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", True, 300)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ExportError, match=r"cannot create .*afile/sub: .*afile is a file, not a directory"):
        export_hf(ckpt, tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert main([f"--checkpoint={tmp_path / 'empty'}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "empty is empty: not a checkpoint" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt", "empty"]


def test_command_line_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("codex-export:") and "--out:" in out and "--dtype:" in out
    for argv, message in ((["--checkpoint=x"], "the following arguments are required: --out"),
                          (["--checkpoint=x", "--out=y", "--dtype=int8"], "flag --dtype=int8: value should be one of")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"export: error: {message}") and err.count("\n") == 1, err
