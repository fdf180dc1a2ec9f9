"""A one-line progress display on terminals; periodic plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Shows step, loss, tokens/s, learning rate and ETA.

    On a terminal the line is redrawn in place every step; when the stream is not a terminal (a log file,
    a CI job) a plain line is printed every `log_every` steps only, so logs stay clean.
    """

    def __init__(self, total_steps: int, start_step: int = 0, log_every: int = 10, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self.total, self.start, self.log_every = total_steps, start_step, max(1, log_every)
        self._t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """Reports that `step` (1-based count of finished steps) is done."""
        done = step - self.start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | lr {lr:.2e} | "
            f"ETA {_duration(eta)}"
        )
        if self.interactive:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Prints a line without garbling the progress line."""
        self.stream.write(("\n" if self.interactive else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
