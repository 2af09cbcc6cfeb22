"""Argparse for every command; ``scripts/*.py`` and the console scripts call into here.

Each ``*_main`` returns an exit code: 0 on success, 2 for a bad argument, input or cache
(one clear message, no traceback), 130 on Ctrl-C and 143 on SIGTERM (one line saying what
was kept; extract resumes). Ctrl-C is handled by :func:`pipeline.interrupts.guard`, so it
stops the command wherever it lands, even during library imports or model building.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "check_output",
    "compare_main",
    "demo_main",
    "export_features_main",
    "extract_main",
    "finetune_main",
    "fit_head_main",
    "predict_main",
]


def extract_parser() -> argparse.ArgumentParser:
    """Arguments of ``extract.py``."""
    p = argparse.ArgumentParser(
        prog="extract.py",
        description="Run every image of DATA_DIR (a folder of class folders, or a CSV "
        "manifest of paths and labels) once through a frozen base and write the "
        "bottleneck features, labels and paths to an HDF5 cache.",
    )
    p.add_argument("data_dir", nargs="?", metavar="DATA_DIR|LABELS.csv",
                   help="DATA_DIR/<class>/... or DATA_DIR/{train,validation,test}/<class>/...; "
                   "or a .csv manifest with a header row path,label[,split] (paths relative "
                   "to its folder, or absolute; split: train|validation|val|test|empty)")
    p.add_argument("--base",
                   help="keras.applications name (vgg16, resnet50, ...), a .keras file, or a "
                   "keras-hub preset: hf://keras/..., kaggle://..., a built-in name such as "
                   "dinov2_with_registers_base, or a local preset folder (needs the [hub] extra)")
    p.add_argument("--weights", default=None,
                   help="imagenet (default for named bases) | none (random, seeded) | a file; "
                   "keras-hub presets carry their own (none: random)")
    p.add_argument("--input-size", default=None, help="N or HxW (default: the base's own size)")
    p.add_argument("--layer", default=None,
                   help="cut the base at this layer (default: its last); a,b,c stores several "
                   "layers from one forward pass; all-blocks: the end of every block (max 8)")
    p.add_argument("--pooling", default="avg",
                   help="feature maps: flatten | avg | max | none; transformer tokens "
                   "(keras-hub bases): cls | mean (patch tokens; avg is the same) | max | "
                   "cls+mean (DINOv2's linear probe) | flatten | none (default: avg)")
    p.add_argument("--preprocess", default=None,
                   help="for .keras bases: none | scale | tf | caffe | torch (default: none)")
    p.add_argument("--interpolation", default="bilinear", help="resize method (default: bilinear)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="float32 | float16")
    p.add_argument("--compression", default="none", help="none | lzf | gzip (lossless)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="run the base in mixed_float16 (GPU); features stored as --dtype")
    p.add_argument("--jit", default="auto",
                   help="XLA for the forward pass: auto (Keras' choice) | on | off")
    p.add_argument("--out", default=None, help="cache file (default: cache/<data>-<base>-...h5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0,
                   help="decode workers (0: auto, one per core but one, at most 8 threads); "
                   "with --engine ray: model actors (0: one per --gpus-per-worker GPUs of the "
                   "cluster, or one per node without GPUs)")
    p.add_argument("--decode", default="auto",
                   help="threads | processes | auto: how files are decoded in parallel; the "
                   "pixels are the same. processes: spawned workers, a run of files of one "
                   "batch per task straight into the batch in /dev/shm (no GIL; in Docker "
                   "start the container with --shm-size=1g); threads: one per file; auto "
                   "(default): processes on >= 4 cores, threads on fewer")
    p.add_argument("--log-every", type=float, default=30.0,
                   help="seconds between progress lines when not on a terminal")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="extract the i-th of N contiguous slices (one process per GPU)")
    p.add_argument("--merge", nargs="+", default=None, metavar="PART",
                   help="merge the caches of --shard 0/N .. N-1/N, or the parts of --engine "
                   "ray (files or their <out>.parts folder), into --out, then stop")
    p.add_argument("--engine", default="local",
                   help="local (this process) | ray (Ray Data on a Ray cluster, docs/scale.md)")
    p.add_argument("--address", default=None,
                   help="--engine ray: the cluster, auto | ray://HOST:10001 (default: start "
                   "a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs per model actor (default 0: CPU; 0.5 shares a GPU)")
    p.add_argument("--augment", type=int, default=0, metavar="K",
                   help="also store K seeded augmented passes of every training image")
    p.add_argument("--augment-flip", default="horizontal",
                   help="horizontal | vertical | horizontal_and_vertical | none")
    p.add_argument("--augment-rotation", type=float, default=0.05,
                   help="max rotation, fraction of a turn (0.05 = 18 degrees)")
    p.add_argument("--augment-zoom", type=float, default=0.1, help="max zoom, fraction")
    p.add_argument("--augment-translation", type=float, default=0.1,
                   help="max shift, fraction of the side")
    return p


def fit_head_parser() -> argparse.ArgumentParser:
    """Arguments of ``fit_head.py``."""
    p = argparse.ArgumentParser(
        prog="fit_head.py",
        description="Train a classifier head on a feature cache and write model + metrics.",
    )
    p.add_argument("cache", help="an .h5 cache written by extract.py")
    p.add_argument("--head", default="logreg", help="dense | logreg | linear-svm | svm | knn")
    p.add_argument("--out", default=None, help="output folder (default: models/<cache>-<head>)")
    p.add_argument("--val-split", type=float, default=0.2,
                   help="validation fraction when the cache records no split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100, help="dense head")
    p.add_argument("--lr", type=float, default=1e-3, help="dense head")
    p.add_argument("--batch-size", type=int, default=32, help="dense head")
    p.add_argument("--patience", type=int, default=10, help="dense head early stopping")
    p.add_argument("--hidden", type=int, default=256, help="dense head: hidden units")
    p.add_argument("--dropout", type=float, default=0.5, help="dense head: dropout rate")
    p.add_argument("--k", type=int, default=5, help="knn head: neighbours")
    p.add_argument("--max-iter", type=int, default=None,
                   help="logreg (default 2000) and linear-svm (default 1000): iterations; "
                   "raise it when the solver says it did not converge")
    p.add_argument("--C", type=float, default=1.0, help="inverse regularisation (sklearn heads)")
    p.add_argument("--class-weight", default=None, help="balanced (default: none)")
    p.add_argument("--use-augmented", action="store_true",
                   help="train on originals + augmented copies (extract --augment K)")
    p.add_argument("--layer", default=None,
                   help="which stored layer to train on (extract --layer a,b,c; default: first)")
    p.add_argument("--stream", action="store_true",
                   help="out of core: read features from HDF5 in batches (dense, logreg and "
                   "linear-svm; the linear heads become SGD, at most 10 passes)")
    p.add_argument("--export", default=None, metavar="FILE.keras",
                   help="dense head: also save base + head as one end-to-end model "
                   "(FILE.keras + FILE.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model in --out trained with other settings (without it, "
                   "such a run stops before training; the same settings again replace it)")
    return p


def predict_parser() -> argparse.ArgumentParser:
    """Arguments of ``predict.py``."""
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Predict the class of images with a fit_head or finetune model, using the "
        "base, size and preprocessing recorded with it; or export a dense head and its base "
        "as one .keras model.",
    )
    p.add_argument("model", help="fit_head/finetune output folder, or an exported FILE.keras")
    p.add_argument("images", nargs="*", metavar="IMAGES_OR_DIR_OR_LIST",
                   help="image files, folders (walked recursively, sorted) and/or lists of "
                   "paths: a .txt file (one per line) or a .csv file with a path column; "
                   "a list's paths are relative to its folder, or absolute")
    p.add_argument("--out", default=None,
                   help="CSV to write (default: predictions.csv, or none when only "
                   "--embeddings is given); unreadable files go to <stem>.skipped.csv")
    p.add_argument("--embeddings", default=None, metavar="OUT.h5|.npy|.parquet",
                   help="also write the features the head reads (the recorded frozen base, "
                   "layer and pooling) with their paths; without --out, only these")
    p.add_argument("--top-k", type=int, default=None, help="add top1..topK class/value columns")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="decode threads (0: auto)")
    p.add_argument("--log-every", type=float, default=30.0,
                   help="seconds between progress lines when not on a terminal")
    p.add_argument("--export", default=None, metavar="FILE.keras",
                   help="save the dense head + frozen base as one end-to-end model "
                   "(FILE.keras + FILE.json); no images needed")
    return p


def export_features_parser() -> argparse.ArgumentParser:
    """Arguments of ``export_features.py``."""
    p = argparse.ArgumentParser(
        prog="export_features.py",
        description="Write the rows of an extract cache (path, label, label_id, split, "
        "features) as Parquet, NumPy or HDF5, for pandas, Polars, FAISS or a vector "
        "database. Streams the cache; writes the file whole or not at all.",
    )
    p.add_argument("cache", metavar="CACHE.h5", help="an .h5 cache written by extract.py")
    p.add_argument("out", metavar="OUT",
                   help="OUT.parquet | OUT.npy (+ OUT.rows.csv naming the rows) | OUT.h5")
    p.add_argument("--layer", default=None,
                   help="which stored layer to export (extract --layer a,b,c; default: first)")
    p.add_argument("--split", default=None,
                   help="export only this split (train, validation, test; default: all rows)")
    p.add_argument("--log-every", type=float, default=30.0,
                   help="seconds between progress lines when not on a terminal")
    return p


def finetune_parser() -> argparse.ArgumentParser:
    """Arguments of ``finetune.py``."""
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Unfreeze the top of the base and train it with the dense head on the "
        "images (augmented; SGD, small learning rate), warm-started from a fit_head dense "
        "head, or from a fresh head warmed up on a cache. Saves an end-to-end model.",
    )
    p.add_argument("source", help="fit_head output folder with a dense head, or a cache .h5 "
                   "(a fresh dense head is warmed up on it first)")
    p.add_argument("--unfreeze-from", default=None, metavar="LAYER",
                   help="train this base layer and everything above it")
    p.add_argument("--unfreeze-top-blocks", default=None, metavar="N", type=_blocks,
                   help="train the top N blocks as the base names them (VGG block5_*, "
                   "ResNet conv5_*, ...), or 'all'")
    p.add_argument("--out", default=None,
                   help="output folder (default: models/<head folder|cache>-finetuned)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=5, help="early stopping on val_loss")
    p.add_argument("--augment-flip", default="horizontal", help="random flips of the training "
                   "images: horizontal | vertical | horizontal_and_vertical | none")
    p.add_argument("--warmup-epochs", type=int, default=50,
                   help="with a cache: epochs of the fresh head on the cached features")
    p.add_argument("--val-split", type=float, default=0.2,
                   help="with a cache that records no split (a head folder records its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="the head's cache (default: as recorded)")
    p.add_argument("--data-dir", default=None,
                   help="where the images are now (default: as the cache recorded)")
    return p


def _blocks(value: str) -> int | str:
    """``--unfreeze-top-blocks``: an integer or 'all' (range checked against the base)."""
    if value.strip().lower() == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or 'all', got {value!r}") from None


def compare_parser() -> argparse.ArgumentParser:
    """Arguments of ``compare.py``."""
    p = argparse.ArgumentParser(
        prog="compare.py",
        description="Score every (cache, head) pair on the same rows and the same stratified "
        "folds, and write a leaderboard, results.json and an HTML report with plots.",
    )
    p.add_argument("caches", nargs="*", metavar="CACHE.h5",
                   help="caches of the same images (e.g. one per base), matched by path")
    p.add_argument("--heads", default="logreg,linear-svm,svm,knn,dense",
                   help="comma-separated heads (default: logreg,linear-svm,svm,knn,dense)")
    p.add_argument("--cv", type=int, default=5, help="stratified folds (default: 5)")
    p.add_argument("--layers", default=None,
                   help="compare stored layers side by side (extract --layer a,b,c): "
                   "a,b or all")
    p.add_argument("--sweep", action="store_true",
                   help="choose each head's regularisation from a small grid by mean CV accuracy")
    p.add_argument("--n-jobs", type=int, default=1,
                   help="parallel fits over heads and folds (-1: all cores; default: 1)")
    p.add_argument("--seed", type=int, default=0, help="folds and every head's random_state")
    p.add_argument("--scratch", default=None, metavar="DATA_DIR",
                   help="also train a small convnet from scratch on the cached images in "
                   "DATA_DIR (same rows, same folds)")
    p.add_argument("--epochs", type=int, default=100, help="dense head: maximum epochs")
    p.add_argument("--scratch-epochs", type=int, default=50,
                   help="scratch convnet: maximum epochs")
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="balanced: weight classes inversely to their frequency, in every "
                   "head but knn, as fit_head (default: none)")
    p.add_argument("--out", default=None,
                   help="report folder (default: reports/compare-<timestamp>); finished fits "
                   "are kept beside it until the report is written, so the same command "
                   "run again after Ctrl-C continues")
    p.add_argument("--history-file", default="reports/history.jsonl",
                   help="one JSON line per run is appended here (default: reports/history.jsonl)")
    p.add_argument("--history", action="store_true",
                   help="print the recorded runs as a table and exit")
    return p


# Why a folder takes no new file, by errno (else the system's own words).
_CANNOT_CREATE = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "virtual file system",  # /proc answers "No such file or directory"
}


def demo_parser() -> argparse.ArgumentParser:
    """Arguments of ``demo.py``."""
    p = argparse.ArgumentParser(
        prog="demo.py",
        description="Offline demo: pretrain a small base on digits 0-4, transfer it to "
        "digits 5-9 with a few labelled images through extract.py and fit_head.py, and "
        "compare the heads with a convnet trained from scratch.",
    )
    p.add_argument("--quick", action="store_true", help="a few epochs only, for a smoke test")
    p.add_argument("--root", type=Path, default=Path("."),
                   help="folder holding data/, cache/, models/ and reports/ "
                   "(default: current directory)")
    return p


def check_output(flag: str, value: str | None, *, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, before any expensive work.

    Missing folders on the way are fine (commands create them); what is checked is that
    the nearest existing one takes a new file, by creating and removing one.

    Args:
        flag: the option as the user typed it (``--out``), named in the message.
        value: its value; None (a default decided later) is not checked.
        folder: the option names a folder to write files into, else one file.

    Raises:
        ValueError: a folder where a file is wanted or a file where a folder is, a path
            below a file, or a folder that takes no new file (permission, read-only file
            system, no space, a virtual file system such as /proc).
    """
    if value is None:
        return
    path = Path(value)
    received = f"Received: {flag}={value!r}"
    if not folder and (path.is_dir() or value.endswith(("/", os.sep))):
        raise ValueError(f"`{flag}` must name a file, but {value} is a folder. {received}")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"`{flag}` must name a folder, but {value} is a file. {received}")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"`{flag}` cannot be created: {existing} is a file, not a folder. "
                         f"{received}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
    except OSError as exc:
        why = _CANNOT_CREATE.get(exc.errno, exc.strerror or str(exc))
        raise ValueError(f"`{flag}` cannot be written: no file can be created in {existing} "
                         f"({why}). {received}") from None
    os.close(handle)
    os.unlink(probe)


