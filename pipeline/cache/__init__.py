"""The HDF5 feature cache: the store between extraction and the heads.

Modules, in the order a cache lives:

    schema   the one place that knows the HDF5 layout: dataset names, attributes, errors
    writer   create, append committed batches, resume, rewrite, finish (``<out>.partial``)
    lock     one writer per cache (``<out>.lock``)
    merge    the parts of ``extract --shard i/N`` or ``--engine ray`` into one cache
    read     attributes, row state, or a whole cache into memory

The package imports h5py and NumPy only, never Keras or TensorFlow, so reading a cache
stays light. The names below are the public surface; ``from pipeline.cache import X``
keeps working for every name that lived in the old ``pipeline/cache.py``.
"""

from pipeline.cache.lock import CacheLock, CacheLockedError
from pipeline.cache.merge import copy_rows, merge_parts
from pipeline.cache.read import (
    Cache,
    RowState,
    check_cache_exists,
    check_finite,
    open_cache,
    read_attrs,
    read_cache,
    read_row_state,
)
from pipeline.cache.schema import (
    IDENTITY_DEFAULTS,
    IDENTITY_KEYS,
    SCHEMA_VERSION,
    CacheError,
    CacheWriteError,
    chunk_rows,
    decode_attrs,
    feature_dataset,
    identity_differences,
    layer_attrs,
    partial_path,
    recorded_jpeg_downscale,
)
from pipeline.cache.writer import CacheWriter

__all__ = [
    "IDENTITY_DEFAULTS",
    "IDENTITY_KEYS",
    "SCHEMA_VERSION",
    "Cache",
    "CacheError",
    "CacheLock",
    "CacheLockedError",
    "CacheWriteError",
    "CacheWriter",
    "RowState",
    "check_cache_exists",
    "check_finite",
    "chunk_rows",
    "copy_rows",
    "decode_attrs",
    "feature_dataset",
    "identity_differences",
    "layer_attrs",
    "recorded_jpeg_downscale",
    "merge_parts",
    "open_cache",
    "partial_path",
    "read_attrs",
    "read_cache",
    "read_row_state",
]
