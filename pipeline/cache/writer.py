"""The HDF5 feature store: the one place that knows the cache layout.

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

While extraction runs, rows go to ``<out>.partial``; each commit writes the rows first
and the ``n_rows`` attribute last, so a resume trusts exactly the committed rows. Only a
finished cache is renamed to ``<out>`` with ``complete=True``: the final path never holds
an incomplete cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "IDENTITY_KEYS",
    "SCHEMA_VERSION",
    "Cache",
    "CacheError",
    "CacheWriteError",
    "CacheWriter",
    "chunk_rows",
    "copy_rows",
    "feature_dataset",
    "open_cache",
    "identity_differences",
    "merge_parts",
    "partial_path",
    "RowState",
    "read_attrs",
    "read_cache",
    "read_row_state",
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
    "preprocess",
    "dtype",
    "precision",
    "seed",
    "class_names",
)
_STR = h5py.string_dtype("utf-8")
# Per-row columns besides features and labels.
_STR_COLUMNS = ("paths", "split", "sha256")
_INT_COLUMNS = ("size", "mtime_ns")
_ROW_COLUMNS = ("features", "labels", *_STR_COLUMNS, *_INT_COLUMNS)
_SKIPPED_COLUMNS = ("skipped/paths", "skipped/reasons", "skipped/size", "skipped/mtime_ns")
# Ray parts are written by many actors in no set order, and Ray may run a batch twice:
# the image-list position of every row and skipped file lets a merge sort and de-duplicate.
_INDEX_COLUMNS = ("index", "skipped/index")
# Attributes only a Ray part carries; a merged cache drops them.
PART_KEYS = ("part_of", "listing", "n_images")


class CacheError(ValueError):
    """A cache file that cannot be used as asked (incomplete, corrupt, mismatched)."""


class CacheWriteError(CacheError):
    """Writing the cache failed (disk full, file size limit, I/O error)."""


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


def _encode_attr(value: Any) -> Any:
    # Lists and dicts are stored as JSON so a user reads them with json.loads.
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return value


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
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


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines ``key: old != new`` for every identity attribute that differs."""
    diffs = []
    for key in IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            diffs.append(f"  {key}: cache has {old.get(key)!r}, this run has {new.get(key)!r}")
    return diffs


def open_cache(path: str | os.PathLike, **kwargs: Any) -> h5py.File:
    """Open a cache read-only (h5py keyword arguments allowed), checked as :func:`read_cache`.

    Raises:
        CacheError: unreadable, or holding links to data outside the file.
    """
    return _open(Path(path), "r", **kwargs)


def _open(path: Path, mode: str, **kwargs: Any) -> h5py.File:
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


