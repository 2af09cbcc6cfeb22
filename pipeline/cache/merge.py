"""Merging the parts of a split extraction into one cache: ``--shard i/N`` and Ray parts.

Shards are contiguous slices of the image list and are concatenated in order; Ray parts
carry each row's image-list position and are sorted by it, a batch run twice kept once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache.read import read_attrs, read_row_state
from pipeline.cache.schema import (
    INT_COLUMNS,
    PART_KEYS,
    SKIPPED_COLUMNS,
    STR_COLUMNS,
    CacheError,
    chunk_rows,
    extra_datasets,
    identity_differences,
    open_file,
)
from pipeline.cache.writer import CacheWriter, copy_selected_into

__all__ = ["copy_rows", "merge_parts"]


def merge_parts(parts: Sequence[str | os.PathLike], final: str | os.PathLike) -> Path:
    """Merge the parts of ``extract --shard i/N`` or ``--engine ray`` into one cache.

    Shards are contiguous slices of the image list, so parts 0..N-1 in order give the
    rows in single-process order. Ray parts (files, or the ``<out>.parts`` folder holding
    them) are sorted by each row's image-list position instead. Parts must share every
    identity attribute.

    Raises:
        CacheError: a part is missing, incomplete, duplicated or made differently.
    """
    final = Path(final)
    parts = _part_files(parts)
    if any(read_attrs(part).get("part_of") for part in parts):
        return _merge_ray_parts(parts, final)
    infos = []
    for part in parts:
        attrs = read_attrs(part)
        if not attrs.get("complete"):
            raise CacheError(f"{part} is not a finished part: run its extract command again.")
        shard = str(attrs.get("shard", ""))
        if "/" not in shard:
            raise CacheError(f"{part} was not made with --shard. Received: shard={shard!r}")
        infos.append((tuple(int(v) for v in shard.split("/")), Path(part), attrs))
    infos.sort(key=lambda item: item[0][0])
    total = {n for (_, n), _, _ in infos}
    indices = [i for (i, _), _, _ in infos]
    if len(total) != 1 or indices != list(range(next(iter(total)))):
        raise CacheError(
            f"Parts must be shards 0..N-1 of one N, each once. Received: "
            f"{[f'{i}/{n}' for (i, n), _, _ in infos]}"
        )
    reference = infos[0][2]
    for _, part, attrs in infos[1:]:
        diffs = identity_differences(reference, attrs)
        if diffs:
            raise CacheError(f"{part} was made differently from {infos[0][1]}:\n"
                             + "\n".join(diffs))
    attrs = {k: v for k, v in reference.items() if k != "shard"}
    new = _writer_like(infos[0][1], final, attrs)
    try:
        for _, part, part_attrs in infos:
            with open_file(part, "r") as f:
                n, m = int(part_attrs["n_rows"]), int(part_attrs["n_skipped"])
                copy_selected_into(f, part_attrs, new, np.arange(n), np.arange(m))
        new.set_attrs(augment_passes=max(int(a.get("augment_passes", 0)) for *_, a in infos))
        return new.finish()
    finally:
        new.close()


def _part_files(parts: Sequence[str | os.PathLike]) -> list[Path]:
    """The given part files, a folder standing for the parts it holds (``<out>.parts``)."""
    files: list[Path] = []
    for part in map(Path, parts):
        if not part.is_dir():
            files.append(part)
            continue
        found = sorted(p for p in part.iterdir() if p.name.endswith((".h5", ".h5.partial")))
        if not found:
            raise CacheError(f"{part} holds no part files (*.h5, *.h5.partial).")
        files += found
    return files


def _writer_like(source: Path, final: Path, attrs: dict[str, Any]) -> CacheWriter:
    """A new cache for ``final`` whose datasets have the row shapes and dtype of ``source``."""
    with open_file(source, "r") as f:
        return CacheWriter.create(
            final, attrs=attrs, feature_shape=f["features"].shape[1:],
            dtype=str(f["features"].dtype), compression=str(attrs.get("compression", "none")),
            extra_shapes=[f[name].shape[1:] for name in extra_datasets(attrs)],
        )


def _merge_ray_parts(parts: Sequence[Path], final: Path) -> Path:
    """Rows of Ray parts in image-list order; a batch Ray ran twice is kept once.

    Actors commit rows to their own part in whatever order Ray hands out batches, and a
    batch retried after its actor died may be in two parts: every image-list position
    must be present (as a row or a skipped file), duplicates are dropped.
    """
    states = []
    for part in parts:
        attrs = read_attrs(part)
        if not attrs.get("part_of"):
            raise CacheError(f"{part} is not a part of extract --engine ray: merge --shard "
                             "parts and Ray parts separately.")
        states.append((part, attrs, read_row_state(part)))
    first, reference, _ = states[0]
    for part, attrs, _ in states[1:]:
        diffs = identity_differences(reference, attrs)
        if attrs.get("listing") != reference.get("listing"):
            diffs.append("  listing: made from another image list (the data folder changed "
                         "between runs)")
        if diffs:
            raise CacheError(f"{part} was made differently from {first}:\n" + "\n".join(diffs))
    rows: dict[int, tuple[Path, int]] = {}
    skipped: dict[int, tuple[Path, int]] = {}
    for part, _, state in states:
        for row, i in enumerate(state.index.tolist()):
            rows.setdefault(i, (part, row))
        for j, i in enumerate(state.skipped_index.tolist()):
            skipped.setdefault(i, (part, j))
    n = int(reference["n_images"])
    missing = sorted(set(range(n)) - rows.keys() - skipped.keys())
    if missing:
        raise CacheError(
            f"{len(missing)} of {n} images are in none of the {len(states)} parts (the first "
            f"is image {missing[0]} of the list): that run did not finish. Run its extract "
            "--engine ray command again to complete it."
        )
    attrs = {k: v for k, v in reference.items() if k not in PART_KEYS}
    new = _writer_like(first, final, attrs)
    try:
        copy_rows(new, [rows[i] for i in sorted(rows)],
                  [skipped[i] for i in sorted(skipped) if i not in rows])
        return new.finish()
    finally:
        new.close()


def copy_rows(
    writer: CacheWriter,
    rows: Sequence[tuple[Path, int]],
    skipped: Sequence[tuple[Path, int]] = (),
    *,
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """Append rows and skipped entries of other cache files to ``writer``, in that order.

    Args:
        writer: the cache being written (same feature shapes and layers as the sources).
        rows: (cache file, row) pairs, in the order the rows are to be written.
        skipped: (cache file, skipped entry) pairs, likewise.
        on_rows: called with the number of rows after each committed chunk (progress).
    """
    files: dict[Path, h5py.File] = {}

    def source(path: Path) -> h5py.File:
        if path not in files:
            files[path] = open_file(Path(path), "r")
        return files[path]

    features = writer.dataset("features")
    # Chunks of ~32 MiB of features: memory stays flat, commits stay few.
    step = chunk_rows(features.shape[1:], features.dtype.itemsize, target_bytes=32 << 20)
    names = ["features", *writer.extra_names, "labels", *STR_COLUMNS, *INT_COLUMNS]
    try:
        for start in range(0, len(rows), step):
            chunk = _gather(rows[start : start + step], source, names)
            writer.append(
                chunk["features"], chunk["labels"], chunk["paths"], chunk["split"],
                sha256=chunk["sha256"], size=chunk["size"], mtime_ns=chunk["mtime_ns"],
                extra=[chunk[name] for name in writer.extra_names],
            )
            if on_rows is not None:
                on_rows(len(chunk["labels"]))
        if skipped:
            entries = _gather(skipped, source, list(SKIPPED_COLUMNS))
            writer.append(features[:0], [], [], [],
                          list(zip(*(entries[name].tolist() for name in SKIPPED_COLUMNS),
                                   strict=True)),
                          extra=[writer.dataset(name)[:0] for name in writer.extra_names])
    finally:
        for f in files.values():
            f.close()


def _gather(
    pairs: Sequence[tuple[Path, int]], source: Callable[[Path], h5py.File], names: list[str]
) -> dict[str, np.ndarray]:
    """Datasets ``names`` at the (file, row) ``pairs``, in the order of ``pairs``.

    Each file is read once per dataset, as one slice when its rows are nearly contiguous
    (HDF5 point selections are slow), in increasing row order otherwise.
    """
    by_file: dict[Path, tuple[list[int], list[int]]] = {}
    for position, (path, row) in enumerate(pairs):
        slots = by_file.setdefault(path, ([], []))
        slots[0].append(position)
        slots[1].append(row)
    out: dict[str, np.ndarray] = {}
    for path, (positions, wanted) in by_file.items():
        f = source(path)
        rows, inverse = np.unique(np.asarray(wanted, dtype=np.int64), return_inverse=True)
        low, high = int(rows[0]), int(rows[-1]) + 1
        dense = high - low <= 2 * len(rows)
        for name in names:
            ds = f[name].asstr() if h5py.check_string_dtype(f[name].dtype) else f[name]
            values = np.asarray(ds[low:high] if dense else ds[rows])
            values = (values[rows - low] if dense else values)[inverse]
            if name not in out:
                out[name] = np.empty((len(pairs), *values.shape[1:]), dtype=values.dtype)
            out[name][positions] = values
    return out
