"""Find images, labels and splits in a data folder, in Keras' order.

Two layouts, as in Keras and in Chollet's 2016 post:

    DATA_DIR/<class>/...                          no split recorded (split == "")
    DATA_DIR/{train,validation[,test]}/<class>/... each image's split recorded
                                                  ("val" is read as "validation")

Class ids are the sorted class folder names (in the split layout: the union over all
splits); an empty class folder keeps its id, so emptying one never shifts the others.
Order is Keras' ``image_dataset_from_directory(shuffle=False)`` order: classes in id
order, then files by sorted folder walk. Policy, Keras' (``index_directory`` with
follow_links=False) unless marked as a deviation:

- class folders are the subfolders not starting with "."; a symlinked class folder is a
  class like any other, read wherever it points (``os.path.isdir`` follows the link);
- nested folders belong to their class; a symlinked folder inside a class folder is not
  descended (``os.walk``), so no loop is endless;
- files directly in DATA_DIR are ignored;
- folders starting with "." are not classes; deviation: inside a class folder, files
  and folders starting with "." are ignored too (and listed), where Keras reads them:
  macOS "._photo.jpg" resource forks are no images, NAS thumbnail folders (".@__thumb")
  hold copies;
- deviation: a symlinked file is read only when its target lies inside DATA_DIR (or
  inside the real folder behind a symlinked split or class folder); Keras reads it
  wherever it points.

Every image or folder left out is listed with its reason (``ImageIndex.ignored``), but
hidden class folders, which Keras skips too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDERS",
    "SPLIT_ORDER",
    "ImageIndex",
    "ImageRecord",
    "image_files",
    "index_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


SPLIT_ORDER = ("train", "validation", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image file: path relative to the data folder ('/'-separated), label, split."""

    path: str
    label: int
    split: str


@dataclass
class ImageIndex:
    """Every image of a data folder (or of a manifest, images/manifest.py), in extraction
    order; record paths are relative to ``root``."""

    root: Path
    records: list[ImageRecord]
    class_names: list[str]
    layout: str  # "classes" or "splits"
    ignored: list[str] = field(default_factory=list)
    first: int = 0  # position of records[0] in the whole folder's list (> 0 for a shard)
    manifest: Path | None = None  # the CSV the records were read from (None: a folder)
    manifest_sha256: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # path -> said when it is skipped

    def positions(self, paths: Sequence[str]) -> list[int]:
        """Each path's position in the whole folder's list (forward batches follow it)."""
        where = {r.path: self.first + i for i, r in enumerate(self.records)}
        return [where[p] for p in paths]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def image_files(class_dir: Path) -> list[Path]:
    """Image files under a folder, in Keras' sorted-walk order (hidden ones skipped)."""
    return _walk(class_dir)[0]


def _walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files in sorted-walk order, [(entry left out, why)]) under ``folder``.

    ``folder`` itself may be a symlink (Keras reads a symlinked class folder); below it,
    os.walk does not descend symlinked folders (Keras' follow_links=False): no loops.
    Hidden folders are not walked; they and hidden image files are left out (a deviation:
    Keras reads both inside a class folder).
    """
    walked, left_out = [], []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        left_out += [(here / d, "hidden folder: not read") for d in dirs if not _visible(d)]
        dirs[:] = [d for d in dirs if _visible(d)]
        left_out += [(here / d, "symlinked folder: not followed") for d in dirs
                     if (here / d).is_symlink()]
        walked.append((root, names))
    files = []
    for root, names in sorted(walked, key=lambda item: item[0]):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                if _visible(name):
                    files.append(Path(root) / name)
                else:
                    left_out.append((Path(root) / name, "hidden file: not read"))
    return files, sorted(left_out)


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders, symlinked ones included (Keras lists them: os.path.isdir)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _outside(path: Path, homes: Sequence[Path]) -> bool:
    """A symlinked file whose target lies in none of ``homes`` (resolved folders)."""
    if not path.is_symlink():
        return False
    target = path.resolve()
    return not any(home in target.parents for home in homes)


def index_images(data_dir: str | os.PathLike) -> ImageIndex:
    """List every image of ``data_dir`` with its label and split, in extraction order.

    Raises:
        ValueError: the folder is missing, has no class folders, or holds no image.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"`data_dir` is not a folder. Received: data_dir={str(data_dir)!r}")
    top = _subdirs(root)
    ignored = [f"{p.name} (file outside any class folder)" for p in root.iterdir()
               if p.is_file() and _visible(p.name)]
    split_dirs = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
    if split_dirs and len(split_dirs) == len(top):
        layout = "splits"
        by_split: dict[str, list[Path]] = {}
        for d in split_dirs:
            by_split.setdefault(SPLIT_FOLDERS[d.name.lower()], []).append(d)
        class_names = sorted({c.name for d in split_dirs for c in _subdirs(d)})
        groups = [
            (split, d) for split in SPLIT_ORDER for d in sorted(by_split.get(split, []))
        ]
    else:
        layout = "classes"
        class_names = [d.name for d in top]
        groups = [("", root)]
    if not class_names:
        raise ValueError(
            f"Found no class folders in {root}. Expected DATA_DIR/<class>/<image> or "
            "DATA_DIR/{train,validation,test}/<class>/<image>."
        )
    class_ids = {name: i for i, name in enumerate(class_names)}
    records = []
    for split, group_dir in groups:
        for class_name in class_names:
            class_dir = group_dir / class_name
            if not class_dir.is_dir():
                continue
            files, left_out = _walk(class_dir)
            ignored += [f"{p.relative_to(root).as_posix()} ({why})" for p, why in left_out]
            # The real folders behind a symlinked split or class folder count as inside.
            homes = {d.resolve() for d in (root, group_dir, class_dir)}
            for path in files:
                rel = path.relative_to(root).as_posix()
                if _outside(path, list(homes)):
                    ignored.append(f"{rel} (symlink to a file outside the data folder)")
                    continue
                records.append(ImageRecord(rel, class_ids[class_name], split))
    if not records:
        raise ValueError(
            f"Found 0 images in subfolders of {root}. Supported image extensions are "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case)."
        )
    return ImageIndex(root, records, class_names, layout, ignored)
