"""``run_extract``: one folder (or manifest) of images -> frozen base -> one HDF5 cache."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bases import FeatureModel, is_application, resolve_base
from pipeline.cache import (
    IDENTITY_DEFAULTS,
    CacheError,
    CacheLock,
    CacheWriteError,
    CacheWriter,
    identity_differences,
    partial_path,
    read_attrs,
)
from pipeline.extract.config import (
    ExtractConfig,
    ExtractResult,
    default_out,
    parse_shard,
    shard_slice,
    validate,
)
from pipeline.extract.engine import ExtractInterrupted, build_model, stopped
from pipeline.extract.local_engine import augment_loop, extract_loop
from pipeline.extract.sync import drop_stale_rows, file_stats, find_leaks, up_to_date
from pipeline.images import ImageIndex, check_interpolation, index_data
from pipeline.interrupts import deferred

__all__ = ["run_extract"]

log = logging.getLogger(__name__)


def run_extract(config: ExtractConfig) -> ExtractResult:
    """Extract bottleneck features for every image of a folder into one HDF5 cache.

    Protocol: validate every argument; index the folder, or the manifest CSV that
    ``data_dir`` names (fixed order, one record per image file; a manifest is ordered as the
    folder tree it describes: pipeline/images/manifest.py); build the frozen feature model;
    open the cache (resume a partial one, append to a complete one, or create it; a cache of
    another configuration is refused); then decode images in threads, run full batches of
    readable images through the model and commit each batch (rows + files skipped on the
    way) from a writer thread. With ``augment=K``, K seeded augmented passes of every
    training row follow (only the passes not yet stored). Batches are formed the same way on
    a resume, so an interrupted run finishes byte-identical to an uninterrupted one. Ctrl-C
    / SIGTERM commit what is done and raise :class:`ExtractInterrupted`. With
    ``engine='ray'`` the decoding and forward pass of the images to do run on a Ray cluster
    instead (pipeline/extract/ray_engine.py); everything else is this same path.

    Raises:
        ValueError: a bad argument, folder or manifest (Keras-style message).
        CacheError: a cache of another configuration exists at the output path.
        ExtractInterrupted: stopped by Ctrl-C or SIGTERM; the partial cache is resumable.
    """
    # Keras lower-cases the method; the cache records (and compares) the lower-case name.
    config = dataclasses.replace(config, interpolation=check_interpolation(config.interpolation))
    size = validate(config)
    if config.engine == "ray":  # Ray is optional: imported only when asked for
        from pipeline.extract.ray_engine import check_ray_config

        check_ray_config(config)
    out: Path | None = None
    try:
        index: ImageIndex = index_data(config.data_dir)
        if (shard := parse_shard(config.shard)) is not None:
            part = shard_slice(len(index.records), shard, config.batch_size)
            index.records, index.first = index.records[part], part.start
        stats = file_stats(index)
        _report_ignored(index.ignored)
        _report_empty_classes(index)
        out = Path(config.out) if config.out else None
        # Before building the base, where its input size is known without it: a keras-hub
        # preset's size is in its files.
        if out is None and (size or is_application(config.base)):
            out = default_out(config, size or (resolve_base(config.base).default_size,) * 2)
        if out is not None and (result := up_to_date(config, index, out, stats)) is not None:
            return result
        if config.engine == "ray":
            from pipeline.extract.ray_workers import keep_off_gpus

            keep_off_gpus()  # this copy of the base only tells the cache its attributes
        with deferred():  # Ctrl-C while the base is built stops right after it
            feature_model = build_model(config, size)
        import keras

        attrs = dict(feature_model.attrs)
        attrs.update(
            interpolation=config.interpolation,
            jpeg_downscale=config.jpeg_downscale,
            dtype=config.dtype,
            class_names=index.class_names,
            keras_version=keras.__version__,
            backend=keras.backend.backend(),
            layout=index.layout,
            data_dir=str(index.root.resolve()),
            **_source_attrs(index),
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


def _source_attrs(index: ImageIndex) -> dict[str, str]:
    """Where a manifest's records came from: its path and sha256 (nothing for a folder).

    The sha256 tells a re-run that the manifest changed (a label or split may differ for
    the same path, which file stats cannot see): then the rows are checked against it.
    """
    if index.manifest is None:
        return {}
    return {"manifest": str(index.manifest.resolve()),
            "manifest_sha256": index.manifest_sha256 or ""}


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


# The extract option behind each identity attribute it sets, named in a refusal.
_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(ExtractConfig)}


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
        diffs = identity_differences(old, attrs, _FLAGS)
        if diffs:
            # Caches made before folding was the default: say how to go on appending.
            unfolded = not old.get("fold_batchnorm", IDENTITY_DEFAULTS["fold_batchnorm"])
            hint = ("\nOr append with `fold_batchnorm`='off', as the cache was made."
                    if unfolded and attrs.get("fold_batchnorm") else "")
            raise CacheError(
                f"{existing} was made with another configuration; it is never appended to. "
                "Differences:\n" + "\n".join(diffs) + "\nUse another --out, or delete the "
                "file to re-extract." + hint
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
    log.warning("extract: %s %s; moved to %s, starting over.", path, why, aside)


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
            writer, changes = drop_stale_rows(writer, index, stats)
            if index.manifest is not None:  # the manifest the rows now agree with
                writer.set_attrs(**_source_attrs(index))
            augmented = writer.n_augmented
            first_row = writer.n_rows
            done = writer.done_paths()
            todo = [r for r in index.records if r.path not in done]
            new_skipped: list[tuple[str, str]] = []
            if todo:
                verb = f"resuming after {writer.n_rows} rows" if mode == "resume" else "starting"
                log.info("extract: %s; %d images to do (%d in %d classes, layout %s) -> %s",
                         verb, len(todo), len(index.records), len(index.class_names),
                         index.layout, out)
                log.info("extract: base %s (weights %s), pooling %s, input %s, preprocess %s, "
                         "%s, BatchNormalization %s, JPEG downscale %s",
                         attrs["base"], attrs["weights"], attrs["pooling"],
                         feature_model.input_size, attrs["preprocess"], attrs["precision"],
                         "folded" if attrs.get("fold_batchnorm") else "not folded",
                         attrs.get("jpeg_downscale", "off"))
                _check_space(feature_model, len(todo), config, out)
                loop = extract_loop
                if config.engine == "ray":
                    from pipeline.extract.ray_engine import extract_on_ray as loop
                new_skipped = loop(config, index, feature_model, writer, todo, stats)
            # New rows of a cache that already holds K passes get those K passes too.
            passes = max(config.augment, int(writer.attrs.get("augment_passes", 0)))
            if passes:
                augment_loop(config, index, feature_model, writer, passes)
            seconds = time.monotonic() - start
            n_rows, n_skipped = writer.n_rows, writer.n_skipped
            new_augmented = writer.n_augmented - augmented
            wrote = n_rows != first_row or any(changes.values()) or new_augmented != 0
            leaks = find_leaks(writer.row_state())
            writer.set_attrs(leaks=len(leaks))
            path = writer.finish()
        finally:
            writer.close()
    _report_skipped(new_skipped, index.notes)
    _report_leaks(leaks)
    return ExtractResult(path, "extracted" if wrote else "up-to-date", n_rows, n_rows - first_row,
                         n_skipped, new_skipped, feature_model.feature_shape, config.dtype, seconds,
                         changes=changes, n_new_augmented=new_augmented)


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
        log.info("extract: layer %s: features %s %s, ~%s MB for %d images%s", name, shape,
                 config.dtype, f"{size / 1e6:,.1f}", n_images,
                 f" x {copies} with augmented passes" if copies > 1 else "")
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
    # Compression can only shrink this; appending to a finished cache copies it once more.
    if total > free:
        raise CacheError(
            f"The features would take ~{total / 1e9:,.2f} GB but {out.parent} has "
            f"{free / 1e9:,.2f} GB free. Pool them (--pooling avg), choose fewer or later "
            f"layers, use --dtype float16 or --compression gzip, or free space. "
            f"Received: layer={config.layer!r}, pooling={config.pooling!r}"
        )


def _report_list(header: str, lines: list[str], *, limit: int = 10, more: str = "") -> None:
    """One warning: ``extract: <header>`` then the first ``limit`` lines, indented."""
    if not lines:
        return
    shown = [f"extract: {header}", *(f"  {line}" for line in lines[:limit])]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more{more}")
    log.warning("\n".join(shown))


def _report_ignored(ignored: list[str]) -> None:
    _report_list(f"ignored {len(ignored)} entries of the data folder:", ignored)


def _report_empty_classes(index: ImageIndex) -> None:
    """Warn about classes with no validation images: fit_head can score nothing for them."""
    if not any(r.split == "validation" for r in index.records):
        return
    seen = {r.label for r in index.records if r.split == "validation"}
    missing = [name for i, name in enumerate(index.class_names) if i not in seen]
    if missing:
        log.warning("extract: warning: no validation images of %s: fit_head can give no "
                    "score for %s", ", ".join(missing),
                    "it" if len(missing) == 1 else f"these {len(missing)} classes")


def _report_leaks(leaks: list[tuple[str, str]]) -> None:
    _report_list(f"warning: {len(leaks)} images appear in two splits with identical bytes "
                 "(leakage: validation/test scores will read high):",
                 [f"{a} == {b}" for a, b in leaks])


def _report_skipped(skipped: list[tuple[str, str]], notes: dict[str, str]) -> None:
    # A manifest's missing file is named with its line (notes), beside the decoder's reason.
    _report_list(f"skipped {len(skipped)} unreadable files:",
                 [f"{path}: {reason}" + (f" ({notes[path]})" if path in notes else "")
                  for path, reason in skipped], limit=20,
                 more=" (all listed in the cache's skipped/paths and skipped/reasons)")
