"""The cache against the folder (or manifest): up to date, or which rows are stale.

A cache row records its file's size, mtime and sha256; a changed size or mtime leads to
a hash, and only a different hash counts as a change. A manifest can also change a row's
label or split without touching its file: the cache records the manifest's sha256, and a
row whose label or split no longer matches is stale too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import (
    CacheWriter,
    partial_path,
    read_attrs,
    read_row_state,
)
from pipeline.extract.config import ExtractConfig, ExtractResult
from pipeline.images import ImageIndex
from pipeline.util.files import file_sha256

__all__ = ["drop_stale_rows", "file_stats", "find_leaks", "up_to_date"]

log = logging.getLogger(__name__)


# ExtractConfig fields that decide what the features are: a complete cache made with the
# same values (and unchanged files) is up to date without building the model.
_FEATURE_FIELDS = (
    "base", "weights", "input_size", "layer", "pooling", "preprocess", "interpolation",
    "jpeg_downscale", "dtype", "seed", "mixed_precision", "augment_flip", "augment_rotation",
    "augment_zoom", "augment_translation", "fold_batchnorm", "precision",
)
# A config recorded before the field existed ran as this (the one way there was then).
_FIELD_DEFAULTS = {"jpeg_downscale": "off", "fold_batchnorm": "off", "precision": "float32"}


def up_to_date(
    config: ExtractConfig, index: ImageIndex, out: Path, stats: dict[str, tuple[int, int]]
) -> ExtractResult | None:
    """The result of a run with nothing to do, decided from the cache's records alone."""
    if not out.exists() or partial_path(out).exists():
        return None
    old = read_attrs(out)
    recorded = old.get("config") or {}
    same = (
        old.get("complete")
        and all(recorded.get(k, _FIELD_DEFAULTS.get(k)) == getattr(config, k)
                for k in _FEATURE_FIELDS)
        and old.get("class_names") == index.class_names
        and int(old.get("augment_passes", 0)) >= config.augment
        # A changed manifest may relabel rows whose files are untouched: look closer.
        and old.get("manifest_sha256") == index.manifest_sha256
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


def file_stats(index: ImageIndex) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every listed file: the cheap first test for a changed file."""
    out = {}
    for record in index.records:
        try:
            st = os.stat(index.root / record.path)
            out[record.path] = (int(st.st_size), int(st.st_mtime_ns))
        except OSError:
            out[record.path] = (-1, -1)  # vanished since listing: decode will skip it
    return out


def drop_stale_rows(
    writer: CacheWriter, index: ImageIndex, stats: dict[str, tuple[int, int]]
) -> tuple[CacheWriter, dict[str, int]]:
    """Remove rows of deleted, changed or relabelled images (and skipped entries to retry).

    A row whose file's size or mtime changed is hashed again; only a different sha256
    counts as changed, so a touched-but-identical image keeps its row. A row whose label
    or split differs from the index (a manifest edited since; in a folder both follow
    from the path) is relabelled. Changed and relabelled images are then extracted again
    like new ones.
    """
    state = writer.row_state()
    labels = writer.dataset("labels")[: len(state.paths)].tolist()
    listed = {r.path: (r.label, r.split) for r in index.records}
    deleted = changed = relabelled = 0
    keep_rows, touched = [], []
    for row, path in enumerate(state.paths):
        now = stats.get(path)
        if now is None:
            deleted += 1
            continue
        if listed[path] != (labels[row], state.split[row]):
            relabelled += 1
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
    changes = {"deleted": deleted, "changed": changed, "relabelled": relabelled,
               "retried_skipped": retried}
    if deleted or changed or relabelled or retried:
        log.warning("extract: the data changed: %d images deleted, %d changed, %d with "
                    "another label or split, %d skipped files to retry; rewriting the cache "
                    "without them.", deleted, changed, relabelled, retried)
        writer = writer.rewrite(np.asarray(keep_rows, dtype=np.int64),
                                np.asarray(keep_skipped, dtype=np.int64))
    return writer, changes


def _file_digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


def find_leaks(state: Any) -> list[tuple[str, str]]:
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
