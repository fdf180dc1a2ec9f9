"""codex-tokenize: the tokenizer alone.

  tokenize train --output=tok.model [--vocab_size=8000] [--model_type=bpe] [--character_coverage=1.0]
                 [--no-byte_fallback] [--num_threads=2] [--overwrite] [SOURCE ...]   (default: the stdlib)
  tokenize encode --model=tok.model [TEXT | < file]     prints the ids, space-separated
  tokenize decode --model=tok.model [IDS | < file]      prints the text
"""

from __future__ import annotations

import argparse
import re
import sys

from codex_ml.cli.common import ArgumentParser, enter_working_directory
from codex_ml.data import DataError, read_corpus
from codex_ml.tokenization import Tokenizer, TokenizerError
from codex_ml.tokenization.tokenizer import check_utf8


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="tokenize", description=__doc__,
                            formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on sources")
    train.add_argument("--output", required=True, help="where to write the model file")
    train.add_argument("--vocab_size", type=int, default=8000)
    train.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--character_coverage", type=float, default=1.0)
    train.add_argument("--byte_fallback", action=argparse.BooleanOptionalAction, default=True,
                       help="unknown characters as bytes (needed for an exact round trip)")
    train.add_argument("--num_threads", type=int, default=2, help="training threads (part of the recipe)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    train.add_argument("sources", nargs="*", help="files, directories or globs (default: the Python stdlib)")
    for name in ("encode", "decode"):
        p = sub.add_parser(name, help=f"{name} with a trained model")
        p.add_argument("--model", required=True, help="a model file made by `tokenize train`")
        p.add_argument("input", nargs="?", help="text (encode) or ids (decode); default: standard input")
    args = parser.parse_args(argv)
    enter_working_directory()
    try:
        if args.command == "train":
            corpus = read_corpus(args.sources or None)
            tok = Tokenizer.train((d.text for d in corpus.documents), args.output, vocab_size=args.vocab_size,
                                  model_type=args.model_type, character_coverage=args.character_coverage,
                                  byte_fallback=args.byte_fallback, num_threads=args.num_threads,
                                  overwrite=args.overwrite)
            print(f"trained on {len(corpus.documents)} documents: {args.output} (sha256 {tok.sha256})")
            return 0
        tok = Tokenizer.load(args.model)
        # Bytes, decoded here: a text stream would raise UnicodeDecodeError (or pass surrogates) on non-UTF-8 input.
        data = check_utf8(args.input if args.input is not None else sys.stdin.buffer.read(),
                          "the input" if args.input is not None else "standard input")
        if args.command == "encode":
            print(" ".join(map(str, tok.encode(data))))
        else:
            words = data.split()
            # ASCII digits only: int() also takes "1_0" and other scripts' digits ("٣").
            if not all(re.fullmatch(r"-?[0-9]+", w) for w in words):
                raise TokenizerError("decode expects whitespace-separated integer ids")
            ids = [int(w) for w in words]
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise TokenizerError(f"id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
            sys.stdout.write(tok.decode(ids))
        return 0
    except (DataError, TokenizerError, OSError) as err:
        print(f"tokenize: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenize: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
