"""A trained model on new images -> one CSV of predictions, and/or the images' features.

The model (a fit_head folder, a finetune folder or an exported ``X.keras``) is found and
loaded by :mod:`pipeline.predictor` with the configuration recorded with it, so decoding,
resizing and preprocessing are never re-specified by hand and cannot drift.

Images are named as files, folders or lists of paths (:func:`list_images`). Output
(``--out``, default ``predictions.csv``): one row per readable image, in input order
(folders walked recursively, sorted, hidden files ignored; lists in their order), with
the columns

    path, predicted, p_<class>... | score_<class>..., [top1_class, top1_p|top1_score, ...]

``p_`` for heads with probabilities (dense, logreg, knn, end-to-end); ``score_`` for the SVMs'
decision function (for two classes its single score s becomes ``-s, s``). ``predicted``
is the head's own ``predict``. Unreadable files never stop the run and never take a
row: they are logged (the CLI shows them on stderr) and written with their reason to
``<out stem>.skipped.csv`` (removed when a later run skips nothing); so is a listed file
that does not exist (reason: ``listed in LIST line N but not found``), as extract treats
a manifest's. A run that can read
no image at all is an error and writes nothing; a file named as an image that is plainly
something else (an HDF5 cache, a ``.keras`` zip, a text file) is said to be so.

``--embeddings OUT.h5|.npy|.parquet`` also writes the features the head reads (the frozen
base rebuilt from the model's recorded cache attributes: same layer, pooling, size and
dtype as the cache it was trained on), row i for the i-th image read, in the formats of
:mod:`pipeline.embeddings`; one forward pass serves both outputs. Given without ``--out``,
only the embeddings are written (no predictions CSV), and unreadable files are listed in
``<embeddings stem>.skipped.csv``. End-to-end models (finetune folders, exported
``.keras``) have no separate features and are refused.

A fit_head folder finds its base file where it recorded it, relative to the folder or
absolute (:mod:`pipeline.bases.files`); ``--base PATH`` says where it is now, and must be
the same file (sha256). ``--evaluate`` takes one labelled folder or manifest instead of
unlabelled images and scores the predictions (:mod:`pipeline.evaluation`).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# export_model and check_exportable lived here before export.py: re-exported for old callers.
from pipeline.embeddings import EmbeddingRows, EmbeddingsWriter, check_embeddings_path, rows_path
from pipeline.evaluation import check_known_classes, evaluate_predictions, labelled_images
from pipeline.export import check_exportable, export_model
from pipeline.images import IMAGE_EXTENSIONS, image_files, is_list_file, read_path_list
from pipeline.interrupts import deferred
from pipeline.predictor import (
    END_TO_END,
    ModelFiles,
    Predictor,
    load_predictor,
    locate_model,
    recorded_classes,
)
from pipeline.progress import Progress, format_duration
from pipeline.util.quiet import load_backend

__all__ = [
    "END_TO_END",
    "PredictConfig",
    "PredictResult",
    "Predictor",
    "check_exportable",
    "export_model",
    "list_images",
    "load_predictor",
    "predictions_out",
    "run_predict",
    "skipped_path",
]

log = logging.getLogger(__name__)



@dataclass
class PredictConfig:
    """Arguments of the predict command."""

    model: str
    images: list[str] = field(default_factory=list)
    out: str | None = None  # None: predictions.csv, or no CSV when only embeddings are asked
    top_k: int | None = None
    batch_size: int = 32
    workers: int = 0
    log_every: float = 30.0
    embeddings: str | None = None
    base: str | None = None  # where the recorded base file is now (a moved model)
    evaluate: bool = False  # images are one labelled folder or manifest: score them


@dataclass
class PredictResult:
    """What one predict run did."""

    out: Path | None  # None: no predictions CSV (embeddings only)
    n_predicted: int
    skipped: list[tuple[str, str]]
    skipped_out: Path | None
    kind: str
    seconds: float
    embeddings: Path | None = None
    evaluation: dict[str, Any] | None = None  # --evaluate: the metrics written

    def summary(self) -> str:
        """The one-line summary printed last."""
        rate = self.n_predicted / self.seconds if self.seconds > 0 else 0.0
        skipped = (
            f"{len(self.skipped)} unreadable files skipped (listed in {self.skipped_out})"
            if self.skipped
            else "none skipped"
        )
        written = [f"predictions in {self.out}"] if self.out is not None else []
        if self.embeddings is not None:
            beside = (f" (+ rows in {rows_path(self.embeddings)})"
                      if self.embeddings.suffix.lower() == ".npy" else "")
            written.append(f"embeddings in {self.embeddings}{beside}")
        if self.evaluation is not None:
            written.append(f"misclassified files in {self.evaluation['misclassified_csv']}, "
                           f"metrics in {self.evaluation['metrics_json']}")
        return (
            f"predict: done. {self.n_predicted} images with the {self.kind} model in "
            f"{format_duration(self.seconds)} ({rate:.1f} img/s), {skipped}; "
            + "; ".join(written)
        )




def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``, in order.

    A folder contributes every image below it (recursive, sorted walk; hidden files and
    folders ignored; extensions from ``IMAGE_EXTENSIONS``, any case; symlinked folders
    not followed). A ``.txt`` file (one path per line) or a ``.csv`` file (a ``path``
    column) is a list: it contributes its paths in its order, relative to its folder or
    absolute, missing files included (``run_predict`` skips those, naming the line). Any
    other file is taken as given, whatever its extension.

    Args:
        inputs: image files, folders and/or lists of paths.

    Returns:
        The paths, files as given and folder or list contents joined to their folder.

    Raises:
        ValueError: nothing given, a path that does not exist, a list that cannot be
            read, or no image found.
    """
    return [path for path, _ in _named_images(inputs)]


