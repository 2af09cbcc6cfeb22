"""Train one head on a feature cache, evaluate it, and save model + metrics + config."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split

from pipeline.base_files import base_file_record
from pipeline.cache import check_finite, read_cache
from pipeline.heads import head_params, make_head, save_head
from pipeline.heads.stream import STREAM_HEADS
from pipeline.util.files import write_json_atomic

__all__ = ["FitConfig", "evaluate", "format_report", "run_fit", "split_rows"]

log = logging.getLogger(__name__)

_SPLITS = ("train", "validation", "test")


@dataclass
class FitConfig:
    """Arguments of the fit-head command, written as ``config.json`` beside the model."""

    cache: str
    head: str = "logreg"
    out: str | None = None  # default: models/<cache file stem>-<head>
    val_split: float = 0.2
    seed: int = 0
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    C: float = 1.0
    class_weight: str | None = None
    patience: int = 10
    use_augmented: bool = False
    stream: bool = False
    layer: str | None = None
    hidden: int = 256  # dense head
    dropout: float = 0.5  # dense head
    k: int = 5  # knn head
    max_iter: int | None = None  # logreg (default 2000), linear-svm (default 1000)
    overwrite: bool = False  # replace a model in ``out`` trained with other settings


def _check_val_split(val_split: float) -> None:
    if not 0 < val_split < 1:  # also rejects NaN
        raise ValueError(
            f"`val_split` must be between 0 and 1, exclusive. Received: val_split={val_split}"
        )


def _class_label(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return repr(class_names[label])
    return f"id {label}"


def split_rows(
    split: np.ndarray,
    labels: np.ndarray,
    val_split: float,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the train, validation and test rows of a cache.

    When the cache records splits (its ``split`` column holds "train"/"validation"/"test"),
    they are used as recorded and ``val_split`` is ignored, except that a cache with "train"
    rows but no "validation" rows gets a stratified ``val_split`` of its train rows. When no
    row records a split (all ""), a stratified, seeded ``val_split`` of all rows is the
    validation set and the test set is empty.

    Args:
        split: per-row split names, shape ``(N,)``.
        labels: per-row integer labels, shape ``(N,)``.
        val_split: fraction of rows to validate on when splitting here, in (0, 1).
        seed: random state of the stratified split.
        class_names: optional names for ``labels``, used in error messages.

    Returns:
        ``(train_idx, val_idx, test_idx)``, each sorted.

    Raises:
        ValueError: ``val_split`` outside (0, 1), unknown or mixed split names, no training
            rows, or a class too small to stratify.
    """
    _check_val_split(val_split)
    split = np.asarray(split).astype(str)
    labels = np.asarray(labels)
    if len(split) != len(labels):
        raise ValueError(
            f"split and labels have different lengths. Received: {len(split)} and {len(labels)}"
        )
    names = set(np.unique(split).tolist())
    unknown = names - {*_SPLITS, ""}
    if unknown:
        raise ValueError(
            f"Unknown split names in the cache. Expected {_SPLITS} or ''. "
            f"Received: {sorted(unknown)}"
        )
    if names <= {""}:
        pool = np.arange(len(split))
        test_idx = np.array([], dtype=np.int64)
    else:
        if "" in names:
            raise ValueError(
                "The cache mixes rows with a recorded split and rows without one "
                f"({int(np.sum(split == ''))} rows have split ''): re-extract it."
            )
        if "train" not in names:
            raise ValueError(f"The cache records splits {sorted(names)} but no 'train' rows.")
        test_idx = np.flatnonzero(split == "test")
        if "validation" in names:
            return np.flatnonzero(split == "train"), np.flatnonzero(split == "validation"), test_idx
        pool = np.flatnonzero(split == "train")
    train_idx, val_idx = _stratified_split(pool, labels[pool], val_split, seed, class_names)
    return train_idx, val_idx, test_idx


