"""The demo's run: the commands a user would type, in order, and the table they lead to.

Protocol (:func:`run_demo`):

1. Write scikit-learn's bundled digits as PNGs into ``data/digits/`` (:mod:`.data`).
2. Pretrain a small convnet on digits 0-4 (the demo's "ImageNet") and save it as
   ``models/demo-digits04-base.keras`` (:mod:`.train`).
3. Transfer to the new task, digits 5-9 with only a few labelled images per class:
   ``scripts/extract.py`` cuts the frozen base at ``top_conv`` and caches its flattened
   feature map for every task image, then ``scripts/fit_head.py`` fits each head on the
   cached train rows (and again with their augmented copies) and scores it on the
   validation rows.
4. Baseline: the same convnet architecture, randomly initialised, trained from scratch on
   the same few task images and scored on the same validation images.
5. One table (head, validation accuracy, fit seconds), written to ``reports/demo.md`` and
   returned for the command line to print.

Every image goes through the same decoding as the pipeline's (Pillow -> RGB -> bilinear
resize to 32x32 -> x/255), so the base sees at extraction what it saw in pretraining.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.demo.data import write_digits
from pipeline.demo.train import pretrain_base, scratch_convnet

__all__ = ["HEADS", "DemoResult", "DemoSchedule", "demo_schedule", "format_table", "run_demo"]

log = logging.getLogger(__name__)

HEADS = ("dense", "logreg", "linear-svm", "svm")
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
    """Log the command a user would type, run it in-process, stop on failure."""
    log.info("$ python %s %s", script, shlex.join(argv))
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


@dataclass(frozen=True)
class DemoResult:
    """What a demo run produced: the table's rows and where everything is."""

    rows: list[dict[str, Any]]
    table: str
    notes: str
    cache: Path
    models: Path
    report: Path
    seconds: float

    def summary(self) -> str:
        """The table, what the heads reused, the takeaway, and a last line naming outputs."""
        return (
            f"\n{self.table}\n\n{self.notes}\n\n"
            f"demo: done in {self.seconds:.0f} s — cache in {self.cache}, heads in "
            f"{self.models / 'demo-digits59-*'}/, table in {self.report}"
        )


def run_demo(
    root: Path = Path("."), *, quick: bool = False, extract: Command, fit_head: Command,
) -> DemoResult:
    """Run the whole demo under ``root`` (protocol: module docstring).

    Args:
        root: the folder holding ``data/``, ``cache/``, ``models/`` and ``reports/``.
        quick: a few epochs only, for a smoke test (the accuracies mean little).
        extract, fit_head: the entry points of ``extract.py`` and ``fit_head.py``
            (``pipeline.cli.extract_main``, ``fit_head_main``), run in-process with the
            arguments the demo logs. Passed in: the demo walks through the CLI, and
            stays below it (the CLI's ``demo.py`` command calls the demo).

    Returns:
        The rows (``head``, ``accuracy``, ``accuracy_augmented``, ``fit_seconds``), the
        table and the paths of the outputs.

    Raises:
        SystemExit: a pipeline command failed; the message names the step.
    """
    start = time.perf_counter()
    root = Path(root)
    sched = demo_schedule(quick)
    digits_dir = root / "data" / "digits"
    base = root / "models" / BASE_NAME
    cache = root / "cache" / CACHE_NAME

    counts = _write_data(digits_dir, sched=sched)
    pretrain_accuracy, pretrain_seconds = _pretrain(digits_dir / "pretrain", base, sched=sched)
    extract_seconds = _extract(digits_dir / "task", base, cache, sched=sched, extract=extract)
    rows = _fit_heads(cache, root / "models", sched=sched, fit_head=fit_head)
    rows.append(_scratch(digits_dir / "task", sched=sched, n_train=counts["task/train"]))

    table = format_table(rows)
    # The heads' fit seconds leave out what they reuse; say what that cost, once.
    notes = (
        f"(heads reuse the base and the cache: pretraining took {pretrain_seconds:.0f} s "
        f"once, extraction {extract_seconds:.0f} s once)\n\n"
        f"{_takeaway(rows, sched.per_class_train)}"
    )
    report = _write_report(root / "reports" / "demo.md", table=table, notes=notes,
                           counts=counts, sched=sched, pretrain_accuracy=pretrain_accuracy,
                           quick=quick)
    return DemoResult(rows, table, notes, cache, root / "models", report,
                      time.perf_counter() - start)


