"""A fit_head model and its frozen base -> something that predicts on another machine.

Two forms, chosen by the name given to ``--export``:

``X.keras`` (dense heads): one end-to-end Keras model that takes RGB images in 0..255 at
    the recorded input size and needs no code of ours to run; ``X.json`` beside it records
    what predict needs to feed it (kind ``end-to-end``, classes, input size,
    interpolation, jpeg_downscale, the cache attributes), so :mod:`pipeline.predict`
    reads it as it reads a finetune folder.
``DIR`` (any head, scikit-learn ones included): a model folder that carries its base —
    the head's own files (``model.joblib`` or ``model.keras``, ``head.json``,
    ``metrics.json``, ``config.json``) plus ``features.keras``, preprocessing + frozen base
    as one Keras model (:func:`pipeline.bases.combine.feature_extractor_model`), named in
    ``head.json`` (``feature_model``). predict loads it with no cache, no base file and
    no ImageNet download, and scores exactly as the source folder does. Copy or zip the
    folder whole. Like every scikit-learn model folder it holds a pickle: load exports
    only from people you trust.
``X.zip`` (any head): the same files in one zip archive, to send as one file; predict
    reads it as it reads the folder (:func:`pipeline.predictor.locate_model` unpacks it
    into a temporary folder, refusing any member an export does not hold).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

from pipeline.bases.files import FEATURE_MODEL_FILE, MODEL_FOLDER_FILES
from pipeline.cache import recorded_jpeg_downscale
from pipeline.predictor import (
    ModelFiles,
    load_bottleneck,
    locate_model,
    recorded,
    recorded_class_names,
)
from pipeline.util.files import read_json, replace_atomically, write_json_atomic

__all__ = [
    "FEATURE_MODEL_FILE",
    "check_exportable",
    "export_is_folder",
    "export_model",
    "exported_files",
]

# Names that look like a file, where an export folder would surprise.
_FILE_SUFFIXES = (".tar", ".gz", ".tgz", ".h5", ".json", ".joblib", ".pkl", ".csv")


def export_is_folder(export: str | None) -> bool:
    """Whether ``--export`` names a folder (not ``X.keras``, not ``X.zip``)."""
    return export is not None and Path(export).suffix.lower() not in (".keras", ".zip")


def check_exportable(head: str, export: str | os.PathLike | None = None) -> None:
    """Refuse an export that cannot be made, before any work.

    Args:
        head: the head kind (a ``HEADS`` name, or ``end-to-end``).
        export: the ``--export`` value: ``X.keras``, ``X.zip`` or a folder (None: not
            checked).

    Raises:
        ValueError: an end-to-end model (it is its own export); ``X.keras`` for a head
            other than ``dense``; a name with a file suffix other than ``.keras`` and
            ``.zip``.
    """
    if head == "end-to-end":
        raise ValueError(
            "An end-to-end model (finetune folder, exported .keras) needs no export: its "
            f"model.keras already holds base and head. Received: head={head!r}"
        )
    name = str(export) if export is not None else ""
    if name.endswith(".keras") and head != "dense":
        raise ValueError(
            "`--export FILE.keras` needs a dense head (a scikit-learn head has no Keras model "
            "to combine with the base): pass a folder or FILE.zip instead, which holds the "
            f"base as features.keras and the head as it is. Received: head={head!r}, "
            f"--export={name!r}"
        )
    if Path(name).suffix.lower() in _FILE_SUFFIXES:
        raise ValueError(
            "`--export` must be FILE.keras (dense heads), a folder or FILE.zip (any head). "
            f"Received: --export={name!r}"
        )


def export_model(
    model_dir: str | os.PathLike, out: str | os.PathLike, *, base: str | os.PathLike | None = None
) -> Path:
    """Export a fit_head model with its frozen base: ``X.keras`` (dense) or a folder (any).

    ``X.keras``: one end-to-end model taking ``(H, W, 3)`` float RGB images in 0..255 at
    the recorded input size (decode and resize them with the recorded interpolation and
    jpeg_downscale; ``predict.py`` does) and giving the head's probabilities (softmax; one
    sigmoid column for two classes), built from Keras layers only
    (:func:`pipeline.bases.combine.end_to_end_model`), loadable with ``safe_mode=True``.
    ``X.json`` beside it records what ``predict.py`` needs: kind ``end-to-end``, classes,
    class_names (indexed by class id), input_size, interpolation, jpeg_downscale, the
    source folder and the cache attributes.

    A folder: the model folder's files plus ``features.keras`` (see the module
    docstring), written whole beside the target and moved into place; an earlier export
    there is replaced, any other non-empty folder refused.

    Args:
        model_dir: a fit_head output folder.
        out: the ``.keras`` file or the folder to write (parents are created).
        base: ``--base PATH``: where the model's recorded base file is now.

    Returns:
        The path written.

    Raises:
        ValueError: a name ``check_exportable`` refuses, ``out`` would overwrite the
            model's own files or a folder that is no export, or the recorded base cannot
            be rebuilt.
    """
    out = Path(out)
    located = locate_model(model_dir, base=base)
    check_exportable(located.meta.get("kind", "?"), out)
    if out.suffix == ".keras":
        return _export_keras(located, out)
    if out.suffix.lower() == ".zip":
        return _export_zip(located, out)
    return _export_folder(located, out)


def exported_files(path: Path) -> str:
    """What an export wrote, for the line a command prints."""
    if path.suffix == ".keras":
        return f"{path} (+ {path.with_suffix('.json')})"
    return str(path) if path.suffix.lower() == ".zip" else f"{path}/"


def _export_keras(located: ModelFiles, out: Path) -> Path:
    """Dense head + base -> ``out`` (.keras) and ``out``'s .json."""
    from pipeline.bases.combine import end_to_end_model
    from pipeline.heads.persist import END_TO_END, head_meta
    from pipeline.util.files import replace_atomically

    sidecar = out.with_suffix(".json")
    folder = located.folder.resolve()
    for target in (out, sidecar):
        if target.resolve().parent == folder and target.name in MODEL_FOLDER_FILES:
            raise ValueError(
                f"Exporting to {out} would overwrite {target.name} of the model itself: "
                f"choose another name. Received: --export={str(out)!r}"
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
        jpeg_downscale=recorded_jpeg_downscale(attrs),
        source=str(located.folder),
        head="dense",
        feature_dtype=dtype,
        cache_attrs=attrs,
    )
    write_json_atomic(sidecar, meta)
    return out


