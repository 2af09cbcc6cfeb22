"""A trained model, found from its recorded metadata and loaded to score decoded images.

Two kinds of model are accepted, and both read the configuration recorded with them, so
decoding, resizing and preprocessing are never re-specified by hand and cannot drift:

    bottleneck   a fit_head folder (model.keras | model.joblib, head.json, metrics.json).
                 The frozen feature model is rebuilt from metrics.json["cache_attrs"]
                 (recorded files must still match their sha256); images are decoded as
                 extract.py does, features are rounded through the cache dtype, and the
                 head is applied: predictions equal those on cached features. The base
                 file is found where the folder moved with it, or given (``--base``;
                 :mod:`pipeline.bases.files`). An export folder is one whose head.json
                 names its ``feature_model`` (``features.keras``): no base is rebuilt.
    end-to-end   a folder whose head.json says "kind": "end-to-end" (finetune output,
                 model.keras taking RGB 0..255), or an exported ``X.keras`` with its
                 metadata ``X.json`` beside it (:func:`pipeline.export.export_model`).

:func:`locate_model` reads only JSON, so a wrong path fails before anything heavy loads;
:func:`load_predictor` builds the model. Keras, scikit-learn and the bases are imported
only there, so importing this module stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.schema import layer_attrs, recorded_jpeg_downscale
from pipeline.util.files import read_json

__all__ = [
    "END_TO_END",
    "ModelFiles",
    "Predictor",
    "load_bottleneck",
    "load_predictor",
    "locate_model",
    "recorded",
    "recorded_class_names",
    "recorded_classes",
]

# The same kind as pipeline.heads.persist.END_TO_END, spelled here so that importing this
# module does not import Keras (persist does).
END_TO_END = "end-to-end"


@dataclass
class Predictor:
    """A loaded model: how to decode images for it and how to score a decoded batch.

    ``predict_batch(images)`` takes ``(n, H, W, 3)`` float32 RGB in 0..255, already
    preprocessed with ``preprocess`` (a mode of
    :func:`~pipeline.images.kernels.preprocess_pixels`, which the decode workers apply:
    ``decoded_batches(preprocess=predictor.preprocess)``), and returns ``(predicted,
    values)``: column indices of the predicted classes ``(n,)`` and one value per class
    ``(n, n_classes)``.

    A bottleneck model also splits that in two, so the features can be kept (predict
    ``--embeddings``): ``embed_batch(images)`` gives the features the head reads, in the
    cache's dtype, and ``score_features(features)`` what ``predict_batch`` gives.
    ``feature_attrs`` are the cache attributes that define those features. End-to-end
    models have none of the three (None).
    """

    kind: str  # a HEADS name or END_TO_END
    class_names: list[str]  # one per output column
    input_size: tuple[int, int]
    interpolation: str
    value_prefix: str  # "p" (probabilities) or "score" (decision function)
    predict_batch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    embed_batch: Callable[[np.ndarray], np.ndarray] | None = None
    score_features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    feature_attrs: dict[str, Any] | None = None
    jpeg_downscale: str = "off"  # as extract decoded the cache's JPEGs (--jpeg-downscale)
    preprocess: str = "none"  # applied to the images before predict_batch / embed_batch


@dataclass
class ModelFiles:
    """Where a model's files are: its metadata (head.json or X.json) and folder."""

    meta: dict[str, Any]
    meta_path: Path
    folder: Path
    keras_file: Path | None  # the end-to-end model file
    # A fit_head folder's cache attributes, its base file's path set to where it is now.
    attrs: dict[str, Any] | None = None
    archive: Path | None = None  # the export zip ``folder`` was unpacked from


