"""The model-folder format: one place writes and reads ``head.json``, with one version.

A fit_head folder holds ``head.json`` (``format_version``, ``kind``, then what that kind
needs) beside its model: ``model.keras`` for the dense head, ``model.joblib`` (a pickle,
its sha256 recorded in ``head.json``) for the scikit-learn heads. A finetune folder holds
``model.keras`` (base + head, end to end) and a ``head.json`` of kind ``end-to-end``; an
export (:func:`pipeline.export.export_model`) writes ``X.keras`` and an ``X.json`` of the
same kind and version. The version is checked where a head is loaded (:func:`load_head`);
predict reads end-to-end metadata whatever its version (every file so far has version 1).
Every file is written atomically (:func:`pipeline.util.files.replace_atomically`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import joblib
import keras
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from pipeline.heads.dense import DenseHead
from pipeline.heads.registry import HEADS, head_name
from pipeline.util.files import file_sha256, replace_atomically, write_json_atomic

__all__ = [
    "END_TO_END",
    "HEAD_FILE",
    "HEAD_FORMAT_VERSION",
    "head_meta",
    "load_head",
    "read_head_meta",
    "save_head",
    "write_head_meta",
]

HEAD_FORMAT_VERSION = 1
HEAD_FILE = "head.json"
# The kind of a model that maps images to classes by itself (finetune output, export).
END_TO_END = "end-to-end"


def head_meta(kind: str, **fields: Any) -> dict[str, Any]:
    """A ``head.json`` (or export ``X.json``): the format version and ``kind``, then ``fields``.

    Args:
        kind: a ``HEADS`` name or ``END_TO_END``.
        **fields: what that kind records (classes, params, input size, ...), in file order.

    Returns:
        The dict to write with :func:`write_head_meta`.
    """
    return {"format_version": HEAD_FORMAT_VERSION, "kind": kind, **fields}


def write_head_meta(out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``meta`` (from :func:`head_meta`) as ``out_dir/head.json``, atomically.

    Returns:
        The path written.
    """
    return write_json_atomic(Path(out_dir) / HEAD_FILE, meta)


def read_head_meta(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``head.json`` of a model folder, its format version checked.

    Args:
        out_dir: a fit_head or finetune output folder.

    Returns:
        The recorded metadata.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``head.json``.
        ValueError: ``head.json`` has another format version.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / HEAD_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"No saved head in {out_dir}: {meta_path.name} is missing. "
            "Train one with the fit-head command first."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has an unsupported format. Expected format_version="
            f"{HEAD_FORMAT_VERSION}. Received: format_version={meta.get('format_version')!r}"
        )
    return meta


def save_head(estimator: BaseEstimator, out_dir: str | os.PathLike) -> Path:
    """Save a fitted head to ``out_dir``.

    ``dense`` -> ``model.keras`` (the Keras model) + ``head.json`` (kind, classes, params,
    feature shape, history). scikit-learn heads -> ``model.joblib`` + ``head.json`` (kind).
    Every file is written atomically.

    Args:
        estimator: a fitted head from :func:`make_head`.
        out_dir: folder to write into (created if missing).

    Returns:
        The path of the saved model file.

    Raises:
        ValueError: the estimator is not a known head.
        sklearn.exceptions.NotFittedError: the estimator is not fitted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = head_name(estimator)
    meta = head_meta(kind)
    if kind == "dense":
        check_is_fitted(estimator, "model_")
        model_path = replace_atomically(out_dir / "model.keras", estimator.model_.save)
        meta |= {
            "classes": estimator.classes_.tolist(),
            "feature_shape": list(estimator.feature_shape_),
            "params": estimator.get_params(),
            "history": estimator.history_,
            "best_epoch": getattr(estimator, "best_epoch_", None),
        }
    else:
        check_is_fitted(estimator)
        model_path = replace_atomically(
            out_dir / "model.joblib", lambda tmp: joblib.dump(estimator, tmp)
        )
        # Checked before unpickling in load_head: a pickle runs code when loaded.
        meta["model_sha256"] = file_sha256(model_path)
    write_head_meta(out_dir, meta)
    return model_path


def load_head(out_dir: str | os.PathLike) -> BaseEstimator:
    """Load a head saved by :func:`save_head`, fitted and ready to predict.

    The Keras model loads with ``safe_mode=True`` (no arbitrary code). A ``model.joblib``
    is a pickle: it is unpickled only if its sha256 equals the one recorded at save time,
    so a file swapped or edited afterwards is refused.

    Args:
        out_dir: the folder given to :func:`save_head`.

    Returns:
        The fitted estimator.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``head.json``.
        ValueError: ``head.json`` names an unknown kind or format.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / HEAD_FILE
    meta = read_head_meta(out_dir)
    kind = meta.get("kind")
    if kind not in HEADS:
        raise ValueError(f"{meta_path}: unknown head. Expected one of {HEADS}. Received: {kind!r}")
    if kind != "dense":
        model_path = out_dir / "model.joblib"
        expected = meta.get("model_sha256")
        if not expected or file_sha256(model_path) != expected:
            raise ValueError(
                f"{model_path} does not match the sha256 recorded in {meta_path} when it was "
                "saved: refusing to unpickle a file that changed (a pickle can run code). "
                "Re-run fit_head to rebuild it."
            )
        return joblib.load(model_path)
    head = DenseHead(**meta["params"])
    head.model_ = keras.models.load_model(out_dir / "model.keras", safe_mode=True, compile=False)
    head.classes_ = np.asarray(meta["classes"])
    head.feature_shape_ = tuple(meta["feature_shape"])
    head.n_features_in_ = int(np.prod(head.feature_shape_))
    head.history_ = meta.get("history", {})
    head.best_epoch_ = meta.get("best_epoch")
    return head
