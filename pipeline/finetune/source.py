"""Where fine-tuning starts: a fit_head folder with a dense head (warm start) or a cache.

A head folder names its cache, split fraction and seed; the cache must still be the one the
head was trained on, or its train/validation split could not be reproduced. The base file
the features came from (a ``.keras`` base, weights file or preset folder) is found as
predict.py finds it (:func:`pipeline.bases.files.locate_base_file`), so a head folder moved
with its base, or ``--base PATH``, still fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bases.files import locate_base_file
from pipeline.cache import Cache, CacheError, identity_differences, read_cache
from pipeline.finetune.config import FinetuneConfig
from pipeline.heads import DenseHead, load_head
from pipeline.heads.persist import read_head_meta
from pipeline.util.files import read_json

__all__ = ["Start", "resolve_source"]


@dataclass
class Start:
    """What fine-tuning starts from: the cache rows, the split, and (maybe) a trained head."""

    kind: str  # "head" or "cache"
    cache_path: Path
    cache: Cache
    # The cache's attributes with its base file's path where the file is now: what the
    # feature model is rebuilt from (the cache's own attrs keep the recorded paths).
    attrs: dict[str, Any]
    val_split: float
    split_seed: int
    head: DenseHead | None
    # The head's --test-split: its held-out test rows must stay out of fine-tuning too.
    test_split: float = 0.0


def _read_output(path: Path) -> dict[str, Any]:
    """A JSON file of a fit_head output folder; a missing one says what was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {path.parent} a fit_head output folder?")
    return read_json(path)


def resolve_source(config: FinetuneConfig) -> Start:
    """Resolve ``config.source``: a dense-head folder (warm start) or a cache (warm-up).

    Args:
        config: the run's arguments (``source``, and ``cache``, ``val_split``, ``seed``,
            ``base``).

    Returns:
        The cache, where its base file is, how to split it, and the head when the source
        is a head folder.

    Raises:
        ValueError: the source is neither, or its head is not a dense head; the base file
            is found nowhere, or ``--base`` names another file.
        FileNotFoundError: the head folder lacks its files.
        pipeline.cache.CacheError: the cache is missing, incomplete or not the head's.
    """
    source = Path(config.source)
    if source.is_dir():
        head = load_head(source)
        if not isinstance(head, DenseHead):
            kind = read_head_meta(source)["kind"]
            raise ValueError(
                f"Fine-tuning needs a dense head (a Keras model to train with the base); "
                f"{source} holds a {kind!r} head. Train one with fit_head.py --head dense, or "
                f"pass the cache to start from a fresh head. Received: source={str(source)!r}"
            )
        metrics = _read_output(source / "metrics.json")
        fit_config = _read_output(source / "config.json")
        cache_path = Path(config.cache or fit_config["cache"])
        if not cache_path.is_file():
            raise CacheError(
                f"The cache the head in {source} was trained on is not at {cache_path} (paths "
                "are relative to where fit_head ran): pass it with --cache. "
                f"Received: cache={str(cache_path)!r}"
            )
        cache = read_cache(cache_path)
        recorded = metrics["cache_attrs"]
        diffs = identity_differences(recorded, cache.attrs)
        if recorded.get("n_rows") != cache.attrs.get("n_rows"):
            diffs.append(
                f"  n_rows: head has {recorded.get('n_rows')}, cache has "
                f"{cache.attrs.get('n_rows')}"
            )
        if diffs:
            raise CacheError(
                f"{cache_path} is not the cache the head in {source} was trained on, so its "
                "train/validation split cannot be reproduced. Differences:\n"
                + "\n".join(diffs)
                + "\nPass the right one with --cache, or train the head again."
            )
        # Looked for as predict.py looks: relative to the head folder first (fit_head
        # records that path), so a folder moved together with its base still finds it.
        attrs = locate_base_file(cache.attrs, model_dir=source, record=metrics.get("base_file"),
                                 base=config.base, command=f"finetune.py {source} ...")
        return Start(
            "head", cache_path, cache, attrs, float(fit_config["val_split"]),
            int(fit_config["seed"]), head, float(fit_config.get("test_split", 0.0)),
        )
    if source.suffix in (".h5", ".hdf5") or source.is_file():
        cache = read_cache(source)
        # A cache records its base by absolute path only: there, beside the cache, or --base.
        attrs = locate_base_file(cache.attrs, model_dir=source.parent, base=config.base,
                                 command=f"finetune.py {source} ...")
        return Start("cache", source, cache, attrs, config.val_split, config.seed, None)
    raise ValueError(
        "`source` must be a fit_head output folder with a dense head, or a cache .h5 file. "
        f"Received: source={str(source)!r} (not found)"
    )
