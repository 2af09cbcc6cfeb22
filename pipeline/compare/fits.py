"""One fit, what every parallel task of a compare run does, and the loop that runs them all.

Each task fits a fresh, seeded head on some rows and predicts others; joblib runs the
tasks (in loky worker processes when ``n_jobs`` is not 1), so this module stays free of
the report and of the run's bookkeeping.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from pipeline.compare.config import SCRATCH_HEAD
from pipeline.heads import DenseHead, make_head, save_head
from pipeline.heads.convnet import ScratchConvnet

__all__ = ["FitTask", "build_estimator", "fit_and_predict"]

# Units of the scratch convnet's hidden Dense layer: Chollet's script 1 uses 64.
_SCRATCH_HIDDEN = 64
# One fit: (pair, grid point, fold or None for the test refit, fit rows, score rows).
FitTask = tuple[int, int, int | None, np.ndarray, np.ndarray]


def build_estimator(
    head: str,
    params: dict[str, Any],
    *,
    seed: int,
    epochs: int,
    scratch_epochs: int,
    class_weight: str | None = None,
) -> BaseEstimator:
    """An unfitted head (or the scratch convnet) with ``params`` set.

    Args:
        head: a ``HEADS`` name or ``SCRATCH_HEAD``.
        params: ``set_params`` overrides, e.g. a :func:`param_grid` point.
        seed: the estimator's ``random_state`` (the same for every task, so a fold's
            result does not depend on which process ran it).
        epochs: maximum epochs of the dense head.
        scratch_epochs: maximum epochs of the scratch convnet.
        class_weight: None or ``"balanced"``, for every head that weights classes (all
            but knn, whose neighbours vote unweighted).

    Returns:
        The estimator.

    Raises:
        ValueError: unknown head or invalid parameter.
    """
    if head == SCRATCH_HEAD:
        estimator: BaseEstimator = ScratchConvnet(
            hidden=_SCRATCH_HIDDEN, epochs=scratch_epochs, random_state=seed,
            class_weight=class_weight,
        )
    else:
        estimator = make_head(head, epochs=epochs, random_state=seed, class_weight=class_weight)
    return estimator.set_params(**params)


def _saved_bytes(estimator: BaseEstimator) -> int:
    """Bytes the fitted head takes on disk, saved exactly as fit_head saves it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_head(estimator, tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir())


def _prepare_keras() -> None:
    """Make Keras fits in this process repeatable (whichever process runs them) and quiet."""
    # Each loky worker is its own process: without growth, the first worker to touch
    # the GPU would reserve all of its memory and the next would fail.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    # Many small models per process make TF warn about tf.function retracing after a few
    # fits: expected here, and it would bury the progress lines.
    tf.get_logger().setLevel("ERROR")
    # On CPU, TF's kernels already give identical results for identical seeds (checked:
    # serial == loky workers). On GPU, cuDNN/cuBLAS pick atomics-based kernels unless
    # told otherwise; op determinism is process-wide, so it is only switched on there.
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()


def fit_and_predict(
    head: str,
    params: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    fit_rows: np.ndarray,
    score_rows: np.ndarray,
    *,
    seed: int,
    epochs: int,
    scratch_epochs: int,
    class_weight: str | None = None,
) -> dict[str, Any]:
    """Fit one head on ``fit_rows``, predict ``score_rows``; a ValueError becomes a result.

    Args:
        head: a ``HEADS`` name or ``SCRATCH_HEAD``.
        params: ``set_params`` overrides.
        X: features (or images, for the scratch convnet) of every row.
        y: integer labels of every row.
        fit_rows: rows to fit on.
        score_rows: rows to predict.
        seed: see :func:`build_estimator`.
        epochs: see :func:`build_estimator`.
        scratch_epochs: see :func:`build_estimator`.
        class_weight: see :func:`build_estimator`.

    Returns:
        ``{"pred", "fit_seconds", "predict_seconds", "model_bytes", "warnings"}``, or
        ``{"error": why}`` when the head refused the data (e.g. more neighbours than
        fitting rows). ``warnings`` holds the distinct convergence warnings of the fit.
    """
    estimator = build_estimator(
        head, params, seed=seed, epochs=epochs, scratch_epochs=scratch_epochs,
        class_weight=class_weight,
    )
    if isinstance(estimator, DenseHead):
        _prepare_keras()
    try:
        # A convergence warning per fold and grid point would bury the progress lines;
        # they are kept with the result and reported once per pair instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            start = time.perf_counter()
            estimator.fit(X[fit_rows], y[fit_rows])
            fit_seconds = time.perf_counter() - start
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        start = time.perf_counter()
        pred = np.asarray(estimator.predict(X[score_rows]))
        predict_seconds = time.perf_counter() - start
    except ValueError as exc:
        return {"error": str(exc).strip().splitlines()[0]}
    return {
        "pred": pred,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "model_bytes": _saved_bytes(estimator),
        "warnings": sorted({str(w.message) for w in caught
                            if issubclass(w.category, ConvergenceWarning)}),
    }
