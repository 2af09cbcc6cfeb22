"""Many images decoded ahead in parallel, yielded as ordered batches.

Every file lands in exactly one batch, in list order, readable or skipped with its reason;
each batch is one forward pass of :meth:`pipeline.bases.FeatureModel.all_features`. Used
by extraction and by predict.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np

from pipeline.images.decode import ImageReadError, read_image, read_images_into

__all__ = ["DECODERS", "DecodedBatch", "check_decode", "decoded_batches"]


DECODERS = ("auto", "threads", "processes")


@dataclass
class DecodedBatch:
    """Up to ``batch_size`` readable images and the unreadable files met on the way.

    ``indices`` and ``skipped`` index the ``paths`` given to :func:`decoded_batches`.
    """

    indices: list[int]
    images: np.ndarray  # (n, H, W, 3) float32 RGB in 0..255, not yet preprocessed
    skipped: list[tuple[int, str]]
    digests: list[str] = field(default_factory=list)  # sha256 of each file's bytes


def check_decode(decode: str) -> str:
    """Validate ``--decode``.

    Raises:
        ValueError: not one of ``DECODERS``.
    """
    if decode not in DECODERS:
        raise ValueError(f"`decode` must be one of {DECODERS}. Received: decode={decode!r}")
    return decode


def decoded_batches(
    paths: Sequence[Path],
    *,
    size: tuple[int, int],
    interpolation: str = "bilinear",
    batch_size: int = 32,
    workers: int = 0,
    decode: str = "auto",
    positions: Sequence[int] | None = None,
) -> Iterator[DecodedBatch]:
    """Decode and resize ``paths`` in parallel, ahead of use, and yield them in order.

    Every file lands in exactly one batch, in input order, readable or skipped. A batch
    holds the files of one batch of positions (``positions[i] // batch_size``; default
    positions ``0..n-1``, so batches of ``batch_size`` files): the batches of a run that
    starts part-way (a resume, a shard) are those of a whole run, and each matches one
    forward pass of :meth:`FeatureModel.all_features`. ``positions`` must increase.

    ``decode``: ``threads`` (libjpeg-turbo, NumPy and TF's decoder release the GIL for
    most of an image), ``processes`` (spawned workers, each decoding a run of files of one
    batch into shared memory per task: no GIL at all, and the parent's work per image is
    one copy), or ``auto``: processes on 4 or more cores, threads on fewer (there the
    parent's forward pass needs a core of its own; docs/performance.md). Pixels are the
    same either way: workers run :func:`read_image` in the same environment.
    """
    check_decode(decode)
    cores = os.cpu_count() or 1
    processes = decode == "processes" or (decode == "auto" and cores >= 4)
    # One core is left to the parent, whose forward pass needs it: on 2 cores a second
    # decode thread made extraction 6 % slower (docs/performance.md). Threads stop gaining
    # at about 8 (the GIL between the decoders' calls).
    workers = workers or (max(1, cores - 1) if processes else min(8, max(1, cores - 1)))
    group = (np.arange(len(paths)) if positions is None
             else np.asarray(positions, np.int64)) // batch_size
    if processes:
        results = _decoded_in_processes(paths, group, size=size, interpolation=interpolation,
                                        batch_size=batch_size, workers=workers)
    else:
        results = _decoded_in_threads(paths, size=size, interpolation=interpolation,
                                      window=2 * batch_size + workers, workers=workers)
    yield from _batched(results, group, size=size, batch_size=batch_size)


# What a decoder yields per file, in input order: (index, pixels, sha256) when read,
# (index, None, reason) when skipped. The pixels may be a view into a buffer that is
# reused once the next file is asked for: the batch assembler copies them at once.
_Decoded = tuple[int, np.ndarray | None, str]


def _batched(results: Iterator[_Decoded], group: np.ndarray, *, size: tuple[int, int],
             batch_size: int) -> Iterator[DecodedBatch]:
    """Assemble decoded files into the batches of ``group``, one copy per image."""
    def new_buffer() -> np.ndarray:
        # A fresh buffer per batch: the consumer preprocesses the previous one in place.
        return np.empty((batch_size, *size, 3), np.float32)

    n = len(group)
    indices: list[int] = []
    images = new_buffer()
    digests: list[str] = []
    skipped: list[tuple[int, str]] = []
    for i, pixels, text in results:
        if pixels is None:
            skipped.append((i, text))
        else:
            images[len(indices)] = pixels
            digests.append(text)
            indices.append(i)
        if i + 1 == n or group[i + 1] != group[i]:
            yield DecodedBatch(indices, images[: len(indices)], skipped, digests)
            indices, images, skipped, digests = [], new_buffer(), [], []


def _decoded_in_threads(paths: Sequence[Path], *, size: tuple[int, int], interpolation: str,
                        window: int, workers: int) -> Iterator[_Decoded]:
    """One future per file in a thread pool, ``window`` files ahead."""
    pending: deque[tuple[int, Future]] = deque()
    upcoming = iter(range(len(paths)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    def submit(i: int) -> None:
        pending.append((i, pool.submit(read_image, paths[i], size, interpolation)))

    try:
        for i in upcoming:
            submit(i)
            if len(pending) >= window:
                break
        while pending:
            i, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                submit(following)
            try:
                pixels, digest = future.result()
            except ImageReadError as exc:
                yield i, None, str(exc)
            else:
                yield i, pixels, digest
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(group: np.ndarray, size: int) -> list[range]:
    """Runs of at most ``size`` consecutive files, never across two batches."""
    chunks: list[range] = []
    start = 0
    for end in [*np.flatnonzero(np.diff(group)) + 1, len(group)]:
        chunks.extend(range(s, min(s + size, end)) for s in range(start, end, size))
        start = end
    return chunks


def _decoded_in_processes(paths: Sequence[Path], group: np.ndarray, *, size: tuple[int, int],
                          interpolation: str, batch_size: int,
                          workers: int) -> Iterator[_Decoded]:
    """One task per run of files of one batch, in spawned processes, into shared memory.

    Each worker gets a run of about ``batch_size / workers`` files (so a batch is spread
    over all workers, and the parent handles one future per run, not per file) and two
    runs in flight per worker. Run j writes into slot block ``j % depth``; at most
    ``depth - 1`` runs are in flight, so a block is only rewritten after the parent has
    copied it.
    """
    chunk = max(1, min(64, -(-batch_size // workers)))
    runs = _chunks(group, chunk)
    depth = 2 * workers + 1
    shm = shared_memory.SharedMemory(create=True, size=depth * chunk * size[0] * size[1] * 12)
    slots = np.ndarray((depth, chunk, *size, 3), np.float32, shm.buf)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    pending: deque[tuple[int, Future]] = deque()
    upcoming = iter(range(len(runs)))

    def submit(j: int) -> None:
        files = [str(paths[i]) for i in runs[j]]
        pending.append((j, pool.submit(read_images_into, shm.name, (j % depth) * chunk, files,
                                       size, interpolation)))

    try:
        for j in upcoming:
            submit(j)
            if len(pending) >= depth - 1:
                break
        while pending:
            j, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "A decode worker process died: killed, out of memory, or it could not "
                    "start. Workers are spawned and import the main module, so a script "
                    "that decodes in processes must do so under `if __name__ == "
                    "'__main__':`. Or decode in threads (decode='threads', extract.py "
                    "--decode threads)."
                ) from exc
            block = slots[j % depth]
            for k, (i, (digest, reason)) in enumerate(zip(runs[j], results, strict=True)):
                yield (i, None, reason) if digest is None else (i, block[k], digest)
            # Only now, once this block is copied, may a new run be written into it.
            following = next(upcoming, None)
            if following is not None:
                submit(following)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        del slots  # the view must go before the block can close
        shm.close()
        shm.unlink()
