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

from pipeline.extract.config import (
    ExtractConfig,
    ExtractResult,
    default_out,
    parse_shard,
    shard_slice,
)
from pipeline.extract.engine import ExtractInterrupted, build_model, stopped, stored_features
from pipeline.extract.run import run_extract
from pipeline.images.batches import DecodedBatch, check_decode, decoded_batches

__all__ = [
    "DecodedBatch",
    "ExtractConfig",
    "ExtractInterrupted",
    "ExtractResult",
    "build_model",
    "check_decode",
    "decoded_batches",
    "default_out",
    "parse_shard",
    "run_extract",
    "shard_slice",
    "stopped",
    "stored_features",
]
