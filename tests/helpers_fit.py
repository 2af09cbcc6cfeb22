"""Synthetic feature caches for the heads and fit tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.cache import CacheWriter

CLASS_NAMES = ["cat", "dog", "owl"]


def blobs(
    n_per_class: int, n_classes: int, shape: Sequence[int] = (16,), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: features (N, *shape) float32 and int labels, shuffled."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    # Centers ~6 sigma apart in 16 dims: every head should classify them almost perfectly.
    centers = rng.normal(0.0, 3.0, size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    rng.shuffle(y)
    X = centers[y] + rng.normal(0.0, 1.0, size=(len(y), dim))
    return X.reshape(len(y), *shape).astype(np.float32), y


def offset_blobs(
    n_per_class: int,
    n_classes: int,
    *,
    scale: float,
    shape: Sequence[int] = (16,),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`blobs` shrunk onto per-feature offsets in 5..10, all times ``scale``.

    As features straight from a base: far from zero, with the class in a small part of
    each value. Still separable (StandardScaler + logistic regression scores 1.0), but a
    network on the raw values sees mostly the offsets.
    """
    X, y = blobs(n_per_class, n_classes, shape, seed)
    offsets = np.random.default_rng(seed + 1).uniform(5.0, 10.0, size=X.shape[1:])
    return ((offsets + 0.05 * X.astype(np.float64)) * scale).astype(np.float32), y


def attrs_for(class_names: Sequence[str], dtype: str = "float32") -> dict:
    """Plausible identity attributes of a cache."""
    return {
        "base": "dummy",
        "weights": "none",
        "layer": "top",
        "pooling": "avg",
        "input_size": [32, 32],
        "interpolation": "bilinear",
        "preprocess": "none",
        "dtype": dtype,
        "class_names": list(class_names),
    }


def make_cache(
    path: Path,
    X: np.ndarray,
    y: np.ndarray,
    *,
    split: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    dtype: str = "float32",
    finish: bool = True,
    batch: int = 64,
) -> Path:
    """Write X, y (and split) as a cache at ``path``; with finish=False leave it partial."""
    class_names = list(class_names or CLASS_NAMES[: int(np.max(y)) + 1])
    split = list(split) if split is not None else [""] * len(y)
    paths = [f"{class_names[label]}/img_{i:04d}.png" for i, label in enumerate(y)]
    writer = CacheWriter.create(
        path, attrs=attrs_for(class_names, dtype), feature_shape=X.shape[1:], dtype=dtype
    )
    for start in range(0, len(y), batch):
        stop = start + batch
        writer.append(X[start:stop], y[start:stop], paths[start:stop], split[start:stop])
    if not finish:
        writer.close()
        return path
    return writer.finish()