def _named_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """:func:`list_images` with, for each listed path, ``listed in LIST line N`` ("" else)."""
    if not inputs:
        raise ValueError("No images given: pass image files, folders and/or lists of paths. "
                         "Received: images=[]")
    files: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend((p, "") for p in image_files(path))
        elif is_list_file(path):
            files.extend((e.path, f"listed in {path} line {e.line}")
                         for e in read_path_list(path))
        elif path.exists():
            files.append((path, ""))
        else:
            raise ValueError(f"No such image file or folder. Received: images={str(item)!r}")
    if not files:
        raise ValueError(
            f"Found 0 images in {', '.join(map(str, inputs))}. Supported image extensions "
            f"are {', '.join(IMAGE_EXTENSIONS)} (any case)."
        )
    return files


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"


def _not_an_image(path: Path) -> str | None:
    """What a file named as an image plainly is instead: HDF5, zip or text; else None.

    The decoder would only say "cannot identify image file". Text is checked last and
    only when Pillow cannot open the file (XPM, XBM and plain PNM images are text).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None  # the decoder says why
    if head.startswith(_HDF5_SIGNATURE):
        return "an HDF5 file (a feature cache?)"
    if head.startswith(_ZIP_SIGNATURE):
        return "a zip archive (a .keras model?)"
    if not head or b"\0" in head:
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the read
            return None
    from PIL import Image

    try:
        with Image.open(path):
            return None
    except Exception:  # noqa: BLE001 - any failure to identify it: not an image Pillow reads
        return "a text file"


def _rejected(inputs: Sequence[str | os.PathLike], paths: Sequence[Path]) -> dict[Path, str]:
    """{file named in ``inputs``: why it is not an image} for files that plainly are not.

    Raises:
        ValueError: every image to predict is such a file.
    """
    named = {Path(item) for item in inputs if not Path(item).is_dir()}
    rejected = {p: f"{kind}, not an image" for p in paths
                if p in named and (kind := _not_an_image(p)) is not None}
    if rejected and len(rejected) == len(paths):
        path, reason = next(iter(rejected.items()))
        more = f" (and {len(rejected) - 1} more like it)" if len(rejected) > 1 else ""
        raise ValueError(
            f"{path} is {reason}: predict takes image files, folders or lists of paths "
            f"(.txt, .csv){more}. Received: images={_shown(inputs)}"
        )
    return rejected


def _shown(inputs: Sequence[str | os.PathLike], limit: int = 3) -> str:
    """``inputs`` for a message: the first few, then how many more."""
    items = [str(i) for i in inputs]
    if len(items) <= limit:
        return repr(items)
    return f"[{', '.join(map(repr, items[:limit]))}, ... ({len(items) - limit} more)]"


def skipped_path(out: str | os.PathLike) -> Path:
    """Where the unreadable files of a run writing ``out`` are listed: ``<stem>.skipped.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def predictions_out(out: str | None, embeddings: str | None, evaluate: bool = False) -> str | None:
    """The predictions CSV to write: ``out``; by default predictions.csv, none when only
    ``--embeddings`` is asked for (``--evaluate`` always scores a CSV)."""
    if out is not None:
        return out
    return None if embeddings is not None and not evaluate else "predictions.csv"


