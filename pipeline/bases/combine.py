"""Frozen base + head as one Keras model that takes raw RGB images (0..255).

The cache pipeline applies preprocessing in NumPy (:func:`pipeline.bases.preprocess`) and
the head to cached features. Here the same steps become layers of one model, built only
from Keras' own layers, so the result saves to ``.keras``, loads with ``safe_mode=True``
and can be used as a layer of a larger model (fine-tuning, serving):

    Input(H, W, 3) [-> Resizing] -> preprocessing layers -> frozen feature model -> head

:func:`feature_extractor_model` is the same without a head: what an export folder carries
for a scikit-learn head.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from pipeline.bases.model import FeatureModel
from pipeline.bases.registry import check_preprocess

__all__ = ["end_to_end_model", "feature_extractor_model", "preprocessing_layers"]

# keras.applications.imagenet_utils' constants, in the channel order each mode works in.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_FEATURE_DTYPES = ("float32", "float16")


def _rgb_to_bgr() -> keras.layers.Layer:
    """A frozen 1x1 convolution whose kernel swaps channels 0 and 2 (exact in float32)."""
    conv = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="preprocess_rgb_to_bgr")
    conv.build((None, None, None, 3))
    # kernel[0, 0, in, out] = 1 where out = 2 - in.
    conv.set_weights([np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3)])
    return conv


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Keras layers equal to ``pipeline.bases.preprocess(x, mode)`` on RGB pixels in 0..255.

    Only built-in layers (no Lambda, no custom classes), so a model holding them loads
    with ``safe_mode=True``. Every layer is frozen (none has trainable weights).

    Args:
        mode: ``none`` | ``scale`` | ``tf`` | ``caffe`` | ``torch`` (Keras'
            ``imagenet_utils.preprocess_input`` modes, plus ``scale`` = x / 255).

    Returns:
        The layers to apply in order; empty for ``none``.

    Raises:
        ValueError: unknown mode.
    """
    check_preprocess(mode)
    if mode == "none":
        return []
    if mode == "scale":
        return [keras.layers.Rescaling(1.0 / 255.0, name="preprocess_scale")]
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "caffe":
        return [
            _rgb_to_bgr(),
            keras.layers.Normalization(
                mean=list(_CAFFE_MEAN_BGR), variance=[1.0, 1.0, 1.0], name="preprocess_caffe"
            ),
        ]
    return [
        keras.layers.Rescaling(1.0 / 255.0, name="preprocess_torch_scale"),
        keras.layers.Normalization(
            mean=list(_TORCH_MEAN),
            variance=[s * s for s in _TORCH_STD],
            name="preprocess_torch",
        ),
    ]


def _check_resize(feature_model: FeatureModel, resize_to: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in resize_to)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(
            f"`resize_to` must be (height, width) with positive integers. "
            f"Received: resize_to={resize_to!r}"
        )
    fixed = tuple(feature_model.model.input_shape[1:3])
    if None not in fixed and fixed != (h, w):
        raise ValueError(
            f"The feature model takes {fixed[0]}x{fixed[1]} inputs. Received: resize_to={(h, w)}"
        )
    return h, w


def end_to_end_model(
    feature_model: FeatureModel,
    head_model: keras.Model,
    *,
    resize_to: tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    feature_dtype: str = "float32",
    name: str = "end_to_end",
) -> keras.Model:
    """One model from raw images to class probabilities: preprocessing, frozen base, head.

    The feature model's layers are shared, not copied; they stay frozen as built by
    :func:`pipeline.bases.build_feature_model`. The result can be saved (``model.save``),
    loaded with ``safe_mode=True``, or called as a layer inside another model.

    Args:
        feature_model: the frozen, cut and pooled base (``FeatureModel.model`` is used).
        head_model: a Keras model taking the feature model's output (a fitted
            ``DenseHead.model_``).
        resize_to: when given, the input is ``(None, None, 3)`` and a ``Resizing`` layer
            brings each batch to this (height, width); otherwise the input is the feature
            model's ``(H, W, 3)`` and images must arrive resized.
        interpolation: the ``Resizing`` method (used only with ``resize_to``); use the
            cache's recorded ``interpolation`` so pixels match extraction.
        feature_dtype: the cache dtype the head was trained on; ``float16`` rounds the
            features through float16 exactly as the cache stored them.
        name: the model's name (distinct names let two such models share an outer model).

    Returns:
        A functional ``keras.Model`` taking float RGB images in 0..255.

    Raises:
        ValueError: a bad ``resize_to``, ``feature_dtype``, or a head that does not take
            the feature model's output shape.
    """
    _check_feature_dtype(feature_dtype)
    features_out = tuple(feature_model.model.output_shape[1:])
    try:
        head_in = tuple(head_model.input_shape[1:])
    except AttributeError:  # an unbuilt head: it is built on the features below
        head_in = features_out
    if features_out != head_in:
        raise ValueError(
            f"The head takes inputs of shape {head_in}, but the feature model outputs "
            f"{features_out}. Received: head_model={head_model.name!r}"
        )
    if resize_to is None:
        inputs = keras.Input((*feature_model.input_size, 3), name="image")
        x = inputs
    else:
        h, w = _check_resize(feature_model, resize_to)
        inputs = keras.Input((None, None, 3), name="image")
        x = keras.layers.Resizing(h, w, interpolation=interpolation, name="resize")(inputs)
    return keras.Model(inputs, head_model(_features(x, feature_model, feature_dtype)), name=name)


def _check_feature_dtype(feature_dtype: str) -> None:
    if feature_dtype not in _FEATURE_DTYPES:
        raise ValueError(
            f"`feature_dtype` must be one of {_FEATURE_DTYPES}. "
            f"Received: feature_dtype={feature_dtype!r}"
        )


def _features(x: Any, feature_model: FeatureModel, feature_dtype: str) -> Any:
    """Images in 0..255 -> preprocessing layers -> frozen base (its first output) ->
    features rounded through the cache dtype."""
    for layer in preprocessing_layers(feature_model.preprocess):
        x = layer(x)
    x = feature_model.model(x)
    if isinstance(x, (list, tuple)):  # a multi-layer base: the head reads the first
        x = x[0]
    if feature_dtype == "float16":
        # Layers cast inputs to their dtype: this rounds to float16, the head casts back.
        x = keras.layers.Identity(dtype="float16", name="cache_float16")(x)
    return x


def feature_extractor_model(
    feature_model: FeatureModel, *, feature_dtype: str = "float32", name: str = "features"
) -> keras.Model:
    """Preprocessing + frozen base as one Keras model: RGB 0..255 at the feature model's
    input size -> the features a head was trained on (rounded through ``feature_dtype``,
    the cache's). Built from Keras layers only, so it loads with ``safe_mode=True`` on a
    machine without the base file or the ImageNet download.

    Raises:
        ValueError: a bad ``feature_dtype``.
    """
    _check_feature_dtype(feature_dtype)
    inputs = keras.Input((*feature_model.input_size, 3), name="image")
    return keras.Model(inputs, _features(inputs, feature_model, feature_dtype), name=name)
