"""Many images decoded ahead in parallel, yielded as ordered batches.

Every file lands in exactly one batch, in list order, readable or skipped with its reason;
each batch is one forward pass of :meth:`pipeline.bases.FeatureModel.all_features`. Used
by extraction and by predict.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np

from pipeline.images.decode import ImageReadError, has_tensorflow, read_image, read_image_into

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

    ``decode``: ``threads`` (TF's decoder releases the GIL inside its graph),
    ``processes`` (spawned workers writing into shared memory: without TF, Pillow and
    NumPy hold the GIL too long for threads to scale, 2.3x on 8 threads of a 16-core GPU
    box), or ``auto``: processes without TensorFlow on 4 or more cores, else threads (on
    2 cores the parent's share of the work makes processes 10 % slower). Pixels are the
    same either way: workers run :func:`read_image` in the same environment.
    """
    check_decode(decode)
    cores = os.cpu_count() or 1
    processes = decode == "processes" or (
        decode == "auto" and cores >= 4 and not has_tensorflow())
    workers = workers or (max(1, cores - 1) if processes else min(8, cores))
    window = 2 * batch_size + workers
    pending: deque[tuple[int, Future]] = deque()
    upcoming = iter(range(len(paths)))
    if processes:
        # One slot per image in flight (+1: a slot is read after the next is submitted).
        shm = shared_memory.SharedMemory(create=True, size=(window + 1) * size[0] * size[1] * 12)
        slots = np.ndarray((window + 1, *size, 3), np.float32, shm.buf)
        pool: Executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))

        def submit(i: int) -> None:
            pending.append((i, pool.submit(read_image_into, shm.name, i % (window + 1),
                                           str(paths[i]), size, interpolation)))

        def result(i: int, future: Future) -> tuple[np.ndarray, str]:
            try:
                return slots[i % (window + 1)], future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "A decode worker process died: killed, out of memory, or it could not "
                    "start. Workers are spawned and import the main module, so a script "
                    "that decodes in processes must do so under `if __name__ == "
                    "'__main__':`. Or decode in threads (decode='threads', extract.py "
                    "--decode threads)."
                ) from exc
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

        def submit(i: int) -> None:
            pending.append((i, pool.submit(read_image, paths[i], size, interpolation)))

        def result(i: int, future: Future) -> tuple[np.ndarray, str]:
            return future.result()

    def new_buffer() -> np.ndarray:
        # Each decoded image is copied once, into its batch (no list + np.stack); a fresh
        # buffer per batch because the consumer preprocesses the previous one in place.
        return np.empty((batch_size, *size, 3), np.float32)

    group = (np.arange(len(paths)) if positions is None
             else np.asarray(positions, np.int64)) // batch_size
    indices: list[int] = []
    images = new_buffer()
    digests: list[str] = []
    skipped: list[tuple[int, str]] = []
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
                image, digest = result(i, future)
            except ImageReadError as exc:
                skipped.append((i, str(exc)))
            else:
                images[len(indices)] = image
                digests.append(digest)
                indices.append(i)
            if i + 1 == len(paths) or group[i + 1] != group[i]:
                yield DecodedBatch(indices, images[: len(indices)], skipped, digests)
                indices, images, skipped, digests = [], new_buffer(), [], []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if processes:
            del slots  # the view must go before the block can close
            shm.close()
            shm.unlink()
