"""The SentencePiece tokenizer keeps code byte for byte and has fixed special ids."""

import io
import sysconfig
from pathlib import Path

import pytest
import torch

from codex_ml.tokenization import SPECIAL_IDS, Tokenizer, TokenizerError, load_tokenizer

NASTY = [
    "",
    " ",
    "\n\n\n",
    "\t\tx = 1\t# tab\t\n",
    "  leading and trailing spaces  ",
    "line one\r\nline two\r\n",
    "def f():\n    if x:\n        return 'héllo ✓ 你好 🚀'\n",
    "mixed \t \n \r indentation\n\t    \t",
    "\x0b\x0c form feed and vertical tab",
    "a" * 5000,
    "unknown chars: \u2028 \ufeff \U0001f600 \u0301",
]


@pytest.fixture(scope="module")
def stdlib_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py"))[:120]:
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return docs


@pytest.fixture(scope="module")
def tokenizer(stdlib_docs, tmp_path_factory):
    return Tokenizer.train(stdlib_docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=1000)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == tuple(SPECIAL_IDS.values())
    assert tokenizer.vocab_size == 1000


def test_round_trip_on_the_standard_library(tokenizer, stdlib_docs):
    failures = [i for i, doc in enumerate(stdlib_docs) if tokenizer.decode(tokenizer.encode(doc)) != doc]
    assert not failures
    total_bytes = sum(len(d.encode()) for d in stdlib_docs)
    total_tokens = sum(len(x) for x in tokenizer.encode_many(stdlib_docs))
    assert total_bytes / total_tokens > 2.0  # it compresses: indentation and keywords are single tokens


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_on_nasty_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_encode_pads_truncates_and_masks(tokenizer):
    texts = ["def f(x):\n    return x\n", "x = 1"]
    right = tokenizer.encode_batch(texts, max_len=6, add_bos=True)
    ids, mask = right["input_ids"], right["attention_mask"]
    assert ids.shape[1] <= 6 and ids.dtype == torch.long
    short = len(tokenizer.encode("x = 1")) + 1
    assert mask[1].tolist() == [1] * short + [0] * (ids.shape[1] - short)
    assert ids[1, short:].eq(tokenizer.pad_id).all() and ids[0, 0] == tokenizer.bos_id
    left = tokenizer.encode_batch(texts, max_len=6, padding_side="left")
    assert left["attention_mask"][1, -1] == 1 and left["attention_mask"][1, 0] == 0
    decoded = tokenizer.decode_batch(tokenizer.encode_batch(texts, add_eos=True))
    assert decoded == texts
    with pytest.raises(ValueError, match="padding_side"):
        tokenizer.encode_batch(texts, padding_side="middle")


def test_identity_is_the_model_files_sha256(tokenizer, tmp_path):
    copy = Tokenizer.load(tokenizer.save(tmp_path))
    assert copy.sha256 == tokenizer.sha256 and len(copy.sha256) == 64
    other = Tokenizer.train(["other text entirely\n" * 20, "y = 2\n"], tmp_path / "o.model", vocab_size=280)
    assert other.sha256 != tokenizer.sha256


def test_training_is_deterministic(stdlib_docs, tmp_path):
    a = Tokenizer.train(stdlib_docs[:30], tmp_path / "a.model", vocab_size=400)
    b = Tokenizer.train(stdlib_docs[:30], tmp_path / "b.model", vocab_size=400)
    assert a.sha256 == b.sha256


def test_bad_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train(["", "   \n"], tmp_path / "x.model")
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match="too small for this corpus's characters"):
        Tokenizer.train(["x = 1\n"], tmp_path / "z.model", vocab_size=60)
    with pytest.raises(TokenizerError, match="model_type"):
        Tokenizer.train(["x"], tmp_path / "y.model", model_type="wordpiece")
    with pytest.raises(TokenizerError, match="vocab_size must be a positive integer"):
        Tokenizer.train(["x = 1\n"], tmp_path / "v.model", vocab_size=-5)
    (tmp_path / "adir").mkdir()
    with pytest.raises(TokenizerError, match="is a directory"):
        Tokenizer.train(["x = 1\n"], tmp_path / "adir", overwrite=True)
    assert not list(tmp_path.glob("[xyz].model*")), "a failed training leaves no file behind"
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_already_written_is_overwritten(tokenizer, tmp_path):
    texts = ["other text entirely\n" * 20, "y = 2\n"]
    model = tmp_path / "o.model"
    Tokenizer.train(texts, model, vocab_size=280)
    before = model.read_bytes()
    with pytest.raises(TokenizerError, match="already exists"):
        Tokenizer.train(["something else = 1\n"] * 5, model, vocab_size=260)
    assert model.read_bytes() == before
    with pytest.raises(TokenizerError, match="already exists and is another model"):
        tokenizer.save(model)
    assert model.read_bytes() == before
    assert Tokenizer.load(model).save(model) == model  # the same model: nothing to do
    assert Tokenizer.train(texts, model, vocab_size=280, overwrite=True).sha256 == Tokenizer.load(model).sha256


