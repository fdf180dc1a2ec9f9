"""A Hugging Face tokenizer folder behind the interface of codex_ml's Tokenizer (for fine-tuning HF models).

Identified by the SHA-256 of its files, as the SentencePiece tokenizer is by its model file's, so shards and
checkpoints record which tokenizer made them. Loaded offline from a local folder only (HF_HUB_OFFLINE is set
before transformers is imported).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from codex_ml._hub import hub_offline
from codex_ml.tokenization.tokenizer import TokenizerError, check_texts_utf8, check_utf8

# The files that define a tokenizer in a Hugging Face folder (whichever exist are hashed, in this order).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


class HFTokenizer:
    """encode/decode/encode_many, vocab_size, special ids and sha256 of an AutoTokenizer folder."""

    model_path = None  # nothing to copy into checkpoints: the folder is named in the operative config

    def __init__(self, folder: str | os.PathLike):
        hub_offline()
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        files = [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]
        if not files:
            raise TokenizerError(f"{self.folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                                 "give a Hugging Face model folder that includes its tokenizer.")
        try:
            self._tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"transformers cannot load the tokenizer in {self.folder} ({e}).") from e
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        self.sha256 = digest.hexdigest()
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        if self.eos_id is None:
            raise TokenizerError(f"The tokenizer in {self.folder} has no eos token; documents are separated by it.")
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.unk_id = self._tok.unk_token_id

    @classmethod
    def load(cls, folder: str | os.PathLike) -> HFTokenizer:
        return cls(folder)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added). TokenizerError if it is not UTF-8 (lone surrogates)."""
        try:
            return self._tok.encode(text, add_special_tokens=False)
        except TypeError:  # how the tokenizers binding refuses a lone surrogate: say so
            check_utf8(text, "the text")
            raise

    def encode_many(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        texts = list(texts)
        try:
            return self._tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        except TypeError:  # a lone surrogate, as in encode()
            check_texts_utf8(texts)
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike):
    """A SentencePiece model file -> Tokenizer; a Hugging Face folder -> HFTokenizer (or, where transformers
    cannot load it, the folder's SentencePiece tokenizer.model)."""
    from codex_ml.tokenization.tokenizer import Tokenizer

    if not str(path):
        raise TokenizerError("The tokenizer path is empty: give a SentencePiece model file or a Hugging Face model "
                             "folder (with configs/lora.gin, bind MODEL_DIR).")
    path = Path(path)
    if not path.exists():  # say both forms: the path may have been meant as a model folder (MODEL_DIR)
        raise TokenizerError(f"The tokenizer path {path} does not exist: give a SentencePiece model file or a "
                             "Hugging Face model folder that holds its tokenizer.")
    if not path.is_dir():
        return Tokenizer.load(path)
    try:
        return HFTokenizer(path)
    except TokenizerError:
        if (path / "tokenizer.model").is_file():  # a SentencePiece model that transformers cannot wrap
            return Tokenizer.load(path / "tokenizer.model")
        raise
