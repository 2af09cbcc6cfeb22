"""Features out: rows of (path, [label, split,] features) -> ``.h5``, ``.npy`` or ``.parquet``.

One writer serves ``predict.py --embeddings`` (the frozen base's features of new images)
and ``export_features.py`` (an extract cache -> what pandas, Polars, FAISS or a vector
database read). The output's extension chooses the format:

    .h5       ``features`` (N, ...) in the features' dtype, ``paths`` (UTF-8) and, from a
              cache, ``labels`` (int64 class ids) and ``split`` (UTF-8): the cache's own
              names. Root attributes: the features' identity as the cache records it
              (``IDENTITY_KEYS``: base, weights, layer, pooling, input_size, interpolation,
              preprocess, dtype, ...; lists as JSON), plus ``feature_shape``, ``n_rows``
              and ``source`` (the cache or model it came from).
    .npy      the features alone, (N, ...) in their dtype (``np.load(..., mmap_mode="r")``
              reads a file larger than memory); beside it ``<stem>.rows.csv`` with the
              columns ``path`` (and ``label``, ``label_id``, ``split``), one row per array
              row: a CSV rather than a list of lines, so every path and the labels survive.
    .parquet  one row per image: ``path`` (and ``label``, ``label_id``, ``split``) and
              ``features``, a fixed-size list of float32, flattened when the features are
              not 1-D (float16 widens exactly); the schema metadata holds ``feature_shape``
              and ``attrs`` (JSON). Needs pyarrow (``pip install "bottleneck-pipeline[parquet]"``).

Row i belongs to path i in every format. Each file is streamed into a temporary name
beside the output and moved into place only when complete (the sidecar first), so a
crash or an error leaves the previous output, never half of one. Only the original rows
of a cache are exported, never its augmented copies.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import (
    IDENTITY_KEYS,
    chunk_rows,
    decode_attrs,
    feature_dataset,
    layer_attrs,
    open_cache,
    read_cache,
)
from pipeline.cache.schema import STR_DTYPE, encode_attr
from pipeline.progress import Progress, format_duration
from pipeline.util.files import move_into_place, temp_beside

__all__ = [
    "FORMATS",
    "EmbeddingRows",
    "EmbeddingsWriter",
    "ExportConfig",
    "ExportResult",
    "check_embeddings_path",
    "export_features",
    "parquet_group_rows",
    "rows_path",
]

log = logging.getLogger(__name__)

FORMATS = (".h5", ".npy", ".parquet")
PARQUET_INSTALL = 'pip install "bottleneck-pipeline[parquet]"'
# Bytes of features read from a cache at once: sequential reads, memory flat in cache size.
READ_BYTES = 32 << 20


def check_embeddings_path(value: str | os.PathLike, flag: str = "--embeddings") -> str:
    """The format (``.h5``, ``.npy`` or ``.parquet``) an output path asks for.

    Args:
        value: the output path as given.
        flag: the option as the user typed it, named in the message.

    Returns:
        The extension, lower case.

    Raises:
        ValueError: another extension, or ``.parquet`` without pyarrow installed.
    """
    suffix = Path(value).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"`{flag}` must end in .h5, .npy or .parquet. "
                         f"Received: {flag}={str(value)!r}")
    if suffix == ".parquet":
        _pyarrow(f"{flag}={str(value)!r}")
    return suffix


def rows_path(out: str | os.PathLike) -> Path:
    """The CSV beside a ``.npy`` output naming its rows: ``<stem>.rows.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rows.csv")