def _validate(config: PredictConfig) -> None:
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={config.batch_size}")
    if config.top_k is not None and config.top_k < 1:
        raise ValueError(f"`top_k` must be >= 1. Received: top_k={config.top_k}")
    if config.workers < 0:
        raise ValueError(f"`workers` must be >= 0 (0: auto). Received: workers={config.workers}")
    if config.log_every <= 0:
        raise ValueError(f"`log_every` must be > 0. Received: log_every={config.log_every}")
    if config.embeddings is not None:
        check_embeddings_path(config.embeddings)
        out = predictions_out(config.out, config.embeddings, config.evaluate)
        taken = {Path(config.embeddings).resolve(), rows_path(config.embeddings).resolve()}
        if out is not None and Path(out).resolve() in taken:
            raise ValueError(
                f"`--out` and `--embeddings` must name different files. "
                f"Received: --out={out!r}, --embeddings={config.embeddings!r}"
            )


def _check_embeddings(located: ModelFiles, embeddings: str | None, model: str) -> None:
    """Refuse ``--embeddings`` for an end-to-end model, before it is loaded.

    Raises:
        ValueError: the model is a finetune folder or an exported ``.keras``: its head
            reads no stored features (a fine-tuned base computes other ones).
    """
    if embeddings is None or located.meta.get("kind") != END_TO_END:
        return
    source = located.meta.get("source")
    hint = f" (this one was made from {source})" if source else ""
    raise ValueError(
        "`--embeddings` needs a fit_head model folder, whose frozen base is rebuilt from "
        "the recorded cache attributes; an end-to-end model (finetune folder, exported "
        f".keras) has no separate features. Use the fit_head folder it came from{hint}. "
        f"Received: model={model!r}"
    )


def _header(predictor: Predictor, top_k: int) -> list[str]:
    prefix = predictor.value_prefix
    columns = ["path", "predicted", *(f"{prefix}_{name}" for name in predictor.class_names)]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}_class", f"top{rank}_{prefix}"]
    return columns


def _rows(
    paths: Sequence[str], predicted: np.ndarray, values: np.ndarray, names: list[str], top_k: int
) -> list[list[str]]:
    # str() of a NumPy scalar is the shortest text that reads back to the same value.
    ranked = np.argsort(-values, axis=1, kind="stable")[:, :top_k]
    rows = []
    for path, pred, row, order in zip(paths, predicted, values, ranked, strict=True):
        top = [item for c in order for item in (names[c], str(row[c]))]
        rows.append([path, names[pred], *(str(v) for v in row), *top])
    return rows


