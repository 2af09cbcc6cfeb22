"""Train one head on a feature cache, evaluate it, and save model + metrics + config."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split

from pipeline.bases.files import base_file_record
from pipeline.cache import check_finite, read_cache
from pipeline.fit.config import FitConfig, check_fit_config, check_fractions
from pipeline.heads import head_params, make_head, save_head
from pipeline.util.files import replace_atomically, write_json_atomic

__all__ = ["TEST_ROWS", "evaluate", "format_done", "format_report", "run_fit", "split_rows"]

log = logging.getLogger(__name__)

_SPLITS = ("train", "validation", "test")

# The rows a --test-split held out, beside the model: row, path, label.
TEST_ROWS = "test_rows.csv"


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
    test_split: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the train, validation and test rows of a cache.

    When the cache records splits (its ``split`` column holds "train"/"validation"/"test"),
    they are used as recorded and ``val_split`` is ignored, except that a cache with "train"
    rows but no "validation" rows gets a stratified ``val_split`` of its train rows. When no
    row records a split (all ""), a stratified, seeded ``val_split`` of all rows is the
    validation set and the test set is empty.

    ``test_split > 0`` first holds out a stratified, seeded ``ceil(test_split * N)`` of the
    ``N`` rows as the test set, taken from the rows that would otherwise train (all rows, or
    the recorded "train" rows); the validation rows are then chosen among the rest as above,
    ``ceil(val_split * N)`` of them when split here. A cache that records "test" rows keeps
    them as its test set and refuses ``test_split``. With ``test_split=0`` the split is
    exactly the one made without it.

    Args:
        split: per-row split names, shape ``(N,)``.
        labels: per-row integer labels, shape ``(N,)``.
        val_split: fraction of rows to validate on when splitting here, in (0, 1).
        seed: random state of the stratified splits.
        class_names: optional names for ``labels``, used in error messages.
        test_split: fraction of all rows to hold out as the test set, in [0, 1).

    Returns:
        ``(train_idx, val_idx, test_idx)``, each sorted.

    Raises:
        ValueError: ``val_split`` outside (0, 1), ``test_split`` outside [0, 1) or with
            ``val_split`` not below 1, a recorded test split with ``test_split``, unknown or
            mixed split names, no training rows, or a class too small to stratify.
    """
    check_fractions(val_split, test_split)
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
        if test_split and test_idx.size:
            raise ValueError(
                f"The cache records a test split ({test_idx.size} rows, from the data folder's "
                "test/ images or the manifest's split column): fit_head tests on those. "
                "`--test-split` holds out a test set only from caches that record none; drop "
                f"it. Received: --test-split={test_split}"
            )
        pool = np.flatnonzero(split == "train")
    # Held out first, so neither training nor early stopping ever sees a test row.
    val_size: float | int = val_split
    if test_split:
        pool, test_idx = _stratified_split(
            pool, labels[pool], int(np.ceil(test_split * len(split))), seed, class_names,
            flag="--test-split", value=test_split,
        )
        # The validation rows stay ``val_split`` of all rows, chosen among the rest.
        val_size = int(np.ceil(val_split * len(split)))
    if "validation" in names:
        return pool, np.flatnonzero(split == "validation"), test_idx
    train_idx, val_idx = _stratified_split(pool, labels[pool], val_size, seed, class_names,
                                           value=val_split)
    return train_idx, val_idx, test_idx


