"""The local engine: decode ahead in threads or processes, forward full batches, commit
each from a writer thread, so decode, forward pass and HDF5 writes overlap."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.augment import augment_batch, batch_seed
from pipeline.bases import FeatureModel
from pipeline.cache import CacheError, CacheWriter
from pipeline.extract.config import ExtractConfig
from pipeline.extract.engine import ExtractInterrupted, stopped, stored_features
from pipeline.images import ImageIndex, ImageRecord
from pipeline.images.batches import DecodedBatch, decoded_batches
from pipeline.interrupts import install_sigterm, restore_sigterm
from pipeline.progress import Progress

__all__ = ["augment_loop", "extract_loop"]

log = logging.getLogger(__name__)


class _BackgroundWriter:
    """Commits batches to the cache in a thread, so HDF5 writes overlap the next forward pass."""

    def __init__(self, writer: CacheWriter) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is None:
                method, args, kwargs = item
                try:
                    getattr(self._writer, method)(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def put(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queue ``writer.<method>(...)`` (one committed batch); re-raise an earlier failure."""
        if self.error is not None:
            raise self.error
        self._queue.put((method, args, kwargs))

    def close(self) -> None:
        """Commit everything queued, then stop."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


@contextmanager
def _committing(writer: CacheWriter) -> Iterator[_BackgroundWriter]:
    """A writer thread for the body; Ctrl-C / SIGTERM stop after committing what is queued."""
    background = _BackgroundWriter(writer)
    previous = install_sigterm()
    try:
        try:
            yield background
        finally:
            restore_sigterm(previous)
            background.close()
    except ExtractInterrupted:
        raise
    except KeyboardInterrupt as exc:
        raise stopped(exc, f"{writer.n_rows} rows and {writer.n_augmented} augmented copies "
                           f"committed in {writer.partial}. Run the same command again to "
                           "resume.") from None


def _decode_ahead(
    config: ExtractConfig, index: ImageIndex, feature_model: FeatureModel, paths: list[str],
    preprocess: str = "none",
) -> tuple[list[int], Generator[DecodedBatch, None, None]]:
    """(list positions, decoded batches) of ``paths``: each batch one forward pass, its
    pixels preprocessed by the decoders with ``preprocess``."""
    positions = index.positions(paths)
    return positions, decoded_batches(
        [index.root / path for path in paths],
        size=feature_model.input_size,
        interpolation=config.interpolation,
        jpeg_downscale=config.jpeg_downscale,
        batch_size=config.batch_size,
        workers=config.workers,
        decode=config.decode,
        positions=positions,
        preprocess=preprocess,
    )


def extract_loop(
    config: ExtractConfig,
    index: ImageIndex,
    feature_model: FeatureModel,
    writer: CacheWriter,
    todo: list[ImageRecord],
    stats: dict[str, tuple[int, int]],
) -> list[tuple[str, str]]:
    """Decode ahead in parallel, forward full batches, commit from a writer thread.

    Returns:
        The files skipped by this run, with their reasons.
    """
    new_skipped: list[tuple[str, str]] = []
    # The decoders preprocess, so this thread hands each batch to the forward pass as it
    # is: no pass over the pixels here (docs/performance.md, "Preprocessing in the decoders").
    positions, batches = _decode_ahead(config, index, feature_model, [r.path for r in todo],
                                       preprocess=feature_model.preprocess)
    progress = Progress(len(todo), "extract", log_every=config.log_every)
    with _committing(writer) as background:
        try:
            for batch in batches:
                records = [todo[i] for i in batch.indices]
                skipped = [(todo[i].path, reason) for i, reason in batch.skipped]
                first, *extra = [stored_features(x, config.dtype) for x in
                                 feature_model.all_features(
                                     batch.images, [positions[i] for i in batch.indices],
                                     preprocessed=True)]
                background.put(
                    "append",
                    first,
                    [r.label for r in records],
                    [r.path for r in records],
                    [r.split for r in records],
                    [(p, reason, *stats[p]) for p, reason in skipped],
                    extra=extra,
                    sha256=batch.digests,
                    size=[stats[r.path][0] for r in records],
                    mtime_ns=[stats[r.path][1] for r in records],
                )
                new_skipped.extend(skipped)
                progress.update(len(records) + len(skipped))
        finally:
            batches.close()
            progress.close()
    return new_skipped


def augment_loop(
    config: ExtractConfig,
    index: ImageIndex,
    feature_model: FeatureModel,
    writer: CacheWriter,
    passes: int,
) -> None:
    """Store the missing augmented passes 0..K-1 of every training row.

    Each batch of rows is decoded once and run through every pass it lacks; pass ``k`` of
    a batch is transformed with ``batch_seed(seed, k, first position)``, so a re-run, a
    resume, a shard or a later K (2 -> 5) produces exactly the copies a single run would
    have.
    """
    spec = config.augment_spec()
    recorded = writer.attrs.get("augment")
    if writer.n_augmented and recorded not in (None, "", spec.to_dict()):
        raise CacheError(
            f"{writer.final} holds augmented copies made with {recorded}; this run would use "
            f"{spec.to_dict()}. Use another --out."
        )
    paths, splits = writer.rows()
    pairs = writer.augmented_pairs()
    k_all = range(passes)
    # Training rows: the "train" split, or every row when the folder records no split
    # (fit_head then only uses copies of the rows it trains on).
    todo = [
        row for row, split in enumerate(splits)
        if split in ("train", "") and any((row, k) not in pairs for k in k_all)
    ]
    writer.set_attrs(augment=spec.to_dict(), augment_passes=passes)
    if not todo:
        return
    log.info("extract: augmenting %d training images, passes 0..%d", len(todo), passes - 1)
    # Batches and seeds follow each row's position in the folder's list, not its cache
    # row, so a shard (whose rows start at 0) augments as the single process does.
    positions, batches = _decode_ahead(config, index, feature_model,
                                       [paths[row] for row in todo])
    progress = Progress(len(todo), "augment", log_every=config.log_every)
    with _committing(writer) as background:
        try:
            for batch in batches:
                if batch.skipped:
                    i, reason = batch.skipped[0]
                    raise CacheError(
                        f"{paths[todo[i]]} was readable when extracted but not now ({reason}): "
                        "the data folder changed. Re-extract to a new --out."
                    )
                rows = [todo[i] for i in batch.indices]
                per_layer: list[list[np.ndarray]] = [[] for _ in feature_model.feature_shapes]
                sources, passes = [], []
                for k in k_all:
                    chosen = [j for j, row in enumerate(rows) if (row, k) not in pairs]
                    if not chosen:
                        continue
                    where = [positions[batch.indices[j]] for j in chosen]
                    images = augment_batch(batch.images[chosen], spec,
                                           batch_seed(config.seed, k, where[0]))
                    for out, x in zip(per_layer, feature_model.all_features(images, where),
                                      strict=True):
                        out.append(stored_features(x, config.dtype))
                    sources.extend(rows[j] for j in chosen)
                    passes.extend([k] * len(chosen))
                first, *extra = [np.concatenate(parts) for parts in per_layer]
                background.put("append_augmented", first, sources, passes, extra=extra)
                progress.update(len(rows))
        finally:
            batches.close()
            progress.close()