def run_predict(config: PredictConfig) -> PredictResult:
    """Predict the class of every image given, with the configuration recorded with a model.

    Protocol (cheap failures first, then one pass over the images):

    1. ``_validate``: the arguments.
    2. :func:`~pipeline.predictor.locate_model`: the model's metadata (JSON only).
    3. ``_images``: the images (:func:`list_images`), named files that are plainly no
       images set aside.
    4. :func:`~pipeline.predictor.load_predictor`, which Ctrl-C does not cut in two: for
       a fit_head folder the frozen feature model is rebuilt from the recorded cache
       attributes.
    5. ``_check_top_k``: ``top_k`` against the model's classes.
    6. ``_write_outputs``: decode images in threads with
       :func:`pipeline.images.batches.decoded_batches` at the recorded size,
       interpolation and jpeg_downscale, run each batch through the base (and the head
       when predictions are written), stream rows into a temporary CSV and/or embeddings
       file that replace ``out`` and ``embeddings`` only when complete.
    7. ``_write_skipped``: list unreadable files in ``<out stem>.skipped.csv`` (the
       embeddings' stem when no CSV is written).

    With ``evaluate``, step 3 reads one labelled folder or manifest
    (:func:`pipeline.evaluation.labelled_images`), its classes are checked against the
    model's recorded class names before step 4 and its loaded classes after it, and last
    the CSV is scored
    (:func:`pipeline.evaluation.evaluate_predictions`: ``<out stem>.misclassified.csv``
    and ``<out stem>.metrics.json``).

    Args:
        config: the model, the images and the output options.

    Returns:
        What was written.

    Raises:
        ValueError: a bad argument, model or image list (Keras-style message): files
            named that are plainly no images (HDF5, zip, text) only, or no image that
            could be read (then nothing is written); ``--embeddings`` with an unknown
            extension or an end-to-end model; ``base`` not the recorded base file (or the
            base file found nowhere); ``evaluate`` with other than one labelled folder or
            manifest, or labels the model does not know.
        FileNotFoundError: a model folder's head files are incomplete.
    """
    _validate(config)
    located = locate_model(config.model, base=config.base)  # a base file found, or why not
    _check_embeddings(located, config.embeddings, config.model)
    labelled = labelled_images(config.images) if config.evaluate else None
    if labelled is None:
        paths, rejected = _images(inputs=config.images)
    else:
        paths, rejected = labelled.paths, dict(labelled.missing)
        recorded = recorded_classes(located)
        if recorded is not None:  # in a fraction of a second, before the model loads
            check_known_classes(labelled, recorded)
    with deferred():  # Ctrl-C while the model is built stops right after it
        load_backend()  # Keras loads only now, after every check, without TF's start-up lines
        predictor = load_predictor(located)
    if labelled is not None:
        check_known_classes(labelled, predictor.class_names)
    top_k = _check_top_k(top_k=config.top_k, n_classes=len(predictor.class_names))
    csv_name = predictions_out(config.out, config.embeddings, config.evaluate)
    out = None if csv_name is None else Path(csv_name)
    embeddings = None if config.embeddings is None else Path(config.embeddings)
    for target in (out, embeddings):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
    log.info("predict: %d images, %s model %s (%d classes), input %dx%d %s -> %s",
             len(paths), predictor.kind, config.model, len(predictor.class_names),
             *predictor.input_size, predictor.interpolation,
             ", ".join(str(t) for t in (out, embeddings) if t is not None))
    start = time.monotonic()
    skipped = [(str(p), reason) for p, reason in rejected.items()]
    n_predicted = _write_outputs(out=out, embeddings=embeddings, paths=paths,
                                 predictor=predictor, top_k=top_k, config=config,
                                 skipped=skipped)
    skipped_out = _write_skipped(out or embeddings, skipped)
    evaluation = None if labelled is None or out is None else evaluate_predictions(
        out, labelled, predictor.class_names, value_prefix=predictor.value_prefix,
        n_skipped=len(skipped), model=config.model)
    return PredictResult(out, n_predicted, skipped, skipped_out, predictor.kind,
                         time.monotonic() - start, embeddings, evaluation)


def _images(*, inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], dict[Path, str]]:
    """The images to predict, and {file: why it is set aside} for named files that are
    plainly no images and listed files that do not exist.

    A listed file that does not exist is a bad image, skipped and reported like an
    unreadable one, not a bad argument: one stale line should not stop a long list.

    Raises:
        ValueError: as :func:`list_images`, every named file is plainly no image, or no
            listed file exists.
    """
    named = _named_images(inputs)
    missing = {p: f"{note} but not found" for p, note in named if note and not p.exists()}
    if missing and all(p in missing for p, _ in named):
        path, reason = next(iter(missing.items()))
        raise ValueError(
            f"None of the {len(named)} listed files exists ({path}: {reason}); a list's "
            f"paths are relative to its folder, or absolute. Received: images={_shown(inputs)}"
        )
    paths = [p for p, _ in named if p not in missing]
    rejected = {**missing, **_rejected(inputs, paths)}
    return [p for p in paths if p not in rejected], rejected


def _check_top_k(*, top_k: int | None, n_classes: int) -> int:
    """``top_k`` as a number of ranked columns (0: none).

    Raises:
        ValueError: more than the model has classes.
    """
    top_k = top_k or 0
    if top_k > n_classes:
        raise ValueError(
            f"`top_k` must be at most the number of classes ({n_classes}). "
            f"Received: top_k={top_k}"
        )
    return top_k