def parquet_group_rows(row_bytes: int) -> int:
    """Rows per Parquet row group: about 64 MiB of features, 1,024 to 1,048,576 rows."""
    return int(min(1 << 20, max(1024, (64 << 20) // max(1, row_bytes))))


def _pyarrow(received: str) -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a one-line error saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"Writing .parquet needs pyarrow, which is not installed: "
                         f"{PARQUET_INSTALL}. Received: {received}") from None
    return pyarrow, pyarrow.parquet


@dataclass
class EmbeddingRows:
    """Consecutive output rows: row i of ``features`` belongs to ``paths[i]``.

    ``labels`` (class ids) and ``split`` are given for every chunk of a cache export and
    for none of predict's.
    """

    paths: Sequence[str]
    features: np.ndarray
    labels: np.ndarray | None = None
    split: Sequence[str] | None = None


class EmbeddingsWriter:
    """Stream :class:`EmbeddingRows` into ``out`` (format by extension), atomically.

    Used as a context manager: a normal exit moves the complete file(s) into place, an
    exception removes them and leaves whatever was at ``out`` before. The feature shape
    and dtype are taken from the first chunk; at least one row must be appended before a
    normal exit (callers say "nothing to write" in their own words first).

    Args:
        out: the file to write (``.h5``, ``.npy`` or ``.parquet``); its folder must exist.
        attrs: the features' recorded attributes (a cache's, or a model's cache_attrs);
            the identity keys are written with the output.
        class_names: names of the class ids in ``labels`` (exports of a cache).
        source: what the features come from (a cache or model path), recorded.
        flag: the option naming ``out``, for messages.
    """

    def __init__(self, out: str | os.PathLike, *, attrs: dict[str, Any],
                 class_names: Sequence[str] | None = None, source: str = "",
                 flag: str = "--embeddings") -> None:
        self.out = Path(out)
        self.format = check_embeddings_path(out, flag)
        self.identity = {k: attrs[k] for k in IDENTITY_KEYS if attrs.get(k) is not None}
        self.class_names = list(class_names or [])
        self.source = source
        self.n_rows = 0
        self.feature_shape: tuple[int, ...] | None = None
        self._sink: Any = None

    def __enter__(self) -> EmbeddingsWriter:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def append(self, rows: EmbeddingRows) -> None:
        """Write ``rows`` after those already written."""
        if len(rows.paths) != len(rows.features):
            raise RuntimeError("internal error: paths and features of a chunk differ in length")
        if not len(rows.paths):
            return
        if self._sink is None:
            self.feature_shape = tuple(int(d) for d in rows.features.shape[1:])
            sink_class = {".h5": _H5Sink, ".npy": _NpySink, ".parquet": _ParquetSink}
            self._sink = sink_class[self.format](self, rows)
        self._sink.append(rows)
        self.n_rows += len(rows.paths)

    def commit(self) -> Path:
        """Finish the file(s) and move them into place; returns ``out``."""
        sink, self._sink = self._sink, None
        if sink is None:
            raise RuntimeError("internal error: an embeddings file with no rows")
        try:
            for tmp, final in sink.finish():  # the main file last: it appears with its
                move_into_place(tmp, final)   # sidecar in place
        except BaseException:
            sink.abort()  # a full disk while finishing: no temporary file is left
            raise
        log.info("embeddings: %d rows of shape %s written to %s",
                 self.n_rows, self.feature_shape, self.out)
        return self.out

    def discard(self) -> None:
        """Close and remove what was written; ``out`` stays as it was."""
        if self._sink is not None:
            self._sink.abort()
            self._sink = None

    def metadata(self) -> dict[str, Any]:
        """The attributes recorded with the features (identity, shape, count, source)."""
        return {**self.identity, "feature_shape": list(self.feature_shape or ()),
                "n_rows": self.n_rows, "source": self.source}

    def label_names(self, labels: np.ndarray) -> list[str]:
        """Class names of the class ids ``labels``."""
        return [self.class_names[int(i)] for i in labels]


class _H5Sink:
    """``.h5``: resizable datasets named as in the cache, attributes written at the end."""

    def __init__(self, writer: EmbeddingsWriter, first: EmbeddingRows) -> None:
        import h5py

        self.writer, self.tmp = writer, temp_beside(writer.out)
        self.labelled = first.labels is not None
        shape, dtype = first.features.shape[1:], first.features.dtype
        self.f = h5py.File(self.tmp, "w")
        rows = chunk_rows(shape, dtype.itemsize)
        self.f.create_dataset("features", shape=(0, *shape), maxshape=(None, *shape),
                              dtype=dtype, chunks=(rows, *shape))
        columns = [("paths", STR_DTYPE)]
        if self.labelled:
            columns += [("labels", "int64"), ("split", STR_DTYPE)]
        for name, kind in columns:
            self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=kind,
                                  chunks=(max(rows, 1024),))

    def append(self, rows: EmbeddingRows) -> None:
        values = {"features": rows.features, "paths": list(rows.paths)}
        if self.labelled:
            values.update(labels=np.asarray(rows.labels, np.int64), split=list(rows.split))
        for name, value in values.items():
            dataset = self.f[name]
            start = dataset.shape[0]
            dataset.resize(start + len(rows.paths), axis=0)
            dataset[start:] = value

    def finish(self) -> list[tuple[Path, Path]]:
        metadata = self.writer.metadata()
        if self.labelled:
            metadata["class_names"] = self.writer.class_names
        for key, value in metadata.items():
            self.f.attrs[key] = encode_attr(value)
        self.f.close()
        return [(self.tmp, self.writer.out)]

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class _RowsCsv:
    """The ``<stem>.rows.csv`` beside a ``.npy``: path (, label, label_id, split) per row."""

    def __init__(self, writer: EmbeddingsWriter, labelled: bool) -> None:
        self.writer, self.labelled = writer, labelled
        self.final = rows_path(writer.out)
        self.tmp = temp_beside(self.final)
        self.file = open(self.tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115 - streamed
        self.csv = csv.writer(self.file)
        self.csv.writerow(["path", "label", "label_id", "split"] if labelled else ["path"])

    def append(self, rows: EmbeddingRows) -> None:
        if self.labelled:
            names = self.writer.label_names(rows.labels)
            self.csv.writerows(zip(rows.paths, names, (int(i) for i in rows.labels),
                                   rows.split, strict=True))
        else:
            self.csv.writerows([p] for p in rows.paths)


class _NpySink:
    """``.npy``: the header is written first and rewritten with the row count at the end.

    NumPy pads every header so that the first axis can grow to any length in place, so
    rows are streamed straight to disk and the array is never held in memory.
    """

    def __init__(self, writer: EmbeddingsWriter, first: EmbeddingRows) -> None:
        self.writer, self.tmp = writer, temp_beside(writer.out)
        self.dtype = first.features.dtype.newbyteorder("<")
        self.shape = first.features.shape[1:]
        self.rows = _RowsCsv(writer, labelled=first.labels is not None)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - streamed over many calls
        self.header_bytes = self._header(0)

    def _header(self, n: int) -> int:
        np.lib.format.write_array_header_1_0(self.f, {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (n, *self.shape),
        })
        return self.f.tell()

    def append(self, rows: EmbeddingRows) -> None:
        self.f.write(np.ascontiguousarray(rows.features, dtype=self.dtype).tobytes())
        self.rows.append(rows)

    def finish(self) -> list[tuple[Path, Path]]:
        self.f.seek(0)
        if self._header(self.writer.n_rows) != self.header_bytes:
            raise RuntimeError("internal error: the .npy header changed length")
        self.f.close()
        self.rows.file.close()
        return [(self.rows.tmp, self.rows.final), (self.tmp, self.writer.out)]

    def abort(self) -> None:
        for handle, tmp in ((self.f, self.tmp), (self.rows.file, self.rows.tmp)):
            handle.close()
            tmp.unlink(missing_ok=True)


class _ParquetSink:
    """``.parquet``: row groups of about 64 MiB, the feature shape in the schema metadata."""

    def __init__(self, writer: EmbeddingsWriter, first: EmbeddingRows) -> None:
        self.pa, pq = _pyarrow(f"out={str(writer.out)!r}")
        self.writer, self.tmp = writer, temp_beside(writer.out)
        self.labelled = first.labels is not None
        self.width = int(np.prod(first.features.shape[1:], dtype=np.int64))
        pa = self.pa
        fields = [pa.field("path", pa.string())]
        if self.labelled:
            fields += [pa.field("label", pa.string()), pa.field("label_id", pa.int64()),
                       pa.field("split", pa.string())]
        fields.append(pa.field("features", pa.list_(pa.float32(), self.width)))
        metadata = writer.metadata()
        if self.labelled:
            metadata["class_names"] = writer.class_names
        self.schema = pa.schema(fields, metadata={
            "feature_shape": json.dumps(metadata["feature_shape"]),
            "attrs": json.dumps(metadata),
        })
        self.group_rows = parquet_group_rows(self.width * 4)
        self.pending: list[Any] = []
        self.n_pending = 0
        self.parquet = pq.ParquetWriter(self.tmp, self.schema)

    def append(self, rows: EmbeddingRows) -> None:
        pa = self.pa
        flat = np.ascontiguousarray(rows.features, dtype=np.float32).reshape(-1)
        columns = [pa.array(list(rows.paths), pa.string())]
        if self.labelled:
            columns += [pa.array(self.writer.label_names(rows.labels), pa.string()),
                        pa.array(np.asarray(rows.labels, np.int64)),
                        pa.array(list(rows.split), pa.string())]
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), self.width))
        self.pending.append(pa.Table.from_arrays(columns, schema=self.schema))
        self.n_pending += len(rows.paths)
        if self.n_pending >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.parquet.write_table(self.pa.concat_tables(self.pending),
                                     row_group_size=self.group_rows)
            self.pending, self.n_pending = [], 0

    def finish(self) -> list[tuple[Path, Path]]:
        self._flush()
        self.parquet.close()
        return [(self.tmp, self.writer.out)]

    def abort(self) -> None:
        self.parquet.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class ExportConfig:
    """Arguments of the export-features command."""

    cache: str
    out: str
    layer: str | None = None
    split: str | None = None
    log_every: float = 30.0


