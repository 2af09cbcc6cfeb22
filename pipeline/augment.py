"""Image augmentation with Keras preprocessing layers: seeded batches for cached passes.

Chollet notes that cached bottleneck features rule out data augmentation. Here each
augmented pass is itself cached: pass ``k`` of a batch of training images is transformed
with a seed derived from (run seed, k, first row of the batch), so the same command gives
the same augmented features, and extending K extracts only the new passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["AugmentSpec", "augment_batch", "augmentation_layers", "batch_seed"]

FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")


@dataclass(frozen=True)
class AugmentSpec:
    """The random transformations of one augmented pass (Keras layer arguments).

    rotation is a fraction of a full turn (0.05 = up to ±18°); zoom and translation are
    fractions of the image side.
    """

    flip: str = "horizontal"
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.1

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise ValueError(
                f"`augment_flip` must be one of {FLIPS}. Received: augment_flip={self.flip!r}"
            )
        for name in ("rotation", "zoom", "translation"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(
                    f"`augment_{name}` must be in [0, 1). Received: augment_{name}={value}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the cache."""
        return asdict(self)


def augmentation_layers(spec: AugmentSpec = AugmentSpec(), seed: int | None = None) -> list:
    """The Keras preprocessing layers of ``spec`` (active only when ``training=True``)."""
    import keras

    layers = []
    if spec.flip != "none":
        layers.append(keras.layers.RandomFlip(spec.flip, seed=seed))
    if spec.rotation:
        layers.append(keras.layers.RandomRotation(spec.rotation, fill_mode="reflect", seed=seed))
    if spec.zoom:
        layers.append(keras.layers.RandomZoom(spec.zoom, fill_mode="reflect", seed=seed))
    if spec.translation:
        layers.append(keras.layers.RandomTranslation(
            spec.translation, spec.translation, fill_mode="reflect", seed=seed))
    return layers


def batch_seed(seed: int, pass_index: int, first_row: int) -> int:
    """A 31-bit seed for one augmented batch (a small pure function: testable, stable)."""
    return int(np.random.SeedSequence([seed, pass_index, first_row]).generate_state(1)[0] >> 1)


def augment_batch(images: np.ndarray, spec: AugmentSpec, seed: int) -> np.ndarray:
    """Randomly transform a batch of (N, H, W, 3) images; the same inputs and seed give the
    same output, whatever ran before.
    """
    import keras

    x = images
    for i, layer in enumerate(augmentation_layers(spec)):
        # A fresh generator per layer and call: draws depend only on (seed, layer).
        generator = keras.random.SeedGenerator(seed + 7919 * (i + 1))
        transformation = layer.get_random_transformation(x, training=True, seed=generator)
        x = layer.transform_images(x, transformation, training=True)
    return np.array(x, dtype=np.float32)
