"""prepare_data: corpus -> tokenizer -> cached, verified token shards -> batches."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import sentencepiece

from codex_ml._files import LockFile, LockHeld, atomic_write_bytes, remove_temporaries, staged_directory, storage_error
from codex_ml.data.batches import BatchIterator
from codex_ml.data.corpus import SPLITS, DataError, check_splits, read_corpus
from codex_ml.data.shards import MANIFEST, load_manifest, load_split, token_dtype, write_shards
from codex_ml.tokenization import Tokenizer, load_tokenizer
from codex_ml.tokenization.tokenizer import MAX_THREADS, MIN_CHARACTER_COVERAGE


def _in_range(value: object, kind: type | tuple[type, ...], low: float, high: float = float("inf")) -> bool:
    """`value` is a `kind` (never a bool) in [low, high] (NaN is not)."""
    return isinstance(value, kind) and not isinstance(value, bool) and low <= value <= high


def _check_settings(*, shard_tokens: int, num_threads: int, tokenizer_threads: int, max_documents: int | None,
                    character_coverage: float, splits: Sequence[float]) -> None:
    """Raises DataError naming the first bad setting, before the corpus is read or anything is written (a
    shard_tokens < 1 would otherwise commit a shard set without shards to the cache)."""
    checks = (
        ("shard_tokens", _in_range(shard_tokens, int, 1), shard_tokens, "a positive integer",
         "it is the most tokens one shard file holds; the default is 1 << 26"),
        ("num_threads", _in_range(num_threads, int, 1), num_threads, "a positive integer",
         "it is how many threads tokenize; the default is 2"),
        ("tokenizer_threads", _in_range(tokenizer_threads, int, 1, MAX_THREADS), tokenizer_threads,
         f"an integer from 1 to {MAX_THREADS}", "it is how many threads train the tokenizer; the default is 2"),
        ("max_documents", max_documents is None or _in_range(max_documents, int, 1), max_documents,
         "None or a positive integer", "None keeps every document"),
        # SentencePiece refuses anything outside this range with an internal error.
        ("character_coverage", _in_range(character_coverage, (int, float), MIN_CHARACTER_COVERAGE, 1),
         character_coverage, f"a number from {MIN_CHARACTER_COVERAGE} to 1", "1.0 (the default) keeps every character"),
    )
    for name, ok, value, rule, fix in checks:
        if not ok:
            raise DataError(f"prepare_data.{name} must be {rule}, got {value!r}: {fix}")
    check_splits(splits)
    if splits[0] == 0:
        raise DataError(f"prepare_data.splits = {tuple(splits)} gives the train split nothing: the tokenizer and the "
                        "model train on it; give it most documents, e.g. (0.98, 0.01, 0.01)")


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


T = TypeVar("T")

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_DIGEST = "tokenizer.sha256"


def _cached_tokenizer(entry: Path) -> Tokenizer | None:
    """The complete cached tokenizer in `entry` (its model and the SHA-256 recorded when it was trained), or
    None. A model edited or damaged since it was trained is an error, never silently trained on."""
    model_path, digest_path = entry / TOKENIZER_FILE, entry / TOKENIZER_DIGEST
    if not (model_path.is_file() and digest_path.is_file()):
        return None  # absent, or interrupted before its digest was written: trained again
    tokenizer = Tokenizer.load(model_path)
    if digest_path.read_text().strip() != tokenizer.sha256:
        raise DataError(f"the cached tokenizer {model_path} changed since it was trained (its SHA-256 is not "
                        f"the one in {digest_path.name}): delete {entry}; the next run retrains it")
    return tokenizer


def _cached_shards(directory: Path) -> dict | None:
    """The manifest of the complete shard set `directory`, every shard verified, or None when there is none."""
    if not (directory / MANIFEST).is_file():
        if directory.exists():
            raise DataError(f"{directory} exists but has no manifest: an interrupted or foreign directory; delete it")
        return None
    manifest = load_manifest(directory)
    for split in SPLITS:  # verifies every shard's digest: a modified cache is an error, never reused silently
        load_split(directory, manifest, split, verify=True)
    return manifest


@contextmanager
def _writing(cache_dir: Path) -> Iterator[None]:
    """A full or read-only cache becomes a DataError naming the directory and the fix (the writers remove
    their temporaries themselves)."""
    try:
        yield
    except OSError as err:
        problem = storage_error(err, cache_dir)
        if problem is None:
            raise
        raise DataError(f"cannot write the data cache: {problem} (train.cache_dir); nothing partial was left "
                        "behind") from err


@contextmanager
def _cache_lock(cache_dir: Path, entry: Path, what: str, log: Callable[[str], None]) -> Iterator[None]:
    """Holds <entry>.lock (an flock, released by the kernel however the process ends) while `entry` is built, so
    that concurrent runs build it once: the others wait, say so, then reuse it. Temporaries left by a builder
    that died are removed under the lock."""
    with _writing(cache_dir):
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = LockFile(entry.with_name(entry.name + ".lock"))
        try:
            lock.acquire()
        except LockHeld as held:
            log(f"Waiting for {held.holder or 'another process'} to finish building {what} in {entry} ...")
            lock.acquire(blocking=True)
    try:
        for tmp in remove_temporaries(entry):
            log(f"Removed {tmp}, left by an interrupted build")
        yield
    finally:
        lock.release()


def _cached_or_built(cache_dir: Path, entry: Path, what: str, log: Callable[[str], None],
                     cached: Callable[[Path], T | None], build: Callable[[], T]) -> tuple[T, bool]:
    """(`cached(entry)`, False), or, where there is none, (`build()`, True) under the entry's lock; looked up again
    once the lock is held, since a concurrent run may have built it meanwhile."""
    value = cached(entry)
    if value is None:
        with _cache_lock(cache_dir, entry, what, log):
            value = cached(entry)  # built meanwhile by the run this one waited for
            if value is None:
                return build(), True
    return value, False


@dataclass
class PreparedData:
    """A verified shard set and its tokenizer."""

    tokenizer: Tokenizer
    manifest: dict
    manifest_path: Path

    @property
    def directory(self) -> Path:
        return self.manifest_path.parent

    def tokens(self, split: str) -> np.ndarray:
        return load_split(self.directory, self.manifest, split, verify=False)

    def batches(self, split: str, *, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                epoch_limit: int | None = None, document_ids: bool = False) -> BatchIterator:
        """A deterministic, resumable iterator over packed sequences of `split`.

        document_ids: also yield "segment_ids" for document-boundary masks (see `document_attention_mask`).
        """
        tokens = self.tokens(split)  # a DataError for an unknown split
        # The split's shard set: a saved position is valid only over these tokens (checked on resume).
        digest = hashlib.sha256(" ".join(s["sha256"] for s in self.manifest["splits"][split]["shards"]).encode())
        return BatchIterator(tokens, split=split, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                             world_size=world_size, epoch_limit=epoch_limit, document_ids=document_ids,
                             eos_id=self.manifest["eos_id"], shards_sha256=digest.hexdigest())


def prepare_data(
    cache_dir: str | Path,
    *,
    sources: Sequence[str] | None = None,
    tokenizer_path: str | Path | None = None,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    max_documents: int | None = None,
    splits: tuple[float, float, float] = (0.98, 0.01, 0.01),
    non_utf8: str = "skip",
    filter_secrets: bool = True,
    include_hidden: bool = False,
    shard_tokens: int = 1 << 26,
    num_threads: int = 2,
    tokenizer_threads: int = 2,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Reads the corpus, trains (or loads) the tokenizer and tokenizes into shards, all cached by content.

    A second call with the same inputs reuses the cached tokenizer and shards (and says so); any change
    (sources, their content, policies, tokenizer) builds a new shard set beside the old one. Concurrent calls on
    one cache build each entry once: the builder holds <entry>.lock, the others wait (saying for whom), then
    reuse it. Entries are built under a temporary name and renamed whole, so an interrupted build leaves
    nothing a later call trusts; a full or read-only cache is a DataError naming the directory.
    num_threads only sets how many threads tokenize (the output does not depend on it);
    tokenizer_threads is part of the tokenizer's recipe: SentencePiece's result depends on it.
    vocab_size, model_type, character_coverage, byte_fallback and tokenizer_threads are the settings of
    `Tokenizer.train` (ignored when tokenizer_path is given); byte_fallback=False loses the exact round
    trip of characters the vocabulary lacks. include_hidden: directory and glob sources also read hidden
    directories, site-packages and virtual environments (skipped by default).
    """
    _check_settings(shard_tokens=shard_tokens, num_threads=num_threads, tokenizer_threads=tokenizer_threads,
                    max_documents=max_documents, character_coverage=character_coverage, splits=tuple(splits))
    cache_dir = Path(cache_dir)
    start = time.time()
    corpus = read_corpus(sources, non_utf8=non_utf8, filter_secrets=filter_secrets, max_documents=max_documents,
                         include_hidden=include_hidden)
    by_split = corpus.split(tuple(splits))
    if not by_split["train"]:  # a small corpus and a small train fraction
        raise DataError(f"the train split is empty: prepare_data.splits = {tuple(splits)} gives none of the "
                        f"{len(corpus.documents)} documents to it; raise its fraction or add documents")
    policies = {"non_utf8": non_utf8, "filter_secrets": filter_secrets, "dedup": "exact content sha256",
                "split": "content sha256", "splits": list(splits), "max_documents": max_documents}
    corpus_digest = hashlib.sha256("".join(d.sha256 for d in corpus.documents).encode()).hexdigest()
    stats = dict(corpus.stats)
    log(f"Corpus: {stats.get('documents', 0)} documents from {stats.get('files', 0)} files "
        f"(skipped: {stats.get('skipped_non_utf8', 0)} not UTF-8, {stats.get('duplicates_removed', 0)} duplicates, "
        f"{stats.get('skipped_secrets', 0)} with secrets, {stats.get('skipped_empty', 0)} empty) "
        f"in {time.time() - start:.1f}s")

    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)  # a SentencePiece file, or a Hugging Face folder
        log(f"Tokenizer: loaded {tokenizer_path} (vocabulary {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]})")
    else:
        train_digest = hashlib.sha256("".join(d.sha256 for d in by_split["train"]).encode()).hexdigest()
        tok_key = _key({"train_docs": train_digest, "vocab_size": vocab_size, "model_type": model_type,
                        "character_coverage": character_coverage, "byte_fallback": byte_fallback,
                        "threads": tokenizer_threads, "sentencepiece": sentencepiece.__version__})
        entry = cache_dir / "tokenizers" / tok_key

        def train_tokenizer() -> Tokenizer:
            t = time.time()
            with _writing(cache_dir), staged_directory(entry, replace=True) as tmp:
                trained = Tokenizer.train((d.text for d in by_split["train"]), tmp / TOKENIZER_FILE,
                                          vocab_size=vocab_size, model_type=model_type,
                                          character_coverage=character_coverage, byte_fallback=byte_fallback,
                                          num_threads=tokenizer_threads)
                # The recorded SHA-256, written last: an entry without it is not a complete one.
                atomic_write_bytes(tmp / TOKENIZER_DIGEST, (trained.sha256 + "\n").encode())
            trained = Tokenizer.load(entry / TOKENIZER_FILE)
            log(f"Tokenizer: trained {model_type} vocabulary {vocab_size} in {time.time() - t:.1f}s -> "
                f"{entry / TOKENIZER_FILE}")
            return trained

        tokenizer, built = _cached_or_built(cache_dir, entry, "the tokenizer", log, _cached_tokenizer, train_tokenizer)
        if not built:
            log(f"Tokenizer: reusing cached {entry / TOKENIZER_FILE}")

    shard_key = _key({"corpus": corpus_digest, "policies": policies, "tokenizer": tokenizer.sha256,
                      "shard_tokens": shard_tokens})
    directory = cache_dir / "shards" / shard_key

    def tokenize() -> dict:
        t = time.time()
        split_tokens = {}
        eos = np.array([tokenizer.eos_id], dtype=np.int64)
        for split, docs in by_split.items():
            ids = tokenizer.encode_many([d.text for d in docs], num_threads=num_threads)
            split_tokens[split] = [np.concatenate([np.asarray(x, dtype=np.int64), eos]) for x in ids]
        manifest = {
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "sources": corpus.sources,
            "corpus_sha256": corpus_digest,
            "policies": policies,
            "corpus_stats": stats,
            "secret_rules_matched": dict(sorted(corpus.secret_rules.items())),
        }
        with _writing(cache_dir):
            manifest = write_shards(directory, split_tokens, manifest,
                                    dtype=token_dtype(tokenizer.vocab_size), shard_tokens=shard_tokens)
        counts = ", ".join(f"{s} {manifest['splits'][s]['tokens']}" for s in SPLITS)
        log(f"Shards: tokenized in {time.time() - t:.1f}s ({counts} tokens) -> {directory}")
        return manifest

    manifest, built = _cached_or_built(cache_dir, directory, "the token shards", log, _cached_shards, tokenize)
    if not built:
        log(f"Shards: reusing cached {directory} ({manifest['splits']['train']['tokens']} train tokens)")
    return PreparedData(tokenizer, manifest, directory / MANIFEST)


def load_prepared(directory: str | Path, tokenizer: Tokenizer) -> PreparedData:
    """Opens an existing shard set, verifying its shards and that `tokenizer` is the one it was made with."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"{directory} was tokenized with tokenizer {manifest['tokenizer_sha256'][:12]}, not "
                        f"{tokenizer.sha256[:12]} ({tokenizer.model_path}): use the matching tokenizer or rebuild")
    for split in SPLITS:
        load_split(directory, manifest, split, verify=True)
    return PreparedData(tokenizer, manifest, directory / MANIFEST)