def _run(prog: str, command: Callable[[], int], *, kept: str | None = None) -> int:
    """Run ``command`` under the Ctrl-C guard and turn its end into an exit code.

    Expected failures print one line ``error: ...`` (2); an interrupt prints one line
    ``<prog>: interrupted by Ctrl-C`` (130; SIGTERM: 143), the exception's own message
    when it has one (what was kept, how to resume), else ``kept`` when given.
    """
    from pipeline.interrupts import Interrupted, guard
    from pipeline.util.log import configure_logging

    configure_logging()
    try:
        with guard():
            return _report_failures(command)
    except KeyboardInterrupt as exc:
        kind = exc if isinstance(exc, Interrupted) else Interrupted()
        line = f"{prog}: interrupted by {kind.signal_name}" + (f"; {kept}" if kept else ".")
        print(str(kind) or line, file=sys.stderr)
        return kind.exit_code


def _report_failures(command: Callable[[], int]) -> int:
    from pipeline.cache import CacheError, CacheLockedError

    try:
        return command()
    except (ValueError, CacheError, CacheLockedError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (traceback above); nothing was marked complete.",
              file=sys.stderr)
        return 1


def extract_main(argv: Sequence[str] | None = None) -> int:
    """``extract.py``: images -> frozen base -> HDF5 cache."""
    args = extract_parser().parse_args(argv)

    def command() -> int:
        check_output("--out", args.out)
        from pipeline.extract import ExtractConfig, run_extract

        options = vars(args)
        merge = options.pop("merge")
        if merge:
            from pipeline.cache import merge_parts

            if not args.out:
                raise ValueError("`--merge` needs `--out FILE.h5`. Received: out=None")
            path = merge_parts(merge, args.out)
            print(f"extract: merged {', '.join(merge)} into {path}.", flush=True)
            return 0
        if not args.data_dir or not args.base:
            raise ValueError("extract needs DATA_DIR and --base (or --merge PARTS). "
                             f"Received: data_dir={args.data_dir!r}, base={args.base!r}")
        config = ExtractConfig(**options)
        result = run_extract(config)
        print(result.summary(), flush=True)
        return 0

    return _run("extract", command, kept=None if args.merge else
                "no cache was written yet. Run the same command again to start.")