@dataclass
class ExportResult:
    """What one export wrote."""

    out: Path
    n_rows: int
    feature_shape: tuple[int, ...]
    layer: str
    split: str | None
    sidecar: Path | None
    seconds: float

    def summary(self) -> str:
        """The one-line summary printed last."""
        which = f"split {self.split!r}" if self.split is not None else "all splits"
        beside = f" (+ rows in {self.sidecar})" if self.sidecar else ""
        return (f"export-features: done. {self.n_rows} rows of layer {self.layer} "
                f"({which}), features of shape {self.feature_shape}, in "
                f"{format_duration(self.seconds)}; written to {self.out}{beside}")


def export_features(config: ExportConfig) -> ExportResult:
    """Write the rows of an extract cache as ``.h5``, ``.npy`` or ``.parquet``.

    Protocol (cheap failures first, then one sequential pass over the features):

    1. ``_check_export``: the output's format, and that it is not the cache itself.
    2. :func:`~pipeline.cache.read_cache` without features: the cache complete and of
       this schema, the layer stored, the small columns (paths, labels, split).
    3. ``_selected_rows``: the rows of ``--split`` (all without it); none is an error.
    4. ``_stream_rows``: read the layer's features in blocks of about 32 MiB and append
       the selected rows of each block to an :class:`EmbeddingsWriter`, which moves the
       file into place when all are written.

    Args:
        config: the cache, the output, the layer and split to export.

    Returns:
        What was written.

    Raises:
        ValueError: a bad output name or split, or no row to export (nothing written).
        CacheError: the cache is missing, incomplete, damaged or lacks the layer.
    """
    start = time.monotonic()
    _check_export(config)
    cache = read_cache(config.cache, features=False, layer=config.layer)
    rows = _selected_rows(cache.split, split_name=config.split, cache_path=config.cache)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layer = cache.attrs["layer"]
    log.info("export-features: %d rows of layer %s from %s -> %s",
             len(rows), layer, config.cache, out)
    # The output holds one layer: it records that layer alone, as a head trained on it does.
    with EmbeddingsWriter(out, attrs=layer_attrs(cache.attrs), class_names=cache.class_names,
                          source=str(config.cache), flag="OUT") as writer:
        _stream_rows(config, cache=cache, rows=rows, writer=writer)
    return ExportResult(out, writer.n_rows, writer.feature_shape or (), layer, config.split,
                        rows_path(out) if writer.format == ".npy" else None,
                        time.monotonic() - start)


