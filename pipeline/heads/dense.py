"""The Keras head: Flatten -> standardise -> Dense(relu) -> Dropout -> softmax, as an estimator.

:class:`DenseHead` is Chollet's bottleneck head behind scikit-learn's estimator contract
(no logic in ``__init__``, ``fit`` returns ``self``, learned state ends in ``_``), with the
per-feature standardisation the other heads get from StandardScaler built into the Keras
model (:func:`feature_moments`, :func:`feature_scale`), so it travels with the saved model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted

from pipeline.heads.args import check_head_args
from pipeline.interrupts import checkpoint
from pipeline.util.log import stderr_is_terminal

__all__ = ["DenseHead", "FeatureMoments", "feature_moments", "feature_scale"]

log = logging.getLogger(__name__)

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

# Seconds between epoch lines when standard error is a log file, not a terminal.
EPOCH_LOG_EVERY = 30.0

@dataclass(frozen=True)
class FeatureMoments:
    """Per-feature count, mean and variance (ddof 0) of flattened rows, in float64, and
    which features are constant (variance within rounding error of 0)."""

    count: int
    mean: np.ndarray
    variance: np.ndarray
    constant: np.ndarray


def feature_moments(batches: Iterable[Any]) -> FeatureMoments:
    """Mean and variance of every flattened feature over batches of rows, in float64.

    scikit-learn's ``StandardScaler.partial_fit`` (what the other heads standardise
    with): float64 accumulators and a pairwise merge of batches, so features far from
    zero (a mean 1e4 with std 1) or tiny ones (1e-11) lose no precision, and one pass
    over streamed batches suffices. Its constant-feature test is kept too.

    Args:
        batches: arrays of shape ``(rows, ...)``, the same row shape each.

    Returns:
        The moments over all rows.

    Raises:
        ValueError: no rows.
    """
    scaler = StandardScaler()
    for batch in batches:
        x = np.asarray(batch)
        if len(x):
            scaler.partial_fit(x.reshape(len(x), -1))
    if not hasattr(scaler, "mean_"):
        raise ValueError("Need at least one row to measure the features. Received: 0 rows")
    # StandardScaler sets the scale of a constant feature to 1; a feature whose variance
    # is exactly 1 is the only other one with that scale.
    constant = (scaler.scale_ == 1.0) & (scaler.var_ != 1.0)
    return FeatureMoments(int(scaler.n_samples_seen_), scaler.mean_, scaler.var_, constant)


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
    mean, variance, constant = moments.mean, moments.variance, moments.constant
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


def epoch_line(epoch: int, epochs: int, logs: dict[str, float], seconds: float) -> str:
    """``epoch 3/100: loss 0.4123, val loss 0.39, accuracy 0.8750, val accuracy 0.9000
    (0.4 s)``; metrics Keras did not log (no validation rows) are left out."""
    # Losses in significant digits (they fall towards 1e-5), accuracies in fixed ones.
    names = (("loss", "loss", ".4g"), ("val_loss", "val loss", ".4g"),
             ("accuracy", "accuracy", ".4f"), ("val_accuracy", "val accuracy", ".4f"))
    values = ", ".join(f"{label} {logs[key]:{fmt}}" for key, label, fmt in names if key in logs)
    return f"epoch {epoch}/{epochs}: {values} ({seconds:.1f} s)"


class _EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch on a terminal; in a log file one at most every
    ``log_every`` seconds, and always the last epoch's, so a batch log stays short.

    Keras' own progress (``verbose=1``) redraws a bar per batch; this is a readable line.
    """

    def __init__(self, epochs: int, prefix: str, log_every: float = EPOCH_LOG_EVERY) -> None:
        super().__init__()
        self._epochs = epochs
        self._prefix = prefix
        self._log_every = log_every
        self._last: str | None = None  # the newest line not yet logged

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._logged_at = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        self._last = self._prefix + epoch_line(epoch + 1, self._epochs, dict(logs or {}),
                                               now - self._epoch_start)
        if stderr_is_terminal() or now - self._logged_at >= self._log_every:
            log.info(self._last)
            self._last, self._logged_at = None, now
        checkpoint()  # an epoch's end is a safe point to stop at on Ctrl-C

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._last is not None:
            log.info(self._last)
            self._last = None


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
        log_epochs: log one line per epoch (loss, accuracy, their validation values,
            seconds) to this module's logger: every epoch on a terminal, at most every
            ``EPOCH_LOG_EVERY`` seconds plus the last one in a log file.

    Attributes:
        history_: per-epoch ``loss``, ``accuracy`` (and ``val_loss``, ``val_accuracy``).
        best_epoch_: the 1-based epoch whose weights the model keeps (lowest validation
            loss, restored by early stopping); None without validation rows (the last).
        stopped_epoch_: the 1-based epoch at which early stopping ended training, or None
            when it ran all ``epochs``.
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
        log_epochs: bool = False,
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
        self.log_epochs = log_epochs

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
        check_head_args(
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
        fit_val = None
        if X_val is not None:
            fit_val = (X_val, y_val.astype(np.float32) if n_classes == 2 else y_val)
        return self._train(
            model,
            X_fit,
            y_fit.astype(np.float32) if n_classes == 2 else y_fit,
            validation_data=fit_val,
            batch_size=self.batch_size,
            # Given explicitly, Keras makes one data iterator per epoch instead of two.
            steps_per_epoch=-(-len(X_fit) // self.batch_size),
            class_weight=weights,
        )

    def _train(self, model: keras.Model, x: Any, y: Any = None, *, validation_data: Any,
               **fit_kwargs: Any) -> DenseHead:
        """``model.fit`` with early stopping on the validation loss (when there are
        validation rows) and the epoch log; sets ``model_``, ``history_``,
        ``best_epoch_`` and ``stopped_epoch_``."""
        callbacks: list[keras.callbacks.Callback] = []
        stopper = None
        if validation_data is not None:
            stopper = keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True
            )
            callbacks.append(stopper)
        if self.log_epochs:
            callbacks.append(_EpochLog(self.epochs, prefix="dense head: "))
        history = model.fit(x, y, validation_data=validation_data, epochs=self.epochs,
                            callbacks=callbacks, verbose=self.verbose, **fit_kwargs)
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        # EarlyStopping restores the best epoch's weights at the end of training, whether
        # it stopped early or not (Keras 3); its epochs count from 0.
        self.best_epoch_ = None if stopper is None else stopper.best_epoch + 1
        stopped = stopper.stopped_epoch if stopper is not None else 0
        self.stopped_epoch_ = stopped + 1 if stopped else None
        if self.log_epochs and self.best_epoch_ is not None:
            val_loss = self.history_["val_loss"][self.best_epoch_ - 1]
            ran = len(self.history_.get("loss", []))
            how = (f"stopped early after epoch {ran}/{self.epochs} (val loss did not improve "
                   f"for {self.patience} epochs)" if self.stopped_epoch_ else
                   f"ran all {ran} epochs")
            log.info("dense head: %s; kept the weights of epoch %d (lowest val loss %.4g)",
                     how, self.best_epoch_, val_loss)
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
        check_head_args(class_weight=self.class_weight, epochs=self.epochs, lr=self.lr,
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
        return self._train(model, train, validation_data=validation,
                           steps_per_epoch=len(train), class_weight=weights)

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
