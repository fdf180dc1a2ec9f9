"""Runs a stand-in training in its own process (for signal, kill -9 and torchrun tests).

Usage: train_standin_main.py RUN_DIR JSON_OPTIONS
JSON_OPTIONS: Trainer options plus "signals": {"<batch position>": ["SIGTERM", ...]} sent to this process
when the training iterator reaches that position ("signals_rank": "R" sends them in rank R's process only),
"dropout", and "model": "gpt" for the tiny native GPT.
"""

import json
import os
import sys

from standins import SIGNALS, StandinData, make_trainer

from codex_ml.training import shutdown_distributed


def main() -> int:
    run_dir, options = sys.argv[1], json.loads(sys.argv[2])
    signals = {int(k): [SIGNALS[s] for s in v] for k, v in options.pop("signals", {}).items()}
    if options.pop("signals_rank", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        signals = {}  # sent to that rank's process only
    trainer = make_trainer(run_dir, data=StandinData(signals=signals), **options)
    try:
        result = trainer.fit(resume="auto")
    finally:
        shutdown_distributed()
    # One write(2) of a short line: under torchrun both ranks share the pipe, and print() may split a
    # line into several writes that interleave with the other rank's.
    os.write(1, f"STATUS {result.status} {result.step} rank={os.environ.get('RANK', '0')}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
