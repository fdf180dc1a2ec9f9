"""A SentencePiece tokenizer that keeps code byte for byte.

SentencePiece's defaults normalize text (NFKC), collapse whitespace and add a dummy prefix space, so
indentation and newlines do not survive. Here: identity normalization, no dummy prefix, whitespace
kept, whitespace-only pieces allowed (runs of indentation become single tokens), newline and tab as
user-defined symbols, and byte fallback so any character round-trips. decode(encode(x)) == x, with one
exception: a literal U+2581 (SentencePiece's own space marker, "▁") decodes as a space.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from codex_ml._files import atomic_write_bytes, file_sha256

# Fixed ids, written into the model itself (pad_id/unk_id/bos_id/eos_id of the trainer spec).
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
# SentencePiece's training refuses values outside these with an internal error.
MIN_CHARACTER_COVERAGE = 0.98
MAX_THREADS = 1024


class TokenizerError(ValueError):
    """A tokenizer could not be trained or loaded; the message says why and what to do."""


def check_utf8(text: str | bytes, what: str) -> str:
    """`text` as a str (bytes decoded), or TokenizerError naming `what` where it is not UTF-8. A str fails when it
    holds lone surrogates: Python's stand-ins for the bytes of a command-line argument that is not UTF-8."""
    try:
        if isinstance(text, bytes):
            return text.decode("utf-8")
        text.encode("utf-8")
        return text
    except UnicodeError as err:
        unit = "byte" if isinstance(text, bytes) else "character"
        raise TokenizerError(f"{what} is not valid UTF-8 ({err.reason} at {unit} {err.start}): give UTF-8 text "
                             "(convert it first, e.g. with iconv -t UTF-8)") from None


def check_texts_utf8(texts: Sequence[str]) -> None:
    """TokenizerError naming the first of `texts` that is not UTF-8 (for after a binding refused the batch)."""
    for i, text in enumerate(texts):
        check_utf8(text, f"text {i}")


def blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file (so `path` cannot be created), else None."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


class Tokenizer:
    """Wraps a SentencePiece model file. Create with `Tokenizer.train` or `Tokenizer.load`."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if self.model_path.is_dir():
            raise TokenizerError(f"{self.model_path} is a directory: give the model file's path, e.g. "
                                 f"{self.model_path}/tokenizer.model")
        if not self.model_path.is_file():
            raise TokenizerError(f"tokenizer model {self.model_path} does not exist: train one or give the right path")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.model_path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.model_path} is not a SentencePiece model ({err})") from err
        self.sha256 = file_sha256(self.model_path)
        self.vocab_size = self._sp.GetPieceSize()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @classmethod
    def load(cls, model_path: str | Path) -> Tokenizer:
        """Loads a saved model file."""
        return cls(model_path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_path: str | Path,
        *,
        vocab_size: int = 8000,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        character_coverage: float = 1.0,
        num_threads: int = 2,
        max_sentence_length: int = 16384,
        input_sentence_size: int = 2_000_000,
        overwrite: bool = False,
    ) -> Tokenizer:
        """Trains on `texts` (documents; split into lines for training) and writes the model to `model_path`.

        An existing `model_path` is an error unless `overwrite`: shards and checkpoints name a tokenizer by
        its file's hash, so silently replacing the file would orphan them.
        """
        model_path = Path(model_path)
        if model_path.is_dir():
            raise TokenizerError(f"{model_path} is a directory: give the model file's path, e.g. {model_path}/"
                                 "tokenizer.model")
        if model_path.exists() and not overwrite:
            raise TokenizerError(f"{model_path} already exists: choose another path, or delete it to retrain")
        blocker = blocking_file(model_path)
        if blocker is not None:  # checked before training, which can take minutes
            raise TokenizerError(f"cannot write {model_path}: {blocker} is a file, not a directory; choose another "
                                 "path")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:
            raise TokenizerError(f"character_coverage must be from {MIN_CHARACTER_COVERAGE} to 1 (SentencePiece's "
                                 f"range; 1.0 keeps every character), got {character_coverage!r}")
        if not isinstance(num_threads, int) or not 1 <= num_threads <= MAX_THREADS:
            raise TokenizerError(f"num_threads must be an integer from 1 to {MAX_THREADS}, got {num_threads!r}")
        lines = [line for text in texts for line in text.split("\n") if line.strip()]
        if not lines:
            raise TokenizerError("cannot train a tokenizer on an empty corpus: no non-blank lines in the documents")
        model_path.parent.mkdir(parents=True, exist_ok=True)
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=iter(lines),
                model_writer=proto,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                num_threads=num_threads,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                # No shuffling: the same corpus always gives the same model file.
                shuffle_input_sentence=False,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                user_defined_symbols=["\n", "\t", "\r"],
                pad_id=SPECIAL_IDS["pad"], unk_id=SPECIAL_IDS["unk"],
                bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
                minloglevel=2,
            )
        except RuntimeError as err:
            if "smaller than required_chars" in str(err):
                raise TokenizerError(
                    f"a vocabulary of {vocab_size} is too small for this corpus's characters ({err}); "
                    "raise vocab_size (byte fallback alone needs 256 pieces)"
                ) from err
            if "Vocabulary size" in str(err) or "vocab_size" in str(err):
                raise TokenizerError(
                    f"the corpus is too small for a vocabulary of {vocab_size} ({err}); "
                    "lower the vocabulary size or add documents"
                ) from err
            raise TokenizerError(f"SentencePiece training failed: {err}") from err
        # A unique temporary, fsynced, renamed into place: a crash or a concurrent writer never leaves a
        # half-written model behind.
        atomic_write_bytes(model_path, proto.getvalue())
        return cls(model_path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos). TokenizerError if it is not UTF-8 (holds lone surrogates)."""
        try:
            return self._sp.EncodeAsIds(text)
        except RuntimeError:  # SentencePiece's binding cannot pass a lone surrogate to C++: say so
            check_utf8(text, "the text")
            raise

    def encode_many(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """Token ids of many texts, encoded on `num_threads` threads."""
        texts = list(texts)
        try:
            return self._sp.Encode(texts, out_type=int, num_threads=num_threads)
        except TypeError:  # a lone surrogate, as in encode()
            check_texts_utf8(texts)
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special ids (pad, bos, eos) are dropped."""
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self._sp.DecodeIds([int(i) for i in ids if int(i) not in specials])

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_len: int | None = None,
        padding_side: str = "right",
        pad: bool = True,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> dict[str, torch.Tensor | list[list[int]]]:
        """Encodes a batch: truncated to max_len, padded with pad_id (as tensors) when `pad`.

        Returns {"input_ids": LongTensor [B, L], "attention_mask": LongTensor [B, L]} when padded,
        else lists of ids and of ones.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = []
        for ids in self.encode_many(texts):
            ids = ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])
            rows.append(ids[:max_len] if max_len is not None else ids)
        if not pad:
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode_batch(self, batch: dict | Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """Decodes rows of ids (padding and special ids dropped)."""
        rows = batch["input_ids"] if isinstance(batch, dict) else batch
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(r) for r in rows]

    def save(self, path: str | Path) -> Path:
        """Copies the model file to `path` (a file, or a directory to put tokenizer.model in).

        An existing file is replaced only if it is this very model (same SHA-256); anything else is an error.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if path.exists():
            if file_sha256(path) == self.sha256:
                return path
            raise TokenizerError(f"{path} already exists and is another model: choose another path or delete it")
        return atomic_write_bytes(path, self.model_path.read_bytes())
