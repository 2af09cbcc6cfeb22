"""Classifier heads on cached bottleneck features, behind one scikit-learn estimator interface.

Modules:

    registry   heads by name (``make_head``, ``head_name``, ``head_params``): the
               scikit-learn pipelines and the dense head
    dense      ``DenseHead``: the Keras head, standardising its features inside the model
    convnet    the demo's small convnet and compare's from-scratch baseline built from it
    persist    the model-folder format: ``save_head``/``load_head`` and ``head.json``
    stream     ``fit_head --stream``: heads trained from the cache in batches
    curve      the dense head's training curve as a PNG (matplotlib, Agg)

Heads work on arrays: they never import images or bases. A fitted head is saved to a
folder with :func:`save_head` and read back with :func:`load_head`.
"""

from pipeline.heads.dense import DenseHead, FeatureMoments, feature_moments, feature_scale
from pipeline.heads.persist import load_head, save_head
from pipeline.heads.registry import (  # noqa: F401 - _flatten: pickles name pipeline.heads._flatten
    HEADS,
    _flatten,
    flatten_step,
    head_name,
    head_params,
    make_head,
)

# Re-exported for predict.py, which takes them from here; new code imports pipeline.util.files.
from pipeline.util.files import replace_atomically, write_json_atomic

__all__ = [
    "HEADS",
    "DenseHead",
    "FeatureMoments",
    "feature_moments",
    "feature_scale",
    "flatten_step",
    "head_name",
    "head_params",
    "load_head",
    "make_head",
    "replace_atomically",
    "save_head",
    "write_json_atomic",
]
