"""The demo's data: scikit-learn's bundled digits as PNG files, and a split loaded as the
extract command decodes it.

Layout written by :func:`write_digits` (the pre-split folder layout)::

    pretrain/{train,validation}/<0..4>/<index>.png   all of digits 0-4, ~20% validation
    task/{train,validation}/<5..9>/<index>.png       digits 5-9: a few per class in train,
                                                     every other image in validation

``<index>`` is the image's row in ``load_digits``, so every file names its source.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.images import index_images, load_image

__all__ = ["PRETRAIN_DIGITS", "SPLITS", "TASK_DIGITS", "load_split", "write_digits"]

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TASK_DIGITS = (5, 6, 7, 8, 9)
SPLITS = ("train", "validation")
PRETRAIN_VALIDATION_FRACTION = 0.2


def _png_bytes(image: np.ndarray) -> bytes:
    """One 8x8 digit (values 0..16) as an 8-bit grayscale PNG."""
    from PIL import Image

    pixels = np.rint(np.asarray(image, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _digit_plan(labels: np.ndarray, *, per_class_train: int, seed: int) -> dict[Path, int]:
    """Relative path -> row of ``load_digits`` for every file of the layout."""
    plan: dict[Path, int] = {}
    for digit in (*PRETRAIN_DIGITS, *TASK_DIGITS):
        rows = np.flatnonzero(labels == digit)
        # One generator per class: a class's split does not depend on the other classes.
        rows = np.random.default_rng([seed, digit]).permutation(rows)
        if digit in PRETRAIN_DIGITS:
            n_val = round(len(rows) * PRETRAIN_VALIDATION_FRACTION)
            parts = {"train": rows[n_val:], "validation": rows[:n_val]}
            group = "pretrain"
        else:
            if not 1 <= per_class_train < len(rows):
                raise ValueError(
                    f"`per_class_train` must be between 1 and {len(rows) - 1} so that digit "
                    f"{digit} keeps validation images. Received: per_class_train="
                    f"{per_class_train}"
                )
            parts = {"train": rows[:per_class_train], "validation": rows[per_class_train:]}
            group = "task"
        for split, split_rows in parts.items():
            for row in sorted(int(r) for r in split_rows):
                plan[Path(group, split, str(digit), f"{row:04d}.png")] = row
    return plan


def write_digits(root: Path, *, per_class_train: int = 20, seed: int = 0) -> dict[str, int]:
    """Write scikit-learn's digits as PNG files in the demo's pre-split layout.

    Idempotent: a file that already holds the right bytes is left alone, and PNGs that a
    previous run with other arguments put in the layout's class folders are removed.

    Args:
        root: the dataset folder (the demo uses ``data/digits``).
        per_class_train: labelled training images per task digit (5-9); the rest of each
            task digit's images go to validation.
        seed: seeds the choice of training images and the pretraining validation split.

    Returns:
        Image counts per split, keyed ``"pretrain/train"``, ``"pretrain/validation"``,
        ``"task/train"``, ``"task/validation"``, plus ``"written"``, ``"unchanged"`` and
        ``"removed"`` (files touched by this call).

    Raises:
        ValueError: ``per_class_train`` leaves a task digit without validation images.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    plan = _digit_plan(digits.target, per_class_train=per_class_train, seed=seed)

    counts: dict[str, int] = {
        f"{group}/{split}": 0 for group in ("pretrain", "task") for split in SPLITS
    }
    counts.update(written=0, unchanged=0, removed=0)
    for rel, row in plan.items():
        counts[f"{rel.parts[0]}/{rel.parts[1]}"] += 1
        path = root / rel
        data = _png_bytes(digits.images[row])
        if path.is_file() and path.read_bytes() == data:
            counts["unchanged"] += 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        counts["written"] += 1

    # A stale file would silently join a split (e.g. after changing per_class_train).
    for group, classes in (("pretrain", PRETRAIN_DIGITS), ("task", TASK_DIGITS)):
        for split in SPLITS:
            for digit in classes:
                for path in (root / group / split / str(digit)).glob("*.png"):
                    if path.relative_to(root) not in plan:
                        path.unlink()
                        counts["removed"] += 1
    return counts


def load_split(split_dir: Path, *, input_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one split folder (``<class>/<image>``) exactly as the extract command decodes it.

    Uses the pipeline's own indexing and decoding (:mod:`pipeline.images`), so the base
    sees the same pixels in pretraining as at extraction.

    Returns:
        ``(x, y, class_names)``: images ``(N, input_size, input_size, 3)`` float32 scaled to
        [0, 1] (the extract command's ``--preprocess scale``), integer labels indexing the
        sorted class folder names, and those names.

    Raises:
        ValueError: the folder is missing or holds no class folders with images.
    """
    index = index_images(split_dir)
    size = (input_size, input_size)
    x = np.stack([load_image(index.root / r.path, size, "bilinear") for r in index.records])
    y = np.asarray([r.label for r in index.records], dtype=np.int64)
    return x / np.float32(255.0), y, index.class_names
