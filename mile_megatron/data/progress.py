"""Progress line on stderr: shards, documents/s, MB/s (decompressed input), tokens/s.

On a terminal the line is redrawn in place at most every ``interval`` seconds; when stderr is
not a terminal nothing is printed unless ``enabled=True`` is forced (then one line per interval).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_shards: int, enabled: bool | None = None,
                 stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.interval = interval if self.tty else max(interval, 10.0)
        self.total_shards = total_shards
        self.shards = self.documents = self.tokens = self.bytes = 0
        self.start = self._last = time.monotonic()
        self._drawn = False

    def update(self, documents: int = 0, tokens: int = 0, nbytes: int = 0, shards: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        self.shards += shards
        now = time.monotonic()
        if self.enabled and (shards or now - self._last >= self.interval):
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        return (f"shards {self.shards}/{self.total_shards} | {self.documents:,} docs "
                f"({self.documents / elapsed:,.0f}/s) | {self.bytes / 1e6:,.1f} MB "
                f"({self.bytes / 1e6 / elapsed:,.2f} MB/s) | {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f}/s) | {elapsed:,.0f}s")

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(now))
            self._drawn = True
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line without corrupting the progress line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self._drawn:
            self.stream.write(self.line())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
