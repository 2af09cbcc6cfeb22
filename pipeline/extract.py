"""Images -> frozen base -> HDF5 cache, with decode, forward pass and writes overlapped."""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context, shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.augment import AugmentSpec, augment_batch, batch_seed
from pipeline.bases import (
    FeatureModel,
    build_feature_model,
    check_pooling,
    check_preprocess,
    file_sha256,
    resolve_base,
)
from pipeline.cache import (
    CacheError,
    CacheWriteError,
    CacheWriter,
    identity_differences,
    partial_path,
    read_attrs,
    read_row_state,
)
from pipeline.images import (
    ImageIndex,
    ImageReadError,
    ImageRecord,
    check_interpolation,
    has_tensorflow,
    index_images,
    parse_size,
    read_image,
    read_image_into,
)
from pipeline.interrupts import Interrupted, deferred, install_sigterm, restore_sigterm
from pipeline.lock import CacheLock
from pipeline.progress import Progress, format_duration

__all__ = [
    "DecodedBatch",
    "ExtractConfig",
    "ExtractInterrupted",
    "ExtractResult",
    "build_model",
    "check_decode",
    "decoded_batches",
    "parse_shard",
    "run_extract",
    "shard_slice",
    "stopped",
    "stored_features",
]

DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
ENGINES = ("local", "ray")
DECODERS = ("auto", "threads", "processes")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class ExtractConfig:
    """Everything ``extract.py`` was asked; saved in the cache's ``config`` attribute."""

    data_dir: str
    base: str
    weights: str | None = None
    input_size: str | None = None
    layer: str | None = None
    pooling: str = "avg"
    preprocess: str | None = None
    interpolation: str = "bilinear"
    batch_size: int = 32
    dtype: str = "float32"
    out: str | None = None
    seed: int = 0
    workers: int = 0  # decode workers; with engine="ray", model actors (0: auto)
    decode: str = "auto"  # threads | processes | auto (threads with TF, processes without)
    log_every: float = 30.0
    compression: str = "none"
    shard: str | None = None  # "i/N": this process extracts the i-th of N contiguous slices
    mixed_precision: bool = False
    jit: str = "auto"
    augment: int = 0
    augment_flip: str = "horizontal"
    augment_rotation: float = 0.05
    augment_zoom: float = 0.1
    augment_translation: float = 0.1
    engine: str = "local"  # "ray": the forward pass runs on a Ray cluster (pipeline/scale.py)
    address: str | None = None  # Ray cluster: "auto", "ray://host:10001"; None starts one
    gpus_per_worker: float = 0.0  # GPUs per Ray model actor (0: CPU)

    def augment_spec(self) -> AugmentSpec:
        """The augmentation of ``--augment`` passes (validated)."""
        return AugmentSpec(self.augment_flip, self.augment_rotation, self.augment_zoom,
                           self.augment_translation)


@dataclass
class ExtractResult:
    """What one extraction run did."""

    path: Path
    status: str  # "extracted" or "up-to-date"
    n_rows: int
    n_new_rows: int
    n_skipped: int
    new_skipped: list[tuple[str, str]] = field(default_factory=list)
    feature_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    seconds: float = 0.0
    changes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """The one-line summary printed last."""
        if self.status == "up-to-date":
            return (
                f"extract: up to date, nothing to do: {self.path} already holds all "
                f"{self.n_rows} images ({self.n_skipped} skipped)."
            )
        size_mb = self.path.stat().st_size / 1e6
        rate = self.n_new_rows / self.seconds if self.seconds > 0 else 0.0
        return (
            f"extract: done. {self.n_new_rows} new images in {format_duration(self.seconds)} "
            f"({rate:.1f} img/s); cache {self.path}: {self.n_rows} rows, features "
            f"{self.feature_shape} {self.dtype}, {size_mb:.1f} MB, {self.n_skipped} skipped"
            + "".join(f", {v} {k.replace('_', ' ')}" for k, v in self.changes.items() if v)
            + "."
        )


class ExtractInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: what was committed is safe and the run can be resumed.

    The message says what was kept and how to go on; ``exit_code`` is 130 or 143.
    """


def stopped(exc: KeyboardInterrupt, kept: str) -> ExtractInterrupted:
    """The :class:`ExtractInterrupted` for ``exc``: ``extract: interrupted by <signal>; <kept>``."""
    kind = exc if isinstance(exc, Interrupted) else Interrupted()
    return ExtractInterrupted(f"extract: interrupted by {kind.signal_name}; {kept}",
                              kind.exit_code)


def _validate(config: ExtractConfig) -> tuple[int, int] | None:
    """Check every argument before anything heavy happens; return the parsed input size."""
    check_pooling(config.pooling)
    if config.preprocess is not None:
        check_preprocess(config.preprocess)
    check_interpolation(config.interpolation)
    if config.dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}. Received: dtype={config.dtype!r}")
    if config.batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={config.batch_size}")
    if config.workers < 0:
        raise ValueError(f"`workers` must be >= 0 (0: auto). Received: workers={config.workers}")
    if config.compression not in COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {COMPRESSIONS}. "
                         f"Received: compression={config.compression!r}")
    if config.augment < 0:
        raise ValueError(f"`augment` must be >= 0. Received: augment={config.augment}")
    config.augment_spec()
    parse_shard(config.shard)
    if config.log_every <= 0:
        raise ValueError(f"`log_every` must be > 0. Received: log_every={config.log_every}")
    check_decode(config.decode)
    if config.engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}. Received: engine={config.engine!r}")
    if config.engine == "ray":
        from pipeline.scale import check_ray_config

        check_ray_config(config)
    elif config.address is not None or config.gpus_per_worker:
        raise ValueError(
            "`address` and `gpus_per_worker` apply to engine='ray'. Received: engine='local', "
            f"address={config.address!r}, gpus_per_worker={config.gpus_per_worker}"
        )
    return parse_size(config.input_size)


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard i/N`` -> (i, N) with 0 <= i < N.

    Raises:
        ValueError: not of that form.
    """
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(
            f"`shard` must be i/N with 0 <= i < N (e.g. 0/4). Received: shard={value!r}"
        )
    return i, n


