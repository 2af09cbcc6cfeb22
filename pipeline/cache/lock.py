"""One writer per cache: an advisory lock file that names its holder and outlives no one.

``<cache>.lock`` holds the holder's pid, host and start time; the kernel's ``flock`` on it
is what counts, so a lock left by a killed process is free again at once (and reported as
stale), while a live holder makes a second run stop with its name.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

__all__ = ["CacheLock", "CacheLockedError"]

log = logging.getLogger(__name__)


class CacheLockedError(RuntimeError):
    """Another live process is writing this cache."""


class CacheLock:
    """Context manager holding ``<path>.lock`` for the duration of a write."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(str(path) + ".lock")
        self._file: IO[str] | None = None

    def __enter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise CacheLockedError(
                f"{self.path.with_suffix('')} is being written by another extraction "
                f"({holder}). Wait for it to finish, or stop it first."
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning("extract: taking over a stale lock left by a process that is gone "
                        "(%s).", previous)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            # Unlink while still holding the lock, so no one can take a file that is going.
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
