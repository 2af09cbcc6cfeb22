"""Heads by name: five classifiers on cached features behind one scikit-learn interface.

Five heads, all trained by ``fit(X, y)`` and used by ``predict(X)``:

    dense        Keras: Flatten -> standardise -> Dense(256, relu) -> Dropout(0.5) -> softmax
                 (Chollet's head, with the scaling the other heads get from StandardScaler)
    logreg       flatten -> StandardScaler -> LogisticRegression
    linear-svm   flatten -> StandardScaler -> LinearSVC
    svm          flatten -> StandardScaler -> SVC(kernel="rbf")
    knn          flatten -> StandardScaler -> KNeighborsClassifier(n_neighbors=5)

``X`` may be pooled vectors ``(N, d)`` or unpooled maps ``(N, h, w, c)``: every head flattens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from pipeline.heads import HEADS
from pipeline.heads.args import check_head_args, check_head_name
from pipeline.heads.dense import DenseHead

__all__ = ["HEADS", "flatten_step", "head_name", "head_params", "make_head"]


def _flatten(X: Any) -> np.ndarray:
    # Module-level (not a lambda) so fitted pipelines pickle; unpooled (N, h, w, c) maps
    # become (N, h*w*c) rows for the scikit-learn classifiers.
    X = np.asarray(X)
    return X.reshape(len(X), -1)


# Saved model.joblib files name this function by module and name: keep the name they have
# always been written with (pipeline/heads/__init__.py imports it, so pickle finds it there).
_flatten.__module__ = "pipeline.heads"


def flatten_step() -> FunctionTransformer:
    """The pipelines' first step: (N, ...) features -> (N, D) rows (picklable)."""
    return FunctionTransformer(_flatten)


def _sklearn_pipeline(clf: BaseEstimator) -> Pipeline:
    return Pipeline(
        [
            ("flatten", flatten_step()),
            ("scale", StandardScaler()),
            ("clf", clf),
        ]
    )


def make_head(
    name: str,
    *,
    C: float = 1.0,
    class_weight: str | None = None,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 32,
    patience: int = 10,
    random_state: int = 0,
    hidden: int = 256,
    dropout: float = 0.5,
    k: int = 5,
    max_iter: int | None = None,
) -> BaseEstimator:
    """Build an unfitted classifier head by name.

    Arguments a head does not use are ignored: ``C`` by ``dense`` and ``knn``; ``epochs``,
    ``lr``, ``batch_size`` and ``patience`` by the scikit-learn heads; ``class_weight`` and
    ``random_state`` by ``knn`` (its neighbours vote unweighted and it draws nothing).

    Args:
        name: one of ``HEADS``.
        C: inverse regularisation strength of the scikit-learn heads.
        class_weight: None, or "balanced" to weight classes inversely to their frequency.
        epochs: maximum training epochs of the dense head.
        lr: Adam learning rate of the dense head.
        batch_size: minibatch size of the dense head.
        patience: epochs without validation-loss improvement before the dense head stops.
        random_state: seed for the head's randomness.
        hidden: units of the dense head's hidden layer.
        dropout: the dense head's dropout rate, in [0, 1).
        k: neighbours of the knn head.
        max_iter: iterations of logreg (default 2000) and linear-svm (default 1000).

    Returns:
        An unfitted estimator with ``fit``/``predict``.

    Raises:
        ValueError: unknown ``name`` or an invalid argument.
    """
    check_head_name(name)
    check_head_args(
        C=C,
        class_weight=class_weight,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        hidden=hidden,
        dropout=dropout,
        k=k,
        max_iter=max_iter,
    )
    if name == "dense":
        return DenseHead(
            hidden=hidden,
            dropout=dropout,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            patience=patience,
            class_weight=class_weight,
            random_state=random_state,
        )
    if name == "logreg":
        clf = LogisticRegression(
            C=C, max_iter=max_iter or 2000, class_weight=class_weight,
            random_state=random_state,
        )
    elif name == "linear-svm":
        clf = LinearSVC(C=C, class_weight=class_weight, random_state=random_state,
                        max_iter=max_iter or 1000)
    elif name == "knn":
        clf = KNeighborsClassifier(n_neighbors=k)
    else:
        clf = SVC(
            kernel="rbf", C=C, gamma="scale", class_weight=class_weight, random_state=random_state
        )
    return _sklearn_pipeline(clf)


def head_name(estimator: BaseEstimator) -> str:
    """The ``HEADS`` name of an estimator built by :func:`make_head`.

    Args:
        estimator: a head from :func:`make_head` (fitted or not).

    Returns:
        One of ``HEADS``.

    Raises:
        ValueError: the estimator is not one of the known heads.
    """
    if isinstance(estimator, DenseHead):
        return "dense"
    clf = estimator.named_steps.get("clf") if isinstance(estimator, Pipeline) else None
    if isinstance(clf, SGDClassifier):  # fit_head --stream: out-of-core linear heads
        return "logreg" if clf.loss == "log_loss" else "linear-svm"
    for cls, name in (
        (LogisticRegression, "logreg"),
        (LinearSVC, "linear-svm"),
        (SVC, "svm"),
        (KNeighborsClassifier, "knn"),
    ):
        if isinstance(clf, cls):
            return name
    raise ValueError(f"Not a head built by make_head. Received: {type(estimator).__name__}")


def head_params(estimator: BaseEstimator) -> dict[str, Any]:
    """The JSON-safe subset (None, bool, int, float, str) of ``estimator.get_params()``.

    Args:
        estimator: any scikit-learn estimator.

    Returns:
        Parameter name -> value, nested pipeline parameters as ``step__param``.
    """
    out: dict[str, Any] = {}
    for key, value in estimator.get_params(deep=True).items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out
