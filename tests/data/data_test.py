"""The data pipeline: corpus policies, content-hash splits, cached verified shards, resumable batches."""

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codex_ml.data import (
    BatchIterator,
    DataError,
    document_attention_mask,
    find_secret,
    load_prepared,
    prepare_data,
    read_corpus,
)
from codex_ml.tokenization import Tokenizer, TokenizerError

AWS_KEY = "AKIA" + "ABCDEFGHIJKLMNOP"
PEM = "-----BEGIN RSA " + "PRIVATE KEY-----"


def make_corpus(root: Path, n: int = 60, seed: int = 0) -> Path:
    """A small code corpus with a duplicate, a non-UTF-8 file, a secret and an empty file."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["value", "index", "result", "items", "count", "name", "data", "total", "node", "key"]
    for i in range(n):
        lines = range(rng.randint(5, 40))
        body = "\n".join(f"    {rng.choice(words)}_{j} = {rng.choice(words)}({i}, {j})  # step {j}" for j in lines)
        (root / f"mod_{i:03d}.py").write_text(f"def function_{i}(x):\n{body}\n    return x\n")
    (root / "dup.py").write_text((root / "mod_000.py").read_text())
    (root / "latin1.py").write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    (root / "creds.py").write_text(f"ACCESS_KEY = '{AWS_KEY}'\n")
    (root / "empty.py").write_text("\n\n")
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def prepare(tmp, corpus, **kwargs):
    logs = []
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("splits", (0.8, 0.1, 0.1))
    data = prepare_data(tmp / "cache", sources=[str(corpus)], log=logs.append, **kwargs)
    return data, logs


def test_corpus_policies_are_applied_and_counted(tmp):
    corpus = read_corpus([str(make_corpus(tmp / "src"))])
    assert corpus.stats["skipped_non_utf8"] == 1
    assert corpus.stats["duplicates_removed"] == 1
    assert corpus.stats["skipped_secrets"] == 1 and corpus.secret_rules == {"aws_access_key_id": 1}
    assert corpus.stats["skipped_empty"] == 1
    assert corpus.stats["documents"] == 60  # notes.txt is not *.py
    assert all(AWS_KEY not in d.text for d in corpus.documents)


def test_non_utf8_replace_policy_keeps_the_file(tmp):
    corpus = read_corpus([str(make_corpus(tmp / "src"))], non_utf8="replace")
    assert corpus.stats.get("skipped_non_utf8", 0) == 0
    assert any("\ufffd" in d.text for d in corpus.documents)


def test_secret_rules_detect_well_known_formats():
    assert find_secret(f"x = 1\n{PEM}\nMIIE...") == "private_key_block"
    assert find_secret("token = 'ghp_" + "a" * 36 + "'") == "github_token"
    assert find_secret("slack = 'xoxb-" + "1234567890-abcdef'") == "slack_token"
    assert find_secret("def f():\n    return 'AKIA is a prefix'\n") is None


def test_globs_and_jsonl_sources(tmp):
    make_corpus(tmp / "src", n=5)
    lines = [json.dumps({"text": f"print({i})\n"}) for i in range(4)] + [json.dumps({"text": "print(0)\n"})]
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    corpus = read_corpus([str(tmp / "src" / "*.txt"), str(tmp / "docs.jsonl")])
    assert corpus.stats["documents"] == 5  # notes.txt + 4 unique JSON texts
    with pytest.raises(DataError, match="no string field 'code'"):
        read_corpus([str(tmp / "docs.jsonl") + "#code"])


def test_split_membership_ignores_file_order(tmp):
    src = make_corpus(tmp / "src")
    first = read_corpus([str(src)]).split((0.7, 0.15, 0.15))
    # The same files under other names (so another listing order) give the same splits.
    shuffled = tmp / "shuffled"
    shuffled.mkdir()
    names = sorted(os.listdir(src))
    for i, name in enumerate(reversed(names)):
        shutil.copy(src / name, shuffled / f"{i:03d}_{name}")
    second = read_corpus([str(shuffled)]).split((0.7, 0.15, 0.15))
    for split in first:
        assert {d.sha256 for d in first[split]} == {d.sha256 for d in second[split]}
    assert first["val"] and first["test"]


def test_two_runs_give_identical_shards_and_manifest_and_reuse_the_cache(tmp):
    src = make_corpus(tmp / "src")
    data_a, logs_a = prepare(tmp / "a", src)
    data_b, _ = prepare(tmp / "b", src)
    files_a = sorted(p.name for p in data_a.directory.iterdir())
    assert files_a == sorted(p.name for p in data_b.directory.iterdir())
    for name in files_a:
        assert (data_a.directory / name).read_bytes() == (data_b.directory / name).read_bytes(), name
    assert any("trained" in line for line in logs_a)
    again, logs = prepare(tmp / "a", src)
    assert any("reusing cached" in line and "Shards" in line for line in logs)
    assert any("reusing cached" in line and "Tokenizer" in line for line in logs)
    assert again.directory == data_a.directory


def test_manifest_records_hashes_counts_and_policies(tmp):
    data, _ = prepare(tmp, make_corpus(tmp / "src"))
    m = data.manifest
    assert m["tokenizer_sha256"] == data.tokenizer.sha256
    assert m["dtype"] == "uint16"
    assert m["policies"]["non_utf8"] == "skip" and m["corpus_stats"]["skipped_secrets"] == 1
    assert m["secret_rules_matched"] == {"aws_access_key_id": 1}
    assert sum(m["splits"][s]["documents"] for s in ("train", "val", "test")) == 60
    for split in ("train", "val", "test"):
        tokens = data.tokens(split)
        assert len(tokens) == m["splits"][split]["tokens"]
        assert int(np.sum(tokens == data.tokenizer.eos_id)) >= m["splits"][split]["documents"]


def test_changed_input_builds_new_shards_beside_the_old(tmp):
    src = make_corpus(tmp / "src")
    first, _ = prepare(tmp, src)
    (src / "mod_001.py").write_text("def changed():\n    return 42\n")
    second, _ = prepare(tmp, src)
    assert second.directory != first.directory and first.directory.exists()


def test_truncated_or_edited_shard_is_an_error_naming_the_file(tmp):
    src = make_corpus(tmp / "src")
    data, _ = prepare(tmp, src)
    shard = data.directory / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_00000.bin.*SHA-256"):
        prepare(tmp, src)
    shard.write_bytes(bytes(raw[:-4]))
    with pytest.raises(DataError, match="train_00000.bin.*truncated"):
        prepare(tmp, src)


def test_a_changed_cached_tokenizer_is_an_error(tmp):
    src = make_corpus(tmp / "src")
    prepare(tmp, src)
    (cached,) = (tmp / "cache" / "tokenizers").glob("*/tokenizer.model")
    other, _ = prepare(tmp / "other", src, vocab_size=320)  # a valid model, but not the one trained here
    cached.write_bytes(other.tokenizer.model_path.read_bytes())
    with pytest.raises(DataError, match="changed since it was trained"):
        prepare(tmp, src)


def test_shards_made_with_another_tokenizer_are_refused(tmp):
    src = make_corpus(tmp / "src")
    data, _ = prepare(tmp, src)
    other = Tokenizer.train(["completely different text\n" * 50, "x = 1\n"], tmp / "other.model", vocab_size=280)
    with pytest.raises(DataError, match="tokenizer"):
        load_prepared(data.directory, other)


def test_batches_are_deterministic_and_resume_exactly(tmp):
    data, _ = prepare(tmp, make_corpus(tmp / "src"))
    kwargs = dict(batch_size=2, seq_len=16, seed=3)
    straight = data.batches("train", **kwargs)
    expected = [next(straight) for _ in range(straight.batches_per_epoch + 5)]  # crosses an epoch
    again = data.batches("train", **kwargs)
    for batch, want in zip(again, expected[:3]):
        assert torch.equal(batch["input_ids"], want["input_ids"])
    first = data.batches("train", **kwargs)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = data.batches("train", **kwargs)
    resumed.load_state_dict(state)
    for want in expected[7:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["targets"], want["targets"])
    b = expected[0]
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (2, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])


def test_ranks_get_disjoint_slices():
    tokens = np.arange(16 * 40 + 1, dtype=np.uint16)  # every sequence distinct
    seen = []
    for rank in range(2):
        it = BatchIterator(tokens, split="train", batch_size=2, seq_len=16, seed=0, rank=rank, world_size=2,
                           epoch_limit=1)
        seen.append([int(row[0]) for batch in it for row in batch["input_ids"]])
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(0, 16 * 40, 16))


def test_document_ids_mark_packed_document_boundaries():
    eos = 3
    # Documents [10 11 eos] [20 eos] [30 31 32 33 eos] ... packed back to back.
    tokens = np.array([10, 11, eos, 20, eos, 30, 31, 32, 33, eos, 40, 41, 42] * 4, dtype=np.uint16)
    it = BatchIterator(tokens, split="train", batch_size=4, seq_len=12, seed=0, document_ids=True, eos_id=eos,
                       epoch_limit=1)
    batch = next(it)  # all 4 sequences, shuffled; find the one that starts the token stream
    row = [r[:2] for r in batch["input_ids"].tolist()].index([10, 11])
    ids, seg = batch["input_ids"][row].tolist(), batch["segment_ids"][row].tolist()
    assert ids == [10, 11, eos, 20, eos, 30, 31, 32, 33, eos, 40, 41]
    # A new document starts right after each eos; the eos belongs to the document it ends.
    assert seg == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3]
    mask = document_attention_mask(batch["segment_ids"])[row]
    assert mask.shape == (12, 12) and mask.dtype == torch.bool
    for q in range(12):
        for k in range(12):
            assert bool(mask[q, k]) == (k <= q and seg[q] == seg[k]), (q, k)
    plain = BatchIterator(tokens, split="train", batch_size=1, seq_len=12, seed=0)
    assert "segment_ids" not in next(plain)
    with pytest.raises(DataError, match="eos_id"):
        BatchIterator(tokens, split="train", batch_size=1, seq_len=12, seed=0, document_ids=True)


def test_prepared_batches_carry_document_ids(tmp):
    data, _ = prepare(tmp, make_corpus(tmp / "src"))
    boundaries = 0
    for batch in data.batches("train", batch_size=2, seq_len=64, seed=0, document_ids=True, epoch_limit=1):
        is_eos = batch["input_ids"] == data.tokenizer.eos_id
        boundaries += int(is_eos.sum())
        # Segment ids start at 0 and step up by one exactly after an eos.
        assert (batch["segment_ids"][:, 0] == 0).all()
        steps = batch["segment_ids"][:, 1:] - batch["segment_ids"][:, :-1]
        assert torch.equal(steps, is_eos[:, :-1].long())
    assert boundaries >= 40, "the epoch covers most of the ~50 train documents"


def test_restoring_with_another_layout_is_refused(tmp):
    data, _ = prepare(tmp, make_corpus(tmp / "src"))
    state = data.batches("train", batch_size=2, seq_len=16, seed=0).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        data.batches("train", batch_size=2, seq_len=8, seed=0).load_state_dict(state)


def test_a_saved_position_is_bound_to_its_shard_set_and_never_rolls_over(tmp):
    data, _ = prepare(tmp, make_corpus(tmp / "src"))
    state = data.batches("train", batch_size=2, seq_len=16, seed=0).state_dict()
    assert state["num_sequences"] > 0 and len(state["shards_sha256"]) == 64
    other = {**state, "num_sequences": state["num_sequences"] + 1}  # as a resume over a grown corpus has it
    with pytest.raises(DataError, match=rf"saved num_sequences={other['num_sequences']}, this run has "
                                        rf"{state['num_sequences']}"):
        data.batches("train", batch_size=2, seq_len=16, seed=0).load_state_dict(other)
    with pytest.raises(DataError, match="saved over another shard set of split 'train'"):
        data.batches("train", batch_size=2, seq_len=16, seed=0).load_state_dict({**state, "shards_sha256": "0" * 64})
    assert data.batches("val", batch_size=2, seq_len=16, seed=0).shards_sha256 != state["shards_sha256"]
    fresh = data.batches("train", batch_size=2, seq_len=16, seed=0)
    per_epoch = fresh.batches_per_epoch
    fresh.load_state_dict({**state, "position": per_epoch})  # the end of an epoch: the next batch starts epoch 1
    next(fresh)
    assert (fresh.epoch, fresh.position) == (1, 1)
    with pytest.raises(DataError, match=rf"saved position {per_epoch + 1} of epoch 0 is outside split 'train', "
                                        rf"which has {per_epoch} batches per epoch"):
        data.batches("train", batch_size=2, seq_len=16, seed=0).load_state_dict({**state, "position": per_epoch + 1})


def test_bad_inputs_get_errors_naming_the_problem(tmp):
    with pytest.raises(DataError, match="does not exist"):
        read_corpus([str(tmp / "missing")])
    (tmp / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no \\*.py files"):
        read_corpus([str(tmp / "empty_dir")])
    with pytest.raises(DataError, match="no files match"):
        read_corpus([str(tmp / "empty_dir" / "*.rs")])
    (tmp / "bin").mkdir()
    (tmp / "bin" / "a.py").write_bytes(b"\x00\x01\x02binary\x00")
    (tmp / "bin" / "b.py").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="corpus is empty"):
        read_corpus([str(tmp / "bin")])
    src = make_corpus(tmp / "src", n=3)
    with pytest.raises(TokenizerError, match="too small for a vocabulary"):
        prepare(tmp, src, vocab_size=50000)
    data, _ = prepare(tmp, make_corpus(tmp / "src2"))
    with pytest.raises(DataError, match="too few for one batch"):
        data.batches("val", batch_size=64, seq_len=512, seed=0)


def test_worker_count_changes_nothing(tmp):
    """Tokenizing with 1 or 2 threads gives the same splits, shards and manifest."""
    src = make_corpus(tmp / "src")
    one, _ = prepare(tmp / "one", src, num_threads=1)
    two, _ = prepare(tmp / "two", src, num_threads=2)
    assert one.manifest == two.manifest
    for shard in sorted(p.name for p in one.directory.glob("*.bin")):
        assert (one.directory / shard).read_bytes() == (two.directory / shard).read_bytes()


def test_benchmark_runs_and_reports_its_figures(tmp):
    """The benchmark's quick preset runs end to end (the figures themselves come from a full run)."""
    here = Path(os.environ["RUNFILES_DIR"]) / "codex_ml" / "tests" / "data" if "RUNFILES_DIR" in os.environ \
        else Path(__file__).parent
    spec = importlib.util.spec_from_file_location("bench_data", here / "bench_data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    figures = bench_data.main(["--batches=20", "--batch_size=2", "--seq_len=32", "--vocab_size=300",
                               str(make_corpus(tmp / "src"))])
    assert figures["documents"] == 60 and figures["tokens"] > 2 * 20 * 32
    assert figures["ms_per_batch_2x32"] > 0 and figures["encode_2_threads_s"] >= 0


