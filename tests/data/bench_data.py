"""Benchmark of the data pipeline: reading the corpus, training the tokenizer, tokenizing, delivering batches.

  tools/bazel run //tests/data:bench_data                      # the whole standard library, vocabulary 4096
  tools/bazel run //tests/data:bench_data -- --max_documents=200 --vocab_size=500

Prints one JSON object of measured figures (seconds, ms per batch). Tokenizing is timed with 1 and with 2
threads so the speed-up from using both cores shows; batches are drawn from memory-mapped uint16 tokens
exactly as training draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from codex_ml.data import BatchIterator, read_corpus
from codex_ml.tokenization import Tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--max_documents", type=int, default=None, help="default: the whole corpus")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("sources", nargs="*", help="default: the Python standard library")
    args = parser.parse_args(argv)
    figures: dict = {"cpus": os.cpu_count()}

    t = time.perf_counter()
    corpus = read_corpus(args.sources or None, max_documents=args.max_documents)
    texts = [d.text for d in corpus.documents]
    figures["read_s"] = round(time.perf_counter() - t, 2)
    figures["documents"] = len(texts)
    figures["megabytes"] = round(sum(len(x.encode()) for x in texts) / 1e6, 2)

    with tempfile.TemporaryDirectory(dir=os.environ.get("TEST_TMPDIR")) as tmp:
        t = time.perf_counter()
        tok = Tokenizer.train(texts, Path(tmp) / "bench.model", vocab_size=args.vocab_size)
        figures["train_tokenizer_s"] = round(time.perf_counter() - t, 2)
        ids = None
        for threads in (1, 2):
            t = time.perf_counter()
            ids = tok.encode_many(texts, num_threads=threads)
            figures[f"encode_{threads}_threads_s"] = round(time.perf_counter() - t, 2)
        tokens = np.concatenate([np.append(np.asarray(x, dtype=np.uint16), np.uint16(tok.eos_id)) for x in ids])
        figures["tokens"] = int(len(tokens))
        figures["bytes_per_token"] = round(figures["megabytes"] * 1e6 / len(tokens), 2)

        path = Path(tmp) / "train.bin"
        tokens.tofile(path)
        memmap = np.memmap(path, dtype=np.uint16, mode="r")
        it = BatchIterator(memmap, split="train", batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
        next(it)  # warm-up: the first permutation
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        figures[f"ms_per_batch_{args.batch_size}x{args.seq_len}"] = round(
            (time.perf_counter() - t) * 1000 / args.batches, 4)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