def _write_data(digits_dir: Path, *, sched: DemoSchedule) -> dict[str, int]:
    """Step 1: the digits as PNGs (unchanged files are left alone)."""
    counts = write_digits(digits_dir, per_class_train=sched.per_class_train, seed=sched.seed)
    log.info("digits: %d + %d images of 0-4 for pretraining, %d + %d of 5-9 for the task "
             "(train + validation) in %s (%d written, %d unchanged)",
             counts["pretrain/train"], counts["pretrain/validation"], counts["task/train"],
             counts["task/validation"], digits_dir, counts["written"], counts["unchanged"])
    return counts


def _pretrain(data_dir: Path, base: Path, *, sched: DemoSchedule) -> tuple[float, float]:
    """Step 2: the base on digits 0-4: (validation accuracy, seconds)."""
    start = time.perf_counter()
    accuracy = pretrain_base(data_dir, base, input_size=sched.input_size,
                             epochs=sched.pretrain_epochs, seed=sched.seed,
                             batch_size=sched.batch_size)
    seconds = time.perf_counter() - start
    log.info("pretrain: convnet on digits 0-4, %d epochs, validation accuracy %.3f in %.0f s "
             "-> %s", sched.pretrain_epochs, accuracy, seconds, base)
    return accuracy, seconds


def _extract(task_dir: Path, base: Path, cache: Path, *, sched: DemoSchedule,
             extract: Command) -> float:
    """Step 3a: ``extract.py`` on the task images, from scratch: its seconds."""
    from pipeline.heads.convnet import CUT_LAYER

    _remove_outputs(cache, cache.with_name(cache.name + ".partial"))
    start = time.perf_counter()
    _run_step(
        "extract",
        extract,
        "scripts/extract.py",
        [
            str(task_dir),
            "--base", str(base),
            "--preprocess", "scale",
            "--input-size", str(sched.input_size),
            "--layer", CUT_LAYER,
            "--pooling", POOLING,
            "--out", str(cache),
            *AUGMENT_ARGS,
        ],
    )  # fmt: skip
    return time.perf_counter() - start


def _fit_heads(cache: Path, models: Path, *, sched: DemoSchedule,
               fit_head: Command) -> list[dict[str, Any]]:
    """Step 3b: ``fit_head.py`` per head, on the cache and with its augmented copies."""
    rows: list[dict[str, Any]] = []
    for head in HEADS:
        row: dict[str, Any] = {"head": head}
        for suffix, extra in (("", []), ("-augmented", ["--use-augmented"])):
            out = models / f"demo-digits59-{head}{suffix}"
            # The demo owns these folders and rebuilds them (a --quick run, then a full one).
            argv = [str(cache), "--head", head, "--out", str(out), "--overwrite", *extra]
            if head == "dense" and sched.dense_head_epochs is not None:
                argv += ["--epochs", str(sched.dense_head_epochs)]
            _run_step(f"fit_head --head {head}{suffix}", fit_head, "scripts/fit_head.py", argv)
            metrics = _read_metrics(out / "metrics.json", head)
            if suffix:
                row["accuracy_augmented"] = metrics["accuracy"]
            else:
                row.update(accuracy=metrics["accuracy"], fit_seconds=metrics["fit_seconds"])
        rows.append(row)
    return rows


def _scratch(task_dir: Path, *, sched: DemoSchedule, n_train: int) -> dict[str, Any]:
    """Step 4: the baseline row, the same convnet trained from random weights."""
    log.info("scratch: the same convnet from random weights on the same %d task images, "
             "%d epochs", n_train, sched.scratch_epochs)
    accuracy, seconds = scratch_convnet(task_dir, input_size=sched.input_size,
                                        epochs=sched.scratch_epochs, seed=sched.seed,
                                        batch_size=sched.batch_size)
    return {"head": SCRATCH_ROW, "accuracy": accuracy, "fit_seconds": seconds}


def _write_report(path: Path, *, table: str, notes: str, counts: dict[str, int],
                  sched: DemoSchedule, pretrain_accuracy: float, quick: bool) -> Path:
    """Step 5: ``reports/demo.md``, the table with what it was made from."""
    from pipeline.heads.convnet import CUT_LAYER

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Demo: bottleneck features on handwritten digits\n\n"
        f"Base: small convnet pretrained on digits 0-4 ({counts['pretrain/train']} images, "
        f"validation accuracy {pretrain_accuracy:.3f}), cut at `{CUT_LAYER}` with "
        f"`{POOLING}` pooling.\n"
        f"Task: digits 5-9, {sched.per_class_train} labelled images per class for training, "
        f"{counts['task/validation']} for validation."
        f"{' Quick run (few epochs).' if quick else ''}\n\n"
        f"{table}\n\n{notes}\n"
    )
    return path