def test_tokenizer_settings_are_gin_configurable_and_part_of_the_cache_key(tmp):
    import gin

    import codex_ml.data.gin_config  # noqa: F401  (registers prepare_data)

    src = make_corpus(tmp / "src")
    base, _ = prepare(tmp, src)
    gin.clear_config()
    try:
        gin.parse_config(["prepare_data.character_coverage = 0.9995", "prepare_data.model_type = 'unigram'"])
        configured = gin.get_configurable("prepare_data")
        logs = []
        other = configured(tmp / "cache", sources=[str(src)], vocab_size=300, splits=(0.8, 0.1, 0.1), log=logs.append)
    finally:
        gin.clear_config()
    assert any("trained unigram" in line for line in logs), logs
    assert other.tokenizer.sha256 != base.tokenizer.sha256
    assert other.tokenizer.model_path != base.tokenizer.model_path and base.tokenizer.model_path.is_file()
    assert other.directory != base.directory  # new shards beside the old ones


def test_jsonl_policies_line_separators_globs_and_bom(tmp):
    good = json.dumps({"text": "print('ok')\n"}).encode()
    (tmp / "bad.jsonl").write_bytes(good + b"\n" + b'{"text": "caf\xe9 = 1"}\n')
    assert read_corpus([str(tmp / "bad.jsonl")], non_utf8="skip").stats["skipped_non_utf8"] == 1
    replaced = read_corpus([str(tmp / "bad.jsonl")], non_utf8="replace")
    assert any("\ufffd" in d.text for d in replaced.documents)
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_corpus([str(tmp / "bad.jsonl")], non_utf8="error")
    # Raw U+2028 / U+0085 inside JSON strings are text, not line ends; a byte-order mark is not JSON.
    records = [{"text": "a = '\u2028'\n"}, {"text": "b = '\x85'\n"}]
    (tmp / "seps.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r, ensure_ascii=False)
                                                                    for r in records).encode())
    assert sorted(d.text for d in read_corpus([str(tmp / "seps.jsonl")]).documents) == sorted(
        r["text"] for r in records)
    # A glob's .jsonl matches are read as JSON Lines too, with the same default field.
    (tmp / "j").mkdir()
    (tmp / "j" / "a.jsonl").write_text(json.dumps({"text": "print(1)"}) + "\n" + json.dumps({"text": "print(2)"}))
    assert sorted(d.text for d in read_corpus([str(tmp / "j" / "*.jsonl")]).documents) == ["print(1)", "print(2)"]


