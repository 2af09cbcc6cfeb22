"""Argparse for every command; ``scripts/*.py``, ``bottleneck <command>`` and the console
scripts call into here.

Each ``*_main`` returns an exit code: 0 on success, 2 for a bad argument, input or cache
(one clear message, no traceback), 130 on Ctrl-C and 143 on SIGTERM (one line saying what
was kept; extract resumes). Ctrl-C is handled by :func:`pipeline.interrupts.guard`, so it
stops the command wherever it lands, even during library imports or model building.

Nothing here imports Keras: ``--help`` and argument errors answer in a fraction of a second.
A library error names a parameter as Python spells it (``input_size``); the command line
reports it as the flag the user typed (``--input-size``, :func:`_as_typed`).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from pipeline.augment import FLIPS
from pipeline.bases.registry import JIT_MODES, POOLINGS, PRECISIONS, PREPROCESS_MODES
from pipeline.extract.config import COMPRESSIONS, DTYPES, ENGINES, FOLD_MODES
from pipeline.heads import HEADS
from pipeline.images.batches import DECODERS
from pipeline.images.decode import INTERPOLATIONS, JPEG_DOWNSCALES

__all__ = [
    "check_output",
    "compare_main",
    "demo_main",
    "export_features_main",
    "extract_main",
    "finetune_main",
    "fit_head_main",
    "main",
    "predict_main",
]

CLASS_WEIGHTS = ("none", "balanced")


class UsageError(Exception):
    """A command line argparse cannot read (the message names the flag as typed)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in`: a default of 0 equals False but is worth showing
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of exiting, with messages in the project's form:
    the flag as typed, the value received and what is allowed."""

    def __init__(self, *, description: str, **kwargs) -> None:
        # Filled here because the formatter keeps the examples' lines as written.
        super().__init__(description=textwrap.fill(description, 88),
                         formatter_class=_HelpFormatter, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and action.default is not None:
            action.help = "(default: %(default)s)"  # argparse shows no line for no help
        return action

    def _synopsis(self) -> str:
        positionals = [_flag_of(a) for a in self._actions if not a.option_strings]
        return " ".join([self.prog, *positionals, "[options]"])

    def short_usage(self) -> str:
        """``usage:`` in one line: the positionals and where the options are explained."""
        return f"usage: {self._synopsis()}   ({self.prog} --help: every option)"

    def format_help(self) -> str:
        # One usage line; the options are listed, with their choices, right below it.
        self.usage = self.usage or self._synopsis()
        return super().format_help()

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            flag = _flag_of(action)
            allowed = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(
                None, f"`{flag}` must be one of {allowed}. Received: {flag}={value!r}")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(_readable(self, message))


_NOT_A_NUMBER = re.compile(r"^argument (?P<flag>[^:/ ]+)\S*: invalid (?P<kind>int|float) "
                           r"value: (?P<value>.*)$")


def _readable(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's own messages, said the way the rest of the project says them."""
    number = _NOT_A_NUMBER.match(message)
    if number:
        kind = "an integer" if number["kind"] == "int" else "a number"
        return (f"`{number['flag']}` must be {kind}. "
                f"Received: {number['flag']}={number['value']}")
    if message.startswith("unrecognized arguments: "):
        known = [flag for action in parser._actions for flag in action.option_strings]
        for word in message.split(": ", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0].replace("_", "-"), known, 1)
            if word.startswith("-") and close:
                return f"{message}. Did you mean {close[0]}?"
    return message


def _flag_of(action: argparse.Action) -> str:
    """How the user writes an argument: its long option, or the positional's name in
    ``usage:``."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return name.split("|")[0]


def _as_typed(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message with its parameter names (``input_size``) as the flags of this
    command (``--input-size``): in backticks, and as ``name=`` after ``Received:``."""
    flags = {action.dest: _flag_of(action) for action in parser._actions
             if action.dest != "help"}

    def flag(match: re.Match) -> str:
        return match.group(0).replace(match["name"], flags.get(match["name"], match["name"]), 1)

    message = re.sub(r"`(?P<name>\w+)`", flag, message)
    head, received, tail = message.partition("Received: ")
    return head + received + re.sub(r"(?<![\w-])(?P<name>\w+)=", flag, tail)


def _examples(prog: str, lines: Sequence[str]) -> str:
    """The example commands that end ``--help``, written for the command as it was run."""
    return "examples:\n" + "\n".join(f"  {prog} {line}" for line in lines)


# Two or three commands each; those on data/, cache/ and models/ work after `make demo`.
_EXAMPLES = {
    "extract": [
        "data/digits/task --base mobilenetv2 --weights none --input-size 32",
        "data/digits/task --base models/demo-digits04-base.keras --layer top_conv "
        "--pooling flatten --out cache/digits.h5",
        "photos/ --base resnet50 --batch-size 256 --decode processes   # a GPU box",
    ],
    "fit_head": [
        "cache/demo-digits59.h5 --head logreg --out models/digits-logreg",
        "cache/demo-digits59.h5 --head dense --epochs 50 --out models/digits-dense",
        "cache/demo-digits59.h5 --head svm --C 10 --class-weight balanced --out models/digits-svm",
    ],
    "predict": [
        "models/demo-digits59-logreg data/digits/task --out predictions.csv",
        "models/demo-digits59-dense data/digits/task --top-k 3 --embeddings features.parquet",
        "models/demo-digits59-dense --export digits.keras",
    ],
    "export_features": [
        "cache/demo-digits59.h5 digits.parquet",
        "cache/demo-digits59.h5 train.npy --split train",
    ],
    "finetune": [
        "models/demo-digits59-dense --unfreeze-top-blocks 1 --epochs 10",
        "cache/demo-digits59.h5 --unfreeze-from top_conv --out models/digits-finetuned",
    ],
    "compare": [
        "cache/demo-digits59.h5 --heads logreg,svm,knn",
        "cache/a.h5 cache/b.h5 --sweep --n-jobs -1",
        "--history",
    ],
    "demo": ["", "--quick"],
}


def _parse(parser: argparse.ArgumentParser,
           argv: Sequence[str] | None) -> argparse.Namespace | None:
    """Parsed arguments, or None after printing usage and one ``error:`` line."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        print(parser.short_usage(), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return None


def _invoked_as(script: str, command: str) -> str:
    """The name ``usage:`` shows: the script or console script that was run."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in (script, f"bottleneck-{command}") else script


def extract_parser(prog: str = "extract.py") -> argparse.ArgumentParser:
    """Arguments of ``extract.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["extract"]),
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
    p.add_argument("--pooling", default="avg", choices=POOLINGS,
                   help="feature maps: flatten | avg | max | none; transformer tokens "
                   "(keras-hub bases): cls | mean (patch tokens; avg is the same) | max | "
                   "cls+mean (DINOv2's linear probe) | flatten | none (default: avg)")
    p.add_argument("--preprocess", default=None, choices=PREPROCESS_MODES,
                   help="for .keras bases (default: none; named bases use their own)")
    p.add_argument("--interpolation", default="bilinear", type=str.lower,
                   choices=INTERPOLATIONS, help="resize method, as Keras names it")
    p.add_argument("--jpeg-downscale", default="off", choices=JPEG_DOWNSCALES,
                   help="off (default): every JPEG decoded at full size, Keras' pixels; dct: "
                   "a JPEG >= 2x the input size on both sides is decoded at 1/2, 1/4 or 1/8 "
                   "scale by libjpeg-turbo in the DCT domain, then resized: decode + resize "
                   "1.1x faster for 500x375 photos at 96 px, 1.5-1.7x for 2000x1500 ones; "
                   "pixels differ from Keras' by 1.6-5.3 levels on average "
                   "(docs/performance.md). Recorded in the cache: predict and finetune "
                   "decode new images the same way")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored features")
    p.add_argument("--compression", default="none", choices=COMPRESSIONS,
                   help="HDF5 compression (lossless)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="the Keras dtype policy the base runs in; features are stored as "
                   "--dtype either way. mixed_bfloat16 ran 1.3-1.8x faster than float32 on "
                   "a 2-core CPU with AVX512_BF16 (features ~0.5-1%% off; "
                   "docs/performance.md); mixed_float16 is for NVIDIA GPUs")
    p.add_argument("--mixed-precision", action="store_true",
                   help="the same as --precision mixed_float16 (GPU)")
    p.add_argument("--jit", default="auto", choices=JIT_MODES,
                   help="XLA for the forward pass (auto: Keras' choice)")
    p.add_argument("--fold-batchnorm", default="on", choices=FOLD_MODES,
                   help="on: fold the frozen base's BatchNormalization into the convolution "
                   "before it, once at build time; on a 2-core CPU the forward pass gives "
                   "x1.4 the img/s for MobileNetV2, x1.2 EfficientNetB0, x1.13 ResNet50, and "
                   "features equal the plain pass up to float rounding (under 1e-6 of their "
                   "scale); off: the plain pass, bit for bit. Recorded in the cache: predict "
                   "uses the same")
    p.add_argument("--out", default=None, help="cache file (default: cache/<data>-<base>-...h5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0,
                   help="decode workers (0: auto, one per core but one, at most 8 threads); "
                   "with --engine ray: model actors (0: one per --gpus-per-worker GPUs of the "
                   "cluster, or one per node without GPUs)")
    p.add_argument("--decode", default="auto", choices=DECODERS,
                   help="how files are decoded in parallel; the "
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
    p.add_argument("--engine", default="local", choices=ENGINES,
                   help="local: this process; ray: Ray Data on a Ray cluster (docs/scale.md)")
    p.add_argument("--address", default=None,
                   help="--engine ray: the cluster, auto | ray://HOST:10001 (default: start "
                   "a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs per model actor (default 0: CPU; 0.5 shares a GPU)")
    p.add_argument("--augment", type=int, default=0, metavar="K",
                   help="also store K seeded augmented passes of every training image")
    p.add_argument("--augment-flip", default="horizontal", choices=FLIPS,
                   help="random flips of the augmented copies")
    p.add_argument("--augment-rotation", type=float, default=0.05,
                   help="max rotation, fraction of a turn (0.05 = 18 degrees)")
    p.add_argument("--augment-zoom", type=float, default=0.1, help="max zoom, fraction")
    p.add_argument("--augment-translation", type=float, default=0.1,
                   help="max shift, fraction of the side")
    return p


def fit_head_parser(prog: str = "fit_head.py") -> argparse.ArgumentParser:
    """Arguments of ``fit_head.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["fit_head"]),
        description="Train a classifier head on a feature cache and write model + metrics.",
    )
    p.add_argument("cache", help="an .h5 cache written by extract.py")
    p.add_argument("--head", default="logreg", choices=HEADS,
                   help="dense: a Keras MLP; the others scikit-learn (svm: RBF kernel)")
    p.add_argument("--out", default=None, help="output folder (default: models/<cache>-<head>)")
    p.add_argument("--val-split", type=float, default=0.2,
                   help="validation fraction when the cache records no split")
    p.add_argument("--test-split", type=float, default=0.0,
                   help="hold out this fraction of all rows as a test set, before the "
                   "validation split (stratified, seeded; rows in test_rows.csv); refused when "
                   "the cache records a test split, which is then the test set")
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
    p.add_argument("--class-weight", default="none", choices=CLASS_WEIGHTS,
                   help="balanced: weight classes inversely to their frequency")
    p.add_argument("--use-augmented", action="store_true",
                   help="train on originals + augmented copies (extract --augment K)")
    p.add_argument("--layer", default=None,
                   help="which stored layer to train on (extract --layer a,b,c; default: first)")
    p.add_argument("--stream", action="store_true",
                   help="out of core: read features from HDF5 in batches (dense, logreg and "
                   "linear-svm; the linear heads become SGD, at most 10 passes)")
    p.add_argument("--export", default=None, metavar="FILE.keras|DIR|FILE.zip",
                   help="also save base + head to predict on another machine: FILE.keras "
                   "(+ FILE.json), one end-to-end model (dense head), or DIR or FILE.zip "
                   "(any head)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model in --out trained with other settings (without it, "
                   "such a run stops before training; the same settings again replace it)")
    return p


def predict_parser(prog: str = "predict.py") -> argparse.ArgumentParser:
    """Arguments of ``predict.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["predict"]),
        description="Predict the class of images with a fit_head or finetune model, using the "
        "base, size and preprocessing recorded with it; score it on labelled images "
        "(--evaluate); or export it with its base, to predict on another machine.",
    )
    p.add_argument("model", help="fit_head/finetune output folder, or an export: FILE.keras, "
                   "DIR or FILE.zip")
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
    p.add_argument("--export", default=None, metavar="FILE.keras|DIR|FILE.zip",
                   help="save the model with its frozen base, to predict on another machine: "
                   "FILE.keras (+ FILE.json), one end-to-end model (dense heads), or DIR or "
                   "FILE.zip, which predict.py loads (any head); no images needed")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="where the model's base file (.keras base, weights file, keras-hub "
                   "preset folder) is now, if it moved; must be the same file (sha256)")
    p.add_argument("--evaluate", action="store_true",
                   help="IMAGES is one labelled folder (a folder per class) or a .csv "
                   "manifest (path,label): print accuracy, macro-F1 and the confusion "
                   "matrix; write <out stem>.misclassified.csv and <out stem>.metrics.json")
    return p


def export_features_parser(prog: str = "export_features.py") -> argparse.ArgumentParser:
    """Arguments of ``export_features.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["export_features"]),
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


def finetune_parser(prog: str = "finetune.py") -> argparse.ArgumentParser:
    """Arguments of ``finetune.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["finetune"]),
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
    p.add_argument("--augment-flip", default="horizontal", choices=FLIPS,
                   help="random flips of the training images")
    p.add_argument("--warmup-epochs", type=int, default=50,
                   help="with a cache: epochs of the fresh head on the cached features")
    p.add_argument("--val-split", type=float, default=0.2,
                   help="with a cache that records no split (a head folder records its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="the head's cache (default: as recorded)")
    p.add_argument("--data-dir", default=None,
                   help="where the images are now (default: as the cache recorded)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="where the base file (.keras base, weights file, keras-hub preset "
                   "folder) is now, if it moved; must be the same file (sha256)")
    return p


def _blocks(value: str) -> int | str:
    """``--unfreeze-top-blocks``: an integer or 'all' (range checked against the base)."""
    if value.strip().lower() == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or 'all', got {value!r}") from None


def compare_parser(prog: str = "compare.py") -> argparse.ArgumentParser:
    """Arguments of ``compare.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["compare"]),
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
    p.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="none",
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


def demo_parser(prog: str = "demo.py") -> argparse.ArgumentParser:
    """Arguments of ``demo.py`` (``prog``: the command as it was run, for ``usage:``)."""
    p = _Parser(
        prog=prog,
        epilog=_examples(prog, _EXAMPLES["demo"]),
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


def _load_backend() -> None:
    """Keras and its backend, without TensorFlow's start-up lines (pipeline/util/quiet.py)."""
    from pipeline.util.quiet import load_backend

    load_backend()


def _run(prog: str, command: Callable[[], int], parser: argparse.ArgumentParser, *,
         kept: str | None = None) -> int:
    """Run ``command`` under the Ctrl-C guard and turn its end into an exit code.

    Expected failures print one line ``error: ...`` naming the flags of ``parser`` as typed
    (2); an interrupt prints one line
    ``<prog>: interrupted by Ctrl-C`` (130; SIGTERM: 143), the exception's own message
    when it has one (what was kept, how to resume), else ``kept`` when given.
    """
    from pipeline.interrupts import Interrupted, guard
    from pipeline.util.log import configure_logging

    configure_logging()
    try:
        with guard():
            return _report_failures(command, parser)
    except KeyboardInterrupt as exc:
        kind = exc if isinstance(exc, Interrupted) else Interrupted()
        line = f"{prog}: interrupted by {kind.signal_name}" + (f"; {kept}" if kept else ".")
        print(str(kind) or line, file=sys.stderr)
        return kind.exit_code


def _report_failures(command: Callable[[], int], parser: argparse.ArgumentParser) -> int:
    from pipeline.cache import CacheError, CacheLockedError

    try:
        return command()
    except (ValueError, CacheError, CacheLockedError, FileNotFoundError) as exc:
        print(f"error: {_as_typed(str(exc), parser)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (traceback above); nothing was marked complete.",
              file=sys.stderr)
        return 1


def extract_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``extract.py``: images -> frozen base -> HDF5 cache."""
    parser = extract_parser(prog or _invoked_as("extract.py", "extract"))
    args = _parse(parser, argv)
    if args is None:
        return 2

    def command() -> int:
        check_output("--out", args.out)
        from pipeline.extract import ExtractConfig, run_extract
        from pipeline.extract.config import validate

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
        validate(config)  # every argument, before Keras loads
        _load_backend()
        result = run_extract(config)
        print(result.summary(), flush=True)
        return 0

    return _run("extract", command, parser, kept=None if args.merge else
                "no cache was written yet. Run the same command again to start.")


def fit_head_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``fit_head.py``: cache -> trained head + metrics."""
    parser = fit_head_parser(prog or _invoked_as("fit_head.py", "fit-head"))
    args = _parse(parser, argv)
    if args is None:
        return 2
    options = vars(args)
    export = options.pop("export")  # not a FitConfig field: done after the fit
    options["class_weight"] = None if args.class_weight == "none" else args.class_weight

    def command() -> int:
        check_output("--out", args.out, folder=True)
        from pipeline.export import export_is_folder

        check_output("--export", export, folder=export_is_folder(export))
        from pipeline.cache import check_cache_exists

        check_cache_exists(args.cache)  # in a fraction of a second, before TensorFlow loads
        from pipeline.fit import FitConfig, check_fit_config

        config = FitConfig(**options)
        check_fit_config(config)  # every argument, and --out's model, before Keras loads
        if export is not None:
            from pipeline.export import check_exportable

            check_exportable(args.head, export)  # before training, not after
        _load_backend()
        from pipeline.fit import format_done, format_report, run_fit

        out_dir, metrics = run_fit(config)
        print(format_report(metrics), flush=True)
        print(format_done(metrics, out_dir), flush=True)
        if export is not None:
            from pipeline.export import export_model, exported_files

            path = export_model(out_dir, export)
            print(f"fit_head: exported base + head to {exported_files(path)}", flush=True)
        return 0

    return _run("fit_head", command, parser)


def predict_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``predict.py``: model + images -> predictions CSV; or ``--export`` a dense head."""
    parser = predict_parser(prog or _invoked_as("predict.py", "predict"))
    args = _parse(parser, argv)
    if args is None:
        return 2
    options = vars(args)
    export = options.pop("export")

    def command() -> int:
        from pipeline.predict import PredictConfig, predictions_out, run_predict

        if args.images:
            check_output("--out", predictions_out(args.out, args.embeddings, args.evaluate))
            check_output("--embeddings", args.embeddings)
        from pipeline.export import export_is_folder, export_model, exported_files

        check_output("--export", export, folder=export_is_folder(export))

        if export is not None:
            _load_backend()
            path = export_model(args.model, export, base=args.base)
            print(f"predict: exported base + head to {exported_files(path)}", flush=True)
            if not args.images:
                return 0
        result = run_predict(PredictConfig(**options))
        if result.evaluation is not None:
            from pipeline.evaluation import format_evaluation

            print(format_evaluation(result.evaluation), flush=True)
        print(result.summary(), flush=True)
        return 0

    return _run("predict", command, parser)


def export_features_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``export_features.py``: cache -> .parquet | .npy | .h5 of its rows."""
    parser = export_features_parser(prog or _invoked_as("export_features.py", "export-features"))
    args = _parse(parser, argv)
    if args is None:
        return 2

    def command() -> int:
        check_output("OUT", args.out)
        from pipeline.embeddings import ExportConfig, export_features

        result = export_features(ExportConfig(**vars(args)))
        print(result.summary(), flush=True)
        return 0

    return _run("export-features", command, parser)


def finetune_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``finetune.py``: head folder or cache -> fine-tuned end-to-end model + metrics."""
    parser = finetune_parser(prog or _invoked_as("finetune.py", "finetune"))
    args = _parse(parser, argv)
    if args is None:
        return 2

    def command() -> int:
        check_output("--out", args.out, folder=True)
        from pipeline.finetune import FinetuneConfig, check_config

        config = FinetuneConfig(**vars(args))
        check_config(config)  # before Keras loads
        _load_backend()
        from pipeline.finetune import run_finetune

        out_dir, metrics = run_finetune(config)
        print(
            f"finetune: done. validation accuracy {metrics['val_accuracy_before']:.4f} -> "
            f"{metrics['val_accuracy_after']:.4f} after {metrics['epochs_run']} epochs "
            f"({metrics['unfrozen_layers']} layers trained from "
            f"{metrics['first_unfrozen_layer']!r}, fit {metrics['fit_seconds']:.1f} s); "
            f"model.keras, head.json, metrics.json and config.json in {out_dir}/",
            flush=True,
        )
        return 0

    return _run("finetune", command, parser)


def compare_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``compare.py``: caches x heads -> leaderboard + report; ``--history`` lists past runs."""
    parser = compare_parser(prog or _invoked_as("compare.py", "compare"))
    args = _parse(parser, argv)
    if args is None:
        return 2
    options = vars(args)
    show_history = options.pop("history")
    options["heads"] = [h.strip() for h in args.heads.split(",") if h.strip()]
    options["class_weight"] = None if args.class_weight == "none" else args.class_weight
    if not show_history and not args.caches:
        print(parser.short_usage(), file=sys.stderr)
        print("error: give at least one CACHE.h5 (or --history to list past runs)",
              file=sys.stderr)
        return 2

    def command() -> int:
        if show_history:  # no Keras needed: the table prints in a fraction of a second
            from pipeline.compare.history import format_history, read_history

            print(format_history(read_history(args.history_file)), flush=True)
            return 0
        check_output("--out", args.out, folder=True)
        check_output("--history-file", args.history_file)
        from pipeline.compare.config import CompareConfig, check_config

        config = CompareConfig(**options)
        check_config(config)  # before Keras loads
        _load_backend()
        from pipeline.compare import run_compare

        result = run_compare(config)
        print(result.summary(), flush=True)
        return 0 if result.leaderboard else 2  # nothing could run: the report says why

    return _run("compare", command, parser)


def demo_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``demo.py``: the offline digits demo, which runs ``extract.py`` and ``fit_head.py``."""
    parser = demo_parser(prog or _invoked_as("demo.py", "demo"))
    args = _parse(parser, argv)
    if args is None:
        return 2

    def command() -> int:
        _load_backend()
        from pipeline.demo import run_demo

        result = run_demo(args.root, quick=args.quick, extract=extract_main,
                          fit_head=fit_head_main)
        print(result.summary(), flush=True)
        return 0

    return _run("demo", command, parser)


# `bottleneck <command>`: each command's main, and what it does in a few words.
COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "extract": (extract_main, "images -> frozen base -> HDF5 feature cache"),
    "fit": (fit_head_main, "cache -> trained head (dense, logreg, SVM, kNN) + metrics"),
    "compare": (compare_main, "caches x heads -> leaderboard + HTML report"),
    "predict": (predict_main, "model + images -> predictions CSV (or --export one model)"),
    "finetune": (finetune_main, "unfreeze the top of the base and train it with the head"),
    "export-features": (export_features_main, "cache -> .parquet | .npy | .h5 of its rows"),
    "demo": (demo_main, "the offline digits demo: extract, fit and compare end to end"),
}
# The script names work as commands too (`bottleneck fit-head` as `bottleneck fit`).
_ALIASES = {"fit-head": "fit", "fit_head": "fit", "export_features": "export-features"}


def version() -> str:
    """This package's version and those of the libraries its results depend on."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    from pipeline import __version__

    py = ".".join(map(str, sys.version_info[:3]))
    return (f"bottleneck {__version__} (Keras {installed('keras')}, TensorFlow "
            f"{installed('tensorflow')}, scikit-learn {installed('scikit-learn')}, Python {py})")


def _overview(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)",
             "", "Bottleneck features for image transfer learning: run every image once "
             "through a frozen", "base into an HDF5 cache, then train and compare heads on "
             "it in seconds.", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit",
              "  --version   show the version and exit", "",
              "examples (after `make demo`):",
              f"  {prog} extract data/digits/task --base mobilenetv2 --weights none "
              "--input-size 32",
              f"  {prog} fit cache/task-mobilenetv2-32x32-top-random-avg.h5 --head logreg",
              f"  {prog} predict models/demo-digits59-logreg data/digits/task"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "bottleneck") -> int:
    """``bottleneck <command> ...``: one entry point for every command (``prog``: how it
    was run, for ``usage:``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_overview(prog))
        return 0
    if argv and argv[0] == "--version":
        print(version())
        return 0
    if not argv:
        print(_overview(prog), file=sys.stderr)
        print("error: name a command.", file=sys.stderr)
        return 2
    name = _ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), 1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"usage: {prog} <command> [options]", file=sys.stderr)
        print(f"error: unknown command.{hint} Choose from {', '.join(COMMANDS)}. "
              f"Received: {argv[0]!r}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[name]
    return command(argv[1:], prog=f"{prog} {name}")
