"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits 0."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType


class GracefulStop:
    """Context manager: the first SIGTERM or SIGINT sets `requested`; a second SIGINT exits at once (code 130).

    Handlers are installed only in the main thread (elsewhere Python forbids it) and restored on exit.
    """

    def __init__(self, report: Callable[[str], None] = print):
        self.requested = False
        self._report = report
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            self._report(f"Second {name}: exiting now, without a checkpoint of the current step.")
            os._exit(130)
        self.requested = True
        self._report(f"{name} received: finishing this step and writing a checkpoint (Ctrl-C again to quit now).")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
