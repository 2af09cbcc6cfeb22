"""Images -> frozen base -> HDF5 cache, with decode, forward pass and writes overlapped.

The modules, in the order a run uses them:

- ``config``: ``ExtractConfig`` (what was asked, checked before anything heavy),
  ``ExtractResult``, the default output name, ``--shard`` slices;
- ``sync``: the cache against the folder (up to date? which rows are stale?);
- ``engine``: what both engines share (the model they build, stored dtypes, stopping);
- ``local_engine``: decode ahead, forward full batches, commit from a writer thread;
- ``ray_workers``: what runs on a Ray cluster (decode tasks, model actors);
- ``ray_engine``: the same batches on a Ray cluster, merged in list order;
- ``run``: ``run_extract``, which ties them together.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py): the CLI reads
# constants such as the allowed values of a flag without importing Keras.
_HOMES = {
    "build_model": "pipeline.extract.engine",
    "check_decode": "pipeline.images.batches",
    "decoded_batches": "pipeline.images.batches",
    "DecodedBatch": "pipeline.images.batches",
    "default_out": "pipeline.extract.config",
    "ExtractConfig": "pipeline.extract.config",
    "ExtractInterrupted": "pipeline.extract.engine",
    "ExtractResult": "pipeline.extract.config",
    "parse_shard": "pipeline.extract.config",
    "run_extract": "pipeline.extract.run",
    "shard_slice": "pipeline.extract.config",
    "stopped": "pipeline.extract.engine",
    "stored_features": "pipeline.extract.engine",
}

__all__ = [name for name in _HOMES if not name.startswith("_")]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