def fit_head_main(argv: Sequence[str] | None = None) -> int:
    """``fit_head.py``: cache -> trained head + metrics."""
    args = fit_head_parser().parse_args(argv)
    options = vars(args)
    export = options.pop("export")  # not a FitConfig field: done after the fit

    def command() -> int:
        check_output("--out", args.out, folder=True)
        check_output("--export", export)
        from pipeline.cache import check_cache_exists

        check_cache_exists(args.cache)  # in a fraction of a second, before TensorFlow loads
        from pipeline.fit import FitConfig, format_report, run_fit

        if export is not None:
            from pipeline.export import check_exportable

            check_exportable(args.head)  # before training, not after
        out_dir, metrics = run_fit(FitConfig(**options))
        print(format_report(metrics), flush=True)
        print(
            f"fit_head: done. {args.head}: validation accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}, fit {metrics['fit_seconds']:.2f} s; "
            f"model, metrics.json and config.json in {out_dir}/",
            flush=True,
        )
        if export is not None:
            from pipeline.export import export_model

            path = export_model(out_dir, export)
            print(f"fit_head: exported base + head to {path} (+ {path.with_suffix('.json')})",
                  flush=True)
        return 0

    return _run("fit_head", command)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``predict.py``: model + images -> predictions CSV; or ``--export`` a dense head."""
    args = predict_parser().parse_args(argv)
    options = vars(args)
    export = options.pop("export")

    def command() -> int:
        from pipeline.predict import PredictConfig, predictions_out, run_predict

        if args.images:
            check_output("--out", predictions_out(args.out, args.embeddings))
            check_output("--embeddings", args.embeddings)
        check_output("--export", export)
        from pipeline.export import export_model

        if export is not None:
            path = export_model(args.model, export)
            print(f"predict: exported base + head to {path} (+ {path.with_suffix('.json')})",
                  flush=True)
            if not args.images:
                return 0
        result = run_predict(PredictConfig(**options))
        print(result.summary(), flush=True)
        return 0

    return _run("predict", command)


def export_features_main(argv: Sequence[str] | None = None) -> int:
    """``export_features.py``: cache -> .parquet | .npy | .h5 of its rows."""
    args = export_features_parser().parse_args(argv)

    def command() -> int:
        check_output("OUT", args.out)
        from pipeline.embeddings import ExportConfig, export_features

        result = export_features(ExportConfig(**vars(args)))
        print(result.summary(), flush=True)
        return 0

    return _run("export-features", command)


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``finetune.py``: head folder or cache -> fine-tuned end-to-end model + metrics."""
    args = finetune_parser().parse_args(argv)

    def command() -> int:
        check_output("--out", args.out, folder=True)
        from pipeline.finetune import FinetuneConfig, run_finetune

        out_dir, metrics = run_finetune(FinetuneConfig(**vars(args)))
        print(
            f"finetune: done. validation accuracy {metrics['val_accuracy_before']:.4f} -> "
            f"{metrics['val_accuracy_after']:.4f} after {metrics['epochs_run']} epochs "
            f"({metrics['unfrozen_layers']} layers trained from "
            f"{metrics['first_unfrozen_layer']!r}, fit {metrics['fit_seconds']:.1f} s); "
            f"model.keras, head.json, metrics.json and config.json in {out_dir}/",
            flush=True,
        )
        return 0

    return _run("finetune", command)


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``compare.py``: caches x heads -> leaderboard + report; ``--history`` lists past runs."""
    parser = compare_parser()
    args = parser.parse_args(argv)
    options = vars(args)
    show_history = options.pop("history")
    options["heads"] = [h.strip() for h in args.heads.split(",") if h.strip()]
    options["class_weight"] = None if args.class_weight == "none" else args.class_weight
    if not show_history and not args.caches:
        parser.error("give at least one CACHE.h5 (or --history to list past runs)")

    def command() -> int:
        if show_history:  # no Keras needed: the table prints in a fraction of a second
            from pipeline.compare.history import format_history, read_history

            print(format_history(read_history(args.history_file)), flush=True)
            return 0
        from pipeline.compare import CompareConfig, run_compare
        check_output("--out", args.out, folder=True)
        check_output("--history-file", args.history_file)
        result = run_compare(CompareConfig(**options))
        print(result.summary(), flush=True)
        return 0 if result.leaderboard else 2  # nothing could run: the report says why

    return _run("compare", command)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``demo.py``: the offline digits demo, which runs ``extract.py`` and ``fit_head.py``."""
    args = demo_parser().parse_args(argv)

    def command() -> int:
        from pipeline.demo import run_demo

        result = run_demo(args.root, quick=args.quick, extract=extract_main,
                          fit_head=fit_head_main)
        print(result.summary(), flush=True)
        return 0

    return _run("demo", command)