def _check_export(config: ExportConfig) -> None:
    """Raises ValueError: an unknown format, or the output is the cache being read."""
    check_embeddings_path(config.out, "OUT")
    if Path(config.out).resolve() == Path(config.cache).resolve():
        raise ValueError(f"OUT would overwrite the cache being read: choose another name. "
                         f"Received: OUT={config.out!r}")
    if config.log_every <= 0:
        raise ValueError(f"`log_every` must be > 0. Received: log_every={config.log_every}")


def _selected_rows(split: np.ndarray, *, split_name: str | None, cache_path: str) -> np.ndarray:
    """Indices of the cache rows to export: those of ``split_name``, or all.

    Raises:
        ValueError: the cache has no rows, or none of ``split_name`` (the message lists
            the splits it records).
    """
    if split_name is None:
        rows = np.arange(len(split))
    else:
        rows = np.flatnonzero(split == split_name)
    if not rows.size:
        recorded = sorted(set(split.tolist()))
        if split_name is None:
            raise ValueError(f"{cache_path} holds no rows: nothing to export.")
        raise ValueError(
            f"`--split` must be one of the splits {cache_path} records: {recorded} "
            f"(\"\" means none was recorded). Received: --split={split_name!r}"
        )
    return rows


def _stream_rows(config: ExportConfig, *, cache: Any, rows: np.ndarray,
                 writer: EmbeddingsWriter) -> None:
    """Append the features of ``rows`` (sorted) to ``writer``, one block of the file at a time.

    Blocks are contiguous row ranges of about :data:`READ_BYTES`, read whole (sequential
    HDF5 reads) and filtered in memory, so memory stays flat whatever the cache size.
    """
    progress = Progress(len(rows), "export-features", log_every=config.log_every, unit="rows")
    try:
        with open_cache(config.cache, rdcc_nbytes=READ_BYTES) as f:
            features = f[feature_dataset(decode_attrs(f.attrs), config.layer)]
            step = chunk_rows(features.shape[1:], features.dtype.itemsize,
                              target_bytes=READ_BYTES)
            for begin in range(int(rows[0]), int(rows[-1]) + 1, step):
                take = rows[np.searchsorted(rows, begin):np.searchsorted(rows, begin + step)]
                if not take.size:
                    continue
                block = features[begin:int(take[-1]) + 1]
                writer.append(EmbeddingRows(
                    paths=[cache.paths[i] for i in take],
                    features=block[take - begin],
                    labels=cache.labels[take],
                    split=cache.split[take].tolist(),
                ))
                progress.update(len(take))
    finally:
        progress.close()
