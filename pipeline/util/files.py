"""Files written whole or not at all, JSON read with a clear error, and a file's sha256.

Every output of the pipeline (models, metrics, reports, CSVs) goes through
:func:`replace_atomically`: a crash or Ctrl-C leaves either the old file or the new one,
never half of one. Nothing here imports Keras, TensorFlow or any other stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "file_sha256",
    "json_default",
    "move_into_place",
    "read_json",
    "replace_atomically",
    "temp_beside",
    "write_json_atomic",
]


def replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp name beside ``path``, then move it over ``path``.

    A crash leaves either the old file or the new one at ``path``, never half of one.

    Args:
        path: the destination file; its folder must exist.
        write: writes the whole file to the path it is given.

    Returns:
        ``path``.
    """
    tmp = temp_beside(path)
    try:
        write(tmp)
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temp_beside(path: Path) -> Path:
    """A new temporary name for writing ``path``: hidden, in its folder, with its suffix.

    For writers that stream into a file over a long loop and move it into place with
    :func:`move_into_place` only when it is complete (:func:`replace_atomically` does both).
    """
    # Same folder (os.replace is atomic only within a filesystem); same suffix, because
    # Keras refuses to save a model to a name not ending in ".keras".
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def move_into_place(tmp: Path, path: Path) -> Path:
    """Flush the complete file ``tmp`` to disk, then rename it over ``path`` (atomic).

    Returns:
        ``path``.
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def json_default(value: Any) -> Any:
    """``json.dumps``' fallback: NumPy scalars and arrays as numbers and lists, sets sorted,
    anything else as its ``str``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    NumPy scalars and arrays become numbers and lists; other unknown objects their ``str``.

    Args:
        path: destination file; its folder must exist.
        obj: a JSON-serialisable structure.

    Returns:
        ``path`` as a Path.
    """
    text = json.dumps(obj, indent=2, default=json_default) + "\n"
    return replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of a UTF-8 JSON file.

    Args:
        path: the file.

    Returns:
        What the file holds (a dict for every file the pipeline writes).

    Raises:
        ValueError: the file cannot be read or is not JSON; the message names it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read {path}: {exc}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