def _extra_datasets(attrs: dict[str, Any], augmented: bool = False) -> list[str]:
    """Datasets of the layers after the first, in attrs["layers"] order."""
    prefix = "augmented/" if augmented else ""
    return [f"{prefix}layers/{name}" for name in list(attrs.get("layers") or [])[1:]]


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a cache (or partial cache), JSON values decoded."""
    with _open(Path(path), "r") as f:
        return _decode_attrs(f.attrs)


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


def _row_state(f: h5py.File) -> RowState:
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
    with _open(Path(path), "r") as f:
        return _row_state(f)


def _done_paths(f: h5py.File) -> set[str]:
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
    path = Path(path)
    if not path.exists():
        hint = ""
        if partial_path(path).exists():
            hint = (
                f" An unfinished extraction exists at {partial_path(path)}: run the same "
                "extract command again to resume it."
            )
        raise CacheError(f"Cache file not found: {path}.{hint}")
    with _open(path, "r") as f:
        attrs = _decode_attrs(f.attrs)
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
            attrs = {**attrs, "layer": layer, "layers": [layer]}
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


def _copy(
    f: h5py.File, attrs: dict[str, Any], final: Path, keep_rows: np.ndarray,
    keep_skipped: np.ndarray,
) -> CacheWriter:
    """Copy the given rows, skipped entries and augmented copies of ``f`` into a new
    partial cache for ``final``, chunk by chunk (memory stays flat)."""
    features = f["features"]
    new = CacheWriter.create(
        final, attrs=attrs, feature_shape=features.shape[1:], dtype=str(features.dtype),
        compression=str(attrs.get("compression", "none")),
        extra_shapes=[f[name].shape[1:] for name in _extra_datasets(attrs)],
    )
    _copy_into(f, attrs, new, keep_rows, keep_skipped)
    return new


def _copy_into(
    f: h5py.File, attrs: dict[str, Any], new: CacheWriter, keep_rows: np.ndarray,
    keep_skipped: np.ndarray,
) -> None:
    """Append the given rows, skipped entries and augmented copies of ``f`` to ``new``;
    augmented copies follow their source row to its new index."""
    features = f["features"]
    extra = [f[name] for name in _extra_datasets(attrs)]
    augmented_extra = [f[name] for name in _extra_datasets(attrs, augmented=True)]
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
                  for i, name in enumerate(_SKIPPED_COLUMNS)) for j in keep_skipped]
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
            with _open(part, "r") as f:
                n, m = int(part_attrs["n_rows"]), int(part_attrs["n_skipped"])
                _copy_into(f, part_attrs, new, np.arange(n), np.arange(m))
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
    with _open(source, "r") as f:
        return CacheWriter.create(
            final, attrs=attrs, feature_shape=f["features"].shape[1:],
            dtype=str(f["features"].dtype), compression=str(attrs.get("compression", "none")),
            extra_shapes=[f[name].shape[1:] for name in _extra_datasets(attrs)],
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
            files[path] = _open(Path(path), "r")
        return files[path]

    features = writer._f["features"]
    # Chunks of ~32 MiB of features: memory stays flat, commits stay few.
    step = chunk_rows(features.shape[1:], features.dtype.itemsize, target_bytes=32 << 20)
    names = ["features", *writer._extra, "labels", *_STR_COLUMNS, *_INT_COLUMNS]
    try:
        for start in range(0, len(rows), step):
            chunk = _gather(rows[start : start + step], source, names)
            writer.append(
                chunk["features"], chunk["labels"], chunk["paths"], chunk["split"],
                sha256=chunk["sha256"], size=chunk["size"], mtime_ns=chunk["mtime_ns"],
                extra=[chunk[name] for name in writer._extra],
            )
            if on_rows is not None:
                on_rows(len(chunk["labels"]))
        if skipped:
            entries = _gather(skipped, source, list(_SKIPPED_COLUMNS))
            writer.append(features[:0], [], [], [],
                          list(zip(*(entries[name].tolist() for name in _SKIPPED_COLUMNS),
                                   strict=True)),
                          extra=[writer._f[name][:0] for name in writer._extra])
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


class CacheWriter:
    """Appends committed batches of rows to ``<out>.partial`` and finishes it into ``<out>``.

    Use :meth:`create` for a new cache and :meth:`resume` to continue a partial one.
    """

    def __init__(self, final: Path, f: h5py.File) -> None:
        self.final = final
        self.partial = partial_path(final)
        self._f = f
        self.attrs = _decode_attrs(f.attrs)
        self.n_rows = int(self.attrs.get("n_rows", 0))
        self.n_skipped = int(self.attrs.get("n_skipped", 0))
        self.n_augmented = int(self.attrs.get("n_augmented", 0))
        self._extra = _extra_datasets(self.attrs)
        self._augmented_extra = _extra_datasets(self.attrs, augmented=True)
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
        extra_names = _extra_datasets(attrs)
        if len(extra_names) != len(extra_shapes):
            raise RuntimeError("internal error: extra layer names and shapes differ")
        for name, shape in zip(extra_names, extra_shapes, strict=True):
            f.create_dataset(name, **feature_options(shape))
            f.create_dataset(f"augmented/{name}", **feature_options(shape))
        vec_chunk = (max(rows, 1024),)
        f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                         fletcher32=True)
        for name in _STR_COLUMNS + ("skipped/paths", "skipped/reasons"):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=vec_chunk)
        for name in _INT_COLUMNS + ("skipped/size", "skipped/mtime_ns"):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                             fletcher32=True)
        f.create_dataset("augmented/features", **feature_options(feature_shape))
        for name in ("augmented/source", "augmented/pass") + (
            _INDEX_COLUMNS if attrs.get("part_of") else ()
        ):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=vec_chunk,
                             fletcher32=True)
        for key, value in attrs.items():
            f.attrs[key] = _encode_attr(value)
        f.attrs["compression"] = compression
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = False
        f.attrs["n_rows"] = 0
        f.attrs["n_skipped"] = 0
        f.attrs["n_augmented"] = 0
        f.flush()
        return cls(final, f)

    @classmethod
    def resume(cls, final: str | os.PathLike) -> CacheWriter:
        """Reopen ``<final>.partial``, dropping anything written after the last commit."""
        final = Path(final)
        f = _open(partial_path(final), "r+")
        writer = cls(final, f)
        f.attrs["complete"] = False
        # Rows past n_rows were written by a batch whose commit never finished.
        indexed = _INDEX_COLUMNS if writer._indexed else ()
        for name in (*_ROW_COLUMNS, *writer._extra, *indexed[:1]):
            f[name].resize(writer.n_rows, axis=0)
        for name in (*_SKIPPED_COLUMNS, *indexed[1:]):
            f[name].resize(writer.n_skipped, axis=0)
        for name in ("augmented/features", "augmented/source", "augmented/pass",
                     *writer._augmented_extra):
            f[name].resize(writer.n_augmented, axis=0)
        return writer

    def done_paths(self) -> set[str]:
        """Paths already committed, as rows or as skipped files."""
        return _done_paths(self._f)

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
            self._f.attrs[key] = _encode_attr(value)
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
            for j, name in enumerate(_SKIPPED_COLUMNS):
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
        return _row_state(self._f)

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
        new = _copy(self._f, {**self.attrs, **counters}, tmp, keep_rows, keep_skipped)
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