def locate_model(model: str | os.PathLike, *, base: str | os.PathLike | None = None) -> ModelFiles:
    """Find a model's metadata, and a fit_head folder's base file, without loading Keras.

    Args:
        model: a model folder (head.json), its ``model.keras``, an exported ``X.keras``
            with ``X.json`` beside it, or an export folder or ``X.zip``.
        base: ``--base PATH``: where a fit_head folder's recorded base file is now.

    Returns:
        Where its files are, with the metadata read; for a fit_head folder also the cache
        attributes with the base file found (:func:`pipeline.bases.files.locate_base_file`:
        relative to the folder, at its recorded path, in the folder, or ``base``).

    Raises:
        ValueError: no model there; a base file found nowhere or ``base`` not the recorded
            file; ``base`` for a model that carries its base (an export, an end-to-end
            model).
    """
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".zip":
        folder = _unpacked(path)
        return _with_base(ModelFiles(read_json(folder / "head.json"), folder / "head.json",
                                     folder, None, archive=path), base)
    if path.is_file() and path.suffix == ".keras":
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            return _with_base(ModelFiles(read_json(sidecar), sidecar, path.parent, path), base)
        if path.name == "model.keras":  # the model file of a model folder: use the folder
            path = path.parent
    if path.is_dir() and (path / "head.json").is_file():
        meta = read_json(path / "head.json")
        keras_file = path / "model.keras" if meta.get("kind") == END_TO_END else None
        return _with_base(ModelFiles(meta, path / "head.json", path, keras_file), base)
    raise ValueError(
        "`model` must be a fit_head or finetune output folder (with head.json), an "
        "exported .keras file with its .json beside it, or an export folder or .zip. "
        f"Received: model={str(model)!r}"
    )


def _unpacked(archive: Path) -> Path:
    """Unpack an export ``X.zip`` into a temporary folder, removed when the process ends.

    Only an export's own files are taken, by plain name (no folders, no absolute or
    ``..`` paths): an archive holding anything else is refused before anything is written.

    Raises:
        ValueError: not a zip, or not an export's files.
    """
    import atexit
    import shutil
    import tempfile
    import zipfile

    from pipeline.bases.files import FEATURE_MODEL_FILE, MODEL_FOLDER_FILES

    allowed = {*MODEL_FOLDER_FILES, FEATURE_MODEL_FILE}
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            strange = sorted(set(names) - allowed)
            if strange or "head.json" not in names or FEATURE_MODEL_FILE not in names:
                raise ValueError(
                    f"{archive} is no export archive (predict.py --export FILE.zip writes "
                    f"{FEATURE_MODEL_FILE}, head.json and the head's files, flat)"
                    + (f"; it holds {', '.join(map(repr, strange[:5]))}" if strange else "")
                    + f". Received: model={str(archive)!r}"
                )
            folder = Path(tempfile.mkdtemp(prefix="bottleneck-export-"))
            atexit.register(shutil.rmtree, folder, True)
            for name in names:
                (folder / name).write_bytes(zipped.read(name))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{archive} is not a readable zip archive ({exc}). "
                         f"Received: model={str(archive)!r}") from None
    return folder


def _with_base(located: ModelFiles, base: str | os.PathLike | None) -> ModelFiles:
    """``located`` with a fit_head folder's base file found; ``base`` refused where the
    model carries its base."""
    from pipeline.bases.files import locate_base_file

    packed = located.meta.get("feature_model")
    carried = (located.keras_file if located.meta.get("kind") == END_TO_END
               else None if packed is None else located.folder / packed)
    if carried is not None:
        if base is not None:
            raise ValueError(
                f"{carried} holds the model's base, so `--base` has nothing to replace. "
                f"Received: --base={str(base)!r}"
            )
        return located
    metrics = _metrics(located)
    located.attrs = locate_base_file(metrics["cache_attrs"], model_dir=located.folder,
                                     record=metrics.get("base_file"), base=base)
    return located


def _metrics(located: ModelFiles) -> dict[str, Any]:
    """What fit_head records beside a model (``cache_attrs``, ``class_names``).

    An exported ``X.json`` carries both itself; a model folder has them in metrics.json.
    """
    if "cache_attrs" in located.meta:
        metrics, path = located.meta, located.meta_path
    else:
        path = located.folder / "metrics.json"
        if not path.is_file():
            raise ValueError(
                f"{located.folder} has no metrics.json: predict needs the cache attributes "
                f"fit_head records there. Received: model={str(located.folder)!r}"
            )
        metrics = read_json(path)
    if not isinstance(metrics.get("cache_attrs"), dict):
        raise ValueError(f"{path} records no cache_attrs: the base cannot be rebuilt.")
    return metrics


