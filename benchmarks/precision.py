"""Mixed precision: how far the features drift from float32, and the forward speed.

Per base (random seeded weights, global average pooling) and policy (``float32``,
``mixed_float16``, ``mixed_bfloat16``): the feature model extract builds
(BatchNormalization folded, as by default), ``predict_on_batch`` on the same batches of
pixels, interleaved ``repeats`` times. Drift is measured against float32 on the first
batch: the largest absolute difference over the largest float32 feature, the median
relative difference per feature vector (``|d| / |f|``), and the cosine similarity of the
vectors (lowest and median). Random weights give activations of another scale than
ImageNet's; the figures say how much the arithmetic moves features, not what a trained
head loses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import timed_batches

__all__ = ["PRECISION_BASES", "measure_precision"]

PRECISION_BASES = ("mobilenetv2", "resnet50", "efficientnetb0")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def measure_precision(bases: Sequence[str] = PRECISION_BASES, *, size: int = 128,
                      n: int = 128, batch_size: int = 32, repeats: int = 3,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Each policy against float32, per base (module docstring)."""
    from pipeline.bases import build_feature_model

    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0.0, 255.0, (n, size, size, 3)).astype(np.float32)
    out = []
    for base in bases:
        models = {policy: build_feature_model(base, weights="none", input_size=(size, size),
                                              pooling="avg", seed=seed, precision=policy,
                                              fold_batchnorm=True)
                  for policy in POLICIES}
        first = {policy: fm.features(pixels[:batch_size]) for policy, fm in models.items()}
        runs: dict[str, list[tuple[float, float]]] = {policy: [] for policy in models}
        for _ in range(repeats):
            for policy, fm in models.items():
                runs[policy].append(timed_batches(fm.features, pixels, batch_size))
        reference = first["float32"]
        norms = np.linalg.norm(reference, axis=1)
        for policy, features in first.items():
            diff = features - reference
            # nan where a policy's features are all zero (float16 flushing the vanishing
            # activations of random weights to zero): no direction to compare.
            with np.errstate(invalid="ignore", divide="ignore"):
                cosine = (features * reference).sum(axis=1) / (
                    np.linalg.norm(features, axis=1) * norms)
            out.append({
                "base": base, "size": size, "policy": policy, "n_images": n,
                "img_s": n / float(np.median([r[0] for r in runs[policy]])),
                "core_ms_per_img": 1e3 * float(np.median([r[1] for r in runs[policy]])) / n,
                "max_abs_over_scale": float(np.abs(diff).max() / np.abs(reference).max()),
                "median_relative": float(np.median(np.linalg.norm(diff, axis=1) / norms)),
                "min_cosine": float(cosine.min()), "median_cosine": float(np.median(cosine)),
            })
    return out