def shard_slice(n_records: int, shard: tuple[int, int], batch_size: int = 1) -> slice:
    """Contiguous slice i of N: parts concatenated in order give the single-process order.

    Slices split the list between forward batches (multiples of ``batch_size``), so each
    image is computed in the batch a single process would put it in: merged shards equal
    the single-process cache byte for byte.
    """
    i, n = shard
    batches = -(-n_records // batch_size)
    return slice(min(n_records, i * batches // n * batch_size),
                 min(n_records, (i + 1) * batches // n * batch_size))


def default_out(config: ExtractConfig, input_size: tuple[int, int]) -> Path:
    """``cache/<data>-<base>-<HxW>-<layer|top>[-random]-<pooling>.h5``: one file per setup.

    Built from the arguments alone (no model needed), so an up-to-date check can find the
    cache before paying for building the base.
    """
    base = Path(config.base).stem if _is_file_base(config.base) else config.base
    h, w = input_size
    layer = (config.layer or "top").replace(",", "+")
    parts = [Path(config.data_dir).resolve().name, base.lower(), f"{h}x{w}", layer]
    if config.weights == "none":
        parts.append("random")
    parts.append(config.pooling)
    name = "-".join(parts)
    if config.shard:
        i, n = parse_shard(config.shard)
        name += f".part-{i}-of-{n}"
    return Path("cache") / (name + ".h5")


def _is_file_base(base: str) -> bool:
    return base.endswith((".keras", ".h5")) or Path(base).is_file()


# ExtractConfig fields that decide what the features are: a complete cache made with the
# same values (and unchanged files) is up to date without building the model.
_FEATURE_FIELDS = (
    "base", "weights", "input_size", "layer", "pooling", "preprocess", "interpolation",
    "dtype", "seed", "mixed_precision", "augment_flip", "augment_rotation", "augment_zoom",
    "augment_translation",
)


def _up_to_date(
    config: ExtractConfig, index: ImageIndex, out: Path, stats: dict[str, tuple[int, int]]
) -> ExtractResult | None:
    """The result of a run with nothing to do, decided from the cache's records alone."""
    if not out.exists() or partial_path(out).exists():
        return None
    old = read_attrs(out)
    recorded = old.get("config") or {}
    same = (
        old.get("complete")
        and all(recorded.get(k) == getattr(config, k) for k in _FEATURE_FIELDS)
        and old.get("class_names") == index.class_names
        and int(old.get("augment_passes", 0)) >= config.augment
    )
    if not same:
        return None
    # Same arguments, but a file behind them may have changed.
    if old.get("base_sha256") and file_sha256(config.base) != old["base_sha256"]:
        return None
    if str(old.get("weights")).startswith("sha256:") and (
        f"sha256:{file_sha256(config.weights)}" != old["weights"]
    ):
        return None
    state = read_row_state(out)
    known = dict(zip(state.paths, zip(state.size.tolist(), state.mtime_ns.tolist(),
                                      strict=True), strict=True))
    known.update(zip(state.skipped_paths, zip(state.skipped_size.tolist(),
                                              state.skipped_mtime_ns.tolist(), strict=True),
                     strict=True))
    if known != stats:  # a file added, deleted, or touched since: look closer
        return None
    return ExtractResult(out, "up-to-date", int(old["n_rows"]), 0, int(old["n_skipped"]),
                         dtype=config.dtype)


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


def _open_writer(
    out: Path, attrs: dict[str, Any], feature_shapes: list[tuple[int, ...]], dtype: str,
    compression: str,
) -> tuple[CacheWriter, str]:
    """Resume ``<out>.partial``, reopen a complete ``out`` for appending, or start anew.

    HDF5 is not crash-safe: a kill during a write can leave its metadata (free-space
    lists, the heap of variable-length strings) damaged past the last commit. So a
    partial cache is never appended to in place: its committed rows are read back (every
    chunk checked by its Fletcher-32 checksum) into a fresh file, and a partial that
    cannot be read back is set aside and extraction starts over.
    """
    partial = partial_path(out)
    for existing in (partial, out):
        if not existing.exists():
            continue
        try:
            old = read_attrs(existing)
        except CacheError:
            if existing == out:
                raise
            _set_aside(existing, "is unreadable")
            continue
        diffs = identity_differences(old, attrs)
        if diffs:
            raise CacheError(
                f"{existing} was made with another configuration; it is never appended to. "
                "Differences:\n" + "\n".join(diffs) + "\nUse another --out, or delete the "
                "file to re-extract."
            )
        if existing == out:  # appended to as a copy: out stays intact until the rename
            return CacheWriter.copy_of(out), "resume"
        try:
            writer = CacheWriter.resume(out)
            return writer.rewrite(np.arange(writer.n_rows), np.arange(writer.n_skipped)), "resume"
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            _set_aside(existing, f"could not be read back ({exc})")
    writer = CacheWriter.create(out, attrs=attrs, feature_shape=feature_shapes[0], dtype=dtype,
                                compression=compression, extra_shapes=feature_shapes[1:])
    return writer, "new"


def _set_aside(path: Path, why: str) -> None:
    """Keep a damaged partial cache for inspection, never append to it."""
    aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
    os.replace(path, aside)
    print(f"extract: {path} {why}; moved to {aside}, starting over.", file=sys.stderr)


def stored_features(features: np.ndarray, dtype: str) -> np.ndarray:
    """Features cast to the cache dtype; refuses values float16 would turn into inf."""
    if dtype == "float16":
        peak = float(np.max(np.abs(features))) if features.size else 0.0
        if np.isfinite(peak) and peak > FLOAT16_MAX:
            raise ValueError(
                f"Features reach {peak:.4g}, beyond the float16 range (±{FLOAT16_MAX:.0f}); "
                "they would be stored as inf. Use --dtype float32 (delete the partial cache "
                "first). Received: dtype='float16'"
            )
        return features.astype(np.float16)
    return features.astype(np.float32, copy=False)


def run_extract(config: ExtractConfig) -> ExtractResult:
    """Extract bottleneck features for every image of a folder into one HDF5 cache.

    Protocol: validate every argument; index the folder (fixed order, one record per
    image file); build the frozen feature model; open the cache (resume a partial one,
    append to a complete one, or create it; a cache of another configuration is
    refused); then decode images in threads, run full batches of readable images through
    the model and commit each batch (rows + files skipped on the way) from a writer
    thread. With ``augment=K``, K seeded augmented passes of every training row follow
    (only the passes not yet stored). Batches are formed the same way on a resume, so an
    interrupted run finishes byte-identical to an uninterrupted one. Ctrl-C / SIGTERM
    commit what is done and raise :class:`ExtractInterrupted`. With ``engine='ray'`` the
    decoding and forward pass of the images to do run on a Ray cluster instead
    (pipeline/scale.py); everything else is this same path.

    Raises:
        ValueError: a bad argument or folder (Keras-style message).
        CacheError: a cache of another configuration exists at the output path.
        ExtractInterrupted: stopped by Ctrl-C or SIGTERM; the partial cache is resumable.
    """
    # Keras lower-cases the method; the cache records (and compares) the lower-case name.
    config = dataclasses.replace(config, interpolation=check_interpolation(config.interpolation))
    size = _validate(config)
    out: Path | None = None
    try:
        index: ImageIndex = index_images(config.data_dir)
        if (shard := parse_shard(config.shard)) is not None:
            part = shard_slice(len(index.records), shard, config.batch_size)
            index.records, index.first = index.records[part], part.start
        stats = _stats(index)
        _report_ignored(index.ignored)
        out = Path(config.out) if config.out else None
        if out is None and (size or not _is_file_base(config.base)):
            out = default_out(config, size or (resolve_base(config.base).default_size,) * 2)
        if out is not None and (result := _up_to_date(config, index, out, stats)) is not None:
            return result
        if config.engine == "ray":
            from pipeline.scale import keep_off_gpus

            keep_off_gpus()  # this copy of the base only tells the cache its attributes
        with deferred():  # Ctrl-C while the base is built stops right after it
            feature_model = build_model(config, size)
        import keras

        attrs = dict(feature_model.attrs)
        attrs.update(
            interpolation=config.interpolation,
            dtype=config.dtype,
            class_names=index.class_names,
            keras_version=keras.__version__,
            backend=keras.backend.backend(),
            layout=index.layout,
            data_dir=str(index.root.resolve()),
            **({"shard": config.shard} if config.shard else {}),
            config=dataclasses.asdict(config),
        )
        out = out or default_out(config, feature_model.input_size)
        try:
            return _extract_into(config, index, feature_model, attrs, out, stats)
        except (OSError, CacheWriteError) as exc:
            raise CacheError(_write_failure(exc, out)) from exc
    except ExtractInterrupted:
        raise
    except KeyboardInterrupt as exc:  # before the batch loop, or between its steps
        raise stopped(exc, _kept(out)) from None


def _kept(out: Path | None) -> str:
    """What a run interrupted outside the batch loop leaves behind, and how to go on."""
    if out is not None and partial_path(out).exists():
        return (f"the rows committed so far are kept in {partial_path(out)}. Run the same "
                "command again to resume.")
    if out is not None and out.exists():
        return f"{out} holds a complete cache. Run the same command again to update it."
    return "no cache was written yet. Run the same command again to start."


# errno values that mean "no room to write", and what to say about each.
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file reached a size limit (of the file system, or ulimit -f)",
}


def _errno(exc: BaseException) -> int | None:
    """The errno behind a write failure (h5py puts it in the message only)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        if found := re.search(r"errno = (\d+)", str(seen)):
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(exc: BaseException, out: Path) -> str:
    """One message for a failed cache write: why, what is kept, what to do.

    A full disk is named only when the errno says so (ENOSPC, EDQUOT, EFBIG).
    """
    room = _NO_ROOM.get(_errno(exc))
    words = [f"Writing the cache failed ({exc})" + (f": {room}." if room else ".")]
    if partial_path(out).exists():
        words.append(f"Committed rows are kept in {partial_path(out)}.")
    if out.exists():
        words.append(f"{out} is unchanged.")
    words.append(("Free some space" if room else "Fix that")
                 + " and run the same command again to resume.")
    return " ".join(words)


def build_model(config: ExtractConfig, size: tuple[int, int] | None) -> FeatureModel:
    """The frozen feature model ``config`` asks for (``size``: the parsed input size).

    Every engine builds its base here (each Ray actor too), so all run the same model.
    """
    return build_feature_model(
        config.base,
        weights=config.weights,
        input_size=size,
        layer=config.layer,
        pooling=config.pooling,
        preprocess_mode=config.preprocess,
        seed=config.seed,
        precision="mixed_float16" if config.mixed_precision else "float32",
        jit=config.jit,
        batch_size=config.batch_size,
    )


def _extract_into(
    config: ExtractConfig,
    index: ImageIndex,
    feature_model: FeatureModel,
    attrs: dict[str, Any],
    out: Path,
    stats: dict[str, tuple[int, int]],
) -> ExtractResult:
    """Open the cache under its lock, bring it up to date, finish it (see run_extract)."""
    with CacheLock(out):
        writer, mode = _open_writer(out, attrs, feature_model.feature_shapes, config.dtype,
                                    config.compression)
        try:
            start = time.monotonic()
            writer, changes = _drop_stale_rows(writer, index, stats)
            augmented = writer.n_augmented
            first_row = writer.n_rows
            done = writer.done_paths()
            todo = [r for r in index.records if r.path not in done]
            new_skipped: list[tuple[str, str]] = []
            if todo:
                verb = f"resuming after {writer.n_rows} rows" if mode == "resume" else "starting"
                print(
                    f"extract: {verb}; {len(todo)} images to do ({len(index.records)} in "
                    f"{len(index.class_names)} classes, layout {index.layout}) -> {out}\n"
                    f"extract: base {attrs['base']} (weights {attrs['weights']}), pooling "
                    f"{attrs['pooling']}, input {feature_model.input_size}, preprocess "
                    f"{attrs['preprocess']}",
                    file=sys.stderr,
                    flush=True,
                )
                _check_space(feature_model, len(todo), config, out)
                loop = _extract_loop
                if config.engine == "ray":
                    from pipeline.scale import extract_on_ray as loop
                new_skipped = loop(config, index, feature_model, writer, todo, stats)
            # New rows of a cache that already holds K passes get those K passes too.
            passes = max(config.augment, int(writer.attrs.get("augment_passes", 0)))
            if passes:
                _augment_loop(config, index, feature_model, writer, passes)
            seconds = time.monotonic() - start
            n_rows, n_skipped = writer.n_rows, writer.n_skipped
            wrote = n_rows != first_row or any(changes.values()) or writer.n_augmented != augmented
            leaks = _leaks(writer.row_state())
            writer.set_attrs(leaks=len(leaks))
            path = writer.finish()
        finally:
            writer.close()
    _report_skipped(new_skipped)
    _report_leaks(leaks)
    return ExtractResult(path, "extracted" if wrote else "up-to-date", n_rows, n_rows - first_row,
                         n_skipped, new_skipped, feature_model.feature_shape, config.dtype, seconds,
                         changes=changes)


def _check_space(feature_model: FeatureModel, n_images: int, config: ExtractConfig,
                 out: Path) -> None:
    """Print each layer's size before starting; refuse when it cannot fit on the disk.

    Unpooled early maps are huge (VGG16 block1 at 224 px: 12 MB per image), so this is
    said before hours of work, not after a full disk.
    """
    itemsize = np.dtype(config.dtype).itemsize
    copies = 1 + config.augment  # augmented passes only touch training rows: an upper bound
    total = 0
    for name, shape in zip(feature_model.layers, feature_model.feature_shapes, strict=True):
        size = int(np.prod(shape)) * itemsize * n_images * copies
        total += size
        print(f"extract: layer {name}: features {shape} {config.dtype}, "
              f"~{size / 1e6:,.1f} MB for {n_images} images"
              + (f" x {copies} with augmented passes" if copies > 1 else ""),
              file=sys.stderr, flush=True)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
    # Compression can only shrink this; appending to a finished cache copies it once more.
    if total > free:
        raise CacheError(
            f"The features would take ~{total / 1e9:,.2f} GB but {out.parent} has "
            f"{free / 1e9:,.2f} GB free. Pool them (--pooling avg), choose fewer or later "
            f"layers, use --dtype float16 or --compression gzip, or free space. "
            f"Received: layer={config.layer!r}, pooling={config.pooling!r}"
        )


def _stats(index: ImageIndex) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every listed file: the cheap first test for a changed file."""
    out = {}
    for record in index.records:
        try:
            st = os.stat(index.root / record.path)
            out[record.path] = (int(st.st_size), int(st.st_mtime_ns))
        except OSError:
            out[record.path] = (-1, -1)  # vanished since listing: decode will skip it
    return out


def _drop_stale_rows(
    writer: CacheWriter, index: ImageIndex, stats: dict[str, tuple[int, int]]
) -> tuple[CacheWriter, dict[str, int]]:
    """Remove rows of deleted or changed images (and skipped entries to retry).

    A row whose file's size or mtime changed is hashed again; only a different sha256
    counts as changed, so a touched-but-identical image keeps its row. Changed images
    are then extracted again like new ones.
    """
    state = writer.row_state()
    deleted = changed = 0
    keep_rows, touched = [], []
    for row, path in enumerate(state.paths):
        now = stats.get(path)
        if now is None:
            deleted += 1
            continue
        if now != (int(state.size[row]), int(state.mtime_ns[row])):
            if _file_digest(index.root / path) != state.sha256[row]:
                changed += 1
                continue
            touched.append(row)
        keep_rows.append(row)
    if touched:  # same bytes, new mtime: remember the new stat so the next check is cheap
        writer.update_stats(touched, [stats[state.paths[r]][0] for r in touched],
                            [stats[state.paths[r]][1] for r in touched])
    keep_skipped = [
        j for j, path in enumerate(state.skipped_paths)
        if stats.get(path) == (int(state.skipped_size[j]), int(state.skipped_mtime_ns[j]))
    ]
    retried = len(state.skipped_paths) - len(keep_skipped)
    changes = {"deleted": deleted, "changed": changed, "retried_skipped": retried}
    if deleted or changed or retried:
        print(f"extract: the data folder changed: {deleted} images deleted, {changed} changed, "
              f"{retried} skipped files to retry; rewriting the cache without them.",
              file=sys.stderr, flush=True)
        writer = writer.rewrite(np.asarray(keep_rows, dtype=np.int64),
                                np.asarray(keep_skipped, dtype=np.int64))
    return writer, changes


def _file_digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _leaks(state: Any) -> list[tuple[str, str]]:
    """Pairs of paths with identical bytes in different splits (train vs validation/test)."""
    first: dict[str, tuple[str, str]] = {}
    leaks = []
    for path, digest, split in zip(state.paths, state.sha256, state.split, strict=True):
        if not digest or not split:
            continue
        seen = first.setdefault(digest, (path, split))
        if seen[1] != split:
            leaks.append((seen[0], path))
    return leaks


def _report_list(header: str, lines: list[str], *, limit: int = 10, more: str = "") -> None:
    """``extract: <header>`` then the first ``limit`` lines, indented, on stderr."""
    if not lines:
        return
    print(f"extract: {header}", file=sys.stderr)
    for line in lines[:limit]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more{more}", file=sys.stderr)


def _report_ignored(ignored: list[str]) -> None:
    _report_list(f"ignored {len(ignored)} entries of the data folder:", ignored)


def _report_leaks(leaks: list[tuple[str, str]]) -> None:
    _report_list(f"warning: {len(leaks)} images appear in two splits with identical bytes "
                 "(leakage: validation/test scores will read high):",
                 [f"{a} == {b}" for a, b in leaks])


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


def _extract_loop(
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
    positions = index.positions([r.path for r in todo])
    batches = decoded_batches(
        [index.root / r.path for r in todo],
        size=feature_model.input_size,
        interpolation=config.interpolation,
        batch_size=config.batch_size,
        workers=config.workers,
        decode=config.decode,
        positions=positions,
    )
    progress = Progress(len(todo), "extract", log_every=config.log_every)
    with _committing(writer) as background:
        try:
            for batch in batches:
                records = [todo[i] for i in batch.indices]
                skipped = [(todo[i].path, reason) for i, reason in batch.skipped]
                first, *extra = [stored_features(x, config.dtype) for x in
                                 feature_model.all_features(
                                     batch.images, [positions[i] for i in batch.indices])]
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


def _augment_loop(
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
    print(f"extract: augmenting {len(todo)} training images, passes 0..{passes - 1}",
          file=sys.stderr, flush=True)
    # Batches and seeds follow each row's position in the folder's list, not its cache
    # row, so a shard (whose rows start at 0) augments as the single process does.
    positions = index.positions([paths[row] for row in todo])
    batches = decoded_batches(
        [index.root / paths[row] for row in todo],
        size=feature_model.input_size,
        interpolation=config.interpolation,
        batch_size=config.batch_size,
        workers=config.workers,
        decode=config.decode,
        positions=positions,
    )
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


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    _report_list(f"skipped {len(skipped)} unreadable files:",
                 [f"{path}: {reason}" for path, reason in skipped], limit=20,
                 more=" (all listed in the cache's skipped/paths and skipped/reasons)")