def _export_folder(located: ModelFiles, out: Path) -> Path:
    """Any fit_head head + base -> the folder ``out`` (features.keras + the head's files)."""
    _check_export_folder(located, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        _write_export(located, tmp)
        _move_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_zip(located: ModelFiles, out: Path) -> Path:
    """Any fit_head head + base -> the zip ``out``: the export folder's files, flat."""
    if out.is_dir():
        raise ValueError(f"`--export` FILE.zip names a folder. Received: --export={str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bottleneck-export-") as folder:
        _write_export(located, Path(folder))

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(Path(folder).iterdir()):
                    archive.write(path, path.name)

        replace_atomically(out, write)
    return out


def _write_export(located: ModelFiles, folder: Path) -> None:
    """Write an export's files into the empty ``folder``."""
    from pipeline.bases.combine import feature_extractor_model
    from pipeline.cache.schema import layer_attrs

    _, metrics, feature_model = load_bottleneck(located)
    attrs = layer_attrs(metrics["cache_attrs"])  # the features.keras computes this layer
    extractor = feature_extractor_model(feature_model,
                                        feature_dtype=attrs.get("dtype", "float32"))
    for name in MODEL_FOLDER_FILES:
        if name not in ("head.json", "metrics.json") and (located.folder / name).is_file():
            shutil.copy2(located.folder / name, folder / name)
    extractor.save(folder / FEATURE_MODEL_FILE)
    write_json_atomic(folder / "head.json", {**located.meta, "feature_model": FEATURE_MODEL_FILE,
                                             "source": str(located.archive or located.folder)})
    # No base_file: the base is features.keras; the attributes keep their old paths as a
    # record of where the features came from.
    write_json_atomic(folder / "metrics.json",
                      {k: v for k, v in {**metrics, "cache_attrs": attrs}.items()
                       if k != "base_file"})


def _check_export_folder(located: ModelFiles, out: Path) -> None:
    """Refuse a target that is a file, the model itself, or a folder holding other things.

    Raises:
        ValueError: as said, naming ``--export``.
    """
    received = f"Received: --export={str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"`--export` must be FILE.keras or a folder, but {out} is a file. "
                         f"{received}")
    if out.resolve() == located.folder.resolve():
        raise ValueError(f"`--export` must name another folder than the model's own. {received}")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise ValueError(
            f"`--export` would replace {out}, which holds files and is no earlier export: "
            f"choose a new or empty folder. {received}"
        )


def _is_export(folder: Path) -> bool:
    try:
        meta: Any = read_json(folder / "head.json")
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("feature_model") == FEATURE_MODEL_FILE


def _move_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``, replacing an earlier export there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)  # a crash between the two renames leaves the old one here
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