def test_sources_must_be_a_non_empty_list(tmp):
    (tmp / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="pass \\["):
        read_corpus(str(tmp / "a.py"))
    with pytest.raises(DataError, match="empty list"):
        read_corpus([])
    with pytest.raises(DataError, match="empty list"):
        prepare_data(tmp / "cache", sources=[], vocab_size=300)


def test_google_key_ending_in_a_dash_is_found():
    assert find_secret("k = 'AIza" + "B" * 34 + "-'") == "google_api_key"
    assert find_secret("k = 'AIza" + "B" * 34 + "x'") == "google_api_key"


@pytest.mark.parametrize("setting, match", [
    ({"shard_tokens": 0}, "prepare_data.shard_tokens must be a positive integer, got 0"),
    ({"shard_tokens": -1}, "prepare_data.shard_tokens must be a positive integer, got -1"),
    ({"num_threads": 0}, "prepare_data.num_threads must be a positive integer"),
    ({"tokenizer_threads": 0}, "prepare_data.tokenizer_threads must be an integer from 1 to 1024"),
    ({"max_documents": 0}, "prepare_data.max_documents must be None or a positive integer"),
    ({"max_documents": -5}, "prepare_data.max_documents must be None or a positive integer"),
    ({"character_coverage": 0.0}, "prepare_data.character_coverage must be a number from 0.98 to 1"),
    ({"character_coverage": 2.0}, "prepare_data.character_coverage must be a number from 0.98 to 1"),
    ({"splits": (0.0, 0.5, 0.5)}, "prepare_data.splits = (0.0, 0.5, 0.5) gives the train split nothing"),
    ({"splits": (float("nan"), 0.5, 0.5)}, "splits must be three non-negative fractions"),
])
def test_bad_settings_are_named_before_anything_is_written(tmp, setting, match):
    """Each names prepare_data.<setting>; none leaves anything in the cache (shard_tokens=-1 used to commit a
    shard set without shards, then fail on its empty train split)."""
    with pytest.raises(DataError, match=re.escape(match)):
        prepare(tmp, make_corpus(tmp / "src", n=5), **setting)
    assert not (tmp / "cache").exists()


