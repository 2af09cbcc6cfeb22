"""The HDF5 layout of a feature cache: the one place that knows dataset names and attributes.

Layout (schema_version 1), one HDF5 file per (data folder, base configuration):

    features       (N, ...) float32|float16, chunked along rows
    labels         (N,) int64, index into attrs["class_names"]
    paths          (N,) UTF-8, relative to the data folder, '/'-separated
    split          (N,) UTF-8, "train" | "validation" | "test" | "" (no split recorded)
    sha256         (N,) UTF-8, hex digest of the image file's bytes when it was extracted
    size, mtime_ns (N,) int64, the file's size and modification time then (a cheap first
                   check: only files whose stat changed are hashed again on a re-run)
    skipped/paths  (M,) UTF-8, unreadable files
    skipped/reasons(M,) UTF-8, why each was skipped
    skipped/size, skipped/mtime_ns (M,) int64: a skipped file that changes is retried
    layers/<name>  (N, ...) more layers of the same forward pass (extract --layer a,b,c):
                   ``features`` is the first layer of attrs["layers"], these the others
    augmented/features (A, ...) randomly augmented passes of training rows (extract --augment)
    augmented/layers/<name> (A, ...) the other layers of the augmented copies
    augmented/source   (A,) int64, the row each augmented copy was made from
    augmented/pass     (A,) int64, which pass (0..K-1) made it
    index, skipped/index (N,), (M,) int64, only in the parts of ``extract --engine ray``
                   (attrs["part_of"]): each row's and skipped file's position in the
                   image list, so a merge restores single-process order (see merge_parts)

Row i of features, labels, paths and split always belongs to the same file.

Root attributes: the identity of the features (:data:`IDENTITY_KEYS`), ``schema_version``,
``created``, ``compression``, ``complete`` and the commit counters ``n_rows``, ``n_skipped``,
``n_augmented``. Lists and dicts are stored as JSON strings (:func:`encode_attr`,
:func:`decode_attrs`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "IDENTITY_DEFAULTS",
    "IDENTITY_KEYS",
    "INDEX_COLUMNS",
    "INT_COLUMNS",
    "PART_KEYS",
    "ROW_COLUMNS",
    "SCHEMA_VERSION",
    "SKIPPED_COLUMNS",
    "STR_COLUMNS",
    "CacheError",
    "CacheWriteError",
    "chunk_rows",
    "create_datasets",
    "decode_attrs",
    "encode_attr",
    "extra_datasets",
    "feature_dataset",
    "identity_differences",
    "layer_attrs",
    "recorded_jpeg_downscale",
    "open_file",
    "partial_path",
]


SCHEMA_VERSION = 1


# Attributes that define what a feature means: a cache may only be resumed or appended to
# by a run whose values are identical.
IDENTITY_KEYS = (
    "base",
    "base_sha256",
    "weights",
    "layer",
    "layers",
    "pooling",
    "input_size",
    "interpolation",
    "jpeg_downscale",
    "preprocess",
    "dtype",
    "precision",
    "fold_batchnorm",
    "seed",
    "class_names",
)
# What a cache written before an identity key existed means by its absence: it was made
# the one way there was then.
IDENTITY_DEFAULTS = {"jpeg_downscale": "off", "fold_batchnorm": False}

STR_DTYPE = h5py.string_dtype("utf-8")
# Per-row columns besides features and labels.
STR_COLUMNS = ("paths", "split", "sha256")
INT_COLUMNS = ("size", "mtime_ns")
ROW_COLUMNS = ("features", "labels", *STR_COLUMNS, *INT_COLUMNS)
SKIPPED_COLUMNS = ("skipped/paths", "skipped/reasons", "skipped/size", "skipped/mtime_ns")
# Ray parts are written by many actors in no set order, and Ray may run a batch twice:
# the image-list position of every row and skipped file lets a merge sort and de-duplicate.
INDEX_COLUMNS = ("index", "skipped/index")
# Attributes only a Ray part carries; a merged cache drops them.
PART_KEYS = ("part_of", "listing", "n_images")


class CacheError(ValueError):
    """A cache file that cannot be used as asked (incomplete, corrupt, mismatched)."""


class CacheWriteError(CacheError):
    """Writing the cache failed (disk full, file size limit, I/O error)."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished cache for ``path`` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def chunk_rows(row_shape: Sequence[int], itemsize: int, target_bytes: int = 1 << 20) -> int:
    """Rows per HDF5 chunk: about ``target_bytes`` per chunk, 1 to 1024 rows.

    One row per chunk for huge unpooled maps keeps single-row reads cheap; many rows per
    chunk for small pooled vectors keeps the chunk index small and reads sequential.
    """
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return int(min(1024, max(1, target_bytes // row_bytes)))


def encode_attr(value: Any) -> Any:
    """An attribute value as stored: lists, tuples and dicts as JSON text, the rest as is."""
    # Lists and dicts are stored as JSON so a user reads them with json.loads.
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return value


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """Attributes as Python values: bytes as str, NumPy scalars as numbers, JSON decoded."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def recorded_jpeg_downscale(*sources: dict[str, Any]) -> str:
    """The first recorded ``jpeg_downscale`` in ``sources`` (cache attributes, a model's
    records): how extract decoded the cache's JPEGs. None recorded: made before the
    option, "off"."""
    return next((source["jpeg_downscale"] for source in sources
                 if source.get("jpeg_downscale") is not None),
                IDENTITY_DEFAULTS["jpeg_downscale"])


def identity_differences(old: dict[str, Any], new: dict[str, Any],
                         flags: dict[str, str] | None = None) -> list[str]:
    """Lines ``key: old != new`` for every identity attribute that differs (an absent key
    read as its :data:`IDENTITY_DEFAULTS` value); ``flags`` names the option that sets a
    key (``{"pooling": "--pooling"}``), shown at the end of its line."""
    diffs = []
    for key in IDENTITY_KEYS:
        was, now = (attrs.get(key, IDENTITY_DEFAULTS.get(key)) for attrs in (old, new))
        if was != now:
            flag = (flags or {}).get(key)
            diffs.append(f"  {key}: cache has {was!r}, this run has {now!r}"
                         + (f" ({flag})" if flag else ""))
    return diffs


def open_file(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    """Open a cache; refuse anything that would make HDF5 read outside this file."""
    try:
        f = h5py.File(path, mode, **kwargs)
    except OSError as exc:
        raise CacheError(
            f"Cannot open {path} as an HDF5 feature cache ({exc}). The file is truncated, "
            "corrupt or not a cache: delete it and re-extract."
        ) from exc
    try:
        _check_self_contained(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_self_contained(f: h5py.File, path: Path) -> None:
    """External links, external raw storage and virtual datasets point HDF5 at other
    files; this tool never writes them, so a cache holding one was not made by it."""
    foreign: list[str] = []

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            full = f"{prefix}{name}"
            if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                foreign.append(f"{full} ({type(link).__name__})")
                continue
            item = group[name]
            if isinstance(item, h5py.Group):
                visit(item, f"{full}/")
            elif item.external or item.is_virtual:
                foreign.append(f"{full} ({'external storage' if item.external else 'virtual'})")

    visit(f, "")
    if foreign:
        raise CacheError(
            f"{path} holds links to data outside the file, which this tool never writes: "
            f"{', '.join(foreign[:5])}. Refusing to read it."
        )


def feature_dataset(attrs: dict[str, Any], layer: str | None, *, augmented: bool = False) -> str:
    """The dataset holding ``layer``'s features (None: the first layer).

    Raises:
        CacheError: the cache holds no such layer; the message lists those it holds.
    """
    layers = list(attrs.get("layers") or [attrs.get("layer")])
    prefix = "augmented/" if augmented else ""
    if layer is None or layer == layers[0]:
        return f"{prefix}features"
    if layer not in layers:
        raise CacheError(
            f"`layer` must be one of the layers this cache holds: {layers}. "
            f"Received: layer={layer!r}"
        )
    return f"{prefix}layers/{layer}"


def layer_attrs(attrs: dict[str, Any], layer: str | None = None) -> dict[str, Any]:
    """``attrs`` describing one stored layer alone (``layer``, ``layers``; None: the first),
    so whatever records them names the base that computes exactly those features."""
    name = layer if layer is not None else list(attrs.get("layers") or [attrs.get("layer")])[0]
    return {**attrs, "layer": name, "layers": [name]}


def extra_datasets(attrs: dict[str, Any], augmented: bool = False) -> list[str]:
    """Datasets of the layers after the first, in attrs["layers"] order."""
    prefix = "augmented/" if augmented else ""
    return [f"{prefix}layers/{name}" for name in list(attrs.get("layers") or [])[1:]]


def create_datasets(
    f: h5py.File,
    *,
    attrs: dict[str, Any],
    feature_shape: Sequence[int],
    dtype: str,
    compression: str = "none",
    extra_shapes: Sequence[Sequence[int]] = (),
) -> None:
    """Lay out an empty cache in the new file ``f``: every dataset with 0 rows, and the root
    attributes ``attrs`` plus the schema's own (version, created, counters at 0).

    Args:
        f: a file just opened for writing.
        attrs: the identity and settings of the cache (lists and dicts JSON-encoded here).
        feature_shape: the row shape of ``features``.
        dtype: the features' dtype (float32 or float16).
        compression: none | lzf | gzip, for the feature datasets: lzf is fast, gzip
            smaller; both are lossless and read transparently by any h5py.
        extra_shapes: the row shapes of the layers after the first, named by
            ``attrs["layers"][1:]``.

    Raises:
        RuntimeError: ``extra_shapes`` does not match ``attrs["layers"]`` (a caller's bug).
    """
    feature_shape = tuple(int(d) for d in feature_shape)
    np_dtype = np.dtype(dtype)
    rows = chunk_rows(feature_shape, np_dtype.itemsize)

    def feature_options(shape: Sequence[int]) -> dict[str, Any]:
        shape = tuple(int(d) for d in shape)
        options: dict[str, Any] = {
            "shape": (0, *shape),
            "maxshape": (None, *shape),
            "dtype": np_dtype,
            "chunks": (chunk_rows(shape, np_dtype.itemsize), *shape),
            "compression": None if compression == "none" else compression,
            "fletcher32": True,  # a damaged chunk fails loudly on read, never silently
        }
        if compression != "none":
            options["shuffle"] = True  # byte-shuffle: floats compress far better
        return options

    f.create_dataset("features", **feature_options(feature_shape))
    extra_names = extra_datasets(attrs)
    if len(extra_names) != len(extra_shapes):
        raise RuntimeError("internal error: extra layer names and shapes differ")
    for name, shape in zip(extra_names, extra_shapes, strict=True):
        f.create_dataset(name, **feature_options(shape))
        f.create_dataset(f"augmented/{name}", **feature_options(shape))
    vec_chunk = (max(rows, 1024),)
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                     fletcher32=True)
    for name in STR_COLUMNS + ("skipped/paths", "skipped/reasons"):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=vec_chunk)
    for name in INT_COLUMNS + ("skipped/size", "skipped/mtime_ns"):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                         fletcher32=True)
    f.create_dataset("augmented/features", **feature_options(feature_shape))
    for name in ("augmented/source", "augmented/pass") + (
        INDEX_COLUMNS if attrs.get("part_of") else ()
    ):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                         fletcher32=True)
    for key, value in attrs.items():
        f.attrs[key] = encode_attr(value)
    f.attrs["compression"] = compression
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    f.attrs["complete"] = False
    f.attrs["n_rows"] = 0
    f.attrs["n_skipped"] = 0
    f.attrs["n_augmented"] = 0
