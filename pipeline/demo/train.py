"""The demo's two trained convnets: the base pretrained on digits 0-4, and the from-scratch
baseline on the few task images (the same architecture, :func:`build_convnet`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.demo.data import load_split

if TYPE_CHECKING:
    import keras

__all__ = ["pretrain_base", "scratch_convnet"]


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
