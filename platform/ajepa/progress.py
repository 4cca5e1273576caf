"""Progress of long work as a person reads it: a bar redrawn in place when stdout is a terminal, plain lines
when it is not (CI, `ray job submit` logs, a file), so logs hold no carriage returns or escape codes.

Both show the same fields: `<what> <done>/<total> <unit>, <fields>, ETA <time>`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

BAR_WIDTH = 20


def duration(seconds: float) -> str:
    """45s, 3m05s, 2h03m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of `total` units of work.

    `update` redraws the bar on a terminal; elsewhere it prints a line at most every `every_s` seconds
    (0: every update). With `keep`, every update also leaves its line on a terminal (a training log
    above its bar)."""

    def __init__(self, what: str, total: int, unit: str, *, every_s: float = 0.0, keep: bool = False,
                 stream: TextIO | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.every_s, self.keep = every_s, keep
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._printed = self.start  # plain mode: the first line comes after every_s, not at once
        self._bar = ""

    def rate(self, done: int) -> float:
        """Average units per second since the start."""
        return done / max(time.monotonic() - self.start, 1e-9)

    def line(self, done: int, fields: str, eta_s: float | None = None) -> str:
        """The progress line; ETA from `eta_s`, else from the average rate so far."""
        if eta_s is None and (rate := self.rate(done)) > 0:
            eta_s = (self.total - done) / rate
        eta = duration(eta_s) if eta_s is not None else "?"
        return f"{self.what} {done}/{self.total} {self.unit}, {fields}, ETA {eta}"

    def update(self, done: int, fields: str, eta_s: float | None = None) -> None:
        text = self.line(done, fields, eta_s)
        if not self.tty:
            now = time.monotonic()
            if now - self._printed >= self.every_s:
                self._printed = now
                print(text, file=self.stream, flush=True)
            return
        if self.keep:
            self._write(f"\r\x1b[K{text}\n")
        filled = round(BAR_WIDTH * done / max(self.total, 1))
        self._bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"
        # Cut to the terminal's width: a wrapped line could not be redrawn in place.
        self._write(f"\r\x1b[K{self._bar[: shutil.get_terminal_size().columns - 1]}")

    def close(self) -> None:
        """End the bar's line, so what is printed next starts on a line of its own."""
        if self.tty and self._bar:
            self._write("\n")
            self._bar = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@contextlib.contextmanager
def polling(poll: Callable[[], None], interval_s: float = 0.5) -> Iterator[None]:
    """Call `poll` every `interval_s` on a background thread while the body runs, and once more after it
    succeeds. The body keeps the main thread, so Ctrl-C interrupts the work itself."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            poll()

    thread = threading.Thread(target=loop, name="ajepa-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    poll()
