"""codex-tokenize: the tokenizer alone.

  tokenize train --output=tok.model [--vocab_size=8000] [--model_type=bpe] [--character_coverage=1.0]
                 [--no-byte_fallback] [--num_threads=2] [--overwrite] [SOURCE ...]   (default: the stdlib)
  tokenize encode --model=tok.model [TEXT | < file]     prints the ids, space-separated
  tokenize decode --model=tok.model [IDS | < file]      prints the text
"""

from __future__ import annotations

import re
import sys

from absl import flags

from codex_ml.cli.common import HELP, enter_working_directory, parse_flags, usage_error
from codex_ml.data.corpus import DataError, read_corpus
from codex_ml.tokenization import Tokenizer, TokenizerError
from codex_ml.tokenization.tokenizer import check_utf8


def define_train_flags(fv: flags.FlagValues) -> None:
    """`tokenize train`'s flags; its arguments are the sources."""
    flags.DEFINE_string("output", None, "where to write the model file", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 8000, "the vocabulary size", flag_values=fv)
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "the SentencePiece model type", flag_values=fv)
    flags.DEFINE_float("character_coverage", 1.0, "the share of characters the vocabulary covers", flag_values=fv)
    flags.DEFINE_bool("byte_fallback", True, "unknown characters as bytes (needed for an exact round trip)",
                      flag_values=fv)
    flags.DEFINE_integer("num_threads", 2, "training threads (part of the recipe)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an existing --output file", flag_values=fv)


def define_codec_flags(fv: flags.FlagValues) -> None:
    """`tokenize encode`'s and `tokenize decode`'s flags; the argument is the text (encode) or the ids (decode)."""
    flags.DEFINE_string("model", None, "a model file made by `tokenize train`", flag_values=fv)


COMMANDS = {"train": (define_train_flags, ("output",), None), "encode": (define_codec_flags, ("model",), 1),
            "decode": (define_codec_flags, ("model",), 1)}


def main(argv: list[str] | None = None) -> int:
    """Runs `tokenize COMMAND [flags] [arguments]` on `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in HELP:
        sys.stdout.write(__doc__.strip() + "\n\n`tokenize COMMAND --help` lists a command's flags.\n")
        return 0
    if not argv:
        usage_error("tokenize", "the following arguments are required: command (train, encode or decode)")
    command = argv[0]
    if command not in COMMANDS:
        usage_error("tokenize", f"argument command: invalid choice: {command!r} (choose from train, encode, decode)")
    define, required, max_args = COMMANDS[command]
    args, rest = parse_flags(f"tokenize {command}", __doc__, define, argv[1:], required=required, max_args=max_args)
    enter_working_directory()
    try:
        if command == "train":
            corpus = read_corpus(rest or None)
            tok = Tokenizer.train((d.text for d in corpus.documents), args.output, vocab_size=args.vocab_size,
                                  model_type=args.model_type, character_coverage=args.character_coverage,
                                  byte_fallback=args.byte_fallback, num_threads=args.num_threads,
                                  overwrite=args.overwrite)
            print(f"trained on {len(corpus.documents)} documents: {args.output} (sha256 {tok.sha256})")
            return 0
        tok = Tokenizer.load(args.model)
        # Bytes, decoded here: a text stream would raise UnicodeDecodeError (or pass surrogates) on non-UTF-8 input.
        data = check_utf8(rest[0] if rest else sys.stdin.buffer.read(), "the input" if rest else "standard input")
        if command == "encode":
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
