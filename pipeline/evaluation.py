"""``predict --evaluate``: a model's predictions on labelled images, scored.

The images come with their answers: a folder of class folders (or Chollet's pre-split
``train/validation/test`` layout, every split scored together) or a ``.csv`` manifest with
``path`` and ``label`` columns, read exactly as extract reads them
(:func:`pipeline.images.index_data`). Every label must be one of the model's classes (a
class of the model with no image is fine). Predictions are scored as fit_head scores a
validation split (:func:`pipeline.fit.evaluate`: accuracy, macro-F1 over the classes
present, per-class precision/recall/F1, confusion matrix in the model's class order), and
beside the predictions CSV ``<stem>.misclassified.csv`` lists every wrong answer (path,
true, predicted, confidence: the predicted class's probability, or its decision score for
the SVMs) and ``<stem>.metrics.json`` holds the scores. Unreadable images are skipped as
predict skips them and counted, never scored.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.util.files import replace_atomically, write_json_atomic

__all__ = [
    "Labelled",
    "check_known_classes",
    "evaluate_predictions",
    "evaluation_paths",
    "format_evaluation",
    "labelled_images",
]


@dataclass
class Labelled:
    """Labelled images to predict: path -> true class name, in extraction order."""

    truth: dict[str, str]  # str(path), as predict writes it -> class name
    paths: list[Path]  # the files that exist
    missing: dict[Path, str]  # manifest files that do not exist -> why (skipped)
    class_names: list[str]  # the labels found (sorted)
    source: str  # the folder or manifest, as given


def labelled_images(inputs: Sequence[str | os.PathLike]) -> Labelled:
    """The images of one labelled folder or manifest, with their classes.

    Raises:
        ValueError: not exactly one folder or ``.csv`` manifest, or what
            :func:`pipeline.images.index_data` raises for it (no class folders, a bad
            manifest, no image).
    """
    from pipeline.images import index_data

    if len(inputs) != 1 or not (Path(inputs[0]).is_dir()
                                or Path(inputs[0]).suffix.lower() == ".csv"):
        raise ValueError(
            "`--evaluate` needs one labelled folder (a folder per class) or one .csv "
            "manifest with path and label columns. "
            f"Received: images={[str(i) for i in inputs]!r}"
        )
    source = str(inputs[0])
    try:
        index = index_data(source)
    except ValueError as exc:
        raise ValueError(f"`--evaluate` cannot read labelled images from {source}: {exc}") from None
    truth: dict[str, str] = {}
    paths, missing = [], {}
    for record in index.records:
        path = index.root / record.path
        if record.path in index.notes:
            missing[path] = index.notes[record.path]
            continue
        paths.append(path)
        truth[str(path)] = index.class_names[record.label]
    return Labelled(truth, paths, missing, list(index.class_names), source)


def check_known_classes(labelled: Labelled, model_classes: Sequence[str]) -> None:
    """Refuse labels the model cannot predict.

    Raises:
        ValueError: names each unknown class with its number of images, and the
            model's classes.
    """
    known = set(model_classes)
    unknown = [name for name in labelled.class_names if name not in known]
    if not unknown:
        return
    counts = {name: 0 for name in unknown}
    for name in labelled.truth.values():
        if name in counts:
            counts[name] += 1
    listed = ", ".join(f"{name!r} ({n} images)" for name, n in counts.items())
    raise ValueError(
        f"`--evaluate`: {labelled.source} has classes the model does not know: {listed}. "
        f"The model's classes are {', '.join(map(repr, model_classes))}; rename or leave "
        f"out the others. Received: images={[labelled.source]!r}"
    )


def evaluation_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>.misclassified.csv, <stem>.metrics.json)`` beside the predictions CSV."""
    out = Path(out)
    return (out.with_name(f"{out.stem}.misclassified.csv"),
            out.with_name(f"{out.stem}.metrics.json"))


def evaluate_predictions(
    predictions: Path,
    labelled: Labelled,
    class_names: Sequence[str],
    *,
    value_prefix: str,
    n_skipped: int,
    model: str,
) -> dict[str, Any]:
    """Score the predictions CSV against ``labelled``; write the misclassified files and
    the metrics beside it.

    Args:
        predictions: the CSV predict wrote (``path``, ``predicted``, one value per class).
        labelled: the answers.
        class_names: the model's classes, in its output order.
        value_prefix: ``p`` or ``score``, the CSV's value columns.
        n_skipped: images that could not be read (not scored).
        model: the model as given, recorded in the metrics.

    Returns:
        The metrics written to ``<stem>.metrics.json``, with ``misclassified_csv`` and
        ``metrics_json`` naming the two files.
    """
    import numpy as np

    from pipeline.fit import evaluate

    with open(predictions, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids = {name: i for i, name in enumerate(class_names)}
    y = np.array([ids[labelled.truth[r["path"]]] for r in rows], dtype=np.int64)
    pred = np.array([ids[r["predicted"]] for r in rows], dtype=np.int64)
    metrics = evaluate(None, None, y, class_names, pred=pred)
    wrong = [[r["path"], labelled.truth[r["path"]], r["predicted"],
              r[f"{value_prefix}_{r['predicted']}"]] for r in rows
             if labelled.truth[r["path"]] != r["predicted"]]
    misclassified, metrics_json = evaluation_paths(predictions)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "true", "predicted", "confidence"])
            writer.writerows(wrong)

    replace_atomically(misclassified, write)
    metrics = {
        "model": model,
        "images": labelled.source,
        "predictions": str(predictions),
        "n_images": len(rows),
        "n_misclassified": len(wrong),
        "n_skipped": n_skipped,
        "confidence": "probability" if value_prefix == "p" else "decision score",
        "class_names": list(class_names),
        **metrics,
        "misclassified_csv": str(misclassified),
    }
    write_json_atomic(metrics_json, metrics)
    return {**metrics, "metrics_json": str(metrics_json)}


def format_evaluation(metrics: dict[str, Any]) -> str:
    """What ``predict --evaluate`` prints: accuracy, macro-F1, the confusion matrix."""
    names = metrics["class_names"]
    matrix = metrics["confusion_matrix"]
    n, right = metrics["n_images"], metrics["n_images"] - metrics["n_misclassified"]
    lines = [f"evaluate: accuracy {metrics['accuracy']:.4f} ({right}/{n} right), "
             f"macro-F1 {metrics['macro_f1']:.4f}",
             "confusion matrix (rows: true class, columns: predicted):"]
    width = max(len(str(v)) for row in matrix for v in row)
    cols = [max(width, len(name)) for name in names]
    first = max(len(name) for name in names)
    lines.append(" " * (first + 2) + "".join(
        f"  {name.rjust(w)}" for name, w in zip(names, cols, strict=True)))
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"  {name.ljust(first)}" + "".join(
            f"  {str(v).rjust(w)}" for v, w in zip(row, cols, strict=True)))
    return "\n".join(lines)
