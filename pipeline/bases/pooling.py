"""Pooling a layer's output into a feature row: feature maps (avg, max, flatten) and
transformer tokens (class token, mean of the patch tokens, both)."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import keras

__all__ = ["TOKEN_POOLINGS", "TokenPooling", "pooled", "register_custom_layers"]

TOKEN_POOLINGS = ("cls", "mean", "cls+mean")  # only for transformer tokens


@keras.saving.register_keras_serializable(package="bottleneck")
class TokenPooling(keras.layers.Layer):
    """(B, tokens, dim) -> (B, dim) or (B, 2*dim).

    ``prefix`` tokens (the class token, then register tokens) come before the patch tokens.
    ``cls``: the first token; ``mean``/``avg`` and ``max``: over the patch tokens only
    (registers are no part of the image grid); ``cls+mean``: both, concatenated, as in
    DINOv2's linear evaluation.
    """

    MODES = ("cls", "mean", "avg", "max", "cls+mean")

    def __init__(self, mode: str, prefix: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"`pooling` must be one of {self.MODES} for tokens. "
                             f"Received: pooling={mode!r}")
        self.mode, self.prefix = mode, int(prefix)

    def call(self, tokens: Any) -> Any:
        ops = keras.ops
        patches = tokens[:, self.prefix:]
        if self.mode == "cls":
            return tokens[:, 0]
        if self.mode == "max":
            return ops.max(patches, axis=1)
        mean = ops.mean(patches, axis=1)
        return ops.concatenate([tokens[:, 0], mean], axis=-1) if self.mode == "cls+mean" else mean

    def compute_output_shape(self, shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        dim = shape[-1] * 2 if self.mode == "cls+mean" and shape[-1] else shape[-1]
        return (shape[0], dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "prefix": self.prefix}


def pooled(x: Any, pooling: str, layer: str, index: int) -> Any:
    """One feature map's output, pooled as asked (layer names kept unique per output).

    Raises:
        ValueError: ``avg``/``max`` of an output that is no 4-D feature map, or a token
            pooling of one.
    """
    rank = len(x.shape)
    tokens = pooling in TOKEN_POOLINGS
    if tokens or (pooling in ("avg", "max") and rank != 4):
        needs = "transformer tokens" if tokens else "a 4-D feature map"
        fits = "avg, max, flatten or none" if rank == 4 else "flatten or none"
        raise ValueError(
            f"pooling={pooling!r} needs {needs}, but layer {layer!r} outputs shape "
            f"{tuple(x.shape)}. Use --pooling {fits}. Received: pooling={pooling!r}"
        )
    suffix = "" if index == 0 else f"_{index}"
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=f"bottleneck_avg_pool{suffix}")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=f"bottleneck_max_pool{suffix}")(x)
    if pooling == "flatten" and rank > 2:
        return keras.layers.Flatten(name=f"bottleneck_flatten{suffix}")(x)
    return x


def register_custom_layers(keras_file: str | os.PathLike) -> None:
    """Make the classes a saved ``.keras`` model may hold loadable: ``TokenPooling`` (this
    module, registered on import) and keras-hub's layers when the file uses them.

    Why: an exported keras-hub base + head is one ``.keras`` file; ``load_model`` finds a
    class only once its module has run. keras-hub is imported (seconds) only when the
    file's config names it.
    """
    try:
        with zipfile.ZipFile(keras_file) as archive:
            uses_hub = b"keras_hub" in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return  # load_model words what is wrong with the file
    if uses_hub:
        try:
            import keras_hub  # noqa: F401 - registers its layers
        except ImportError as exc:
            raise ValueError(
                f"{keras_file} holds a keras-hub backbone: pip install "
                "'bottleneck-pipeline[hub]' to load it."
            ) from exc
