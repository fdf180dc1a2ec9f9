"""The data pipeline: corpus, tokenizer, cached token shards with manifests, deterministic batches.

The names below are imported from their modules on first use: importing the secret filter (codex_ml.data.secrets,
what generation reads) or the corpus reader (codex_ml.data.corpus, what the tokenizer command reads) does not
import the batches, shards and cache, nor numpy, torch and SentencePiece with them.
"""

import importlib

_MODULE_OF = {
    "BatchIterator": "batches",
    "document_attention_mask": "batches",
    "Corpus": "corpus",
    "DataError": "corpus",
    "Document": "corpus",
    "read_corpus": "corpus",
    "PreparedData": "pipeline",
    "load_prepared": "pipeline",
    "prepare_data": "pipeline",
    "find_secret": "secrets",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)

