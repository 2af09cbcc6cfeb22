"""Which layers train, and the model that trains them.

Blocks are found from layer names, as each architecture names them (VGG ``block5_*``,
ResNet/DenseNet ``conv5_*``, MobileNetV2 ``block_16_*``, EfficientNet ``block7*``,
Inception ``mixed9``, Xception ``block14_*``, ...): :func:`unfreeze_start` finds where the
top blocks begin, :func:`set_trainable` unfreezes from there with BatchNormalization kept
frozen, and :class:`TrainingModel` runs the base in inference mode under augmentation.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from pipeline.augment import AugmentSpec, augmentation_layers
from pipeline.bases import FeatureModel, block_owners, layer_index
from pipeline.bases.combine import preprocessing_layers
from pipeline.bases.hub import HUB_BACKBONE

__all__ = [
    "MOMENTUM",
    "TrainingModel",
    "evaluate",
    "set_trainable",
    "training_model",
    "unfreeze_start",
]

# Chollet's fine-tuning optimizer: SGD with a small learning rate and momentum 0.9.
MOMENTUM = 0.9


def _learnable(layer: Any) -> bool:
    """Whether unfreezing ``layer`` would train anything (BatchNormalization never does)."""
    frozen_kinds = (keras.layers.BatchNormalization, keras.layers.Normalization)
    return bool(layer.weights) and not isinstance(layer, frozen_kinds)


def unfreeze_start(model: Any, n_blocks: int | str) -> str:
    """The first layer to train when the top ``n_blocks`` blocks of ``model`` are unfrozen.

    Layers are read in ``model.layers`` order; the answer is the first layer with weights
    (BatchNormalization aside) at or after the start of the top ``n_blocks`` blocks, e.g.
    ``block5_conv1`` for VGG16 and 1, ``block_16_expand`` for MobileNetV2 and 1. Counting
    blocks by name, not layers by index, is what Chollet's ``model.layers[:25]`` got wrong.

    Args:
        model: a Keras model built from a ``keras.applications`` base (weights not needed).
        n_blocks: how many blocks, counted from the top, or ``"all"``.

    Returns:
        A layer name of ``model``.

    Raises:
        ValueError: no blocks recognised, or ``n_blocks`` not in 1..number of blocks.
    """
    hub = _hub_blocks(model)
    if hub is not None:
        blocks = hub[1]
        count = _block_count(n_blocks, len(blocks), blocks[0].name, blocks[-1].name)
        return f"{HUB_BACKBONE}/{blocks[-count].name}"
    layers = list(model.layers)
    owners = block_owners([lyr.name for lyr in layers])
    blocks = list(dict.fromkeys(o for o in owners if o))
    if not blocks:
        raise ValueError(
            f"Cannot tell the blocks of {getattr(model, 'name', 'the model')} from its layer "
            "names: pass --unfreeze-from LAYER instead. Received: unfreeze_top_blocks="
            f"{n_blocks}"
        )
    n_blocks = _block_count(n_blocks, len(blocks), blocks[0], blocks[-1])
    top = set(blocks[-n_blocks:])
    first = next(i for i, owner in enumerate(owners) if owner in top)
    for layer in layers[first:]:
        if _learnable(layer):
            return layer.name
    raise ValueError(f"No layer with weights from {layers[first].name!r} to the top.")


def _block_count(n_blocks: int | str, n: int, first: str, last: str) -> int:
    """``--unfreeze-top-blocks`` as a number of blocks out of ``n``.

    Raises:
        ValueError: not 1..n or ``all``.
    """
    if n_blocks == "all":
        return n
    if (isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer))
            or not 1 <= n_blocks <= n):
        raise ValueError(
            f"`unfreeze_top_blocks` must be 1..{n} (or 'all'): the base has {n} blocks, "
            f"{first} .. {last}. Received: unfreeze_top_blocks={n_blocks!r}"
        )
    return int(n_blocks)


def _hub_blocks(model: Any) -> tuple[Any, list[Any]] | None:
    """(the encoder layer, its transformer blocks in order) of a keras-hub feature model;
    None for other models.

    The blocks of a keras-hub backbone sit inside one encoder layer (DINOv2's
    ``DINOV2Encoder``, ViT's ``ViTEncoder``): the encoder is the backbone's layer holding
    the most transformer blocks (:func:`_is_block`).
    """
    inner = next((layer for layer in model.layers if layer.name == HUB_BACKBONE), None)
    if inner is None:
        return None
    best: tuple[Any, list[Any]] | None = None
    for layer in inner.layers:
        blocks = [child for child in getattr(layer, "_layers", []) if _is_block(child)]
        if blocks and (best is None or len(blocks) > len(best[1])):
            best = (layer, blocks)
    return best


def _is_block(layer: Any) -> bool:
    """A keras-hub transformer block, by its class: ``DINOV2Layer``, ``ViTEncoderBlock``,
    ``TransformerEncoder`` ... (keras-hub's own classes, not Keras' Dense or LayerNorm)."""
    kind = type(layer)
    return (kind.__module__.startswith("keras_hub")
            and kind.__name__.endswith(("Layer", "Block", "TransformerEncoder")))


def _set_hub_trainable(model: Any, start: str) -> list[str]:
    """Unfreeze the keras-hub backbone from block ``start`` (``hub_backbone/<block>``) up:
    those blocks and every backbone layer after their encoder (the final norm, a head).

    Raises:
        ValueError: no such block.
    """
    found = _hub_blocks(model)
    name = start.split("/", 1)[1]
    names = [block.name for block in found[1]] if found else []
    if name not in names:
        raise ValueError(
            f"`unfreeze_from` must name a block of the keras-hub backbone "
            f"({', '.join(f'{HUB_BACKBONE}/{n}' for n in names)}). Received: "
            f"unfreeze_from={start!r}"
        )
    encoder, blocks = found
    model.trainable = True  # then everything below the start is frozen again
    inner = model.get_layer(HUB_BACKBONE)
    after_encoder = False
    trained: list[str] = []
    for layer in inner.layers:
        if layer is encoder:
            after_encoder = True
            continue
        layer.trainable = after_encoder
        if after_encoder and layer.weights:
            trained.append(f"{HUB_BACKBONE}/{layer.name}")
    first = names.index(name)
    for i, block in enumerate(blocks):
        block.trainable = i >= first
    trained[:0] = [f"{HUB_BACKBONE}/{block.name}" for block in blocks[first:]]
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return trained


def _sublayers(layer: Any) -> list[Any]:
    """Every layer nested in ``layer`` (ConvNeXt nests Sequential blocks), depth first."""
    out = []
    for child in getattr(layer, "layers", []):
        out.append(child)
        out.extend(_sublayers(child))
    return out


def set_trainable(model: Any, start: str) -> list[str]:
    """Make ``start`` and every layer after it trainable, every layer before it frozen.

    BatchNormalization layers stay frozen everywhere: with ``trainable=False`` they also
    run in inference mode, so their moving statistics never change (Keras 3). Compile
    the model again after this.

    Args:
        model: the feature model (``FeatureModel.model``).
        start: the first layer to train, a name from ``model.layers``.

    Returns:
        Names of the layers that now have trainable weights, bottom to top.

    Raises:
        ValueError: ``start`` is not a layer of ``model``.
    """
    if start.startswith(f"{HUB_BACKBONE}/"):
        return _set_hub_trainable(model, start)
    index = layer_index(model, start, "unfreeze_from")
    model.trainable = True  # the containers must be trainable for their layers to count
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= index
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return [lyr.name for lyr in model.layers[index:] if lyr.trainable_weights]


class TrainingModel(keras.Model):
    """Augmentation -> preprocessing -> base (always in inference mode) -> head.

    A subclass, not a functional model: Keras 3 functional models pass the outer
    ``training`` flag to every nested call, overriding ``base(x, training=False)``. Used
    for training only; the saved model is :func:`pipeline.bases.combine.end_to_end_model`,
    which shares the base and head layers.
    """

    def __init__(self, augment: list, preprocess: list, base: Any, head: Any) -> None:
        super().__init__(name="finetune")
        self.augment = augment
        self.preprocess = preprocess
        self.base = base
        self.head = head

    def call(self, images: Any, training: bool | None = None) -> Any:
        x = images
        for layer in self.augment:
            x = layer(x, training=training)
        for layer in self.preprocess:
            x = layer(x)
        # Inference mode: BatchNormalization keeps its statistics, the base's dropout is off.
        x = self.base(x, training=False)
        return self.head(x, training=training)


def training_model(
    feature_model: FeatureModel, head_model: Any, *, flip: str, seed: int, lr: float, binary: bool
) -> TrainingModel:
    """Augmentation -> preprocessing -> base -> head, compiled as Chollet's step 3 compiles it.

    Args:
        feature_model: the rebuilt base, its layers already unfrozen (:func:`set_trainable`).
        head_model: the head's Keras model (``DenseHead.model_``).
        flip: the augmentation's flip (``AugmentSpec.flip``).
        seed: the augmentation's seed.
        lr: SGD's learning rate (momentum :data:`MOMENTUM`).
        binary: the head has one sigmoid output (two classes).

    Returns:
        The compiled training model, reporting loss and accuracy.
    """
    trainer = TrainingModel(
        augmentation_layers(AugmentSpec(flip=flip), seed),
        preprocessing_layers(feature_model.preprocess),
        feature_model.model,
        head_model,
    )
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],  # binary: threshold 0.5, as DenseHead.predict
    )
    return trainer


def evaluate(model: Any, dataset: Any) -> dict[str, float]:
    """Loss and accuracy of the compiled training model, in inference mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        scores = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"loss": float(scores["loss"]), "accuracy": float(scores["accuracy"])}
