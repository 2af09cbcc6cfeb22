"""Logging for batch jobs: the library logs, the command line decides where lines go.

Every library module logs to ``logging.getLogger(__name__)`` (all under ``pipeline``) and
never prints, so ``import pipeline`` stays quiet in a notebook or a service. The command-line
entry points call :func:`configure_logging` once: from then on each line goes to standard
error, plain on a terminal and with a timestamp otherwise (a batch job's log file), and
through ``tqdm.write`` so that a line never tears a progress bar.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

__all__ = ["LOGGER", "configure_logging", "stderr_is_terminal"]

LOGGER = "pipeline"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def stderr_is_terminal() -> bool:
    """Whether standard error (looked up now, as a test may have replaced it) is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


class _Formatter(logging.Formatter):
    """``message`` on a terminal; ``2026-12-03 09:30:00 message`` in a log file."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if stderr_is_terminal():
            return message
        return f"{self.formatTime(record, TIME_FORMAT)} {message}"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected file)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # logging must never take the job down
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``pipeline`` loggers' lines at ``level`` and above to standard error.

    Idempotent: calling it again (each CLI entry point does, and the demo runs several in one
    process) replaces the handler instead of doubling every line.
    """
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _StderrHandler):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    # The root logger may carry handlers of its own (absl, Ray): one line, not two.
    logger.propagate = False