def recorded(key: str, *sources: dict[str, Any]) -> Any:
    """The first non-null ``key`` in ``sources``.

    Raises:
        ValueError: none records it (a model is never applied with a guessed setting).
    """
    for source in sources:
        if source.get(key) is not None:
            return source[key]
    raise ValueError(f"The model records no {key!r}; it cannot be applied without guessing.")


def _column_names(classes: Sequence[Any], class_names: Sequence[str] | None) -> list[str]:
    """Names of the output columns.

    ``class_names`` may list every class of the cache (indexed by class id, as in
    metrics.json) or exactly the model's classes in output order; both are read.
    """
    classes = list(classes)
    names = list(class_names or [])
    if len(names) == len(classes):
        return [str(n) for n in names]
    if all(isinstance(c, int) and 0 <= c < len(names) for c in classes):
        return [str(names[c]) for c in classes]
    return [str(c) for c in classes]


def load_bottleneck(located: ModelFiles) -> tuple[Any, dict[str, Any], Any]:
    """``(head, metrics, feature model)`` of a fit_head folder, checked against each other.

    The feature model is the export's own ``features.keras`` when the folder is an
    export (:func:`pipeline.export.export_model`); otherwise it is rebuilt from the
    recorded cache attributes, its base file where :func:`locate_model` found it.

    Args:
        located: a fit_head folder's files (:func:`locate_model`).

    Returns:
        The fitted head, what fit_head recorded (``cache_attrs``, ``class_names``; the
        attributes with the base file's current path) and the frozen feature model.

    Raises:
        ValueError: no cache attributes, a recorded base file changed since it was
            found, or the head was trained on features of another shape.
    """
    from pipeline.heads import DenseHead, load_head

    metrics = _metrics(located)
    if located.attrs is not None:
        metrics["cache_attrs"] = located.attrs
    head = load_head(located.folder)
    feature_model = _feature_model(located, metrics)
    got = feature_model.feature_shape
    if isinstance(head, DenseHead):
        matches, expected = tuple(head.feature_shape_) == got, tuple(head.feature_shape_)
    else:
        expected = head[-1].n_features_in_  # the classifier sees flattened rows
        matches = int(np.prod(got)) == expected
    if not matches:
        raise ValueError(
            f"The head in {located.folder} was trained on features of shape {expected}, but "
            f"the feature model rebuilt from its cache_attrs gives {got}."
        )
    return head, metrics, feature_model


def _feature_model(located: ModelFiles, metrics: dict[str, Any]) -> Any:
    """The frozen feature model of a fit_head folder or of an export folder."""
    from pipeline.bases import FeatureModel, feature_model_from_attrs

    attrs = metrics["cache_attrs"]
    packed = located.meta.get("feature_model")
    if packed is None:
        return feature_model_from_attrs(attrs)
    import keras

    from pipeline.bases.pooling import register_custom_layers

    path = located.folder / packed
    if not path.is_file():
        raise ValueError(f"The export {located.folder} lacks its base {packed}: copy the "
                         f"whole folder. Received: model={str(located.folder)!r}")
    register_custom_layers(path)
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    # Preprocessing is inside the saved model; the fixed-shape batches of FeatureModel
    # keep its rows independent of how images are grouped, as at extraction.
    return FeatureModel(model=model, attrs=attrs,
                        input_size=tuple(int(v) for v in attrs["input_size"]),
                        preprocess="none", layers=[attrs.get("layer")])


def recorded_class_names(metrics: dict[str, Any]) -> list[str] | None:
    """The class names fit_head recorded (indexed by class id), if any."""
    return metrics.get("class_names") or metrics["cache_attrs"].get("class_names")


def recorded_classes(located: ModelFiles) -> list[str] | None:
    """The class names a model records, read from its JSON alone (None: none recorded).

    Every class the model can predict is among them (the head may lack a class that had
    no training rows): a quick check before the model loads, not the exact list.
    """
    names = located.meta.get("class_names")
    if not names:
        try:
            names = recorded_class_names(_metrics(located))
        except ValueError:
            return None
    return [str(n) for n in names] if names else None