def _write_outputs(
    *,
    out: Path | None,
    embeddings: Path | None,
    paths: Sequence[Path],
    predictor: Predictor,
    top_k: int,
    config: PredictConfig,
    skipped: list[tuple[str, str]],
) -> int:
    """Decode ``paths`` ahead and write each batch's predictions to the CSV ``out`` and/or
    its features to ``embeddings`` (either may be None, not both).

    Each output is written whole or not at all; unreadable files are appended to
    ``skipped``; progress is logged.

    Returns:
        The number of rows (images read).

    Raises:
        ValueError: no image could be read; the outputs are left as they were.
    """
    from pipeline.images.batches import decoded_batches
    from pipeline.util.files import replace_atomically

    n_predicted = 0

    def write(tmp: Path | None) -> None:
        nonlocal n_predicted
        progress = Progress(len(paths), "predict", log_every=config.log_every)
        batches = decoded_batches(
            paths,
            size=predictor.input_size,
            interpolation=predictor.interpolation,
            jpeg_downscale=predictor.jpeg_downscale,
            batch_size=config.batch_size,
            workers=config.workers,
            preprocess=predictor.preprocess,
        )
        try:
            with ExitStack() as outputs:
                writer = None
                if tmp is not None:
                    writer = csv.writer(outputs.enter_context(
                        open(tmp, "w", newline="", encoding="utf-8")))
                    writer.writerow(_header(predictor, top_k))
                features_out = None if embeddings is None else outputs.enter_context(
                    EmbeddingsWriter(embeddings, attrs=predictor.feature_attrs or {},
                                     source=config.model))
                for batch in batches:
                    skipped.extend((str(paths[i]), reason) for i, reason in batch.skipped)
                    if batch.indices:
                        done = [str(paths[i]) for i in batch.indices]
                        _score(batch.images, done, predictor=predictor, writer=writer,
                               features_out=features_out, top_k=top_k)
                        n_predicted += len(batch.indices)
                    progress.update(len(batch.indices) + len(batch.skipped))
                if not n_predicted:  # raised inside: no header-only or empty file is left
                    path, reason = skipped[0]
                    targets = [str(t) for t in (out, embeddings) if t is not None]
                    raise ValueError(
                        f"No image could be read, so nothing was predicted and "
                        f"{' and '.join(targets)} {'was' if len(targets) == 1 else 'were'} "
                        f"not written. First of {len(skipped)} unreadable: {path}: {reason}. "
                        f"Received: images={_shown(config.images)}"
                    )
        finally:
            batches.close()
            progress.close()

    if out is None:
        write(None)
    else:
        replace_atomically(out, write)
    return n_predicted


def _score(
    images: np.ndarray,
    done: list[str],
    *,
    predictor: Predictor,
    writer: Any,
    features_out: EmbeddingsWriter | None,
    top_k: int,
) -> None:
    """One decoded batch: its features to ``features_out`` and/or its rows to ``writer``."""
    if features_out is not None:
        features = predictor.embed_batch(images)
        features_out.append(EmbeddingRows(done, features))
        if writer is None:
            return  # embeddings only: the head is not run
        predicted, values = predictor.score_features(features)
    else:
        predicted, values = predictor.predict_batch(images)
    writer.writerows(_rows(done, predicted, values, predictor.class_names, top_k))


def _write_skipped(out: Path, skipped: list[tuple[str, str]], limit: int = 20) -> Path | None:
    """List unreadable files on stderr and in ``<out stem>.skipped.csv``; drop a stale list."""
    from pipeline.util.files import replace_atomically

    target = skipped_path(out)
    if not skipped:
        target.unlink(missing_ok=True)  # from an earlier run: it would describe other files
        return None

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)

    replace_atomically(target, write)
    shown = [f"predict: skipped {len(skipped)} unreadable files:",
             *(f"  {path}: {reason}" for path, reason in skipped[:limit])]
    if len(skipped) > limit:
        shown.append(f"  ... and {len(skipped) - limit} more (all in {target})")
    log.warning("\n".join(shown))
    return target
