"""Classifier heads on cached bottleneck features, behind one scikit-learn estimator interface.

Modules:

    registry   heads by name (``make_head``, ``head_name``, ``head_params``): the
               scikit-learn pipelines and the dense head
    dense      ``DenseHead``: the Keras head, standardising its features inside the model
    convnet    the demo's small convnet and compare's from-scratch baseline built from it
    args       the hyper-parameters, checked without Keras (quick errors)
    persist    the model-folder format: ``save_head``/``load_head`` and ``head.json``
    stream     ``fit_head --stream``: heads trained from the cache in batches
    curve      the dense head's training curve as a PNG (matplotlib, Agg)

Heads work on arrays: they never import images or bases. A fitted head is saved to a
folder with :func:`save_head` and read back with :func:`load_head`.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py): the CLI reads
# constants such as the allowed values of a flag without importing Keras.
_HOMES = {
    "check_head_args": "pipeline.heads.args",
    "check_head_name": "pipeline.heads.args",
    # model.joblib files pickled before heads became a package name pipeline.heads._flatten
    "_flatten": "pipeline.heads.registry",
    "DenseHead": "pipeline.heads.dense",
    "feature_moments": "pipeline.heads.dense",
    "feature_scale": "pipeline.heads.dense",
    "FeatureMoments": "pipeline.heads.dense",
    "flatten_step": "pipeline.heads.registry",
    "head_name": "pipeline.heads.registry",
    "head_params": "pipeline.heads.registry",
    "load_head": "pipeline.heads.persist",
    "make_head": "pipeline.heads.registry",
    # predict.py takes these two from here; new code imports pipeline.util.files
    "replace_atomically": "pipeline.util.files",
    "save_head": "pipeline.heads.persist",
    "write_json_atomic": "pipeline.util.files",
}

# The head names, here rather than in registry (which imports Keras and scikit-learn), so
# that `fit_head.py --help` and its argument checks answer at once.
HEADS = ("dense", "logreg", "linear-svm", "svm", "knn")
# Those fit_head --stream trains from the cache in batches (RBF SVMs and kNN need all rows).
STREAM_HEADS = ("dense", "logreg", "linear-svm")

__all__ = ["HEADS", "STREAM_HEADS", *(name for name in _HOMES if not name.startswith("_"))]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
