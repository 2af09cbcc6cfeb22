"""Reading a cache: its attributes, its row state (paths, hashes, stats), or all of it.

Readers open a cache read-only through :func:`pipeline.cache.schema.open_file`, which refuses
files holding links to data outside themselves. Nothing here imports Keras.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache.schema import (
    SCHEMA_VERSION,
    CacheError,
    decode_attrs,
    feature_dataset,
    layer_attrs,
    open_file,
    partial_path,
)

__all__ = [
    "Cache",
    "RowState",
    "check_cache_exists",
    "check_finite",
    "done_paths_of",
    "open_cache",
    "read_attrs",
    "read_cache",
    "read_row_state",
    "row_state_of",
]


def check_finite(features: np.ndarray, paths: Sequence[str] | None = None, *,
                 source: str = "") -> None:
    """Refuse features with NaN or infinite values, naming the first row that has them.

    Every reader that trains or scores on cached rows calls this (whole caches, row
    batches, augmented copies), so the message and its advice are one.

    Args:
        features: rows of features (any shape after the row axis).
        paths: the image path of each row, to name the first bad one (None: its index).
        source: where the rows come from ("in cache.h5"), for the message.

    Raises:
        ValueError: some row holds NaN or an infinite value.
    """
    bad = np.flatnonzero(~np.isfinite(features.reshape(len(features), -1)).all(axis=1))
    if bad.size:
        first = paths[bad[0]] if paths is not None else f"row {bad[0]}"
        raise ValueError(
            f"{bad.size} of {len(features)} rows{f' {source}' if source else ''} have NaN or "
            f"infinite features (first: {first}). Re-extract the cache; with float16 caches, "
            "large activations overflow: extract with --dtype float32."
        )


def open_cache(path: str | os.PathLike, **kwargs: Any) -> h5py.File:
    """Open a cache read-only (h5py keyword arguments allowed), checked as :func:`read_cache`.

    Raises:
        CacheError: unreadable, or holding links to data outside the file.
    """
    return open_file(Path(path), "r", **kwargs)


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a cache (or partial cache), JSON values decoded."""
    with open_file(Path(path), "r") as f:
        return decode_attrs(f.attrs)


@dataclass
class RowState:
    """What a cache knows about the files behind its rows and skipped entries."""

    paths: list[str]
    sha256: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    split: list[str]
    skipped_paths: list[str]
    skipped_size: np.ndarray
    skipped_mtime_ns: np.ndarray
    skipped_reasons: list[str] = field(default_factory=list)
    index: np.ndarray | None = None  # image-list positions (Ray parts only)
    skipped_index: np.ndarray | None = None


def row_state_of(f: h5py.File) -> RowState:
    """The :class:`RowState` of an open cache: its committed rows and skipped files."""
    n, m = int(f.attrs.get("n_rows", 0)), int(f.attrs.get("n_skipped", 0))
    indexed = "index" in f
    return RowState(
        list(f["paths"].asstr()[:n]), list(f["sha256"].asstr()[:n]), f["size"][:n],
        f["mtime_ns"][:n], list(f["split"].asstr()[:n]), list(f["skipped/paths"].asstr()[:m]),
        f["skipped/size"][:m], f["skipped/mtime_ns"][:m], list(f["skipped/reasons"].asstr()[:m]),
        f["index"][:n] if indexed else None, f["skipped/index"][:m] if indexed else None,
    )


def read_row_state(path: str | os.PathLike) -> RowState:
    """The :class:`RowState` of a cache file, read without its features."""
    with open_file(Path(path), "r") as f:
        return row_state_of(f)


def done_paths_of(f: h5py.File) -> set[str]:
    """Paths an open cache has committed, as rows or as skipped files."""
    rows = f["paths"].asstr()[: int(f.attrs.get("n_rows", 0))]
    skipped = f["skipped/paths"].asstr()[: int(f.attrs.get("n_skipped", 0))]
    return set(rows) | set(skipped)


@dataclass
class Cache:
    """A cache read into memory."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    split: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    augmented_features: np.ndarray | None = None
    augmented_source: np.ndarray | None = None
    augmented_pass: np.ndarray | None = None


def check_cache_exists(path: str | os.PathLike) -> Path:
    """The cache's path, if there is a file there (cheap: the CLIs call it before loading
    TensorFlow, so a typo fails in a fraction of a second).

    Raises:
        CacheError: no file; names an unfinished extraction of it when there is one.
    """
    path = Path(path)
    if not path.exists():
        hint = ""
        if partial_path(path).exists():
            hint = (
                f" An unfinished extraction exists at {partial_path(path)}: run the same "
                "extract command again to resume it."
            )
        raise CacheError(f"Cache file not found: {path}.{hint}")
    return path


def read_cache(
    path: str | os.PathLike,
    *,
    require_complete: bool = True,
    augmented: bool = False,
    features: bool = True,
    layer: str | None = None,
) -> Cache:
    """Read a whole cache into memory.

    Args:
        path: the ``.h5`` file written by extract.
        require_complete: refuse a cache whose extraction has not finished.
        augmented: also read the augmented copies (extract --augment).
        features: read the feature matrix; False leaves ``features`` empty (0 rows) for
            out-of-core use, with only the small columns in memory.
        layer: which stored layer to read (extract --layer a,b,c); default the first. The
            returned attrs then describe that layer alone (``layer``, ``layers``), so a head
            trained on it records the base that computes it.

    Raises:
        CacheError: the file is missing, unreadable, incomplete or not of this schema.
    """
    path = check_cache_exists(path)
    with open_file(path, "r") as f:
        attrs = decode_attrs(f.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(
                f"{path} is not a feature cache of schema_version {SCHEMA_VERSION}. "
                f"Received: schema_version={attrs.get('schema_version')!r}"
            )
        if require_complete and not attrs.get("complete", False):
            raise CacheError(
                f"{path} is an incomplete cache ({attrs.get('n_rows', 0)} rows committed): "
                "run the same extract command again to finish it."
            )
        n = int(attrs.get("n_rows", 0))
        name = feature_dataset(attrs, layer)
        augmented_name = feature_dataset(attrs, layer, augmented=True)
        if layer is not None:
            attrs = layer_attrs(attrs, layer)
        try:
            cache = Cache(
                features=f[name][: n if features else 0],
                labels=f["labels"][:n],
                paths=list(f["paths"].asstr()[:n]),
                split=np.asarray(f["split"].asstr()[:n], dtype=object),
                class_names=list(attrs["class_names"]),
                attrs=attrs,
                skipped=list(
                    zip(
                        f["skipped/paths"].asstr()[: attrs.get("n_skipped", 0)],
                        f["skipped/reasons"].asstr()[: attrs.get("n_skipped", 0)],
                        strict=True,
                    )
                ),
            )
            if augmented:
                m = int(attrs.get("n_augmented", 0))
                cache.augmented_features = f[augmented_name][:m]
                cache.augmented_source = f["augmented/source"][:m]
                cache.augmented_pass = f["augmented/pass"][:m]
        except (KeyError, OSError, RuntimeError) as exc:
            raise CacheError(f"{path} is damaged ({exc}): delete it and re-extract.") from exc
    return cache
