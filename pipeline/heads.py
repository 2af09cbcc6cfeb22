"""Classifier heads on cached bottleneck features, behind one scikit-learn estimator interface.

Five heads, all trained by ``fit(X, y)`` and used by ``predict(X)``:

    dense        Keras: Flatten -> standardise -> Dense(256, relu) -> Dropout(0.5) -> softmax
                 (Chollet's head, with the scaling the other heads get from StandardScaler)
    logreg       flatten -> StandardScaler -> LogisticRegression
    linear-svm   flatten -> StandardScaler -> LinearSVC
    svm          flatten -> StandardScaler -> SVC(kernel="rbf")
    knn          flatten -> StandardScaler -> KNeighborsClassifier(n_neighbors=5)

``X`` may be pooled vectors ``(N, d)`` or unpooled maps ``(N, h, w, c)``: every head flattens.
A fitted head is saved to a folder with :func:`save_head` and read back with :func:`load_head`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import keras
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted

# replace_atomically and write_json_atomic are re-exported: predict.py takes them from here.
from pipeline.util.files import file_sha256, replace_atomically, write_json_atomic

__all__ = [
    "HEADS",
    "DenseHead",
    "FeatureMoments",
    "feature_moments",
    "feature_scale",
    "head_name",
    "head_params",
    "load_head",
    "make_head",
    "replace_atomically",
    "save_head",
    "write_json_atomic",
]

HEADS = ("dense", "logreg", "linear-svm", "svm", "knn")
_HEAD_FORMAT_VERSION = 1
# Share of the training rows DenseHead holds out for early stopping when given no validation data.
_INTERNAL_VAL_FRACTION = 0.1
# A small head's step is cheaper than Keras' dispatch of it: running up to 32 steps per call
# trains ~1.5x faster on CPU with bit-identical weights (docs/performance.md). Batch-level
# callbacks then fire every 32 steps, which no head here uses.
_STEPS_PER_EXECUTION = 32
# Rows per float64 block when DenseHead measures its training features: about 16 MiB.
_MOMENT_BYTES = 16 << 20
# Keras' Normalization divides by max(std, 1e-7), and a float32 variance overflows above
# std ~1e19: features whose largest std lies outside 2**-10 .. 2**10 are first multiplied
# by a power of two (exact in float32) that brings it near 1.
_UNSCALED_STD_RANGE = (2.0**-10, 2.0**10)


def _check_head_args(
    *,
    C: float = 1.0,
    class_weight: str | None,
    epochs: int,
    lr: float,
    batch_size: int,
    patience: int,
) -> None:
    """Raise a Keras-style ValueError for the first invalid head argument."""
    if not C > 0:  # also rejects NaN
        raise ValueError(f"`C` must be a positive number. Received: C={C}")
    if class_weight not in (None, "balanced"):
        raise ValueError(
            f"`class_weight` must be None or 'balanced'. Received: class_weight={class_weight!r}"
        )
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    if not lr > 0:
        raise ValueError(f"`lr` must be a positive number. Received: lr={lr}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}"
        )
    if not isinstance(patience, (int, np.integer)) or patience < 0:
        raise ValueError(f"`patience` must be an integer >= 0. Received: patience={patience!r}")


def _flatten(X: Any) -> np.ndarray:
    # Module-level (not a lambda) so fitted pipelines pickle; unpooled (N, h, w, c) maps
    # become (N, h*w*c) rows for the scikit-learn classifiers.
    X = np.asarray(X)
    return X.reshape(len(X), -1)


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

    Returns:
        An unfitted estimator with ``fit``/``predict``.

    Raises:
        ValueError: unknown ``name`` or an invalid argument.
    """
    if name not in HEADS:
        raise ValueError(f"Unknown head. Expected one of {HEADS}. Received: head={name!r}")
    _check_head_args(
        C=C,
        class_weight=class_weight,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
    )
    if name == "dense":
        return DenseHead(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            patience=patience,
            class_weight=class_weight,
            random_state=random_state,
        )
    if name == "logreg":
        clf = LogisticRegression(
            C=C, max_iter=2000, class_weight=class_weight, random_state=random_state
        )
    elif name == "linear-svm":
        clf = LinearSVC(C=C, class_weight=class_weight, random_state=random_state)
    elif name == "knn":
        clf = KNeighborsClassifier(n_neighbors=5)
    else:
        clf = SVC(
            kernel="rbf", C=C, gamma="scale", class_weight=class_weight, random_state=random_state
        )
    return _sklearn_pipeline(clf)


