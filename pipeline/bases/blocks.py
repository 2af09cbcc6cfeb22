"""Layers and blocks of a base: which block a layer belongs to, where blocks end, and the
``--layer`` names (one, several, ``all-blocks``) resolved to layers.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ALL_BLOCKS",
    "MAX_BLOCK_LAYERS",
    "block_ends",
    "block_of",
    "block_owners",
    "blocks_of",
    "layer_index",
    "parse_layers",
]

# (pattern, block name template), tried in order. Group 1 is the block's number or name.
# Inception and InceptionResNet name only a block's closing layers (mixed9, block35_1_*):
# the unnamed layers before them belong to them (see block_owners).
_BLOCK_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(block\d+_\d+)(?:_|$)"), "{}"),  # InceptionResNetV2 block35_1_mixed
    (re.compile(r"^block(\d+)[a-z]?(?:_|$)"), "block{}"),  # VGG, Xception, EfficientNet
    (re.compile(r"^block_(\d+)(?:_|$)"), "block_{}"),  # MobileNetV2
    (re.compile(r"^(expanded_conv(?:_\d+)?)(?:_|$)"), "{}"),  # MobileNetV2/V3 first blocks
    (re.compile(r"^(?:conv|pool)(\d+)(?:_|$)"), "conv{}"),  # ResNet, DenseNet (+ transitions)
    (re.compile(r"^conv_(?:dw|pw|pad)_(\d+)(?:_|$)"), "conv_{}"),  # MobileNet (v1)
    (re.compile(r"^(mixed_?\d+[a-z]?)$"), "{}"),  # InceptionV3 mixed9, InceptionResNet mixed_6a
    (re.compile(r"_stage_(\d+)_"), "stage_{}"),  # ConvNeXt
)


def block_of(layer_name: str) -> str | None:
    """The block a layer belongs to by its name, as the architecture names its blocks.

    Examples: ``block5_conv1`` -> ``block5`` (VGG16), ``conv5_block1_1_conv`` -> ``conv5``
    (ResNet50, DenseNet; the ``pool4_*`` transition after a stage -> ``conv4``),
    ``block_16_expand`` -> ``block_16`` (MobileNetV2), ``block7a_expand_conv`` -> ``block7``
    (EfficientNet), ``mixed9`` -> ``mixed9`` (InceptionV3), ``block14_sepconv1`` ->
    ``block14`` (Xception). Layers above the last block (``Conv_1``, ``top_conv``,
    ``out_relu``, pooling) and generically named ones (``conv2d_85``) give None.

    Args:
        layer_name: a Keras layer name.

    Returns:
        The block name, or None when the name does not tell.
    """
    for pattern, template in _BLOCK_PATTERNS:
        match = pattern.search(layer_name)
        if match:
            return template.format(match.group(1))
    return None


def block_owners(names: Sequence[str]) -> list[str | None]:
    """The block of each layer; an unnamed layer belongs to the next named block.

    Inception names only a block's closing concatenation (``mixed9``) and Xception leaves
    its shortcut convolutions unnamed, so a generic name inherits the block that follows
    it. Unnamed layers after the last block (the top) stay None.
    """
    owners = [block_of(name) for name in names]
    following: str | None = None
    for i in range(len(owners) - 1, -1, -1):
        if owners[i] is None:
            owners[i] = following
        else:
            following = owners[i]
    return owners


def blocks_of(model: Any) -> list[str]:
    """The blocks of a model, bottom to top, from its layer names (see :func:`block_of`).

    Args:
        model: a Keras model (anything with ``.layers`` whose items have ``.name``).

    Returns:
        Block names in order of first appearance; empty when the names tell none.
    """
    return list(dict.fromkeys(o for o in block_owners([lyr.name for lyr in model.layers]) if o))


def layer_index(model: Any, name: str, argument: str = "layer") -> int:
    """Position of the layer called ``name`` in ``model.layers``.

    Raises:
        ValueError: no such layer; the message names ``argument`` and close names.
    """
    names = [lyr.name for lyr in model.layers]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"`{argument}` must name a layer of {model.name} ({len(names)} layers, "
            f"{names[0]!r} .. {names[-1]!r}).{hint} Received: {argument}={name!r}"
        )
    return names.index(name)


ALL_BLOCKS = "all-blocks"


MAX_BLOCK_LAYERS = 8


def block_ends(model: Any, cap: int = MAX_BLOCK_LAYERS) -> list[str]:
    """The last layer of every block the architecture names (VGG ``block*_pool``, ResNet
    ``conv*_block*_out``, MobileNetV2 ``block_*_add``...), then the model's output layer;
    at most ``cap`` layers, spread evenly from the bottom and always keeping the top."""
    names = [lyr.name for lyr in model.layers]
    owners = block_owners(names)
    ends = [names[i] for i in range(len(names) - 1)
            if owners[i] is not None and owners[i] != owners[i + 1]]
    ends = list(dict.fromkeys([*ends, names[-1]]))
    if len(ends) > cap:
        picks = np.linspace(0, len(ends) - 1, cap).round().astype(int)
        ends = [ends[i] for i in sorted(set(picks.tolist()))]
    return ends


def parse_layers(layer: str | None, model: Any) -> list[str]:
    """``--layer``: None (the base's last layer), a name, ``a,b,c`` or ``all-blocks``.

    Raises:
        ValueError: an unknown layer name, or no blocks to pick from.
    """
    if layer is None:
        return [model.layers[-1].name]
    if layer == ALL_BLOCKS:
        ends = block_ends(model)
        if len(ends) < 2:
            raise ValueError(
                f"{model.name} names no blocks in its layers; list the layers instead. "
                f"Received: layer={layer!r}"
            )
        return ends
    names = [name.strip() for name in layer.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`layer` must list distinct layer names. Received: layer={layer!r}")
    for name in names:
        layer_index(model, name)
    return names
