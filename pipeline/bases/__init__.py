"""Frozen feature models: every ``keras.applications`` base or a saved ``.keras`` model.

A base is resolved to a :class:`FeatureModel`: the Keras model cut at a layer and pooled,
plus the facts that define its features (recorded in every cache): base, weights, layer,
pooling, input size, preprocessing. ``registry``: bases by name, preprocessing, sizes;
``blocks``: layer and block rules, ``--layer`` names; ``model``: ``FeatureModel``;
``combine``: preprocessing + base + head as one Keras model.
"""

from pipeline.bases.blocks import (
    ALL_BLOCKS,
    MAX_BLOCK_LAYERS,
    block_ends,
    block_of,
    block_owners,
    blocks_of,
    layer_index,
    parse_layers,
)
from pipeline.bases.combine import (
    end_to_end_model,
    preprocessing_layers,
)
from pipeline.bases.model import (
    FeatureModel,
    build_feature_model,
    feature_model_from_attrs,
)
from pipeline.bases.registry import (
    JIT_MODES,
    MODULE_PREPROCESS,
    POOLINGS,
    PRECISIONS,
    PREPROCESS_MODES,
    BaseSpec,
    WeightsUnavailableError,
    build_application,
    check_pooling,
    check_preprocess,
    default_input_size,
    is_application,
    load_saved_base,
    preprocess,
    resolve_base,
)

__all__ = [
    "ALL_BLOCKS",
    "JIT_MODES",
    "MAX_BLOCK_LAYERS",
    "MODULE_PREPROCESS",
    "POOLINGS",
    "PRECISIONS",
    "PREPROCESS_MODES",
    "BaseSpec",
    "FeatureModel",
    "WeightsUnavailableError",
    "block_ends",
    "block_of",
    "block_owners",
    "blocks_of",
    "build_application",
    "build_feature_model",
    "check_pooling",
    "is_application",
    "check_preprocess",
    "default_input_size",
    "end_to_end_model",
    "feature_model_from_attrs",
    "layer_index",
    "load_saved_base",
    "parse_layers",
    "preprocess",
    "preprocessing_layers",
    "resolve_base",
]