def _bottleneck_predictor(located: ModelFiles) -> Predictor:
    from pipeline.heads import DenseHead

    head, metrics, feature_model = load_bottleneck(located)
    attrs = metrics["cache_attrs"]
    dtype = attrs.get("dtype", "float32")
    has_proba = hasattr(head, "predict_proba")

    def embed_batch(images: np.ndarray) -> np.ndarray:
        # In the cache dtype: the features exactly as fit_head saw them (float16 caches).
        return feature_model.features(images, preprocessed=True).astype(dtype)

    def score_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = features.astype(np.float32)
        if isinstance(head, DenseHead):
            values = head.predict_proba(X)
            return np.argmax(values, axis=1), values
        values = head.predict_proba(X) if has_proba else head.decision_function(X)
        if values.ndim == 1:  # two classes: one score, positive for classes_[1]
            values = np.stack([-values, values], axis=1)
        return np.searchsorted(head.classes_, head.predict(X)), values

    return Predictor(
        kind=located.meta["kind"],
        class_names=_column_names(head.classes_.tolist(), recorded_class_names(metrics)),
        input_size=feature_model.input_size,
        interpolation=recorded("interpolation", attrs),
        value_prefix="p" if has_proba else "score",
        predict_batch=lambda images: score_features(embed_batch(images)),
        embed_batch=embed_batch,
        score_features=score_features,
        # The features are the first recorded layer's, whatever else the cache held.
        feature_attrs=layer_attrs(attrs),
        jpeg_downscale=recorded_jpeg_downscale(attrs),
        preprocess=feature_model.preprocess,
    )


def _end_to_end_predictor(located: ModelFiles) -> Predictor:
    import keras

    meta = located.meta
    # Recorded facts come from head.json (or X.json) first, then from the cache attributes.
    has_metrics = "cache_attrs" in meta or (located.folder / "metrics.json").is_file()
    attrs = _metrics(located)["cache_attrs"] if has_metrics else {}
    size = tuple(int(v) for v in recorded("input_size", meta, attrs))
    interpolation = recorded("interpolation", meta, attrs)
    classes = recorded("classes", meta)
    names = _column_names(classes, meta.get("class_names") or attrs.get("class_names"))
    if located.keras_file is None or not located.keras_file.is_file():
        raise ValueError(f"{located.folder} has no model.keras. Received: model={located.folder}")
    from pipeline.bases.pooling import register_custom_layers

    register_custom_layers(located.keras_file)
    model = keras.models.load_model(located.keras_file, compile=False, safe_mode=True)
    fixed = tuple(model.input_shape[1:3])
    if None not in fixed and fixed != size:
        raise ValueError(
            f"{located.keras_file} takes {fixed[0]}x{fixed[1]} images, but its metadata "
            f"records input_size={list(size)}."
        )

    def predict_batch(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(model.predict_on_batch(images))
        if values.ndim == 2 and values.shape[1] == 1 and len(names) == 2:
            values = np.concatenate([1.0 - values, values], axis=1)  # a sigmoid output
        if values.ndim != 2 or values.shape[1] != len(names):
            raise ValueError(
                f"{located.keras_file} outputs shape {values.shape[1:]} for "
                f"{len(names)} classes {names}."
            )
        return np.argmax(values, axis=1), values

    return Predictor(END_TO_END, names, (size[0], size[1]), interpolation, "p", predict_batch,
                     jpeg_downscale=recorded_jpeg_downscale(meta, attrs))


def load_predictor(
    model: str | os.PathLike | ModelFiles, *, base: str | os.PathLike | None = None
) -> Predictor:
    """Load a fit_head folder, a finetune folder or an exported ``.keras`` for prediction.

    Args:
        model: a model folder (head.json), its ``model.keras``, or an exported ``X.keras``
            with ``X.json`` beside it; or what :func:`locate_model` found there.
        base: ``--base PATH``: where a fit_head folder's recorded base file is now (when
            ``model`` is not located yet).

    Returns:
        A :class:`Predictor` with the recorded input size, interpolation and
        jpeg_downscale.

    Raises:
        ValueError: no model there, missing or inconsistent metadata, a recorded base
            file that is gone or changed, ``base`` for a model that carries its base or
            naming another file.
    """
    located = model if isinstance(model, ModelFiles) else locate_model(model, base=base)
    if located.meta.get("kind") == END_TO_END:
        return _end_to_end_predictor(located)
    return _bottleneck_predictor(located)