def test_a_train_fraction_too_small_for_the_corpus_is_named(tmp):
    with pytest.raises(DataError, match=r"the train split is empty: prepare_data.splits = \(0.01, 0.5, 0.49\) gives "
                                        "none of the 5 documents"):
        prepare(tmp, make_corpus(tmp / "src", n=5), splits=(0.01, 0.5, 0.49))
    assert not (tmp / "cache").exists()


def test_jsonl_lone_surrogates_follow_the_non_utf8_policy(tmp):
    """json.loads turns the escape "\\ud800" into a lone surrogate, which UTF-8 cannot encode."""
    (tmp / "s.jsonl").write_text('{"text": "a = 1 \\ud800"}\n{"text": "b = 2"}\n')
    assert [d.text for d in read_corpus([str(tmp / "s.jsonl")]).documents] == ["b = 2"]
    replaced = read_corpus([str(tmp / "s.jsonl")], non_utf8="replace")
    assert sorted(d.text.rstrip("\ufffd") for d in replaced.documents) == ["a = 1 ", "b = 2"]
    with pytest.raises(DataError, match=r"s.jsonl:1: not valid UTF-8"):
        read_corpus([str(tmp / "s.jsonl")], non_utf8="error")


def test_directory_sources_skip_hidden_directories_and_virtual_environments(tmp):
    src = tmp / "project"
    files = {
        "pkg/a.py": "def a():\n    return 1\n",
        ".git/hooks/hook.py": "def hook():\n    pass\n",
        ".venv/lib/python3/site-packages/dep/d.py": "def dep():\n    pass\n",
        "env/pyvenv.cfg": "home = /usr/bin\n",
        "env/bin/activate_this.py": "activated = True\n",
        "vendor/site-packages/v.py": "def vendored():\n    pass\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    corpus = read_corpus([str(src)])
    assert [Path(d.source).relative_to(src).as_posix() for d in corpus.documents] == ["pkg/a.py"]
    everything = read_corpus([str(src)], include_hidden=True)
    assert len(everything.documents) == 5
    assert len(read_corpus([f"{src}/**/*.py"]).documents) == 2  # the glob: hidden and site-packages skipped
    (src / "pkg" / "a.py").unlink()
    with pytest.raises(DataError, match="outside hidden directories and virtual environments.*include_hidden"):
        read_corpus([str(src)])


def test_the_secret_filter_and_the_corpus_reader_import_nothing_else_of_the_pipeline():
    """generation reads data/secrets.py and the tokenizer command data/corpus.py: neither imports the batches,
    shards or cache (nor numpy, torch or SentencePiece), while `from codex_ml.data import <name>` still works."""
    code = ("import sys\n"
            "import codex_ml.data.corpus, codex_ml.data.secrets\n"
            "print(sorted(m for m in sys.modules if m.startswith('codex_ml.data')"
            " or m in ('numpy', 'torch', 'sentencepiece')))\n"
            "from codex_ml.data import BatchIterator, prepare_data\n"
            "print(BatchIterator.__module__, prepare_data.__module__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, facade = result.stdout.splitlines()
    assert loaded == str(["codex_ml.data", "codex_ml.data.corpus", "codex_ml.data.secrets"])
    assert facade == "codex_ml.data.batches codex_ml.data.pipeline"
    import codex_ml.data

    with pytest.raises(AttributeError, match="has no attribute 'prepare'"):
        codex_ml.data.prepare  # noqa: B018
