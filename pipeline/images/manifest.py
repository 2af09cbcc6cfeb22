"""Images named in a file instead of found in a folder: a labelled manifest, a path list.

A manifest (``extract.py LABELS.csv``, the Kaggle layout) is a CSV file with a header row
naming the columns ``path`` and ``label`` and, optionally, ``split`` (any order, any case;
other columns are ignored)::

    path,label,split
    train/cat/001.jpg,cat,train
    /mnt/photos/dog/7.jpg,dog,val

Paths are relative to the manifest's folder, or absolute. It becomes the same
:class:`~pipeline.images.index.ImageIndex` a folder does, so extraction, resume, shards
and everything downstream read it unchanged:

- class ids are the sorted label names, as for class folders;
- split values are train, validation, val (read as validation), test or empty (any
  case), as split folders are named; rows with a split and rows without one are not
  mixed (fit_head refuses such a cache);
- row order is not the manifest's: records are sorted exactly as the equivalent folder
  tree would list them (:func:`~pipeline.images.index.index_images`): by split
  (train, validation, test), then class id, then folder and file name of the path, so a
  manifest and the folder tree it describes give the same cache, and reordering the
  manifest's lines changes nothing. (One difference: a tree holding both ``val/`` and
  ``validation/`` lists each folder whole in turn; a manifest interleaves them by class.)
- a listed path is taken as given: no extension filter, no hidden-file or symlink rule
  (the folder walk needs those to decide what is an image; a manifest says so itself).

Problems with the manifest itself (no header, a missing ``path`` or ``label`` column,
empty labels or paths, duplicate paths, unknown split values, no rows) are all collected
and raised together as one ``ValueError`` naming the file and each line. A listed file
that does not exist is not one of them: like an unreadable image it is a bad image, not a
bad argument. It keeps its record (and its place in the forward batches), so extraction
skips it and records it with the cache's skipped files; it is retried when it appears,
and its manifest line is named when it is reported (``ImageIndex.notes``). Only a
manifest none of whose files exist is an error.

A path list (``predict.py LIST``) is a ``.txt`` file with one path per line, or a ``.csv``
file with a ``path`` column (a manifest, or an earlier predictions CSV, serves as one);
paths are relative to the list's folder, or absolute.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.images.index import SPLIT_FOLDERS, SPLIT_ORDER, ImageIndex, ImageRecord, index_images

__all__ = [
    "LIST_EXTENSIONS",
    "MANIFEST_COLUMNS",
    "ListedPath",
    "index_data",
    "index_manifest",
    "is_list_file",
    "is_manifest",
    "read_path_list",
]

MANIFEST_COLUMNS = ("path", "label", "split")

# What predict reads as a list of paths rather than as an image.
LIST_EXTENSIONS = (".txt", ".csv")

# More problems than this are counted, not listed: the first ones show what is wrong.
_SHOWN = 20


@dataclass(frozen=True)
class ListedPath:
    """A path named on one line of a list or manifest: as written, and found from the file."""

    text: str  # the cell as written (stripped)
    path: Path  # relative to the list's folder, or absolute
    line: int  # 1-based line of the file


def is_manifest(data: str | os.PathLike) -> bool:
    """Whether extract's data argument names a manifest (a ``.csv`` file, any case)."""
    return Path(data).suffix.lower() == ".csv" and not Path(data).is_dir()


def is_list_file(path: str | os.PathLike) -> bool:
    """Whether predict reads ``path`` as a list of paths (a ``.txt`` or ``.csv`` file)."""
    return Path(path).suffix.lower() in LIST_EXTENSIONS and Path(path).is_file()


def index_data(data: str | os.PathLike) -> ImageIndex:
    """Extract's data argument as an :class:`ImageIndex`: a folder or a manifest.

    Raises:
        ValueError: see :func:`index_images` and :func:`index_manifest`; or a file that
            is no ``.csv`` manifest.
    """
    if is_manifest(data):
        return index_manifest(data)
    if Path(data).is_file():
        raise ValueError(
            "`data_dir` must be a folder of class folders or a .csv manifest with columns "
            f"path,label[,split]. Received: data_dir={str(data)!r} (a file)"
        )
    return index_images(data)


