"""Out-of-core training: heads fitted from HDF5 in batches, memory flat in cache size.

``fit_head.py --stream`` never loads the feature matrix: the dense head trains from a
``keras.utils.PyDataset`` that reads one shuffled batch of rows at a time, and the linear
heads become ``SGDClassifier`` trained with ``partial_fit`` after a streamed
``StandardScaler.partial_fit`` pass (log loss for ``logreg``, hinge for ``linear-svm``).
Peak memory is a batch plus a fixed HDF5 chunk cache, whatever the cache size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache import check_finite, decode_attrs, feature_dataset, open_cache
from pipeline.heads import STREAM_HEADS
from pipeline.heads.dense import DenseHead
from pipeline.heads.registry import flatten_step

__all__ = [
    "STREAM_HEADS",
    "fit_streaming",
    "iter_rows",
    "open_features",
    "predict_rows",
    "read_rows",
]

# HDF5 chunk cache per open file: fixed, so memory does not grow with the cache.
CHUNK_CACHE_BYTES = 32 << 20


def open_features(
    path: str | Path, layer: str | None = None
) -> tuple[h5py.File, h5py.Dataset]:
    """Open a cache read-only with a bounded chunk cache; return (file, layer's features)."""
    f = open_cache(path, rdcc_nbytes=CHUNK_CACHE_BYTES)
    try:
        return f, f[feature_dataset(decode_attrs(f.attrs), layer)]
    except BaseException:
        f.close()
        raise


# Rows read at once for passes whose order does not matter (scaling, prediction): enough
# for sequential reads, bounded in bytes so peak memory does not depend on the row size.
READ_BYTES = 16 << 20


def read_rows(features: h5py.Dataset, batch_size: int) -> int:
    """Rows per sequential read: about READ_BYTES, at least one batch (a small pure rule)."""
    row_bytes = max(1, int(np.prod(features.shape[1:])) * features.dtype.itemsize)
    return max(batch_size, min(1024, READ_BYTES // row_bytes))


def iter_rows(
    features: h5py.Dataset, rows: np.ndarray, batch_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, float32 features) for sorted ``rows``, ``batch_rows`` at a time."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        yield chunk, np.asarray(features[chunk], dtype=np.float32)


def _row_batches_class() -> type:
    """The PyDataset class, defined on first use so importing this module skips Keras."""
    import keras

    class RowBatches(keras.utils.PyDataset):
        """Shuffled batches of cache rows read from HDF5 on demand (one batch in memory)."""

        def __init__(
            self,
            path: str | Path,
            rows: np.ndarray,
            targets: np.ndarray,
            batch_size: int,
            seed: int,
            shuffle: bool = True,
            layer: str | None = None,
        ) -> None:
            super().__init__()
            self._path = str(path)
            self._layer = layer
            self._rows = np.asarray(rows, dtype=np.int64)
            self._targets = np.asarray(targets)
            self._batch_size = batch_size
            self._rng = np.random.default_rng(seed)
            self._shuffle = shuffle
            self._order = np.arange(len(self._rows))
            self._features: h5py.Dataset | None = None
            self.on_epoch_end()

        def __len__(self) -> int:
            return math.ceil(len(self._rows) / self._batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            if self._features is None:
                _, self._features = open_features(self._path, self._layer)
            take = self._order[index * self._batch_size : (index + 1) * self._batch_size]
            # h5py reads fancy indices in increasing order only.
            take = np.sort(take)
            x = np.asarray(self._features[self._rows[take]], dtype=np.float32)
            check_finite(x, source="in this batch")
            return x, self._targets[take]

        def on_epoch_end(self) -> None:
            if self._shuffle:
                self._rng.shuffle(self._order)

    return RowBatches


def predict_rows(estimator: Any, features: h5py.Dataset, rows: np.ndarray,
                 batch_rows: int) -> np.ndarray:
    """Predictions for ``rows`` (in sorted row order), one batch in memory at a time."""
    out = [estimator.predict(x) for _, x in iter_rows(features, rows, batch_rows)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def fit_streaming(
    head: str,
    path: str | Path,
    *,
    labels: np.ndarray,
    paths: list[str],
    train: np.ndarray,
    val: np.ndarray,
    feature_shape: tuple[int, ...],
    epochs: int,
    lr: float,
    batch_size: int,
    patience: int,
    C: float,
    class_weight: str | None,
    seed: int,
    layer: str | None = None,
    hidden: int = 256,
    dropout: float = 0.5,
    log_epochs: bool = False,
) -> Any:
    """Fit one head from the cache at ``path`` without loading its features.

    Args:
        head: one of ``STREAM_HEADS``.
        path: the cache file.
        labels, paths: the cache's label and path columns (small, in memory).
        train, val: row indices to train on and to early-stop / report on.
        feature_shape: shape of one row.
        epochs: passes over the training rows (dense: maximum, with early stopping).
        lr, batch_size, patience: dense head settings; batch_size is also the SGD batch.
        C: inverse regularisation; SGD's ``alpha = 1 / (C * n_train)``, the usual mapping.
        class_weight: None or "balanced".
        seed: shuffling and initialisation seed.
        layer: which stored layer to train on (default the first).
        hidden, dropout, log_epochs: dense head settings (see DenseHead).

    Returns:
        The fitted estimator (DenseHead, or a flatten -> scale -> SGD Pipeline).

    Raises:
        ValueError: a head without an out-of-core path, or non-finite features.
    """
    if head not in STREAM_HEADS:
        raise ValueError(
            f"`stream` supports the heads {STREAM_HEADS} (RBF SVMs need all rows in memory). "
            f"Received: head={head!r}"
        )
    classes = np.unique(labels[train])
    if head == "dense":
        return _dense(path, labels, train, val, classes, feature_shape, epochs=epochs, lr=lr,
                      batch_size=batch_size, patience=patience, class_weight=class_weight,
                      seed=seed, layer=layer, hidden=hidden, dropout=dropout,
                      log_epochs=log_epochs)
    return _sgd(head, path, labels, paths, train, classes, epochs=epochs, batch_size=batch_size,
                C=C, class_weight=class_weight, seed=seed, layer=layer)


def _dense(path, labels, train, val, classes, feature_shape, *, epochs, lr, batch_size, patience,
           class_weight, seed, layer, hidden, dropout, log_epochs) -> Any:
    head = DenseHead(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr,
                     batch_size=batch_size, patience=patience, class_weight=class_weight,
                     random_state=seed, log_epochs=log_epochs)
    batches = _row_batches_class()
    binary = len(classes) == 2

    def targets(rows: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(classes, labels[rows])
        return idx.astype(np.float32) if binary else idx

    seen = val[np.isin(labels[val], classes)]
    train_batches = batches(path, train, targets(train), batch_size, seed, layer=layer)
    val_batches = batches(path, seen, targets(seen), batch_size, seed, shuffle=False, layer=layer)
    return head.fit_batches(train_batches, classes=classes, feature_shape=feature_shape,
                            validation=val_batches if len(seen) else None,
                            y_for_weights=np.searchsorted(classes, labels[train]))


def _sgd(head, path, labels, paths, train, classes, *, epochs, batch_size, C, class_weight,
         seed, layer) -> Any:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_class_weight

    f, features = open_features(path, layer)
    try:
        scaler = StandardScaler()
        # Contiguous reads for the scaler pass; row order does not matter for means.
        for rows, x in iter_rows(features, train, read_rows(features, batch_size)):
            x = x.reshape(len(x), -1)
            check_finite(x, [paths[int(r)] for r in rows], source="in this batch")
            scaler.partial_fit(x)
        weights = None
        if class_weight == "balanced":
            w = compute_class_weight("balanced", classes=classes, y=labels[train])
            weights = dict(zip(classes.tolist(), w.tolist(), strict=True))
        clf = SGDClassifier(
            loss="log_loss" if head == "logreg" else "hinge",
            alpha=1.0 / (C * len(train)),
            class_weight=weights,
            random_state=seed,
            learning_rate="optimal",
        )
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(train)
            for start in range(0, len(order), batch_size):
                rows = np.sort(order[start : start + batch_size])
                x = np.asarray(features[rows], dtype=np.float32).reshape(len(rows), -1)
                clf.partial_fit(scaler.transform(x), labels[rows], classes=classes)
    finally:
        f.close()
    return Pipeline([("flatten", flatten_step()), ("scale", scaler), ("clf", clf)])