def _stratified_split(
    rows: np.ndarray,
    labels: np.ndarray,
    size: float | int,
    seed: int,
    class_names: Sequence[str] | None,
    *,
    flag: str = "val_split",
    value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) of ``rows``, sorted: ``part`` holds ``size`` of them (a fraction, or a
    row count when an int), stratified by ``labels``; ``flag=value`` names the option in
    errors (``value`` defaults to ``size``)."""
    values, counts = np.unique(labels, return_counts=True)
    if counts.size and counts.min() < 2:
        small = int(values[np.argmin(counts)])
        raise ValueError(
            f"Cannot split stratified: class {_class_label(small, class_names)} has only "
            f"{counts.min()} row(s); every class needs at least 2. Add images of it or "
            "record a train/validation split in the data folder."
        )
    # Check what train_test_split would reject, so the message says what to change.
    n_part = size if isinstance(size, int) else int(np.ceil(size * len(rows)))
    if n_part < len(values) or len(rows) - n_part < len(values):
        received = f"{flag}={size if value is None else value}"
        raise ValueError(
            f"Cannot split {len(rows)} rows of {len(values)} classes stratified with "
            f"{received}: both parts need at least one row per class. "
            f"Choose another {flag} or add rows."
        )
    rest, part = train_test_split(rows, test_size=size, stratify=labels, random_state=seed)
    return np.sort(rest), np.sort(part)


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
    out_dir = check_fit_config(config)
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
    if config.head == "dense":
        estimator.set_params(log_epochs=True)  # one line per epoch: training takes a while
    cache_path = Path(config.cache)
    cache, X = _read_rows(config, cache_path)
    train, val, test = _split(config, cache, cache_path)
    estimator, n_augmented, fit_seconds, converged = _fit(config, estimator, cache=cache, X=X,
                                                          train=train, val=val)
    metrics = _metrics(config, estimator, cache=cache, X=X, train=train, val=val, test=test,
                       n_augmented=n_augmented, fit_seconds=fit_seconds)
    if not converged:
        metrics["max_iter_reached"] = next(
            (v for k, v in estimator.get_params().items() if k.endswith("max_iter")), None)
    # Relative to the model folder too, so a folder moved with its base still finds it.
    metrics["base_file"] = base_file_record(cache.attrs, out_dir)
    save_head(estimator, out_dir)
    _write_extras(config, estimator, metrics, cache=cache, test=test, out_dir=out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(config))
    return out_dir, metrics


def _write_extras(
    config: FitConfig, estimator: Any, metrics: dict[str, Any], *, cache: Any,
    test: np.ndarray, out_dir: Path,
) -> None:
    """The dense head's training curve (PNG), and the rows a ``--test-split`` held out
    (``test_rows.csv``: row, path, label); each named in ``metrics``."""
    history = getattr(estimator, "history_", None)
    if history and history.get("loss"):
        from pipeline.heads.curve import TRAINING_CURVE, plot_training_curve

        plot_training_curve(history, metrics.get("best_epoch"), out_dir / TRAINING_CURVE)
        metrics["training_curve"] = TRAINING_CURVE
    if metrics.get("test_source") == "held out":
        import csv
        import io

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["row", "path", "label"])
        writer.writerows([int(i), cache.paths[i], cache.class_names[cache.labels[i]]]
                         for i in test)
        replace_atomically(out_dir / TEST_ROWS, lambda tmp: tmp.write_text(text.getvalue()))
        metrics["test_rows"] = TEST_ROWS


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
        cache.split, cache.labels, config.val_split, config.seed, class_names=cache.class_names,
        test_split=config.test_split,
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
    augmented rows used, seconds, whether the solver converged within its iterations)."""
    labels = cache.labels
    n_augmented = 0
    converged = True
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
        with _convergence() as warned:
            estimator.fit(X_train, y_train, **fit_kwargs)
        converged = not warned
    return estimator, n_augmented, time.perf_counter() - start, converged


@contextmanager
def _convergence() -> Iterator[list[Warning]]:
    """Holds back scikit-learn's ConvergenceWarning, which names no flag ("increase the
    number of iterations"), into the list: the report says which flag raises the limit.
    Other warnings pass through as they came."""
    warned: list[Warning] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield warned
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            warned.append(w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


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
        # "recorded": the cache's test split; "held out": --test-split here; None: no test.
        "test_source": ("held out" if config.test_split else "recorded") if test.size else None,
        "test_split": config.test_split,
        "split_seed": config.seed,
        "fit_seconds": fit_seconds,
        "stream": config.stream,
        **_scores(config, estimator, cache, X, val),
    }
    if hasattr(estimator, "history_"):
        metrics["epochs_run"] = len(estimator.history_.get("loss", []))
        metrics["history"] = estimator.history_
        # The epoch whose weights the model keeps (early stopping restores the best).
        metrics["best_epoch"] = getattr(estimator, "best_epoch_", None)
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
        layer=config.layer, hidden=config.hidden, dropout=config.dropout, log_epochs=True,
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


_TEST_NOTES = {
    "held out": "  (held out by --test-split: never trained or early-stopped on)",
    "recorded": "  (the cache's test split: never trained or early-stopped on)",
}


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
        lines.append(f"{part}: accuracy={m['accuracy']:.4f}  macro-F1={m['macro_f1']:.4f}"
                     + (_TEST_NOTES.get(metrics.get("test_source"), "") if part == "test" else ""))
        # A class with no rows in this split has no F1: say so rather than print 0.000.
        f1s = "  ".join(f"{name} {v['f1-score']:.3f}" if v.get("support") else
                        f"{name} - (no {part} rows)" for name, v in m["per_class"].items())
        lines.append(f"  per-class F1: {f1s}")
    if "max_iter_reached" in metrics:
        lines.append(f"note: the solver stopped at its limit of {metrics['max_iter_reached']} "
                     "iterations before converging; a higher --max-iter may score better")
    return "\n".join(lines)


def format_done(metrics: dict[str, Any], out_dir: Path) -> str:
    """fit_head's last line: validation (and test) scores, fit time, what was written where."""
    scores = f"validation accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    if metrics.get("test"):
        scores += (f"; test accuracy {metrics['test']['accuracy']:.4f}, "
                   f"macro-F1 {metrics['test']['macro_f1']:.4f}")
    files = ["model", "metrics.json", "config.json"]
    if metrics.get("training_curve"):
        kept = (f", kept epoch {metrics['best_epoch']} of {metrics['epochs_run']}"
                if metrics.get("best_epoch") else "")
        files.append(f"{metrics['training_curve']} (training curve{kept})")
    if metrics.get("test_rows"):
        files.append(metrics["test_rows"])
    return (f"fit_head: done. {metrics['head']}: {scores}, fit {metrics['fit_seconds']:.2f} s; "
            f"{', '.join(files[:-1])} and {files[-1]} in {out_dir}/")
