"""What ``fit_head`` was asked, checked before anything heavy loads.

Only the standard library and NumPy here: a bad value, an unsupported ``--stream`` head or a
model folder trained with other settings is refused in a fraction of a second, before
TensorFlow and scikit-learn load (~8 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.heads import STREAM_HEADS
from pipeline.heads.args import check_head_args, check_head_name

__all__ = ["FitConfig", "check_fit_config", "check_fractions", "default_out"]


@dataclass
class FitConfig:
    """Arguments of the fit-head command, written as ``config.json`` beside the model."""

    cache: str
    head: str = "logreg"
    out: str | None = None  # default: models/<cache file stem>-<head>
    val_split: float = 0.2
    test_split: float = 0.0  # held-out test fraction of all rows, when the cache records none
    seed: int = 0
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    C: float = 1.0
    class_weight: str | None = None
    patience: int = 10
    use_augmented: bool = False
    stream: bool = False
    layer: str | None = None
    hidden: int = 256  # dense head
    dropout: float = 0.5  # dense head
    k: int = 5  # knn head
    max_iter: int | None = None  # logreg (default 2000), linear-svm (default 1000)
    overwrite: bool = False  # replace a model in ``out`` trained with other settings


def default_out(config: FitConfig) -> Path:
    """The model folder: ``--out``, else ``models/<cache file stem>-<head>``."""
    if config.out:
        return Path(config.out)
    return Path("models") / f"{Path(config.cache).stem}-{config.head}"


def check_fit_config(config: FitConfig) -> Path:
    """Check every argument of ``config``; return the model folder it writes.

    Raises:
        ValueError: the first bad argument, named as the flag is typed where the message
            comes from here, else by its field name (the CLI says it as the flag).
    """
    check_head_name(config.head)
    check_fractions(config.val_split, config.test_split)
    check_head_args(C=config.C, class_weight=config.class_weight, epochs=config.epochs,
                    lr=config.lr, batch_size=config.batch_size, patience=config.patience,
                    hidden=config.hidden, dropout=config.dropout, k=config.k,
                    max_iter=config.max_iter)
    _check_stream(config)
    out_dir = default_out(config)
    _check_overwrite(config, out_dir)
    return out_dir


def check_fractions(val_split: float, test_split: float = 0.0) -> None:
    """Refuse validation and test fractions that leave no row to train on."""
    if not 0 < val_split < 1:  # also rejects NaN
        raise ValueError(
            f"`val_split` must be between 0 and 1, exclusive. Received: val_split={val_split}"
        )
    if not 0 <= test_split < 1:
        raise ValueError(
            f"`--test-split` must be at least 0 and below 1. Received: --test-split={test_split}"
        )
    if val_split + test_split >= 1:
        raise ValueError(
            "`--val-split` + `--test-split` must be below 1, or no row is left to train on. "
            f"Received: --val-split={val_split}, --test-split={test_split}"
        )


def _check_overwrite(config: FitConfig, out_dir: Path) -> None:
    """Refuse to replace a model trained with other settings, unless asked to.

    Why: ``--head logreg`` then ``--head logreg --C 0.01`` both default to
    ``models/<cache>-logreg/``; the second run silently replaced the first. The same
    settings again (a re-run) replace it as before.

    Raises:
        ValueError: ``out_dir`` holds a model whose config.json differs.
    """
    if config.overwrite or not (out_dir / "config.json").is_file():
        return
    try:
        before = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a model this command wrote: save_head judges the folder
    now = dataclasses.asdict(config)
    # A setting added after that model was trained reads as its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    before = {key: before.get(key, defaults[key]) for key in now}
    differs = [f"--{key.replace('_', '-')} {before[key]!r} -> {now[key]!r}"
               for key in now if key not in ("out", "overwrite") and before[key] != now[key]]
    if differs:
        raise ValueError(
            f"{out_dir} already holds a model trained with other settings "
            f"({'; '.join(differs)}). Pass --out to keep both, or --overwrite to replace it. "
            f"Received: out={str(out_dir)!r}"
        )


def _check_stream(config: FitConfig) -> None:
    """Refuse ``--stream`` with a head or option it does not support."""
    if config.stream and config.head not in STREAM_HEADS:
        raise ValueError(
            f"`stream` supports the heads {STREAM_HEADS} (RBF SVMs need all rows in memory). "
            f"Received: head={config.head!r}"
        )
    if config.stream and config.use_augmented:
        raise ValueError("`stream` and `use_augmented` cannot be combined yet. "
                         "Received: stream=True, use_augmented=True")
