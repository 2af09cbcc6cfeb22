"""Many images decoded ahead in parallel, yielded as ordered batches.

Every file lands in exactly one batch, in list order, readable or skipped with its reason;
each batch is one forward pass of :meth:`pipeline.bases.FeatureModel.all_features`. Used
by extraction and by predict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np

from pipeline.images.decode import read_image_into, read_images_into
from pipeline.images.kernels import PREPROCESS_MODES
from pipeline.util.arrays import aligned_empty

__all__ = ["DECODERS", "DecodedBatch", "check_decode", "decoded_batches"]

log = logging.getLogger(__name__)


DECODERS = ("auto", "threads", "processes")


@dataclass
class DecodedBatch:
    """Up to ``batch_size`` readable images and the unreadable files met on the way.

    ``indices`` and ``skipped`` index the ``paths`` given to :func:`decoded_batches`.
    ``images`` lives in a ring of batch buffers that the decoders fill ahead, so it is
    valid, and may be changed in place, until the next batch is asked for; copy it to keep
    it longer.
    """

    indices: list[int]
    images: np.ndarray  # (n, H, W, 3) float32 RGB in 0..255, then preprocessed as below
    skipped: list[tuple[int, str]]
    digests: list[str] = field(default_factory=list)  # sha256 of each file's bytes
    preprocess: str = "none"  # the mode the decoders applied to ``images``


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
    jpeg_downscale: str = "off",
    preprocess: str = "none",
) -> Iterator[DecodedBatch]:
    """Decode and resize ``paths`` in parallel, ahead of use, and yield them in order.

    Every file lands in exactly one batch, in input order, readable or skipped. A batch
    holds the files of one batch of positions (``positions[i] // batch_size``; default
    positions ``0..n-1``, so batches of ``batch_size`` files): the batches of a run that
    starts part-way (a resume, a shard) are those of a whole run, and each matches one
    forward pass of :meth:`FeatureModel.all_features`. ``positions`` must increase.

    Each file is resized straight into its batch's slot of a ring of batch buffers (no
    copy in the parent); the two batches after the one handed out are being decoded.

    ``decode``: ``threads`` (libjpeg-turbo, NumPy and TF's decoder release the GIL for
    most of an image), ``processes`` (spawned workers, each decoding a run of files of one
    batch per task into a ring in shared memory: no GIL at all, and the parent's work per
    image is bookkeeping), or ``auto``: processes on 4 or more cores, threads on fewer
    (there the parent's forward pass needs a core of its own; docs/performance.md).
    Pixels are the same either way: workers run :func:`read_image` in the same environment.
    ``jpeg_downscale``: as :func:`pipeline.images.read_image` (``"dct"``: large JPEGs
    reduced in the DCT domain first; not Keras' pixels).
    ``preprocess``: a mode of :func:`~pipeline.images.kernels.preprocess_pixels` that each
    decoder applies to its image in its slot (``FeatureModel.all_features(...,
    preprocessed=True)`` then hands the batch to the forward pass as it is); ``none``
    yields pixels in 0..255.

    Raises:
        ValueError: ``decode="processes"`` and the ring does not fit in the free shared
            memory (/dev/shm); ``auto`` decodes in threads instead, with a warning.
    """
    check_decode(decode)
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"`preprocess` must be one of {PREPROCESS_MODES}. "
                         f"Received: preprocess={preprocess!r}")
    cores = os.cpu_count() or 1
    processes = decode == "processes" or (decode == "auto" and cores >= 4)
    # One core is left to the parent, whose forward pass needs it: on 2 cores a second
    # decode thread made extraction 6 % slower (docs/performance.md). Threads stop gaining
    # at about 8 (the GIL between the decoders' calls).
    threads = workers or min(8, max(1, cores - 1))
    group = (np.arange(len(paths)) if positions is None
             else np.asarray(positions, np.int64)) // batch_size
    batches = _Batches.of(group)
    if processes:
        workers = workers or max(1, cores - 1)
        ring = _SharedRing.fitting(batches, size=size, workers=workers,
                                   fallback=decode == "auto")
        if ring is not None:
            yield from _decoded_in_processes(paths, batches, ring, size=size,
                                             interpolation=interpolation, workers=workers,
                                             jpeg_downscale=jpeg_downscale,
                                             preprocess=preprocess)
            return
    # Threads, chosen or fallen back to: an explicit worker count holds for them too.
    yield from _decoded_in_threads(paths, batches, size=size, interpolation=interpolation,
                                   workers=threads, jpeg_downscale=jpeg_downscale,
                                   preprocess=preprocess)


@dataclass(frozen=True)
class _Batches:
    """The batches of a run: batch ``b`` holds files ``starts[b]:starts[b + 1]``, and file
    ``i`` of it has slot ``i - starts[b]`` of its buffer."""

    starts: list[int]

    @classmethod
    def of(cls, group: np.ndarray) -> _Batches:
        """The batches of consecutive equal ``group`` values."""
        if not len(group):
            return cls([0])
        return cls([0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(group)])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def files(self, b: int) -> range:
        """The files of batch ``b``."""
        return range(self.starts[b], self.starts[b + 1])

    @property
    def largest(self) -> int:
        """The most files in one batch (a buffer's slots)."""
        return int(max(np.diff(self.starts), default=1))


# A decoder's result per file: (sha256, None) when read into its slot, (None, reason) when
# skipped.
_Result = tuple[str | None, str | None]


def _ring(batches: _Batches, depth: int, start: Callable[[int], None],
          finish: Callable[[int], DecodedBatch]) -> Iterator[DecodedBatch]:
    """Batches in order, batch ``b`` decoded into buffer ``b % depth``.

    ``start(b)`` sets batch ``b`` decoding; ``finish(b)`` waits for it. Batch ``b + depth``
    starts only once the consumer asks for the batch after ``b``: a buffer is refilled only
    after its batch has been handed out and left behind.
    """
    for b in range(min(depth, len(batches))):
        start(b)
    for b in range(len(batches)):
        yield finish(b)
        if b + depth < len(batches):
            start(b + depth)


def _assembled(buffer: np.ndarray, files: range, results: Sequence[_Result],
               preprocess: str) -> DecodedBatch:
    """The batch of ``files`` whose pixels are in ``buffer``'s slots 0.., readable rows
    moved up over the skipped ones (so its images are one contiguous block)."""
    indices: list[int] = []
    digests: list[str] = []
    skipped: list[tuple[int, str]] = []
    for slot, (i, (digest, reason)) in enumerate(zip(files, results, strict=True)):
        if digest is None:
            skipped.append((i, str(reason)))
            continue
        if slot != len(indices):
            buffer[len(indices)] = buffer[slot]
        indices.append(i)
        digests.append(digest)
    return DecodedBatch(indices, buffer[: len(indices)], skipped, digests, preprocess)


_DEPTH = 3  # batch buffers: the one handed out and two being decoded


def _decoded_in_threads(paths: Sequence[Path], batches: _Batches, *, size: tuple[int, int],
                        interpolation: str, workers: int, jpeg_downscale: str,
                        preprocess: str) -> Iterator[DecodedBatch]:
    """One future per file in a thread pool, each resizing into its batch slot."""
    # Aligned: a whole batch can go to TensorFlow without a copy (FeatureModel).
    ring = aligned_empty((_DEPTH, batches.largest, *size, 3))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: dict[int, list[Future]] = {}

    def start(b: int) -> None:
        buffer = ring[b % _DEPTH]
        pending[b] = [pool.submit(read_image_into, paths[i], size, interpolation, buffer[k],
                                  jpeg_downscale, preprocess)
                      for k, i in enumerate(batches.files(b))]

    def finish(b: int) -> DecodedBatch:
        return _assembled(ring[b % _DEPTH], batches.files(b),
                          [future.result() for future in pending.pop(b)], preprocess)

    try:
        yield from _ring(batches, _DEPTH, start, finish)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _SharedRing:
    """Batch buffers in shared memory, the layout of the processes' ring.

    The arrays handed out keep this object alive (it is their base), so the mapping is
    closed only when the last batch a consumer still holds is gone; the name is unlinked
    as soon as decoding ends.
    """

    def __init__(self, depth: int, slots: int, size: tuple[int, int]) -> None:
        self.depth, self.slots = depth, slots
        shape = (depth, slots, *size, 3)
        self.shm = shared_memory.SharedMemory(create=True,
                                              size=int(np.prod(shape)) * 4)
        self._view: np.ndarray | None = np.ndarray(shape, np.float32, self.shm.buf)
        self.__array_interface__ = self._view.__array_interface__

    @classmethod
    def fitting(cls, batches: _Batches, *, size: tuple[int, int], workers: int,
                fallback: bool) -> _SharedRing | None:
        """A ring deep enough to keep ``workers`` busy; None (threads then) when it does
        not fit in the free shared memory and ``fallback`` is allowed.

        Raises:
            ValueError: it does not fit and ``fallback`` is False.
        """
        slots = batches.largest
        runs = -(-slots // _run_length(slots, workers))
        # Two runs in flight per worker, in the batches after the one handed out.
        depth = max(_DEPTH, 1 + -(-2 * workers // runs))
        need = depth * slots * size[0] * size[1] * 3 * 4
        free = _free_shared_memory()
        if free is None or need <= free:
            return cls(depth, slots, size)
        message = (
            f"Decoding in processes needs {need / 2**20:.0f} MiB of shared memory "
            f"({depth} buffers of {slots} images of {size[0]}x{size[1]} px) and /dev/shm "
            f"has {free / 2**20:.0f} MiB free. In Docker, start the container with "
            f"--shm-size={-(-need * 2 // 2**30)}g; or lower --batch-size, or decode in "
            "threads (--decode threads)."
        )
        if not fallback:
            raise ValueError(f"{message} Received: decode='processes'")
        log.warning("%s Decoding in threads.", message)
        return None

    def buffer(self, b: int) -> np.ndarray:
        """Batch ``b``'s buffer, (slots, H, W, 3)."""
        return np.asarray(self)[b % self.depth]

    def offset(self, b: int) -> int:
        """Batch ``b``'s first slot in the whole ring."""
        return (b % self.depth) * self.slots

    def release(self) -> None:
        """Unlink the name now; the memory goes when the last batch handed out does."""
        self.shm.unlink()

    def __del__(self) -> None:
        self._view = None  # the export must go before the mapping can close
        if hasattr(self, "shm"):
            self.shm.close()


def _run_length(slots: int, workers: int) -> int:
    """Files per worker task: a batch spread over all workers, at most 64."""
    return max(1, min(64, -(-slots // workers)))


def _free_shared_memory() -> int | None:
    """Free bytes in /dev/shm, where Linux keeps shared memory (None elsewhere)."""
    try:
        stat = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def _decoded_in_processes(paths: Sequence[Path], batches: _Batches, ring: _SharedRing, *,
                          size: tuple[int, int], interpolation: str, workers: int,
                          jpeg_downscale: str, preprocess: str) -> Iterator[DecodedBatch]:
    """One task per run of files of one batch, in spawned processes, into the shared ring.

    Each worker gets a run of about ``batch_size / workers`` files (so a batch is spread
    over all workers, and the parent handles one future per run, not per file) and writes
    each file's pixels into its slot of the batch's buffer.
    """
    length = _run_length(ring.slots, workers)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    pending: dict[int, list[Future]] = {}

    def start(b: int) -> None:
        files = batches.files(b)
        pending[b] = [
            pool.submit(read_images_into, ring.shm.name, ring.offset(b) + first - files.start,
                        [str(paths[i]) for i in range(first, min(first + length, files.stop))],
                        size, interpolation, jpeg_downscale, preprocess)
            for first in range(files.start, files.stop, length)
        ]

    def finish(b: int) -> DecodedBatch:
        try:
            results = [result for future in pending.pop(b) for result in future.result()]
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "A decode worker process died: killed, out of memory, or it could not "
                "start. Workers are spawned and import the main module, so a script "
                "that decodes in processes must do so under `if __name__ == "
                "'__main__':`. Or decode in threads (decode='threads', extract.py "
                "--decode threads)."
            ) from exc
        return _assembled(ring.buffer(b), batches.files(b), results, preprocess)

    try:
        yield from _ring(batches, ring.depth, start, finish)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        ring.release()
