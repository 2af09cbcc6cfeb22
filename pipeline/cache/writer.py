"""Writing a cache: create, append committed batches, resume, rewrite, finish.

While extraction runs, rows go to ``<out>.partial``; each commit writes the rows first
and the ``n_rows`` attribute last, so a resume trusts exactly the committed rows. Only a
finished cache is renamed to ``<out>`` with ``complete=True``: the final path never holds
an incomplete cache.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache.read import RowState, done_paths_of, row_state_of
from pipeline.cache.schema import (
    INDEX_COLUMNS,
    ROW_COLUMNS,
    SKIPPED_COLUMNS,
    CacheWriteError,
    create_datasets,
    decode_attrs,
    encode_attr,
    extra_datasets,
    open_file,
    partial_path,
)

__all__ = ["CacheWriter", "copy_selected", "copy_selected_into"]


def _writing(method: Callable) -> Callable:
    """Turn HDF5's write failures (OSError, or RuntimeError from a failed flush) into a
    CacheWriteError that says which file and what happened."""

    @functools.wraps(method)
    def wrapper(self: CacheWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "internal error" in str(exc):
                raise
            self.failed = True
            _quiet_hdf5_finalizers()
            raise CacheWriteError(f"writing {self.partial} failed: {exc}") from exc

    return wrapper


def _quiet_hdf5_finalizers() -> None:
    """After a failed write, HDF5 retries the flush when Python frees the file at exit and
    prints the same failure again as an 'Exception ignored' traceback; the user already
    has the clear message, so drop those."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if "h5py" not in repr(unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook


class CacheWriter:
    """Appends committed batches of rows to ``<out>.partial`` and finishes it into ``<out>``.

    Use :meth:`create` for a new cache and :meth:`resume` to continue a partial one.
    """

    def __init__(self, final: Path, f: h5py.File) -> None:
        self.final = final
        self.partial = partial_path(final)
        self._f = f
        self.attrs = decode_attrs(f.attrs)
        self.n_rows = int(self.attrs.get("n_rows", 0))
        self.n_skipped = int(self.attrs.get("n_skipped", 0))
        self.n_augmented = int(self.attrs.get("n_augmented", 0))
        self._extra = extra_datasets(self.attrs)
        self._augmented_extra = extra_datasets(self.attrs, augmented=True)
        self._indexed = "index" in f
        self.failed = False

    @classmethod
    def create(
        cls,
        final: str | os.PathLike,
        *,
        attrs: dict[str, Any],
        feature_shape: Sequence[int],
        dtype: str,
        compression: str = "none",
        extra_shapes: Sequence[Sequence[int]] = (),
    ) -> CacheWriter:
        """Start a new partial cache for ``final`` (overwrites an old partial file).

        ``compression`` (none | lzf | gzip) applies to the feature datasets: lzf is fast,
        gzip smaller; both are lossless and read transparently by any h5py.
        ``extra_shapes`` are the row shapes of the layers after the first, named by
        ``attrs["layers"][1:]``.
        """
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(partial_path(final), "w")
        create_datasets(f, attrs=attrs, feature_shape=feature_shape, dtype=dtype,
                        compression=compression, extra_shapes=extra_shapes)
        f.flush()
        return cls(final, f)

    @classmethod
    def resume(cls, final: str | os.PathLike) -> CacheWriter:
        """Reopen ``<final>.partial``, dropping anything written after the last commit."""
        final = Path(final)
        f = open_file(partial_path(final), "r+")
        writer = cls(final, f)
        f.attrs["complete"] = False
        # Rows past n_rows were written by a batch whose commit never finished.
        indexed = INDEX_COLUMNS if writer._indexed else ()
        for name in (*ROW_COLUMNS, *writer._extra, *indexed[:1]):
            f[name].resize(writer.n_rows, axis=0)
        for name in (*SKIPPED_COLUMNS, *indexed[1:]):
            f[name].resize(writer.n_skipped, axis=0)
        for name in ("augmented/features", "augmented/source", "augmented/pass",
                     *writer._augmented_extra):
            f[name].resize(writer.n_augmented, axis=0)
        return writer

    @property
    def extra_names(self) -> list[str]:
        """Dataset names of the layers after the first, in attrs["layers"] order."""
        return list(self._extra)

    def dataset(self, name: str) -> h5py.Dataset:
        """One dataset of the partial file, to read its shape, dtype or committed rows."""
        return self._f[name]

    def done_paths(self) -> set[str]:
        """Paths already committed, as rows or as skipped files."""
        return done_paths_of(self._f)

    def rows(self) -> tuple[list[str], list[str]]:
        """Committed ``paths`` and ``split`` columns."""
        n = self.n_rows
        return list(self._f["paths"].asstr()[:n]), list(self._f["split"].asstr()[:n])

    def augmented_pairs(self) -> set[tuple[int, int]]:
        """Committed augmented copies as (source row, pass) pairs."""
        n = self.n_augmented
        return set(zip(self._f["augmented/source"][:n].tolist(),
                       self._f["augmented/pass"][:n].tolist(), strict=True))

    @_writing
    def append_augmented(
        self, features: np.ndarray, source: Sequence[int], passes: Sequence[int],
        extra: Sequence[np.ndarray] = (),
    ) -> None:
        """Write augmented copies of committed rows (``extra``: the other layers), commit."""
        f = self._f
        start, stop = self.n_augmented, self.n_augmented + len(source)
        for name, values in (
            ("augmented/features", features),
            ("augmented/source", np.asarray(source, dtype=np.int64)),
            ("augmented/pass", np.asarray(passes, dtype=np.int64)),
            *zip(self._augmented_extra, extra, strict=True),
        ):
            f[name].resize(stop, axis=0)
            f[name][start:stop] = values
        self.n_augmented = stop
        f.attrs["n_augmented"] = stop  # the commit record, written last
        f.flush()

    @_writing
    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (JSON-encoding lists and dicts)."""
        for key, value in attrs.items():
            self._f.attrs[key] = encode_attr(value)
            self.attrs[key] = value

    @_writing
    def append(
        self,
        features: np.ndarray,
        labels: Sequence[int],
        paths: Sequence[str],
        splits: Sequence[str],
        skipped: Sequence[tuple] = (),
        *,
        sha256: Sequence[str] | None = None,
        size: Sequence[int] | None = None,
        mtime_ns: Sequence[int] | None = None,
        extra: Sequence[np.ndarray] = (),
        index: Sequence[int] = (),
        skipped_index: Sequence[int] = (),
    ) -> None:
        """Write one batch of rows (and the files skipped while making it), then commit.

        ``extra`` holds the features of the layers after the first, in attrs order.

        ``skipped`` holds (path, reason) or (path, reason, size, mtime_ns) tuples; unknown
        hashes and stats are stored as "" and -1. A Ray part also takes the image-list
        positions of the rows (``index``) and of the skipped files (``skipped_index``).
        """
        k = len(paths)
        if not (len(features) == len(labels) == len(splits) == k):
            raise RuntimeError("internal error: batch arrays of different lengths")
        if self._indexed and (len(index), len(skipped_index)) != (k, len(skipped)):
            raise RuntimeError("internal error: a Ray part needs the index of every row")
        f = self._f
        if k:
            start, stop = self.n_rows, self.n_rows + k
            columns = {
                "features": features,
                "labels": np.asarray(labels, dtype=np.int64),
                "paths": list(paths),
                "split": list(splits),
                "sha256": list(sha256) if sha256 is not None else [""] * k,
                "size": np.asarray(size if size is not None else [-1] * k, dtype=np.int64),
                "mtime_ns": np.asarray(mtime_ns if mtime_ns is not None else [-1] * k,
                                       dtype=np.int64),
                **dict(zip(self._extra, extra, strict=True)),
                **({"index": np.asarray(index, dtype=np.int64)} if self._indexed else {}),
            }
            for name, values in columns.items():
                f[name].resize(stop, axis=0)
                f[name][start:stop] = values
            self.n_rows = stop
        if skipped:
            start, stop = self.n_skipped, self.n_skipped + len(skipped)
            full = [(*item, -1, -1)[:4] for item in skipped]
            for j, name in enumerate(SKIPPED_COLUMNS):
                values = [item[j] for item in full]
                f[name].resize(stop, axis=0)
                f[name][start:stop] = np.asarray(values, dtype=np.int64) if j >= 2 else values
            if self._indexed:
                f["skipped/index"].resize(stop, axis=0)
                f["skipped/index"][start:stop] = np.asarray(skipped_index, dtype=np.int64)
            self.n_skipped = stop
        # The counters are written last: they are the commit record a resume trusts.
        f.attrs["n_rows"] = self.n_rows
        f.attrs["n_skipped"] = self.n_skipped
        f.flush()

    @_writing
    def update_stats(self, rows: Sequence[int], size: Sequence[int],
                     mtime_ns: Sequence[int]) -> None:
        """Record new stats for rows whose file was touched but whose bytes are the same."""
        for row, sz, mt in zip(rows, size, mtime_ns, strict=True):
            self._f["size"][row] = sz
            self._f["mtime_ns"][row] = mt
        self._f.flush()

    def row_state(self) -> RowState:
        """Paths, hashes and stats of the committed rows and skipped files."""
        return row_state_of(self._f)

    @_writing
    def rewrite(self, keep_rows: np.ndarray, keep_skipped: np.ndarray) -> CacheWriter:
        """A new partial cache holding only the given rows (and their augmented copies)
        and skipped files, in their order; used when images were deleted or changed, and
        to read a partial cache back into a fresh file before resuming it.

        Returns:
            The writer of the rewritten partial cache (this writer is closed).
        """
        tmp = self.partial.with_name(self.partial.name + ".rewrite")
        counters = {"n_rows": self.n_rows, "n_skipped": self.n_skipped,
                    "n_augmented": self.n_augmented}
        new = copy_selected(self._f, {**self.attrs, **counters}, tmp, keep_rows, keep_skipped)
        new.close()
        self.close()
        os.replace(new.partial, self.partial)
        return CacheWriter.resume(self.final)

    @classmethod
    def copy_of(cls, final: str | os.PathLike) -> CacheWriter:
        """A partial cache holding a copy of the complete cache ``final``, to append to.

        ``final`` itself is not touched until the new cache is finished and renamed over
        it, so a failure (disk full, kill) leaves the previous cache intact. A complete
        cache was closed cleanly, so a byte copy of it is a sound file to append to (unlike
        a killed partial one: see :meth:`rewrite`); the copy runs at disk speed, or is a
        reflink where the filesystem has them, instead of decoding every row.
        """
        final = Path(final)
        partial = partial_path(final)
        try:
            shutil.copyfile(final, partial)
            return cls.resume(final)
        except BaseException:
            # A truncated copy is worth nothing; the next run copies again.
            partial.unlink(missing_ok=True)
            raise

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.id.get_vfd_handle())

    @_writing
    def close(self) -> None:
        """Make everything committed durable and close the partial file.

        After a failed write only a best-effort close: the first error is the one to report.
        """
        if not self._f.id.valid:
            return
        if self.failed:
            try:
                self._f.close()
            except (OSError, RuntimeError):
                pass
            return
        self._sync()
        self._f.close()

    @_writing
    def finish(self) -> Path:
        """Mark the cache complete and move it to its final path atomically."""
        self._f.attrs["complete"] = True
        self.close()
        os.replace(self.partial, self.final)
        return self.final


def copy_selected(
    f: h5py.File, attrs: dict[str, Any], final: Path, keep_rows: np.ndarray,
    keep_skipped: np.ndarray,
) -> CacheWriter:
    """Copy the given rows, skipped entries and augmented copies of ``f`` into a new
    partial cache for ``final``, chunk by chunk (memory stays flat)."""
    features = f["features"]
    new = CacheWriter.create(
        final, attrs=attrs, feature_shape=features.shape[1:], dtype=str(features.dtype),
        compression=str(attrs.get("compression", "none")),
        extra_shapes=[f[name].shape[1:] for name in extra_datasets(attrs)],
    )
    copy_selected_into(f, attrs, new, keep_rows, keep_skipped)
    return new


def copy_selected_into(
    f: h5py.File, attrs: dict[str, Any], new: CacheWriter, keep_rows: np.ndarray,
    keep_skipped: np.ndarray,
) -> None:
    """Append the given rows, skipped entries and augmented copies of ``f`` to ``new``;
    augmented copies follow their source row to its new index."""
    features = f["features"]
    extra = [f[name] for name in extra_datasets(attrs)]
    augmented_extra = [f[name] for name in extra_datasets(attrs, augmented=True)]
    first_row = new.n_rows
    step = max(1, features.chunks[0] if features.chunks else 256)
    keep_rows = np.asarray(keep_rows, dtype=np.int64)
    for start in range(0, len(keep_rows), step):
        rows = keep_rows[start : start + step]
        new.append(
            features[rows], f["labels"][rows], f["paths"].asstr()[rows],
            f["split"].asstr()[rows], sha256=f["sha256"].asstr()[rows],
            size=f["size"][rows], mtime_ns=f["mtime_ns"][rows],
            extra=[d[rows] for d in extra],
        )
    kept = [tuple(f[name].asstr()[j] if i < 2 else int(f[name][j])
                  for i, name in enumerate(SKIPPED_COLUMNS)) for j in keep_skipped]
    if kept:
        new.append(features[:0], [], [], [], kept, extra=[d[:0] for d in extra])
    # Augmented copies follow their source row to its new index.
    where = {int(row): first_row + i for i, row in enumerate(keep_rows)}
    source = f["augmented/source"][: int(attrs.get("n_augmented", 0))]
    copies = [j for j, row in enumerate(source) if int(row) in where]
    for start in range(0, len(copies), step):
        take = copies[start : start + step]
        new.append_augmented(f["augmented/features"][take],
                             [where[int(source[j])] for j in take], f["augmented/pass"][take],
                             extra=[d[take] for d in augmented_extra])
