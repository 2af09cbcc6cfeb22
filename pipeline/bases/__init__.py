"""Frozen feature models: every ``keras.applications`` base or a saved ``.keras`` model.

A base is resolved to a :class:`FeatureModel`: the Keras model cut at a layer and pooled,
plus the facts that define its features (recorded in every cache): base, weights, layer,
pooling, input size, preprocessing. ``registry``: bases by name, preprocessing, sizes;
``blocks``: layer and block rules, ``--layer`` names; ``model``: ``FeatureModel``;
``combine``: preprocessing + base + head as one Keras model; ``files``: where a model's
base file is after the model moved.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py): the CLI reads
# constants such as the allowed values of a flag without importing Keras.
_HOMES = {
    "ALL_BLOCKS": "pipeline.bases.blocks",
    "BaseSpec": "pipeline.bases.registry",
    "block_ends": "pipeline.bases.blocks",
    "block_of": "pipeline.bases.blocks",
    "block_owners": "pipeline.bases.blocks",
    "blocks_of": "pipeline.bases.blocks",
    "build_application": "pipeline.bases.registry",
    "build_feature_model": "pipeline.bases.model",
    "check_pooling": "pipeline.bases.registry",
    "check_preprocess": "pipeline.bases.registry",
    "default_input_size": "pipeline.bases.registry",
    "end_to_end_model": "pipeline.bases.combine",
    "feature_model_from_attrs": "pipeline.bases.model",
    "FeatureModel": "pipeline.bases.model",
    "is_application": "pipeline.bases.registry",
    "JIT_MODES": "pipeline.bases.registry",
    "layer_index": "pipeline.bases.blocks",
    "load_saved_base": "pipeline.bases.registry",
    "MAX_BLOCK_LAYERS": "pipeline.bases.blocks",
    "MODULE_PREPROCESS": "pipeline.bases.registry",
    "parse_layers": "pipeline.bases.blocks",
    "POOLINGS": "pipeline.bases.registry",
    "PRECISIONS": "pipeline.bases.registry",
    "preprocess": "pipeline.bases.registry",
    "PREPROCESS_MODES": "pipeline.bases.registry",
    "preprocessing_layers": "pipeline.bases.combine",
    "resolve_base": "pipeline.bases.registry",
    "WeightsUnavailableError": "pipeline.bases.registry",
}

__all__ = [name for name in _HOMES if not name.startswith("_")]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
