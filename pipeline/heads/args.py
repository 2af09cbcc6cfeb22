"""The heads' names and hyper-parameters, checked without importing Keras or scikit-learn,
so that ``fit_head.py`` refuses a bad value before TensorFlow loads (~8 s on 2 cores)."""

from __future__ import annotations

import numpy as np

from pipeline.heads import HEADS

__all__ = ["check_head_args", "check_head_name"]


def check_head_name(name: str) -> None:
    """Raise a Keras-style ValueError for a head that is not one of ``HEADS``."""
    if name not in HEADS:
        raise ValueError(f"Unknown head. Expected one of {HEADS}. Received: head={name!r}")


def check_head_args(
    *,
    C: float = 1.0,
    class_weight: str | None,
    epochs: int,
    lr: float,
    batch_size: int,
    patience: int,
    hidden: int = 256,
    dropout: float = 0.5,
    k: int = 5,
    max_iter: int | None = None,
) -> None:
    """Raise a Keras-style ValueError for the first invalid head argument."""
    if not C > 0:  # also rejects NaN
        raise ValueError(f"`C` must be a positive number. Received: C={C}")
    if class_weight not in (None, "balanced"):
        raise ValueError(
            f"`class_weight` must be None or 'balanced'. Received: class_weight={class_weight!r}"
        )
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    if not lr > 0:
        raise ValueError(f"`lr` must be a positive number. Received: lr={lr}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}"
        )
    if not isinstance(patience, (int, np.integer)) or patience < 0:
        raise ValueError(f"`patience` must be an integer >= 0. Received: patience={patience!r}")
    if not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ValueError(f"`hidden` must be an integer >= 1. Received: hidden={hidden!r}")
    if not 0 <= dropout < 1:  # also rejects NaN
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1. Received: k={k!r}")
    if max_iter is not None and (not isinstance(max_iter, (int, np.integer)) or max_iter < 1):
        raise ValueError(f"`max_iter` must be an integer >= 1. Received: max_iter={max_iter!r}")
