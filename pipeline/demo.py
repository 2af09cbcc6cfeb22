"""The offline demo: bottleneck features on real handwritten digits, start to finish.

Protocol (:func:`run_demo`):

1. Write scikit-learn's bundled digits (``load_digits``: 1,797 real 8x8 scans, values
   0..16) as 8-bit grayscale PNGs into ``data/digits/`` in the pre-split folder layout::

       pretrain/{train,validation}/<0..4>/<index>.png   all of digits 0-4, ~20% validation
       task/{train,validation}/<5..9>/<index>.png       digits 5-9: a few per class in train,
                                                        every other image in validation

   ``<index>`` is the image's row in ``load_digits``, so every file names its source.
2. Pretrain a small convnet on digits 0-4 (the demo's "ImageNet") and save it as
   ``models/demo-digits04-base.keras``.
3. Transfer to the new task, digits 5-9 with only a few labelled images per class:
   ``scripts/extract.py`` cuts the frozen base at ``top_conv`` and caches its flattened
   feature map for every task image, then ``scripts/fit_head.py`` fits each head on the
   cached train rows and scores it on the validation rows.
4. Baseline: the same convnet architecture, randomly initialised, trained from scratch on
   the same few task images and scored on the same validation images.
5. Print one table (head, validation accuracy, fit seconds), write it to
   ``reports/demo.md``.

Every image goes through the same decoding as the pipeline's (Pillow -> RGB -> bilinear
resize to 32x32 -> x/255), so the base sees at extraction what it saw in pretraining.
"""

from __future__ import annotations

import io
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.images import index_images, load_image

if TYPE_CHECKING:
    import keras

__all__ = [
    "HEADS",
    "PRETRAIN_DIGITS",
    "TASK_DIGITS",
    "DemoSchedule",
    "demo_schedule",
    "format_table",
    "load_split",
    "pretrain_base",
    "run_demo",
    "scratch_convnet",
    "write_digits",
]

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TASK_DIGITS = (5, 6, 7, 8, 9)
HEADS = ("dense", "logreg", "linear-svm", "svm")
SPLITS = ("train", "validation")
PRETRAIN_VALIDATION_FRACTION = 0.2
BASE_NAME = "demo-digits04-base.keras"
CACHE_NAME = "demo-digits59.h5"
# Flatten, not avg: averaging top_conv gives exactly the 64 "gap" features the base was
# trained through, tuned to tell 0-4 apart; flattening keeps the 8x8 grid (4,096 features),
# i.e. *where* the strokes are, which the unseen digits 5-9 need. With seeds 0-2 every head
# scored higher with flatten (logreg 0.97-0.98 vs 0.92-0.94), and 100 rows of 4,096
# floats still fit in about a second.
POOLING = "flatten"
SCRATCH_ROW = "scratch convnet (same images)"
# Augmented passes per training image; no flips: a mirrored digit is another glyph.
AUGMENT_PASSES = 4
AUGMENT_ARGS = ("--augment", str(AUGMENT_PASSES), "--augment-flip", "none")


@dataclass(frozen=True)
class DemoSchedule:
    """The demo's knobs, chosen together so the whole run fits in a few CPU minutes."""

    input_size: int = 32
    per_class_train: int = 20
    pretrain_epochs: int = 30
    # Enough for the baseline to converge on its 100 images: by 200 epochs its training loss
    # is ~0.01 and another 200 epochs add about one point of validation accuracy.
    scratch_epochs: int = 200
    batch_size: int = 32
    # None: fit_head.py's own default. The quick run caps the dense head's epochs.
    dense_head_epochs: int | None = None
    seed: int = 0


def demo_schedule(quick: bool = False) -> DemoSchedule:
    """The demo's sizes: the full run, or a few epochs for a smoke test."""
    if quick:
        return DemoSchedule(pretrain_epochs=3, scratch_epochs=3, dense_head_epochs=3)
    return DemoSchedule()


# ---------------------------------------------------------------------------------------
# 1. data


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


# ---------------------------------------------------------------------------------------
# 2. models


def _train_and_score(
    train_dir: Path,
    validation_dir: Path,
    *,
    input_size: int,
    epochs: int,
    seed: int,
    batch_size: int,
    name: str,
) -> tuple[keras.Model, float, float]:
    """Fit a fresh convnet on one folder, score it on another: (model, accuracy, seconds)."""
    import keras

    if epochs < 1:
        raise ValueError(f"`epochs` must be at least 1. Received: epochs={epochs}")
    x_train, y_train, classes = load_split(train_dir, input_size=input_size)
    x_val, y_val, val_classes = load_split(validation_dir, input_size=input_size)
    if val_classes != classes:
        raise RuntimeError(
            f"{train_dir} and {validation_dir} have different class folders: "
            f"{classes} vs {val_classes}"
        )
    from pipeline.heads.convnet import build_convnet

    keras.utils.set_random_seed(seed)
    model = build_convnet(input_size, len(classes), name=name)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_val, y_val, batch_size=256, verbose=0)
    return model, float(accuracy), seconds