@dataclass(frozen=True)
class FeatureMoments:
    """Per-feature count, mean and variance (ddof 0) of flattened rows, in float64."""

    count: int
    mean: np.ndarray
    variance: np.ndarray


def feature_moments(batches: Iterable[Any]) -> FeatureMoments:
    """Mean and variance of every flattened feature over batches of rows, in float64.

    Each batch is reduced on its own (mean, then squared deviations from it) and merged
    with the running totals by Chan et al.'s pairwise update, so features far from zero
    (a mean 1e4 with std 1) or tiny ones (1e-11) lose no precision, and one pass over
    streamed batches suffices.

    Args:
        batches: arrays of shape ``(rows, ...)``, the same row shape each.

    Returns:
        The moments over all rows.

    Raises:
        ValueError: no rows.
    """
    count, mean, m2 = 0, None, None
    for batch in batches:
        x = np.asarray(batch, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if not len(x):
            continue
        b_mean = x.mean(axis=0)
        b_m2 = np.square(x - b_mean).sum(axis=0)
        if mean is None:
            count, mean, m2 = len(x), b_mean, b_m2
            continue
        total = count + len(x)
        delta = b_mean - mean
        mean = mean + delta * (len(x) / total)
        m2 = m2 + b_m2 + np.square(delta) * (count * len(x) / total)
        count = total
    if mean is None:
        raise ValueError("Need at least one row to measure the features. Received: 0 rows")
    return FeatureMoments(count, mean, m2 / count)


def _row_blocks(X: np.ndarray) -> Iterable[np.ndarray]:
    """``X`` in blocks of rows that take about ``_MOMENT_BYTES`` once widened to float64."""
    rows = max(1, _MOMENT_BYTES // (8 * max(1, int(np.prod(X.shape[1:])))))
    return (X[start : start + rows] for start in range(0, len(X), rows))


def feature_scale(std: np.ndarray) -> float:
    """The power of two that features are multiplied by before Normalization (often 1).

    1 while the largest std is within ``_UNSCALED_STD_RANGE``; otherwise the power of two
    nearest its reciprocal, so that no float32 statistic underflows Keras' epsilon or
    overflows. A power of two changes no float32 value's digits.
    """
    largest = float(np.max(std, initial=0.0))
    low, high = _UNSCALED_STD_RANGE
    if largest == 0.0 or low <= largest <= high:
        return 1.0
    return 2.0 ** -round(math.log2(largest))


def _standardise_layers(moments: FeatureMoments) -> list[keras.layers.Layer]:
    """Frozen layers mapping flattened features to (x - mean) / std, as StandardScaler does.

    Constant features (variance within rounding error of 0) are only centred. The
    statistics are weights of the layer, so they travel in the saved ``.keras`` file and
    apply wherever the model does (predict, finetune, export).
    """
    n, mean, variance = moments.count, moments.mean, moments.variance
    # StandardScaler's test: a variance within rounding error of 0 is a constant feature.
    eps = np.finfo(np.float64).eps
    constant = variance <= n * eps * variance + np.square(n * mean * eps)
    scale = feature_scale(np.sqrt(np.where(constant, 0.0, variance)))
    mean = (mean * scale).astype(np.float32)
    variance = np.where(constant, 1.0, variance * scale**2).astype(np.float32)
    layers: list[keras.layers.Layer] = []
    if scale != 1.0:
        layers.append(keras.layers.Rescaling(scale, name="feature_scale"))
    norm = keras.layers.Normalization(name="standardise")
    norm.build((None, len(mean)))
    # The weights adapt() would set (mean, variance, count), computed in float64 above.
    norm.set_weights([mean, variance, np.asarray(moments.count, dtype=norm.count.dtype)])
    norm.finalize_state()  # as adapt() does: the layer divides by what was just set
    return [*layers, norm]


def _stratified_holdout(
    y_idx: np.ndarray, fraction: float, seed: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified (fit, holdout) row indices, or None when some class is too small to split."""
    n, n_classes = len(y_idx), int(y_idx.max()) + 1
    n_holdout = int(np.ceil(fraction * n))
    if np.bincount(y_idx).min() < 2 or n_holdout < n_classes or n - n_holdout < n_classes:
        return None
    fit_idx, holdout_idx = train_test_split(
        np.arange(n), test_size=n_holdout, stratify=y_idx, random_state=seed
    )
    return np.sort(fit_idx), np.sort(holdout_idx)


class DenseHead(ClassifierMixin, BaseEstimator):
    """Keras bottleneck head: Flatten -> Dense(relu) -> Dropout -> softmax (sigmoid for 2 classes).

    Between Flatten and the hidden layer a frozen ``Normalization`` standardises every
    flattened feature with the mean and variance of the training rows (measured in float64;
    preceded by a power-of-two ``Rescaling`` when the features are tiny or huge, see
    :func:`feature_scale`). Features straight from a base range from 1e-11 to hundreds; the
    scikit-learn heads standardise them with StandardScaler, and so does this one, inside
    the Keras model, so predict, finetune and export apply the same scaling.

    Early stopping watches the validation loss and restores the best weights. Without
    ``validation_data``, ``fit`` holds out a seeded stratified 10% of the rows; when a class
    is too small for that, it trains all ``epochs`` without early stopping.

    (ClassifierMixin comes first: scikit-learn >= 1.6 only reads its tags in that order.)

    Args:
        hidden: units of the hidden Dense layer.
        dropout: dropout rate after the hidden layer.
        epochs: maximum training epochs.
        lr: Adam learning rate.
        batch_size: minibatch size.
        patience: epochs without validation-loss improvement before stopping.
        class_weight: None, or "balanced".
        random_state: seed passed to ``keras.utils.set_random_seed`` in ``fit``.
        verbose: Keras ``fit`` verbosity.
    """

    def __init__(
        self,
        hidden: int = 256,
        dropout: float = 0.5,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 32,
        patience: int = 10,
        class_weight: str | None = None,
        random_state: int | None = 0,
        verbose: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state
        self.verbose = verbose

    # Whether fit standardises the trunk's output with the training rows' statistics. A
    # subclass whose trunk learns (the scratch convnet) turns it off.
    _standardises = True

    def _features(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim < 2:
            raise ValueError(
                f"Expected features of shape (n_samples, ...). Received: X.shape={X.shape}"
            )
        return X

    def _label_indices(self, y: Any, what: str) -> np.ndarray:
        y = np.asarray(y)
        unseen = np.setdiff1d(y, self.classes_)
        if unseen.size:
            raise ValueError(
                f"{what} has labels absent from the training labels {self.classes_.tolist()}. "
                f"Received: {unseen.tolist()}"
            )
        return np.searchsorted(self.classes_, y)

    def _trunk(self, feature_shape: tuple[int, ...]) -> list[keras.layers.Layer]:
        # The layers between the input and the standardisation (or the hidden Dense layer);
        # a subclass may put a whole convnet here (compare's from-scratch baseline) and keep
        # fit/predict as is.
        return [keras.layers.Flatten(name="flatten")] if len(feature_shape) > 1 else []

    def _build(
        self,
        feature_shape: tuple[int, ...],
        n_classes: int,
        moments: FeatureMoments | None = None,
    ) -> keras.Model:
        layers: list[keras.layers.Layer] = [
            keras.Input(shape=feature_shape),
            *self._trunk(feature_shape),
        ]
        if moments is not None:  # None: the unstandardised head, as heads saved before it
            layers += _standardise_layers(moments)
        layers += [
            keras.layers.Dense(self.hidden, activation="relu", name="hidden"),
            keras.layers.Dropout(self.dropout, name="dropout"),
        ]
        if n_classes == 2:
            layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
            loss = "binary_crossentropy"
        else:
            layers.append(keras.layers.Dense(n_classes, activation="softmax", name="output"))
            loss = "sparse_categorical_crossentropy"
        model = keras.Sequential(layers, name="dense_head")
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=self.lr), loss=loss, metrics=["accuracy"],
            steps_per_execution=_STEPS_PER_EXECUTION,
        )
        return model

    def fit(self, X: Any, y: Any, validation_data: tuple[Any, Any] | None = None) -> DenseHead:
        """Train the head.

        Args:
            X: features, shape ``(n_samples, ...)``.
            y: labels, shape ``(n_samples,)``, any sortable type.
            validation_data: optional ``(X_val, y_val)`` for early stopping.

        Returns:
            self.

        Raises:
            ValueError: invalid arguments, fewer than two classes, or validation labels
                unseen in ``y``.
        """
        _check_head_args(
            class_weight=self.class_weight,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            patience=self.patience,
        )
        if not isinstance(self.hidden, (int, np.integer)) or self.hidden < 1:
            raise ValueError(f"`hidden` must be an integer >= 1. Received: hidden={self.hidden!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={self.dropout}")
        X = self._features(X)
        y = np.asarray(y)
        if len(y) != len(X):
            raise ValueError(
                f"X and y have different numbers of rows. Received: {len(X)} and {len(y)}"
            )
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"Need at least two classes to train. Received: classes={self.classes_.tolist()}"
            )
        self.n_features_in_ = int(np.prod(X.shape[1:]))
        self.feature_shape_ = tuple(int(d) for d in X.shape[1:])
        n_classes = len(self.classes_)

        if validation_data is not None:
            X_val = self._features(validation_data[0])
            y_val = self._label_indices(validation_data[1], "validation_data")
            X_fit, y_fit = X, y_idx
        else:
            holdout = _stratified_holdout(y_idx, _INTERNAL_VAL_FRACTION, self.random_state)
            if holdout is None:
                X_val = y_val = None
                X_fit, y_fit = X, y_idx
            else:
                fit_idx, val_idx = holdout
                X_fit, y_fit = X[fit_idx], y_idx[fit_idx]
                X_val, y_val = X[val_idx], y_idx[val_idx]

        # Statistics of the rows the weights are fitted on (not the early-stopping holdout).
        moments = feature_moments(_row_blocks(X_fit)) if self._standardises else None
        if self.random_state is not None:
            keras.utils.set_random_seed(int(self.random_state))
        model = self._build(self.feature_shape_, n_classes, moments)
        weights = None
        if self.class_weight == "balanced":
            w = compute_class_weight("balanced", classes=np.arange(n_classes), y=y_fit)
            weights = {i: float(v) for i, v in enumerate(w)}
        callbacks = []
        fit_val = None
        if X_val is not None:
            fit_val = (X_val, y_val.astype(np.float32) if n_classes == 2 else y_val)
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=self.patience, restore_best_weights=True
                )
            )
        history = model.fit(
            X_fit,
            y_fit.astype(np.float32) if n_classes == 2 else y_fit,
            validation_data=fit_val,
            epochs=self.epochs,
            batch_size=self.batch_size,
            # Given explicitly, Keras makes one data iterator per epoch instead of two.
            steps_per_epoch=-(-len(X_fit) // self.batch_size),
            class_weight=weights,
            callbacks=callbacks,
            verbose=self.verbose,
        )
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        return self

    def fit_batches(
        self,
        train: Any,
        *,
        classes: np.ndarray,
        feature_shape: tuple[int, ...],
        validation: Any = None,
        y_for_weights: np.ndarray | None = None,
    ) -> DenseHead:
        """Train from batches that never sit in memory together (``fit_head --stream``).

        Args:
            train: a ``keras.utils.PyDataset`` of (features, class index) batches; class
                indices as float32 for two classes (sigmoid output).
            classes: the labels the indices stand for, sorted.
            feature_shape: shape of one row.
            validation: an optional PyDataset like ``train`` for early stopping.
            y_for_weights: training class indices, for ``class_weight="balanced"``.

        Returns:
            self.
        """
        _check_head_args(class_weight=self.class_weight, epochs=self.epochs, lr=self.lr,
                         batch_size=self.batch_size, patience=self.patience)
        self.classes_ = np.asarray(classes)
        self.feature_shape_ = tuple(int(d) for d in feature_shape)
        self.n_features_in_ = int(np.prod(self.feature_shape_))
        # One extra pass over the training batches, before the first epoch.
        moments = (
            feature_moments(train[i][0] for i in range(len(train)))
            if self._standardises
            else None
        )
        if self.random_state is not None:
            keras.utils.set_random_seed(int(self.random_state))
        model = self._build(self.feature_shape_, len(self.classes_), moments)
        weights = None
        if self.class_weight == "balanced" and y_for_weights is not None:
            w = compute_class_weight("balanced", classes=np.arange(len(self.classes_)),
                                     y=y_for_weights)
            weights = {i: float(v) for i, v in enumerate(w)}
        callbacks = []
        if validation is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True))
        history = model.fit(train, validation_data=validation, epochs=self.epochs,
                            steps_per_epoch=len(train), class_weight=weights,
                            callbacks=callbacks, verbose=self.verbose)
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order.

        Args:
            X: features of the shape seen in ``fit``.

        Returns:
            Array of shape ``(n_samples, n_classes)``.

        Raises:
            ValueError: features of another shape than in ``fit``.
        """
        check_is_fitted(self, "model_")
        X = self._features(X)
        if X.shape[1:] != self.feature_shape_:
            raise ValueError(
                f"Expected features of shape (n, {', '.join(map(str, self.feature_shape_))}). "
                f"Received: X.shape={X.shape}"
            )
        p = self.model_.predict(X, batch_size=self.batch_size, verbose=0)
        if len(self.classes_) == 2:
            p = np.concatenate([1.0 - p, p], axis=1)
        return p

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class of each row.

        Args:
            X: features of the shape seen in ``fit``.

        Returns:
            Array of labels from ``classes_``, shape ``(n_samples,)``.
        """
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


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
    meta: dict[str, Any] = {"format_version": _HEAD_FORMAT_VERSION, "kind": kind}
    if kind == "dense":
        check_is_fitted(estimator, "model_")
        model_path = replace_atomically(out_dir / "model.keras", estimator.model_.save)
        meta |= {
            "classes": estimator.classes_.tolist(),
            "feature_shape": list(estimator.feature_shape_),
            "params": estimator.get_params(),
            "history": estimator.history_,
        }
    else:
        check_is_fitted(estimator)
        model_path = replace_atomically(
            out_dir / "model.joblib", lambda tmp: joblib.dump(estimator, tmp)
        )
        # Checked before unpickling in load_head: a pickle runs code when loaded.
        meta["model_sha256"] = file_sha256(model_path)
    write_json_atomic(out_dir / "head.json", meta)
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
    meta_path = out_dir / "head.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"No saved head in {out_dir}: {meta_path.name} is missing. "
            "Train one with the fit-head command first."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != _HEAD_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has an unsupported format. Expected format_version="
            f"{_HEAD_FORMAT_VERSION}. Received: format_version={meta.get('format_version')!r}"
        )
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
    return head
