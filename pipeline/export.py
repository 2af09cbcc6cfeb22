"""A dense fit_head head and its frozen base -> one end-to-end ``.keras`` file + ``X.json``.

The exported model takes RGB images in 0..255 at the recorded input size and needs no
code of ours to run; ``X.json`` beside it records what predict needs to feed it (kind
``end-to-end``, classes, input size, interpolation, the cache attributes), so
:mod:`pipeline.predict` reads an export as it reads a finetune folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.predictor import load_bottleneck, locate_model, recorded, recorded_class_names

__all__ = ["check_exportable", "export_model"]

# Files of a fit_head folder that an export must never overwrite.
_MODEL_DIR_FILES = ("model.keras", "model.joblib", "head.json", "metrics.json", "config.json")


def check_exportable(head: str) -> None:
    """Refuse to export a head without a Keras model.

    Args:
        head: the head kind (a ``HEADS`` name, or ``end-to-end``).

    Raises:
        ValueError: ``head`` is not ``dense``.
    """
    if head != "dense":
        raise ValueError(
            "export needs a dense head (scikit-learn heads and end-to-end models have no "
            f"separate Keras head to combine with the base). Received: head={head!r}"
        )


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save a fit_head dense head and its frozen base as one end-to-end ``.keras`` model.

    The model takes ``(H, W, 3)`` float RGB images in 0..255 at the recorded input size
    (decode and resize them with the recorded interpolation; ``predict.py`` does) and
    outputs the head's probabilities (softmax; one sigmoid column for two classes).
    It is built from Keras layers only (:func:`pipeline.bases.combine.end_to_end_model`) and
    loads with ``safe_mode=True``. Beside ``X.keras``, ``X.json`` records what
    ``predict.py`` needs: kind ``end-to-end``, classes, class_names (indexed by class id),
    input_size, interpolation, the source folder and the cache attributes.

    Args:
        model_dir: a fit_head output folder with a dense head.
        out: the ``.keras`` file to write (its folder is created).

    Returns:
        The path of the saved model.

    Raises:
        ValueError: ``out`` does not end in ``.keras`` or would overwrite the folder's own
            files, the head is not dense, or the recorded base cannot be rebuilt.
    """
    from pipeline.bases.combine import end_to_end_model
    from pipeline.heads.persist import END_TO_END, head_meta
    from pipeline.util.files import replace_atomically, write_json_atomic

    out = Path(out)
    if out.suffix != ".keras":
        raise ValueError(f"`export` must be a file ending in .keras. Received: export={str(out)!r}")
    located = locate_model(model_dir)
    check_exportable(located.meta.get("kind", "?"))
    sidecar = out.with_suffix(".json")
    folder = located.folder.resolve()
    for target in (out, sidecar):
        if target.resolve().parent == folder and target.name in _MODEL_DIR_FILES:
            raise ValueError(
                f"Exporting to {out} would overwrite {target.name} of the model itself: "
                f"choose another name. Received: export={str(out)!r}"
            )
    head, metrics, feature_model = load_bottleneck(located)
    attrs = metrics["cache_attrs"]
    dtype = attrs.get("dtype", "float32")
    model = end_to_end_model(feature_model, head.model_, feature_dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, model.save)
    # The model-folder format's version and fields: X.json reads as a finetune head.json.
    meta = head_meta(
        END_TO_END,
        classes=head.classes_.tolist(),
        class_names=recorded_class_names(metrics),
        input_size=list(feature_model.input_size),
        interpolation=recorded("interpolation", attrs),
        source=str(located.folder),
        head="dense",
        feature_dtype=dtype,
        cache_attrs=attrs,
    )
    write_json_atomic(sidecar, meta)
    return out