def pretrain_base(
    data_dir: Path,
    out: Path,
    *,
    input_size: int = 32,
    epochs: int,
    seed: int,
    batch_size: int = 32,
) -> float:
    """Train the demo's base on digits 0-4 and save it as a ``.keras`` file.

    Args:
        data_dir: the pretraining folder with ``train/`` and ``validation/`` splits.
        out: where to save the model (``.keras``).
        input_size: square input side in pixels.
        epochs: training epochs.
        seed: seeds weights and shuffling (``keras.utils.set_random_seed``).
        batch_size: minibatch size.

    Returns:
        Accuracy on the pretraining validation split.
    """
    out = Path(out)
    if out.suffix != ".keras":
        raise ValueError(f"`out` must be a .keras file. Received: out={out}")
    model, accuracy, _ = _train_and_score(
        Path(data_dir) / "train",
        Path(data_dir) / "validation",
        input_size=input_size,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        name="digits04_base",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return accuracy


def scratch_convnet(
    task_dir: Path, *, input_size: int = 32, epochs: int, seed: int, batch_size: int = 32
) -> tuple[float, float]:
    """The baseline: the base's architecture from random weights, on the few task images.

    Returns:
        ``(validation accuracy, fit seconds)`` on ``task_dir/validation``.
    """
    _, accuracy, seconds = _train_and_score(
        Path(task_dir) / "train",
        Path(task_dir) / "validation",
        input_size=input_size,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        name="digits59_scratch",
    )
    return accuracy, seconds


# ---------------------------------------------------------------------------------------
# 3. orchestration


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of head, accuracy (plain and with augmented passes) and fit seconds."""
    cells = [("head", "val accuracy", f"+ {AUGMENT_PASSES} augmented passes", "fit seconds")]
    for r in rows:
        augmented = r.get("accuracy_augmented")
        cells.append((r["head"], f"{r['accuracy']:.3f}",
                      "—" if augmented is None else f"{augmented:.3f}", f"{r['fit_seconds']:.2f}"))
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _takeaway(rows: Sequence[dict[str, Any]], per_class_train: int) -> str:
    heads = [r for r in rows if r["head"] != SCRATCH_ROW]
    scratch = next(r for r in rows if r["head"] == SCRATCH_ROW)
    best = max(heads, key=lambda r: r["accuracy"])
    if best["accuracy"] > scratch["accuracy"]:
        verdict = "beats"
    elif best["accuracy"] == scratch["accuracy"]:
        verdict = "ties"
    else:
        verdict = "loses to"
    return (
        f"takeaway: with {per_class_train} labelled images per digit, the best head "
        f"({best['head']}, {best['accuracy']:.3f}, fit in {best['fit_seconds']:.2f} s) on "
        f"features of a base pretrained on digits 0-4 {verdict} the same convnet trained "
        f"from scratch ({scratch['accuracy']:.3f}, {scratch['fit_seconds']:.1f} s)."
    )


def _run_step(
    step: str, entry: Command, script: str, argv: list[str]
) -> None:
    """Print the command a user would type, run it in-process, stop on failure."""
    print(f"\n$ python {script} {shlex.join(argv)}", flush=True)
    try:
        code = entry(argv)
    except SystemExit as exc:  # argparse exits on a bad argument
        code = exc.code if isinstance(exc.code, int) else 1
    if code in (130, 143):  # interrupted: the step has said so and what it kept
        raise SystemExit(code)
    if code:
        raise SystemExit(f"demo: step '{step}' failed with exit code {code}")


def _read_metrics(path: Path, head: str) -> dict[str, float]:
    """``accuracy`` and ``fit_seconds`` from a fit_head metrics.json."""
    try:
        metrics = json.loads(path.read_text())
        return {"accuracy": float(metrics["accuracy"]),
                "fit_seconds": float(metrics["fit_seconds"])}
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(
            f"demo: step 'fit_head --head {head}' left no usable {path} "
            f"(needs keys 'accuracy' and 'fit_seconds'): {exc!r}"
        ) from exc


def _remove_outputs(*paths: Path) -> None:
    """Remove files the demo regenerates: a cache made from the previous base is stale."""
    for path in paths:
        if path.is_file():
            path.unlink()


# A command-line entry point: argv -> exit status (pipeline.cli's *_main functions).
Command = Callable[[list[str] | None], int]


def run_demo(
    root: Path = Path("."), *, quick: bool = False, extract: Command, fit_head: Command,
) -> list[dict[str, Any]]:
    """Run the whole demo under ``root`` and print its table (protocol: module docstring).

    Args:
        root: the folder holding ``data/``, ``cache/``, ``models/`` and ``reports/``.
        quick: a few epochs only, for a smoke test (the accuracies mean little).
        extract, fit_head: the entry points of ``extract.py`` and ``fit_head.py``
            (``pipeline.cli.extract_main``, ``fit_head_main``), run in-process with the
            arguments the demo prints. Passed in: the demo walks through the CLI, and
            stays below it (the CLI's ``demo.py`` command calls the demo).

    Returns:
        One dict per table row: ``head``, ``accuracy``, ``fit_seconds``.

    Raises:
        SystemExit: a pipeline command failed; the message names the step.
    """
    from pipeline.heads.convnet import CUT_LAYER

    start = time.perf_counter()
    root = Path(root)
    sched = demo_schedule(quick)
    digits_dir = root / "data" / "digits"
    base = root / "models" / BASE_NAME
    cache = root / "cache" / CACHE_NAME

    counts = write_digits(digits_dir, per_class_train=sched.per_class_train, seed=sched.seed)
    print(
        f"digits: {counts['pretrain/train']} + {counts['pretrain/validation']} images of 0-4 "
        f"for pretraining, {counts['task/train']} + {counts['task/validation']} of 5-9 for the "
        f"task (train + validation) in {digits_dir} ({counts['written']} written, "
        f"{counts['unchanged']} unchanged)",
        flush=True,
    )

    t = time.perf_counter()
    pretrain_accuracy = pretrain_base(
        digits_dir / "pretrain",
        base,
        input_size=sched.input_size,
        epochs=sched.pretrain_epochs,
        seed=sched.seed,
        batch_size=sched.batch_size,
    )
    pretrain_seconds = time.perf_counter() - t
    print(
        f"pretrain: convnet on digits 0-4, {sched.pretrain_epochs} epochs, validation "
        f"accuracy {pretrain_accuracy:.3f} in {pretrain_seconds:.0f} s -> {base}",
        flush=True,
    )

    _remove_outputs(cache, cache.with_name(cache.name + ".partial"))
    t = time.perf_counter()
    _run_step(
        "extract",
        extract,
        "scripts/extract.py",
        [
            str(digits_dir / "task"),
            "--base", str(base),
            "--preprocess", "scale",
            "--input-size", str(sched.input_size),
            "--layer", CUT_LAYER,
            "--pooling", POOLING,
            "--out", str(cache),
            *AUGMENT_ARGS,
        ],
    )  # fmt: skip
    extract_seconds = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    for head in HEADS:
        row: dict[str, Any] = {"head": head}
        for suffix, extra in (("", []), ("-augmented", ["--use-augmented"])):
            out = root / "models" / f"demo-digits59-{head}{suffix}"
            argv = [str(cache), "--head", head, "--out", str(out), *extra]
            if head == "dense" and sched.dense_head_epochs is not None:
                argv += ["--epochs", str(sched.dense_head_epochs)]
            _run_step(f"fit_head --head {head}{suffix}", fit_head, "scripts/fit_head.py", argv)
            metrics = _read_metrics(out / "metrics.json", head)
            if suffix:
                row["accuracy_augmented"] = metrics["accuracy"]
            else:
                row.update(accuracy=metrics["accuracy"], fit_seconds=metrics["fit_seconds"])
        rows.append(row)

    print(
        f"\nscratch: the same convnet from random weights on the same "
        f"{counts['task/train']} task images, {sched.scratch_epochs} epochs",
        flush=True,
    )
    scratch_acc, scratch_seconds = scratch_convnet(
        digits_dir / "task",
        input_size=sched.input_size,
        epochs=sched.scratch_epochs,
        seed=sched.seed,
        batch_size=sched.batch_size,
    )
    rows.append({"head": SCRATCH_ROW, "accuracy": scratch_acc, "fit_seconds": scratch_seconds})

    table = format_table(rows)
    takeaway = _takeaway(rows, sched.per_class_train)
    # The heads' fit seconds leave out what they reuse; say what that cost, once.
    costs = (
        f"(heads reuse the base and the cache: pretraining took {pretrain_seconds:.0f} s "
        f"once, extraction {extract_seconds:.0f} s once)"
    )
    print(f"\n{table}\n\n{costs}\n\n{takeaway}")

    report = root / "reports" / "demo.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        "# Demo: bottleneck features on handwritten digits\n\n"
        f"Base: small convnet pretrained on digits 0-4 ({counts['pretrain/train']} images, "
        f"validation accuracy {pretrain_accuracy:.3f}), cut at `{CUT_LAYER}` with "
        f"`{POOLING}` pooling.\n"
        f"Task: digits 5-9, {sched.per_class_train} labelled images per class for training, "
        f"{counts['task/validation']} for validation."
        f"{' Quick run (few epochs).' if quick else ''}\n\n"
        f"{table}\n\n{costs}\n\n{takeaway}\n"
    )
    print(
        f"demo: done in {time.perf_counter() - start:.0f} s — cache in {cache}, heads in "
        f"{root / 'models' / 'demo-digits59-*'}/, table in {report}"
    )
    return rows