def index_manifest(manifest: str | os.PathLike) -> ImageIndex:
    """The :class:`ImageIndex` of a manifest, in the order of the folder tree it describes.

    See the module docstring for the format and the policy (row order, missing files).

    Args:
        manifest: a CSV file with columns ``path,label[,split]`` and a header row.

    Returns:
        The index: ``root`` is the manifest's folder, ``manifest`` and
        ``manifest_sha256`` say where it came from, ``notes`` names the manifest line of
        each listed file that does not exist.

    Raises:
        ValueError: the file is missing or unreadable, or one or more problems with its
            content (all listed, each with its line number); or none of its files exist.
    """
    path = Path(manifest)
    data = _read_bytes(path, "data_dir")
    header, rows = _read_table(path, data)
    columns = _columns(path, header, required=("path", "label"))
    entries, problems = _entries(rows, columns, path.parent)
    if problems:
        raise _problems(path, problems)
    return _sorted_index(path, entries, hashlib.sha256(data).hexdigest())


# One manifest row, checked: (path as the index keys it, label, split, line).
_Entry = tuple[str, str, str, int]


def _entries(rows: Sequence[tuple[int, list[str]]], columns: dict[str, int],
             root: Path) -> tuple[list[_Entry], list[str]]:
    """The rows as entries, and every problem found in them (each naming its line)."""
    problems: list[str] = []
    entries: list[_Entry] = []
    first_line: dict[str, int] = {}
    for line, fields in rows:
        cell = {name: fields[i] if i < len(fields) else "" for name, i in columns.items()}
        key, label, given = _key(cell["path"], root), cell["label"], cell.get("split", "")
        split = SPLIT_FOLDERS.get(given.lower())
        if not cell["path"]:
            problems.append(f"empty path (line {line})")
        elif key in first_line:
            problems.append(f"duplicate path, first listed on line {first_line[key]}. "
                            f"Received: path={cell['path']!r} (line {line})")
        else:
            first_line[key] = line
        if not label:
            problems.append(f"empty label. Received: label='' (line {line})")
        if split is None and given:
            problems.append(
                "unknown split; allowed: train, validation, val (read as validation), test "
                f"or empty. Received: split={given!r} (line {line})"
            )
        # An unknown split stays as written, so it is not also counted as an empty one.
        entries.append((key, label, given if split is None else split, line))
    problems += _mixed_splits(entries)
    if not rows:
        problems.append("no rows after the header: the manifest lists no image")
    return entries, problems


def _sorted_index(path: Path, entries: list[_Entry], sha256: str) -> ImageIndex:
    """The index of checked entries, in the folder tree's order.

    Raises:
        ValueError: none of the listed files exists.
    """
    root = path.parent
    class_names = sorted({label for _, label, _, _ in entries})
    ids = {name: i for i, name in enumerate(class_names)}
    rank = {split: i for i, split in enumerate(("", *SPLIT_ORDER))}
    # The folder tree's order (index_images): split, class id, then its sorted walk (a
    # folder's files before its subfolders', each folder's files by name).
    ordered = sorted(entries, key=lambda e: (rank[e[2]], ids[e[1]], posixpath.dirname(e[0]),
                                             posixpath.basename(e[0])))
    records = [ImageRecord(key, ids[label], split) for key, label, split, _ in ordered]
    notes = {key: f"listed in {path.name} line {line} but not found"
             for key, _, _, line in ordered if not (root / key).exists()}
    if len(notes) == len(records):
        key, _, _, line = entries[0]
        raise ValueError(
            f"None of the {len(records)} files listed in {path} exists (paths are relative "
            f"to {root.resolve()}, or absolute). Received: path={key!r} (line {line}) and "
            f"{len(records) - 1} more"
        )
    layout = "splits" if any(r.split for r in records) else "classes"
    return ImageIndex(root, records, class_names, layout, manifest=path,
                      manifest_sha256=sha256, notes=notes)


