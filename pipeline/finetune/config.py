"""What a finetune run is asked: ``FinetuneConfig``, checked before any file is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.augment import AugmentSpec

__all__ = ["FinetuneConfig", "check_config"]


@dataclass
class FinetuneConfig:
    """Arguments of the finetune command, written as ``config.json`` beside the model."""

    source: str  # a fit_head folder with a dense head, or a cache .h5 (warm-up first)
    unfreeze_from: str | None = None
    unfreeze_top_blocks: int | str | None = None  # N, or "all"
    out: str | None = None  # default: models/<head dir name | cache stem>-finetuned
    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 32
    patience: int = 5
    augment_flip: str = "horizontal"  # "none" where mirrored images mean something else
    warmup_epochs: int = 50  # only when starting from a cache
    val_split: float = 0.2  # only when starting from a cache; a head dir records its own
    seed: int = 0
    cache: str | None = None  # default: the cache the head recorded
    data_dir: str | None = None  # default: the folder the cache recorded
    base: str | None = None  # where the base file is now, if it moved (same sha256)


def check_config(config: FinetuneConfig) -> None:
    """Check every argument that needs no file, before anything is read or built.

    Args:
        config: the arguments to check.

    Raises:
        ValueError: Keras-style, for the first invalid argument.
    """
    chosen = [config.unfreeze_from is not None, config.unfreeze_top_blocks is not None]
    if all(chosen) or not any(chosen):
        raise ValueError(
            "Pass exactly one of `unfreeze_from` (a layer name) and `unfreeze_top_blocks` "
            f"(N or 'all'). Received: unfreeze_from={config.unfreeze_from!r}, "
            f"unfreeze_top_blocks={config.unfreeze_top_blocks!r}"
        )
    blocks = config.unfreeze_top_blocks
    if (
        blocks is not None
        and blocks != "all"
        and (isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1)
    ):
        raise ValueError(
            f"`unfreeze_top_blocks` must be an integer >= 1 or 'all'. "
            f"Received: unfreeze_top_blocks={blocks!r}"
        )
    for name in ("epochs", "batch_size", "warmup_epochs"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    if not isinstance(config.patience, (int, np.integer)) or config.patience < 0:
        raise ValueError(
            f"`patience` must be an integer >= 0. Received: patience={config.patience!r}"
        )
    if not config.lr >= 0:  # also rejects NaN; 0 is allowed (a dry run: nothing moves)
        raise ValueError(f"`lr` must be >= 0. Received: lr={config.lr}")
    AugmentSpec(flip=config.augment_flip)  # raises for an unknown flip