def test_command_line_train_encode_decode(tmp_path, capsys):
    from codex_ml.cli.tokenizer import main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def add(a, b):\n    return a + b\n" * 30)
    model = tmp_path / "t.model"
    assert main(["train", f"--output={model}", "--vocab_size=300", str(tmp_path / "src")]) == 0
    capsys.readouterr()
    assert main(["encode", f"--model={model}", "def add(x):\n\treturn x"]) == 0
    ids = capsys.readouterr().out.strip()
    assert main(["decode", f"--model={model}", ids]) == 0
    assert capsys.readouterr().out == "def add(x):\n\treturn x"
    assert main(["decode", f"--model={model}", "999999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["encode", f"--model={tmp_path / 'missing.model'}", "x"]) == 2
    before = model.read_bytes()
    assert main(["train", f"--output={model}", "--vocab_size=280", str(tmp_path / "src")]) == 2
    assert "already exists" in capsys.readouterr().err and model.read_bytes() == before


def test_the_one_character_that_does_not_round_trip(tokenizer):
    """SentencePiece's space marker U+2581 comes back as a space (documented in tokenizer.py)."""
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


def test_text_that_is_not_utf8_is_named(tokenizer):
    """A non-UTF-8 command-line argument reaches Python as lone surrogates, which SentencePiece's binding cannot
    take (it raised a pybind11 RuntimeError, or TypeError for a batch)."""
    with pytest.raises(TokenizerError, match=r"the text is not valid UTF-8 \(surrogates not allowed at character 1\)"):
        tokenizer.encode("a\udcffb")
    with pytest.raises(TokenizerError, match="text 1 is not valid UTF-8"):
        tokenizer.encode_many(["ok", "a\ud800"])
    assert tokenizer.encode_many(["ok"]) == [tokenizer.encode("ok")]


def test_paths_that_cannot_be_a_model_file(tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="is a directory: give the model file's path"):
        Tokenizer.load(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TokenizerError, match=r"cannot write .*afile/x.model: .*afile is a file, not a directory"):
        Tokenizer.train(["x = 1\n"], tmp_path / "afile" / "x.model", vocab_size=260)
    with pytest.raises(TokenizerError, match="character_coverage must be from 0.98 to 1"):
        Tokenizer.train(["x = 1\n"], tmp_path / "c.model", character_coverage=0.5)
    with pytest.raises(TokenizerError, match="num_threads must be an integer from 1 to 1024, got 0"):
        Tokenizer.train(["x = 1\n"], tmp_path / "t.model", num_threads=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # load_tokenizer takes a model file or a model folder (MODEL_DIR): a missing path names both.
    with pytest.raises(TokenizerError, match="path .*nope does not exist: give a SentencePiece model file or a"):
        load_tokenizer(tmp_path / "nope")


def test_command_line_bad_input_is_one_line(tokenizer, tmp_path, capsys, monkeypatch):
    from codex_ml.cli.tokenizer import main

    def error(argv, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("tokenize: error: ") and err.count("\n") == 1, err
        return err

    model = f"--model={tokenizer.model_path}"
    assert "the input is not valid UTF-8" in error(["encode", model, "a\udcffb"])
    assert "standard input is not valid UTF-8 (invalid start byte at byte 1)" in error(["encode", model], b"a\xffb")
    for ids in ("\u0663", "1_0", "+3"):  # Arabic-Indic three; int() accepts all of these
        assert "decode expects whitespace-separated integer ids" in error(["decode", model, ids])
    assert "outside the vocabulary" in error(["decode", model, "-1"])
    assert "is a directory: give the model file's path" in error(["encode", f"--model={tmp_path}", "x"])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "src.py").write_text("def f(x):\n    return x\n" * 20)
    assert "afile is a file, not a directory" in error(["train", f"--output={tmp_path / 'afile' / 't.model'}",
                                                        "--vocab_size=260", str(tmp_path / "src.py")])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("x = 1\r\n".encode())))
    assert main(["encode", model]) == 0  # standard input is encoded byte for byte, \r included
    assert capsys.readouterr().out.split() == [str(i) for i in tokenizer.encode("x = 1\r\n")]
