"""The dense head's training curve as a PNG: loss and accuracy per epoch, best epoch marked.

Drawn with matplotlib's object API (``Figure``, no pyplot), as compare's report does: it
renders with Agg and needs no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.util.files import replace_atomically

__all__ = ["TRAINING_CURVE", "plot_training_curve"]

TRAINING_CURVE = "training_curve.png"


def plot_training_curve(
    history: dict[str, list[float]], best_epoch: int | None, path: str | Path
) -> Path:
    """Write loss (left) and accuracy (right) against the epoch, training and validation.

    Args:
        history: per-epoch ``loss``, ``accuracy`` and, with validation rows, ``val_loss``
            and ``val_accuracy`` (a DenseHead's ``history_``).
        best_epoch: the 1-based epoch whose weights the model keeps (a dashed line and the
            legend say so); None draws no mark.
        path: the PNG to write (atomically).

    Returns:
        ``path``.

    Raises:
        ValueError: ``history`` holds no epoch.
    """
    from matplotlib.figure import Figure

    epochs = range(1, len(history.get("loss", [])) + 1)
    if not epochs:
        raise ValueError("The training history holds no epoch: nothing to plot.")
    fig = Figure(figsize=(9.0, 3.6), dpi=100, layout="constrained")
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy"),
                                 strict=True):
        _curves(ax, history, metric, epochs)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="#54a24b", linestyle="--",
                       label=f"kept: epoch {best_epoch} (lowest val loss)")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(path)
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def _curves(ax: Any, history: dict[str, list[float]], metric: str, epochs: range) -> None:
    for key, label, color in ((metric, "training", "#4c78a8"),
                              (f"val_{metric}", "validation", "#f58518")):
        if history.get(key):
            ax.plot(epochs, history[key], color=color, label=label,
                    marker="o" if len(epochs) < 30 else None, markersize=3)
