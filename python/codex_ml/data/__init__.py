"""The data pipeline: corpus, tokenizer, cached token shards with manifests, deterministic batches."""

from codex_ml.data.batches import BatchIterator, document_attention_mask
from codex_ml.data.corpus import Corpus, DataError, Document, read_corpus
from codex_ml.data.pipeline import PreparedData, load_prepared, prepare_data
from codex_ml.data.secrets import find_secret

__all__ = ["BatchIterator", "Corpus", "DataError", "Document", "PreparedData", "document_attention_mask", "find_secret",
           "load_prepared", "prepare_data", "read_corpus"]
