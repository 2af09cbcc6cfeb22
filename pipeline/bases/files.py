"""Where a model's base file is: recorded at fit time, found again wherever the model went.

A cache records the file its base came from by absolute path and sha256: a saved ``.keras``
base (``base_path``), a local weights file of a ``keras.applications`` base
(``weights_path``) or a local keras-hub preset folder (``base_path``, its
``model.weights.h5`` hashed). A model folder copied to another disk or machine, with or
without that file, must still find it, so fit_head also records the file's path relative
to the model folder (:func:`base_file_record`), and :func:`locate_base_file` looks, in
order, at:

1. ``--base PATH`` when given (then nowhere else);
2. the recorded path relative to the model folder (model and base moved together);
3. the recorded absolute path (the model moved alone);
4. the file's name inside the model folder (the base copied in beside the head).

The first that exists *and* has the recorded sha256 is used, so a different file by the
same name can never produce other features. The relative path is preferred to a copy of
the base in every model folder: bases weigh 10-500 MB, fit_head is run as often as you
like, and a folder that must carry its base whole is what ``--export DIR`` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bases.hub import HUB_PREFIX
from pipeline.util.files import file_sha256

__all__ = [
    "FEATURE_MODEL_FILE",
    "MODEL_FOLDER_FILES",
    "BaseFile",
    "base_file_record",
    "locate_base_file",
    "recorded_base_file",
]

_HUB_WEIGHTS = "model.weights.h5"  # what a preset folder's recorded sha256 is of
# A model folder's own files: a base file by one of these names is not looked for there
# (and an export never overwrites them).
MODEL_FOLDER_FILES = ("model.keras", "model.joblib", "head.json", "metrics.json", "config.json")
# An export's base: preprocessing + frozen base as one Keras model (pipeline.export).
FEATURE_MODEL_FILE = "features.keras"


@dataclass(frozen=True)
class BaseFile:
    """A file (or keras-hub preset folder) that the recorded features depend on."""

    key: str  # the attribute holding its path: "base_path" or "weights_path"
    path: str  # as the cache recorded it
    sha256: str
    folder: bool  # a keras-hub preset folder: the sha256 is of its model.weights.h5

    @property
    def what(self) -> str:
        """How a message names it."""
        if self.folder:
            return "keras-hub preset folder"
        return "weights file" if self.key == "weights_path" else "base file"


def recorded_base_file(attrs: dict[str, Any]) -> BaseFile | None:
    """The file a cache's (or model's) features depend on, or None (a named base with
    ImageNet or random weights, a downloaded keras-hub preset)."""
    base = str(attrs.get("base", ""))
    weights = str(attrs.get("weights") or "")
    if base.startswith("file:") and attrs.get("base_path"):
        return BaseFile("base_path", attrs["base_path"], attrs.get("base_sha256", ""), False)
    if base.startswith(HUB_PREFIX) and attrs.get("base_path") and attrs.get("base_sha256"):
        return BaseFile("base_path", attrs["base_path"], attrs["base_sha256"], True)
    if weights.startswith("sha256:") and attrs.get("weights_path"):
        return BaseFile("weights_path", attrs["weights_path"], weights.removeprefix("sha256:"),
                        False)
    return None


def base_file_record(attrs: dict[str, Any], model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What a model folder records about its base file: ``metrics.json["base_file"]``.

    Args:
        attrs: the cache attributes the head was trained on.
        model_dir: the model folder (its final place; it need not exist yet).

    Returns:
        ``{"attr", "path" (absolute), "relative" (to the model folder, or None when no
        relative path exists, e.g. another Windows drive), "sha256"}``; None when the
        features depend on no local file.
    """
    recorded = recorded_base_file(attrs)
    if recorded is None:
        return None
    path = Path(recorded.path).resolve()
    try:
        relative: str | None = Path(os.path.relpath(path, Path(model_dir).resolve())).as_posix()
    except ValueError:  # no relative path between two drives
        relative = None
    return {"attr": recorded.key, "path": str(path), "relative": relative,
            "sha256": recorded.sha256}


def _matches(path: Path, recorded: BaseFile) -> bool | None:
    """Whether ``path`` is the recorded file: None when it does not exist."""
    target = path / _HUB_WEIGHTS if recorded.folder else path
    if not target.is_file():
        return None
    return file_sha256(target) == recorded.sha256


def locate_base_file(
    attrs: dict[str, Any],
    *,
    model_dir: str | os.PathLike,
    record: dict[str, Any] | None = None,
    base: str | os.PathLike | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """``attrs`` with the base file's path set to where the file is now.

    Args:
        attrs: the cache attributes recorded with the model.
        model_dir: the model folder, wherever it is now.
        record: its ``metrics.json["base_file"]`` (None for folders written before it).
        base: ``--base PATH``, the user's word for where the file is.
        command: the command a "not found" error suggests running again with
            ``--base PATH`` (default: ``predict.py MODEL_DIR IMAGES``).

    Returns:
        A copy of ``attrs`` (unchanged when the features depend on no local file).

    Raises:
        ValueError: ``--base`` given for a model whose features depend on no file, or
            naming another file than the recorded one; the file found nowhere (every
            path tried is named, and ``--base`` is offered).
    """
    recorded = recorded_base_file(attrs)
    if recorded is None:
        if base is not None:
            raise ValueError(
                f"`--base` names where a model's base file moved, but this model's base "
                f"({attrs.get('base')!r}, weights {attrs.get('weights')!r}) is no local "
                f"file. Received: --base={str(base)!r}"
            )
        return dict(attrs)
    if base is not None:
        found = _matches(Path(base), recorded)
        if not found:
            name = Path(recorded.path).name
            why = (f"must name the {recorded.what} the head was trained on ({name}), but "
                   f"{base} does not exist" if found is None else
                   f"is not the {recorded.what} the head was trained on (its sha256 differs "
                   f"from the recorded {recorded.sha256[:12]}…, {name})")
            raise ValueError(f"`--base` {why}. Received: --base={str(base)!r}")
        return _with_path(attrs, recorded, Path(base))
    folder = Path(model_dir).resolve()
    name = Path(recorded.path).name
    candidates = [((folder / record["relative"]).resolve(), "relative to the model folder")
                  if record and record.get("relative") else None,
                  (Path(recorded.path), "recorded path"),
                  # Not a base named like the folder's own files (a dense head's model.keras).
                  None if name in MODEL_FOLDER_FILES else (folder / name, "in the model folder")]
    tried, changed = [], []
    for path, how in filter(None, candidates):
        found = _matches(path, recorded)
        if found:
            return _with_path(attrs, recorded, path)
        tried.append(f"{path} ({how}{'' if found is None else ', another file'})")
        if found is not None:
            changed.append(str(path))
    problem = "is gone" if not changed else "is gone or changed (sha256 differs)"
    raise ValueError(
        f"The {recorded.what} this model was trained on ({name}) {problem}. "
        f"Tried: {'; '.join(tried)}. Pass where it is now: "
        f"{command or f'predict.py {folder} IMAGES'} --base PATH."
    )


def _with_path(attrs: dict[str, Any], recorded: BaseFile, path: Path) -> dict[str, Any]:
    located = {**attrs, recorded.key: str(path.resolve())}
    if recorded.folder:  # a preset is loaded from the handle in ``base``
        located["base"] = HUB_PREFIX + str(path.resolve())
    return located
