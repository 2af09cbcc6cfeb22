"""BatchNormalization folded into the layer before it: forward speed and feature drift.

Per base (random seeded weights, 96 px, global average pooling), the plain model gets
random BatchNormalization statistics and affine weights (so the fold is far from the
identity and a mistake would show), then is folded with
:func:`pipeline.bases.fold.fold_batchnorm`. Both run ``predict_on_batch`` on the same
batches, interleaved ``repeats`` times: img/s, core-ms per image (this process's CPU time,
``getrusage``), folded over plain, and the features' largest difference relative to
their largest magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import timed_batches

__all__ = ["FOLD_BASES", "measure_fold"]

FOLD_BASES = ("mobilenetv2", "efficientnetb0", "resnet50", "inceptionv3", "xception")


def _random_statistics(model: Any, seed: int) -> None:
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []
            for weight in layer.weights:
                if "variance" in weight.path:
                    values.append(rng.uniform(0.2, 3.0, weight.shape))
                elif "gamma" in weight.path:
                    values.append(rng.uniform(0.5, 1.5, weight.shape))
                else:  # beta, moving mean
                    values.append(rng.normal(0.0, 0.5, weight.shape))
            layer.set_weights(values)


def measure_fold(bases: Sequence[str] = FOLD_BASES, *, size: int = 96, n: int = 256,
                 batch_size: int = 32, repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Plain against folded forward pass per base (module docstring)."""
    from pipeline.bases import build_feature_model
    from pipeline.bases.fold import fold_batchnorm

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, size, size, 3)).astype(np.float32)
    out = []
    for base in bases:
        plain = build_feature_model(base, weights="none", input_size=(size, size),
                                    pooling="avg", seed=seed).model
        _random_statistics(plain, seed)
        folded, count = fold_batchnorm(plain)
        models = {"plain": plain, "folded": folded}
        for model in models.values():  # trace once, untimed
            model.predict_on_batch(x[:batch_size])
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                runs[name].append(timed_batches(model.predict_on_batch, x, batch_size))
        reference = plain.predict_on_batch(x[:batch_size])
        drift = np.abs(folded.predict_on_batch(x[:batch_size]) - reference).max()
        row: dict[str, Any] = {"base": base, "size": size, "n_images": n, "n_folded": count}
        for name, rs in runs.items():
            row[name] = {"img_s": n / float(np.median([r[0] for r in rs])),
                         "core_ms_per_img": 1e3 * float(np.median([r[1] for r in rs])) / n}
        row["folded/plain img_s"] = row["folded"]["img_s"] / row["plain"]["img_s"]
        row["max_relative_difference"] = float(drift / np.abs(reference).max())
        out.append(row)
    return out
