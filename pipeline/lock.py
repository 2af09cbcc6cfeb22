"""Moved to :mod:`pipeline.cache.lock`; this name stays for code that imports it from here."""

from pipeline.cache.lock import CacheLock, CacheLockedError

__all__ = ["CacheLock", "CacheLockedError"]
