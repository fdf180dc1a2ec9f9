"""SentencePiece tokenizer for code: exact round trip, fixed special ids, identified by its file's SHA-256."""

from codex_ml.tokenization.hf import HFTokenizer, load_tokenizer
from codex_ml.tokenization.tokenizer import SPECIAL_IDS, Tokenizer, TokenizerError

__all__ = ["SPECIAL_IDS", "HFTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]
