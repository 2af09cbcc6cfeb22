"""The HDF5 feature cache (being split into schema, read, writer, merge and lock)."""

from pipeline.cache.lock import CacheLock, CacheLockedError
from pipeline.cache.writer import (
    IDENTITY_KEYS,
    SCHEMA_VERSION,
    Cache,
    CacheError,
    CacheWriteError,
    CacheWriter,
    RowState,
    _copy,  # noqa: F401 - bench.py
    _decode_attrs,  # noqa: F401 - bench.py, stream.py
    chunk_rows,
    copy_rows,
    feature_dataset,
    identity_differences,
    merge_parts,
    open_cache,
    partial_path,
    read_attrs,
    read_cache,
    read_row_state,
)

__all__ = [
    "IDENTITY_KEYS",
    "SCHEMA_VERSION",
    "Cache",
    "CacheError",
    "CacheLock",
    "CacheLockedError",
    "CacheWriteError",
    "CacheWriter",
    "RowState",
    "chunk_rows",
    "copy_rows",
    "feature_dataset",
    "identity_differences",
    "merge_parts",
    "open_cache",
    "partial_path",
    "read_attrs",
    "read_cache",
    "read_row_state",
]
