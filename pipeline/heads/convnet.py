"""The small convnet of the demo, and the same architecture as a from-scratch baseline head.

:func:`build_convnet` is what the demo pretrains on digits 0-4 and cuts at ``CUT_LAYER``;
:class:`ScratchConvnet` is compare's baseline: that architecture trained from random
weights on the images themselves, fitted and scored like any other head. Both live here, in
the heads, so that compare (a product command) does not depend on the demo (its example).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.heads.dense import DenseHead

if TYPE_CHECKING:
    import keras

__all__ = ["CUT_LAYER", "ScratchConvnet", "build_convnet"]

# The layer the demo cuts its pretrained base at (extract --layer).
CUT_LAYER = "top_conv"


def build_convnet(
    input_size: int = 32, n_classes: int = 5, *, name: str = "digits_convnet"
) -> keras.Model:
    """The demo's small convnet, compiled; the base is cut at its ``CUT_LAYER`` (top_conv).

    Only built-in layers (no Lambda), so the saved ``.keras`` file loads with
    ``safe_mode=True``.
    """
    import keras
    from keras import layers

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Conv2D(32, 3, activation="relu", padding="same", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", padding="same", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", padding="same", name=CUT_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class ScratchConvnet(DenseHead):
    """Chollet's "script 1" baseline: a small convnet trained from random weights on images.

    The demo's convnet (:func:`build_convnet`: three 3x3 convolutions, two
    max-pools, global average pooling) between a ``Rescaling(1/255)`` and
    :class:`~pipeline.heads.DenseHead`'s classifier (Dense(hidden) -> Dropout -> softmax);
    fitting, seeding, early stopping on a held-out 10% and prediction are DenseHead's.

    ``fit(X, y)`` takes RGB images ``(n, H, W, 3)`` in 0..255, any H and W. The arguments
    are DenseHead's; compare builds it with ``hidden=64``, the width of Chollet's script.
    """

    # Its trunk learns (and starts with Rescaling(1/255)): nothing to standardise before it.
    _standardises = False

    def _trunk(self, feature_shape: tuple[int, ...]) -> list[Any]:
        import keras

        if len(feature_shape) != 3 or feature_shape[-1] != 3:
            raise ValueError(
                "ScratchConvnet trains on RGB images of shape (n, H, W, 3). "
                f"Received: X.shape=(n, {', '.join(map(str, feature_shape))})"
            )
        net = build_convnet(int(feature_shape[0]), 2, name="scratch_trunk")
        # Everything between the demo net's input and its classifier (conv1 .. gap); the
        # convolutions only fix the channel count, so a non-square H x W works too.
        return [keras.layers.Rescaling(1.0 / 255.0, name="rescale"), *net.layers[1:-1]]