def read_path_list(list_file: str | os.PathLike) -> list[ListedPath]:
    """The paths a list names, in its order: a ``.csv`` file's ``path`` column, else one
    path per line (blank lines skipped; surrounding spaces stripped).

    Args:
        list_file: the list; its paths are relative to its folder, or absolute.

    Returns:
        One :class:`ListedPath` per path, missing files included (the caller decides).

    Raises:
        ValueError: the file is unreadable, a CSV without a ``path`` column, an empty
            ``path`` cell (all such lines named), or a list naming no path.
    """
    path = Path(list_file)
    data = _read_bytes(path, "images")
    if path.suffix.lower() == ".csv":
        header, rows = _read_table(path, data)
        where = _columns(path, header, required=("path",))["path"]
        cells = [(line, fields[where] if where < len(fields) else "") for line, fields in rows]
    else:
        cells = [(n, text.strip()) for n, text in enumerate(_text(path, data).splitlines(), 1)
                 if text.strip()]
    problems = [f"empty path (line {line})" for line, text in cells if not text]
    if not cells:
        problems.append("it names no path")
    if problems:
        raise _problems(path, problems, what="list of images")
    return [ListedPath(text, path.parent / text, line) for line, text in cells]


def _read_bytes(path: Path, argument: str) -> bytes:
    """The file's bytes (hashed and parsed from the same read).

    Raises:
        ValueError: it cannot be read.
    """
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"Cannot read {path}: {exc.strerror or exc}. "
                         f"Received: {argument}={str(path)!r}") from None


def _text(path: Path, data: bytes) -> str:
    """UTF-8 text (a byte-order mark, as Excel writes one, dropped).

    Raises:
        ValueError: not UTF-8.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (line {line}): save it as UTF-8.") from None


def _read_table(path: Path, data: bytes) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, fields)]) of a CSV file: cells stripped, blank lines skipped.

    Raises:
        ValueError: the file is empty, not UTF-8 or not CSV.
    """
    reader = csv.reader(io.StringIO(_text(path, data), newline=""))
    header: list[str] | None = None
    rows = []
    try:
        for fields in reader:
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue
            if header is None:
                header = [f.lower() for f in fields]
            else:
                rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise ValueError(f"{path} is not a CSV file ({exc}, line {reader.line_num}).") from None
    if header is None:
        raise ValueError(f"{path} is empty. Expected a header row naming its columns "
                         f"({','.join(MANIFEST_COLUMNS)}) and one row per image.")
    return header, rows


def _columns(path: Path, header: Sequence[str], *, required: Sequence[str]) -> dict[str, int]:
    """{column name: position} of the columns read (required ones and ``split``).

    Raises:
        ValueError: a required column is missing or named twice.
    """
    wanted = [*required, *(["split"] if "label" in required else [])]
    missing = [name for name in required if name not in header]
    twice = [name for name in wanted if header.count(name) > 1]
    if missing or twice:
        what = (f"has no {' or '.join(f'`{n}`' for n in missing)} column" if missing
                else f"names column {' and '.join(f'`{n}`' for n in twice)} twice")
        raise ValueError(
            f"{path} {what}: its first row must name the columns "
            f"{','.join(required)}{'[,split]' if 'label' in required else ''} (any order; "
            f"other columns are ignored). Received: columns={list(header)}"
        )
    return {name: header.index(name) for name in wanted if name in header}


def _key(text: str, root: Path) -> str:
    """A listed path as the index keys it: '/'-separated, relative to ``root`` when it lies
    inside it (also when written absolute, so both spellings are one path), else absolute."""
    norm = os.path.normpath(text) if text else ""
    if os.path.isabs(norm):
        for base in (Path(os.path.abspath(root)), root.resolve()):
            if Path(norm).is_relative_to(base):
                return Path(norm).relative_to(base).as_posix()
    return Path(norm).as_posix()


def _mixed_splits(entries: Sequence[tuple[str, str, str, int]]) -> list[str]:
    """The problem of a manifest whose rows record a split only in part, as one line."""
    empty = [line for _, _, split, line in entries if not split]
    if not empty or len(empty) == len(entries):
        return []
    lines = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
    return [f"{len(empty)} of {len(entries)} rows have no split while the others have one "
            "(fit_head refuses such a mix): give every row a split or none. "
            f"Received: split='' (lines {lines})"]


def _problems(path: Path, problems: list[str], what: str = "manifest") -> ValueError:
    """One error listing every problem (the first ``_SHOWN``), naming the file."""
    shown = [f"  {p}" for p in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        shown.append(f"  ... and {len(problems) - _SHOWN} more")
    return ValueError(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in "
                      f"the {what}:\n" + "\n".join(shown))
