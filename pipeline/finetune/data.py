"""The images side: the split's image files, checked on disk, and tf.data pipelines of them.

Fine-tuning trains on the images themselves, decoded exactly as extract decoded them for the
cache (:func:`pipeline.images.load_image`), and leaves out files that cannot be read as
extract does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import Cache
from pipeline.fit import split_rows
from pipeline.images import ImageReadError, load_image

__all__ = ["Part", "Split", "image_dataset", "part_datasets", "split_images"]


@dataclass(frozen=True)
class Part:
    """The cache rows of one part of the split and their image files, in the same order."""

    rows: np.ndarray
    paths: list[str]


@dataclass(frozen=True)
class Split:
    """The train, validation and test parts (the test part may be empty)."""

    train: Part
    val: Part
    test: Part


def split_images(cache: Cache, *, val_split: float, seed: int, data_dir: str | None,
                 test_split: float = 0.0) -> Split:
    """The cache's rows split exactly as fit_head split them, with their image files.

    The split is :func:`pipeline.fit.split_rows`', so the validation images of the head's
    fit are never trained on here.

    Args:
        cache: the cache the head was (or will be) trained on.
        val_split: the validation fraction, when the cache records no split.
        seed: the split's random state.
        data_dir: where the images are now; default: the folder the cache recorded.
        test_split: the test fraction fit_head held out (``--test-split``), if any.

    Returns:
        The three parts, each with its rows and files.

    Raises:
        ValueError: the split cannot be made, or the folder or an image is missing.
    """
    train, val, test = split_rows(
        cache.split, cache.labels, val_split, seed, class_names=cache.class_names,
        test_split=test_split,
    )
    paths = _image_paths(cache, np.concatenate([train, val, test]), data_dir)
    n_train, n_fit = train.size, train.size + val.size
    return Split(
        Part(train, paths[:n_train]), Part(val, paths[n_train:n_fit]), Part(test, paths[n_fit:])
    )


def _image_paths(cache: Cache, rows: np.ndarray, data_dir: str | None) -> list[str]:
    """Absolute paths of the cached rows; refuses a missing folder or moved images."""
    root = Path(data_dir or cache.attrs.get("data_dir", ""))
    if not str(root) or not root.is_dir():
        raise ValueError(
            f"The image folder is missing: the cache recorded data_dir={str(root)!r}. Fine-"
            "tuning trains on the images themselves: pass --data-dir where they are now. "
            f"Received: data_dir={str(root)!r}"
        )
    paths = [root / cache.paths[i] for i in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} images listed in the cache are missing from "
            f"{root} (first: {missing[0].relative_to(root)}). Were they moved? Pass "
            f"--data-dir where they are now, or re-extract. Received: data_dir={str(root)!r}"
        )
    return [str(p) for p in paths]


def image_dataset(
    paths: Sequence[str],
    targets: np.ndarray,
    *,
    size: tuple[int, int],
    interpolation: str,
    batch_size: int,
    shuffle_seed: int | None = None,
    unreadable: dict[str, str] | None = None,
    jpeg_downscale: str = "off",
) -> Any:
    """A ``tf.data`` pipeline of (image, target) batches, decoded as extract decodes them.

    Images are read with :func:`pipeline.images.load_image` (RGB float32 in 0..255 at
    ``size``) in a parallel ``map``; files that cannot be read are left out, as extract
    leaves them out, and recorded in ``unreadable``.

    Args:
        paths: image files.
        targets: one target per file.
        size: (H, W) to resize to.
        interpolation: the resize method the cache recorded.
        batch_size: images per batch (the last batch holds the rest).
        shuffle_seed: shuffle every epoch with this seed; None keeps the order.
        unreadable: filled with path -> reason for files that could not be read.
        jpeg_downscale: how the cache's JPEGs were decoded (extract --jpeg-downscale).

    Returns:
        A batched, prefetched ``tf.data.Dataset``.
    """
    import tensorflow as tf

    failures = unreadable if unreadable is not None else {}
    blank = np.zeros((*size, 3), np.float32)

    def read(path: bytes) -> tuple[np.ndarray, np.bool_]:
        name = path.decode("utf-8")
        try:
            return load_image(name, size, interpolation, jpeg_downscale), np.bool_(True)
        except ImageReadError as exc:
            failures[name] = str(exc)
            return blank, np.bool_(False)

    def load(path: Any, target: Any) -> tuple[Any, Any, Any]:
        image, ok = tf.numpy_function(read, [path], (tf.float32, tf.bool), stateful=False)
        image.set_shape((*size, 3))
        ok.set_shape(())
        return image, target, ok

    def readable(image: Any, target: Any, ok: Any) -> Any:
        return ok

    def pair(image: Any, target: Any, ok: Any) -> tuple[Any, Any]:
        return image, target

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, dtype=str), targets))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).filter(readable).map(pair)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def part_datasets(
    split: Split,
    *,
    labels: np.ndarray,
    classes: np.ndarray,
    size: tuple[int, int],
    interpolation: str,
    batch_size: int,
    seed: int,
    unreadable: dict[str, str],
    jpeg_downscale: str = "off",
) -> dict[str, Any]:
    """The parts as :func:`image_dataset` pipelines, targets in the head's output columns.

    Rows of classes the head never learnt cannot be scored or trained on: they are left
    out. A two-class head (one sigmoid output) takes float targets.

    Args:
        split: the parts.
        labels: every cache row's label.
        classes: the head's classes, in the order of its outputs.
        size: (H, W) to resize to.
        interpolation: the resize method the cache recorded.
        batch_size: images per batch.
        seed: the training images' shuffle seed.
        unreadable: filled with path -> reason for files that could not be read.
        jpeg_downscale: how the cache's JPEGs were decoded (extract --jpeg-downscale).

    Returns:
        ``{"train": ..., "val": ...}`` and ``"test"`` when the test part has rows; the
        training images are reshuffled every epoch, the others keep their order.
    """
    binary = len(classes) == 2

    def dataset(part: Part, shuffle_seed: int | None = None) -> Any:
        seen = np.isin(labels[part.rows], classes)
        y = np.searchsorted(classes, labels[part.rows][seen])
        return image_dataset(
            [p for p, s in zip(part.paths, seen, strict=True) if s],
            y.astype(np.float32) if binary else y,
            size=size,
            interpolation=interpolation,
            batch_size=batch_size,
            shuffle_seed=shuffle_seed,
            unreadable=unreadable,
            jpeg_downscale=jpeg_downscale,
        )

    datasets = {"train": dataset(split.train, shuffle_seed=seed), "val": dataset(split.val)}
    if split.test.rows.size:
        datasets["test"] = dataset(split.test)
    return datasets
