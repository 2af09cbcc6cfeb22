"""The rows a compare run scores: caches read and aligned by path, features, scratch images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import Cache, check_finite, read_cache
from pipeline.compare.decisions import match_caches
from pipeline.progress import Progress

__all__ = [
    "cache_entries",
    "cache_features",
    "load_caches",
    "load_data",
    "load_scratch_images",
]


def cache_entries(paths: Sequence[str], layers: str | None) -> list[tuple[str, str | None]]:
    """(cache path, stored layer) to compare: one per cache, or one per requested layer.

    ``layers`` is ``a,b`` (each cache must hold them) or ``all`` (every layer each cache
    holds, bottom to top), so layers line up exactly as bases do: same rows, same folds.

    Args:
        paths: the cache files.
        layers: ``a,b``, ``all``, or None for each cache's default layer.

    Returns:
        One (cache path, layer or None) per compared entry, in the caches' order.

    Raises:
        ValueError: a cache without a requested layer.
    """
    from pipeline.cache import read_attrs

    if layers is None:
        return [(p, None) for p in paths]
    entries = []
    for path in paths:
        attrs = read_attrs(path)
        stored = list(attrs.get("layers") or [attrs.get("layer")])
        wanted = stored if layers == "all" else [n.strip() for n in layers.split(",") if n]
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise ValueError(
                f"{path} holds the layers {stored}; extract with --layer to add others. "
                f"Received: layers={layers!r}"
            )
        entries += [(path, name) for name in wanted]
    return entries


def load_caches(
    entries: Sequence[tuple[str, str | None]]
) -> tuple[list[Cache], list[np.ndarray]]:
    """Read every (cache, layer) and align its rows with the first one's, by path.

    Args:
        entries: (cache path, stored layer or None), as :func:`cache_entries`.

    Returns:
        ``(caches, orders)``: ``caches[i].features[orders[i]]`` is in the first cache's order.

    Raises:
        ValueError: the caches do not hold the same images (see ``match_caches``).
        pipeline.cache.CacheError: a cache is incomplete or damaged.
    """
    caches = [read_cache(p, layer=layer) for p, layer in entries]
    names = [Path(p).name + (f" @ {layer}" if layer else "") for p, layer in entries]
    if len(set(names)) != len(names):
        names = [str(p) + (f" @ {layer}" if layer else "") for p, layer in entries]
    orders = match_caches(caches, names)
    return caches, orders


def cache_features(cache: Cache, order: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The cache's features in the shared row order as float32, or why they are unusable.

    Args:
        cache: a cache, read.
        order: its row order, from :func:`load_caches`.

    Returns:
        ``(X, problem)``: ``problem`` names the rows with NaN or infinite features, or is None.
    """
    X = np.asarray(cache.features[order], dtype=np.float32)
    try:
        check_finite(X, [cache.paths[i] for i in order])
    except ValueError as exc:
        return X, str(exc)
    return X, None


def load_scratch_images(
    data_dir: Path, paths: Sequence[str], attrs: dict[str, Any]
) -> tuple[np.ndarray | None, str | None]:
    """Decode the cached images for the scratch row as extract did (size, interpolation,
    jpeg_downscale).

    Args:
        data_dir: the folder the caches were extracted from.
        paths: the cached images' paths relative to ``data_dir``, in the shared row order.
        attrs: the first cache's attributes (``input_size``, ``interpolation``,
            ``jpeg_downscale``).

    Returns:
        ``(images, None)``, or ``(None, why)`` when the images cannot all be decoded.
    """
    from pipeline.cache import recorded_jpeg_downscale
    from pipeline.images import ImageReadError, load_image

    size = attrs.get("input_size")
    if not size or len(size) != 2:
        return None, f"the cache records no input_size (Received: input_size={size!r})"
    interpolation = attrs.get("interpolation", "bilinear")
    jpeg_downscale = recorded_jpeg_downscale(attrs)
    images = np.empty((len(paths), int(size[0]), int(size[1]), 3), dtype=np.float32)
    failed: list[str] = []
    progress = Progress(len(paths), "compare: decode for --scratch", unit="img")
    for i, rel in enumerate(paths):
        try:
            images[i] = load_image(data_dir / rel, tuple(size), interpolation, jpeg_downscale)
        except (ImageReadError, OSError):
            failed.append(rel)
        progress.update()
    progress.close()
    if failed:
        return None, (
            f"{len(failed)} of {len(paths)} cached images cannot be read from {data_dir} "
            f"(first: {failed[0]}); give the folder the caches were extracted from"
        )
    return images, None


def load_data(
    caches: Sequence[Cache], orders: Sequence[np.ndarray], *, scratch: str | None
) -> tuple[list[np.ndarray], list[str | None]]:
    """Every data array the pairs read, aligned: each cache's features, then scratch images.

    Args:
        caches: the caches, read.
        orders: their row orders, from :func:`load_caches`.
        scratch: the folder of the cached images, or None for no scratch row.

    Returns:
        ``(data, data_skips)``: one array per cache (and one for the scratch images, zeros
        when they cannot be decoded) and, for each, why it is unusable or None.
    """
    data: list[np.ndarray] = []
    data_skips: list[str | None] = []
    for cache, order in zip(caches, orders, strict=True):
        X, problem = cache_features(cache, order)
        data.append(X)
        data_skips.append(problem)
    if scratch is not None:
        ref = caches[0]
        images, problem = load_scratch_images(Path(scratch), ref.paths, ref.attrs)
        data.append(images if images is not None else np.zeros((len(ref.labels), 1, 1, 3)))
        data_skips.append(problem)
    return data, data_skips