def _stratified_split(
    rows: np.ndarray,
    labels: np.ndarray,
    val_split: float,
    seed: int,
    class_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    values, counts = np.unique(labels, return_counts=True)
    if counts.size and counts.min() < 2:
        small = int(values[np.argmin(counts)])
        raise ValueError(
            f"Cannot split stratified: class {_class_label(small, class_names)} has only "
            f"{counts.min()} row(s); every class needs at least 2. Add images of it or "
            "record a train/validation split in the data folder."
        )
    # Check what train_test_split would reject, so the message says what to change.
    n_val = int(np.ceil(val_split * len(rows)))
    if n_val < len(values) or len(rows) - n_val < len(values):
        raise ValueError(
            f"Cannot split {len(rows)} rows of {len(values)} classes stratified with "
            f"val_split={val_split}: both parts need at least one row per class. "
            "Choose another val_split or add rows."
        )
    train_idx, val_idx = train_test_split(
        rows, test_size=val_split, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(val_idx)


def evaluate(
    estimator: BaseEstimator,
    X: np.ndarray | None,
    y: np.ndarray,
    class_names: Sequence[str],
    *,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and confusion matrix of a fitted head.

    Args:
        estimator: a fitted head predicting integer labels.
        X: features.
        y: integer labels indexing ``class_names``.
        class_names: names of all classes of the cache.
        pred: predictions already made (out of core); then ``X`` is not used.

    Returns:
        JSON-safe dict with keys ``accuracy``, ``macro_f1``, ``per_class`` (name ->
        precision, recall, f1-score, support) and ``confusion_matrix`` (rows: true class,
        columns: predicted class, both in ``class_names`` order).
    """
    ids = list(range(len(class_names)))
    if pred is None:
        pred = estimator.predict(X)
    report = classification_report(
        y, pred, labels=ids, target_names=list(class_names), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y, pred)),
        # labels=present classes only: a class absent from this split would score F1=0.
        "macro_f1": float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)),
        "per_class": {name: report[name] for name in class_names},
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
    }


def run_fit(config: FitConfig) -> tuple[Path, dict[str, Any]]:
    """Train one head on a feature cache, evaluate it and save everything needed to reuse it.

    Protocol:
        1. Build the head from ``config`` (unknown head or bad argument fails here, before
           the cache is read).
        2. Read the whole cache; an incomplete or damaged cache raises CacheError.
        3. Refuse features containing NaN or infinity (names the count and the first path).
        4. Split rows with :func:`split_rows`: the cache's recorded train/validation/test
           split, else a stratified seeded ``val_split`` with no test set.
        5. Refuse training rows of a single class.
        6. Fit on the train rows (the dense head early-stops on the validation rows) and
           time the fit.
        7. Evaluate on the validation rows, and on the test rows when there are any.
        8. Write to the out folder, each file atomically: the model (:func:`save_head`),
           ``metrics.json`` (with the base file's path relative to the folder, so the
           folder can move with its base) and ``config.json``; print a short report.

    Args:
        config: what to train and where to write it.

    Returns:
        ``(out_dir, metrics)``, metrics as written to ``metrics.json``.

    Raises:
        ValueError: a bad argument, unusable features or labels.
        pipeline.cache.CacheError: the cache is missing, incomplete or damaged.
    """
    _check_val_split(config.val_split)
    estimator = make_head(
        config.head,
        C=config.C,
        class_weight=config.class_weight,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        patience=config.patience,
        random_state=config.seed,
        hidden=config.hidden,
        dropout=config.dropout,
        k=config.k,
        max_iter=config.max_iter,
    )
    _check_stream(config)
    cache_path = Path(config.cache)
    out_dir = (
        Path(config.out) if config.out else Path("models") / f"{cache_path.stem}-{config.head}"
    )
    _check_overwrite(config, out_dir)
    cache, X = _read_rows(config, cache_path)
    train, val, test = _split(config, cache, cache_path)
    estimator, n_augmented, fit_seconds = _fit(config, estimator, cache=cache, X=X,
                                               train=train, val=val)
    metrics = _metrics(config, estimator, cache=cache, X=X, train=train, val=val, test=test,
                       n_augmented=n_augmented, fit_seconds=fit_seconds)
    # Relative to the model folder too, so a folder moved with its base still finds it.
    metrics["base_file"] = base_file_record(cache.attrs, out_dir)
    save_head(estimator, out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(config))
    return out_dir, metrics


def _check_overwrite(config: FitConfig, out_dir: Path) -> None:
    """Refuse to replace a model trained with other settings, unless asked to.

    Why: ``--head logreg`` then ``--head logreg --C 0.01`` both default to
    ``models/<cache>-logreg/``; the second run silently replaced the first. The same
    settings again (a re-run) replace it as before.

    Raises:
        ValueError: ``out_dir`` holds a model whose config.json differs.
    """
    import json

    if config.overwrite or not (out_dir / "config.json").is_file():
        return
    try:
        before = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a model this command wrote: save_head judges the folder
    now = dataclasses.asdict(config)
    differs = [f"--{key.replace('_', '-')} {before.get(key)!r} -> {now[key]!r}"
               for key in now if key not in ("out", "overwrite") and before.get(key) != now[key]]
    if differs:
        raise ValueError(
            f"{out_dir} already holds a model trained with other settings "
            f"({'; '.join(differs)}). Pass --out to keep both, or --overwrite to replace it. "
            f"Received: out={str(out_dir)!r}"
        )


def _check_stream(config: FitConfig) -> None:
    """Refuse ``--stream`` with a head or option it does not support."""
    if config.stream and config.head not in STREAM_HEADS:
        raise ValueError(
            f"`stream` supports the heads {STREAM_HEADS} (RBF SVMs need all rows in memory). "
            f"Received: head={config.head!r}"
        )
    if config.stream and config.use_augmented:
        raise ValueError("`stream` and `use_augmented` cannot be combined yet. "
                         "Received: stream=True, use_augmented=True")


def _read_rows(config: FitConfig, cache_path: Path) -> tuple[Any, np.ndarray]:
    """(cache, features as float32) with labels and values checked; no features when
    streaming (the streamed heads check each batch as they read it)."""
    cache = read_cache(cache_path, augmented=config.use_augmented, features=not config.stream,
                       layer=config.layer)
    layers = list(cache.attrs.get("layers") or [])
    if config.layer is None and len(layers) > 1:
        log.warning("fit_head: %s holds %d layers; training on the first, %s. Choose "
                    "another with --layer (%s).", cache_path, len(layers), layers[0],
                    ", ".join(layers[1:]))
    class_names, labels = cache.class_names, cache.labels
    if len(labels) == 0:
        raise ValueError(f"{cache_path} holds no rows: nothing to train on.")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"{cache_path} has labels outside 0..{len(class_names) - 1} "
            f"(class_names={class_names}). Received: labels in {labels.min()}..{labels.max()}"
        )
    # float16 caches are widened once here; Keras and scikit-learn both want float32.
    X = np.asarray(cache.features, dtype=np.float32)
    if len(labels) == len(X):
        check_finite(X, cache.paths, source=f"in {cache_path}")
    return cache, X


def _split(
    config: FitConfig, cache: Any, cache_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) rows (:func:`split_rows`); refuses training rows of one class."""
    train, val, test = split_rows(
        cache.split, cache.labels, config.val_split, config.seed, class_names=cache.class_names
    )
    train_classes = np.unique(cache.labels[train])
    if train_classes.size < 2:
        raise ValueError(
            f"The training rows of {cache_path} hold only one class "
            f"({_class_label(int(train_classes[0]), cache.class_names)}); a classifier needs "
            "at least two."
        )
    return train, val, test


def _fit(
    config: FitConfig, estimator: Any, *, cache: Any, X: np.ndarray, train: np.ndarray,
    val: np.ndarray,
) -> tuple[Any, int, float]:
    """Fit on the training rows (+ their augmented copies when asked): (estimator,
    augmented rows used, seconds)."""
    labels = cache.labels
    n_augmented = 0
    start = time.perf_counter()
    if config.stream:
        estimator = _fit_streaming(config, cache, train, val)
    else:
        X_train, y_train = X[train], labels[train]
        if config.use_augmented:
            X_train, y_train, n_augmented = _with_augmented(cache, train, X_train, y_train)
        fit_kwargs: dict[str, Any] = {}
        if config.head == "dense":
            # Early stopping can only score rows of classes the head learns.
            seen = np.isin(labels[val], np.unique(labels[train]))
            fit_kwargs["validation_data"] = (X[val][seen], labels[val][seen])
        estimator.fit(X_train, y_train, **fit_kwargs)
    return estimator, n_augmented, time.perf_counter() - start


def _scores(config: FitConfig, estimator: Any, cache: Any, X: np.ndarray,
            rows: np.ndarray) -> dict[str, Any]:
    """:func:`evaluate` on ``rows``, read from the cache in batches when streaming."""
    labels, class_names = cache.labels, cache.class_names
    if not config.stream:
        return evaluate(estimator, X[rows], labels[rows], class_names)
    from pipeline.heads.stream import open_features, predict_rows, read_rows

    f, features = open_features(Path(config.cache), config.layer)
    with f:
        rows = np.sort(rows)
        pred = predict_rows(estimator, features, rows, read_rows(features, config.batch_size))
    return evaluate(estimator, None, labels[rows], class_names, pred=pred)


def _metrics(
    config: FitConfig, estimator: Any, *, cache: Any, X: np.ndarray, train: np.ndarray,
    val: np.ndarray, test: np.ndarray, n_augmented: int, fit_seconds: float,
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run's facts, validation scores, test scores."""
    metrics: dict[str, Any] = {
        "head": config.head,
        "params": head_params(estimator),
        "cache": str(Path(config.cache)),
        "cache_attrs": cache.attrs,
        "class_names": list(cache.class_names),
        "split_source": "recorded" if np.any(cache.split != "") else "stratified",
        "n_train": int(train.size),
        "n_train_augmented": n_augmented,
        "n_val": int(val.size),
        "n_test": int(test.size),
        "fit_seconds": fit_seconds,
        "stream": config.stream,
        **_scores(config, estimator, cache, X, val),
    }
    if hasattr(estimator, "history_"):
        metrics["epochs_run"] = len(estimator.history_.get("loss", []))
    if test.size:
        metrics["test"] = _scores(config, estimator, cache, X, test)
    return metrics


# Linear heads trained out of core make at most this many passes over the cache.
STREAM_SGD_PASSES = 10


def _fit_streaming(config: FitConfig, cache: Any, train: np.ndarray, val: np.ndarray) -> Any:
    """Fit ``config.head`` from the cache file in batches (``--stream``)."""
    from pipeline.heads.stream import fit_streaming, open_features

    f, features = open_features(config.cache, config.layer)
    with f:
        feature_shape = tuple(features.shape[1:])
    epochs = config.epochs if config.head == "dense" else min(config.epochs, STREAM_SGD_PASSES)
    return fit_streaming(
        config.head, config.cache, labels=cache.labels, paths=cache.paths, train=train, val=val,
        feature_shape=feature_shape, epochs=epochs, lr=config.lr, batch_size=config.batch_size,
        patience=config.patience, C=config.C, class_weight=config.class_weight, seed=config.seed,
        layer=config.layer,
    )


def _with_augmented(
    cache: Any, train: np.ndarray, X_train: np.ndarray, y_train: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Training rows plus the augmented copies of exactly those rows (never of validation
    or test rows, so validation stays on originals only)."""
    if cache.augmented_source is None or cache.augmented_source.size == 0:
        raise ValueError(
            f"{cache.attrs.get('data_dir', 'the cache')}: the cache holds no augmented "
            "copies: extract with --augment K first. Received: use_augmented=True"
        )
    keep = np.isin(cache.augmented_source, train)
    source = cache.augmented_source[keep]
    extra = np.asarray(cache.augmented_features[keep], dtype=np.float32)
    check_finite(extra, [cache.paths[i] for i in source], source="(augmented copies)")
    return (np.concatenate([X_train, extra]), np.concatenate([y_train, cache.labels[source]]),
            int(keep.sum()))


def format_report(metrics: dict[str, Any]) -> str:
    """The metrics a fit_head run prints: sizes, then accuracy and per-class F1 per split."""
    layer = (metrics.get("cache_attrs") or {}).get("layer")
    lines = [
        (f"layer={layer}  " if layer else "")
        + f"head={metrics['head']}  n_train={metrics['n_train']}  n_val={metrics['n_val']}  "
        f"n_test={metrics['n_test']}  augmented={metrics['n_train_augmented']}  "
        f"fit {metrics['fit_seconds']:.2f} s"
    ]
    for part, m in (("validation", metrics), ("test", metrics.get("test"))):
        if m is None:
            continue
        lines.append(f"{part}: accuracy={m['accuracy']:.4f}  macro-F1={m['macro_f1']:.4f}")
        # A class with no rows in this split has no F1: say so rather than print 0.000.
        f1s = "  ".join(f"{name} {v['f1-score']:.3f}" if v.get("support") else
                        f"{name} - (no {part} rows)" for name, v in m["per_class"].items())
        lines.append(f"  per-class F1: {f1s}")
    return "\n".join(lines)
