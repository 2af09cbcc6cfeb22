"""The parent's work to feed the forward pass: preprocessing in the parent or in the decoders.

The process that runs the forward pass must not touch pixels: one parent feeds every
decoder, so its core-ms per image caps the whole pipeline (1000 / it img/s). Per
preprocessing mode (``tf``: MobileNetV2, ``caffe``: ResNet50/VGG, ``torch``: DenseNet),
interleaved ``repeats`` times over the same JPEGs, both with worker processes decoding:

    parent    ``decoded_batches(preprocess="none")``, then ``all_features`` copies each
              batch into the forward pass's input array and preprocesses it there
              (extract up to docs/performance.md's "Update 2026-12-03d")
    decoders  ``decoded_batches(preprocess=mode)``: each worker preprocesses its image in
              its slot; ``all_features(..., preprocessed=True)`` hands a whole batch to the
              forward pass as it is

The forward pass is a real Keras model that keeps each image's top-left pixel, so that
what remains is the feed: the parent's CPU time (``getrusage``, all its threads) per
image, and img/s.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FEED_MODES", "measure_feed"]

FEED_MODES = ("tf", "caffe", "torch")


def _parent_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pooling_model(size: int, mode: str, batch_size: int) -> Any:
    import keras

    from pipeline.bases.model import FeatureModel

    inputs = keras.Input((size, size, 3))
    # Each image's top-left pixel: the batch goes to the backend whole, and nothing is
    # computed on it (TF's global average pool cost 0.3-0.7 core-ms per 224 px image).
    corner = keras.layers.Cropping2D(((0, size - 1), (0, size - 1)))(inputs)
    model = keras.Model(inputs, keras.layers.Flatten()(corner))
    return FeatureModel(model, {}, (size, size), mode, batch_size=batch_size)


def _fed(paths: Sequence[Path], fm: Any, *, in_decoders: bool, workers: int) -> int:
    from pipeline.images.batches import decoded_batches

    n = 0
    for batch in decoded_batches(paths, size=fm.input_size, batch_size=fm.batch_size,
                                 workers=workers, decode="processes",
                                 preprocess=fm.preprocess if in_decoders else "none"):
        fm.all_features(batch.images, preprocessed=in_decoders)
        n += len(batch.indices)
    return n


def measure_feed(paths: Sequence[Path], *, size: int, batch_size: int, workers: int,
                 repeats: int, modes: Sequence[str] = FEED_MODES) -> list[dict[str, Any]]:
    """Parent core-ms per image and img/s, preprocessing in the parent or in the decoders.

    Returns:
        Per mode: each way's median wall seconds, img/s and parent core-ms per image, and
        the parent's core-ms in the decoders' way over the parent's way.
    """
    n = len(paths)
    out = []
    for mode in modes:
        fm = _pooling_model(size, mode, batch_size)
        runs: dict[str, list[tuple[float, float]]] = {"parent": [], "decoders": []}
        for name in runs:  # untimed warm-up: the file cache, the graph's trace
            _fed(paths[:batch_size], fm, in_decoders=name == "decoders", workers=workers)
        for _ in range(repeats):
            for name, timings in runs.items():
                wall, cpu = time.perf_counter(), _parent_cpu()
                done = _fed(paths, fm, in_decoders=name == "decoders", workers=workers)
                timings.append((time.perf_counter() - wall, _parent_cpu() - cpu))
                if done != n:
                    raise RuntimeError(f"feed: {done} of {n} images read")
        result: dict[str, Any] = {"mode": mode, "size": size, "batch_size": batch_size,
                                  "workers": workers, "n_images": n}
        for name, timings in runs.items():
            wall = float(np.median([t[0] for t in timings]))
            result[name] = {"median_s": wall, "img_s": n / wall,
                            "parent_core_ms_per_img": 1e3 * float(
                                np.median([t[1] for t in timings])) / n}
        result["decoders/parent core-ms"] = (result["decoders"]["parent_core_ms_per_img"]
                                             / result["parent"]["parent_core_ms_per_img"])
        out.append(result)
    return out
