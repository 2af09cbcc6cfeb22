"""Progress for batch jobs: a tqdm bar on a terminal, a plain log line every ~30 s otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

from pipeline.interrupts import checkpoint

__all__ = ["Progress", "format_duration"]

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts done items; never silent for long, whatever the output is.

    Args:
        total: items to do.
        desc: what is being done (first word of each line).
        log_every: seconds between plain log lines when ``stream`` is not a terminal.
        stream: where the bar goes on a terminal (stderr by default, like tqdm); elsewhere
            the lines go to this module's logger, timestamped by the CLI's log format.
        unit: item name for rates ("img" -> "img/s").
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        log_every: float = 30.0,
        stream: TextIO | None = None,
        unit: str = "img",
    ) -> None:
        self.total = total
        self.desc = desc
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.unit = unit
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        isatty = getattr(self.stream, "isatty", None)
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
            if isatty is not None and isatty()
            else None
        )

    @property
    def rate(self) -> float:
        """Items per second so far."""
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """``desc: done/total (pct%), rate unit/s, ETA``."""
        rate = self.rate
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta}"
        )

    def update(self, n: int = 1) -> None:
        """Record ``n`` more items done; a safe point to stop at on Ctrl-C.

        Raises:
            Interrupted: Ctrl-C came where it could not be raised (see pipeline/interrupts.py).
        """
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif (now := time.monotonic()) - self._last_line >= self.log_every:
            self._last_line = now
            log.info(self.line())
        checkpoint()

    def close(self) -> None:
        """Close the bar (no final line: the caller prints a summary)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
