"""python -m codex_ml [--version | train ... | tokenize ...]."""

import sys

import codex_ml


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "--version":
        print(f"codex_ml {codex_ml.__version__}")
        return 0
    if argv[0] == "train":
        from absl import app

        from codex_ml.cli.train import main as train_main

        sys.argv = ["codex-train", *argv[1:]]
        app.run(train_main)
    if argv[0] == "tokenize":
        from codex_ml.cli.tokenizer import main as tokenize_main

        return tokenize_main(argv[1:])
    print(f"unknown command {argv[0]!r}: use --version, train or tokenize", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
