"""``run_finetune``: the fine-tuning protocol, from a head folder or a cache to a saved model."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.bases import FeatureModel, feature_model_from_attrs
from pipeline.bases.combine import end_to_end_model
from pipeline.cache import Cache, recorded_jpeg_downscale
from pipeline.finetune.config import FinetuneConfig, check_config
from pipeline.finetune.data import Split, part_datasets, split_images
from pipeline.finetune.model import (
    MOMENTUM,
    evaluate,
    set_trainable,
    training_model,
    unfreeze_start,
)
from pipeline.finetune.source import Start, resolve_source
from pipeline.heads import DenseHead, make_head
from pipeline.heads.persist import END_TO_END, head_meta, write_head_meta
from pipeline.progress import format_duration
from pipeline.util.files import replace_atomically, write_json_atomic

__all__ = ["run_finetune"]

log = logging.getLogger(__name__)


def run_finetune(config: FinetuneConfig) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the top of the base together with a dense head on the images.

    Protocol:
        1. Validate the arguments (exactly one of ``unfreeze_from``/``unfreeze_top_blocks``).
        2. Resolve the source: a fit_head folder with a dense head (warm start; its
           cache, ``val_split``, ``test_split`` and ``seed`` are read from its config.json,
           and the cache must still be the one it was trained on), or a cache.
        3. Split rows exactly as fit_head did (:func:`pipeline.fit.split_rows`), so the
           validation images are never trained on; check every image is still there.
        4. Rebuild the feature model from the cache attributes
           (:func:`pipeline.bases.feature_model_from_attrs`): same base, weights, layer,
           pooling, input size and preprocessing; a base file (``.keras``, weights, preset
           folder) is taken from where it is now, found as predict.py finds it (relative
           to the head folder, as recorded, beside it, or ``--base``; same sha256).
        5. Unfreeze from ``unfreeze_from``, or from the start of the top
           ``unfreeze_top_blocks`` blocks (:func:`unfreeze_start`, :func:`set_trainable`):
           everything below stays frozen, BatchNormalization stays frozen and in inference
           mode everywhere. A bad layer or block count fails here, before any training.
        6. From a cache, warm up a fresh dense head on the cached features (the base's
           frozen outputs) for ``warmup_epochs``, early-stopped on validation loss.
        7. Score the validation (and test) images with base + head: loss and accuracy
           "before".
        8. Compile (SGD, ``lr``, momentum 0.9) and train augmentation -> preprocessing ->
           base -> head on shuffled training images, early-stopped on validation loss
           (``patience``) with the best weights restored; the starting weights count as a
           candidate, so a fine-tuning that never beats them gives them back.
        9. Score again ("after"); save to ``out``, each file atomically: ``model.keras``
           (raw RGB 0..255 -> probabilities, no augmentation, Keras layers only, loads with
           ``safe_mode=True``), ``head.json`` (kind ``end-to-end``, for predict.py),
           ``metrics.json`` and ``config.json``.

    Args:
        config: what to fine-tune and how.

    Returns:
        ``(out_dir, metrics)``, metrics as written to ``metrics.json``.

    Raises:
        ValueError: a bad argument, source, layer or block count; missing images.
        FileNotFoundError: the head folder lacks its files.
        pipeline.cache.CacheError: the cache is missing, incomplete or not the head's.
    """
    check_config(config)
    # Seed before anything is built: the loaded head's dropout draws its seed when created.
    keras.utils.set_random_seed(config.seed)
    start = resolve_source(config)
    out_dir = _out_dir(config=config, start=start)
    split = split_images(start.cache, val_split=start.val_split, seed=start.split_seed,
                         data_dir=config.data_dir, test_split=start.test_split)
    # The plain layers: finetune trains them, BatchNormalization included.
    feature_model = feature_model_from_attrs(start.attrs, fold_batchnorm=False)
    first, unfrozen = _unfreeze(config=config, feature_model=feature_model)
    verbose = 1 if sys.stdout.isatty() else 2  # Keras' progress: a bar, or a line an epoch
    head, warmup = _head(config=config, start=start, split=split,
                         feature_model=feature_model, verbose=verbose)
    # Again: rebuilding a random base and the warm-up reseed on their own.
    keras.utils.set_random_seed(config.seed)
    unreadable: dict[str, str] = {}
    datasets = part_datasets(
        split, labels=start.cache.labels, classes=head.classes_, size=feature_model.input_size,
        interpolation=start.cache.attrs["interpolation"], batch_size=config.batch_size,
        seed=config.seed, unreadable=unreadable,
        jpeg_downscale=recorded_jpeg_downscale(start.cache.attrs),
    )
    trainer = training_model(feature_model, head.model_, flip=config.augment_flip,
                             seed=config.seed, lr=config.lr, binary=len(head.classes_) == 2)
    before = _scores(trainer=trainer, datasets=datasets)
    _log_start(start=start, feature_model=feature_model, split=split, first=first,
               unfrozen=unfrozen, before=before)
    trained = _train(config=config, trainer=trainer, datasets=datasets,
                     start_loss=before["val"]["loss"], verbose=verbose)
    after = _scores(trainer=trainer, datasets=datasets)
    metrics = _metrics(config=config, start=start, split=split, first=first, unfrozen=unfrozen,
                       before=before, after=after, trained=trained, unreadable=unreadable,
                       warmup=warmup)
    _save(out_dir, config=config, start=start, feature_model=feature_model, head=head,
          metrics=metrics)
    _log_done(metrics=metrics, unreadable=unreadable)
    return out_dir, metrics


# ---------------------------------------------------------------------------------------
# Steps of run_finetune


@dataclass
class _Trained:
    """What the fine-tuning fit did."""

    history: dict[str, list[float]]  # Keras' per-epoch history
    best_epoch: int  # 0: no epoch beat the starting weights, which were kept
    seconds: float
    trainable_params: int


def _out_dir(*, config: FinetuneConfig, start: Start) -> Path:
    """``out``, or ``models/<head folder name | cache stem>-finetuned``."""
    source = Path(config.source)
    name = source.name if start.kind == "head" else source.stem
    return Path(config.out) if config.out else Path("models") / f"{name}-finetuned"


def _unfreeze(*, config: FinetuneConfig, feature_model: FeatureModel) -> tuple[str, list[str]]:
    """The first layer to train and the layers that now train, bottom to top."""
    base = feature_model.model
    first = config.unfreeze_from or unfreeze_start(base, config.unfreeze_top_blocks)
    # Only flags change here: inference, warm-up and the "before" score are unaffected.
    return first, set_trainable(base, first)


def _head(
    *,
    config: FinetuneConfig,
    start: Start,
    split: Split,
    feature_model: FeatureModel,
    verbose: int,
) -> tuple[DenseHead, dict[str, Any]]:
    """The head to train with the base, and the warm-up's entries of metrics.json.

    The source's head, or from a cache a fresh one warmed up on the cached features;
    refused when it does not take the base's features or knows no validation class.
    """
    warmup: dict[str, Any] = {}
    head = start.head
    if head is None:
        log.info("finetune: warming up a fresh dense head on the cached features for up to "
                 "%d epochs (base frozen)", config.warmup_epochs)
        began = time.perf_counter()
        head = _warm_up(config=config, cache=start.cache, train=split.train.rows,
                        val=split.val.rows, verbose=verbose)
        warmup = {
            "warmup_epochs_run": len(head.history_.get("loss", [])),
            "warmup_seconds": time.perf_counter() - began,
        }
    if tuple(head.feature_shape_) != feature_model.feature_shape:
        raise ValueError(
            f"The head takes features of shape {tuple(head.feature_shape_)}, but the base "
            f"rebuilt from the cache attributes gives {feature_model.feature_shape}."
        )
    if not np.isin(start.cache.labels[split.val.rows], head.classes_).any():
        raise ValueError(
            f"No validation image belongs to a class the head knows ({head.classes_.tolist()})."
        )
    return head, warmup


def _warm_up(
    *, config: FinetuneConfig, cache: Cache, train: np.ndarray, val: np.ndarray, verbose: int
) -> DenseHead:
    """A fresh dense head trained on the cached features: the frozen base's outputs.

    The same as training it end to end with the base frozen (the Keras guide's warm-up),
    without running the base every epoch; the features are those of the same pixels.
    """
    X = np.asarray(cache.features, dtype=np.float32)
    head = make_head(
        "dense",
        epochs=config.warmup_epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        random_state=config.seed,
    )
    head.set_params(verbose=verbose)
    seen = np.isin(cache.labels[val], cache.labels[train])
    head.fit(X[train], cache.labels[train], validation_data=(X[val][seen], cache.labels[val][seen]))
    return head


def _scores(*, trainer: Any, datasets: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Validation (and test) loss and accuracy.

    Evaluation runs in inference mode: no augmentation, so these are base + head scores.
    """
    return {part: evaluate(trainer, datasets[part]) for part in ("val", "test") if part in datasets}


def _log_start(
    *,
    start: Start,
    feature_model: FeatureModel,
    split: Split,
    first: str,
    unfrozen: list[str],
    before: dict[str, dict[str, float]],
) -> None:
    """One line: the base, what trains, on how many images, and the starting accuracy."""
    attrs, size = start.cache.attrs, feature_model.input_size
    log.info("finetune: %s (%s), unfreezing %d layers from %r to the top; %d training / %d "
             "validation images at %sx%s; validation accuracy before: %.4f", attrs["base"],
             attrs["weights"], len(unfrozen), first, len(split.train.paths),
             len(split.val.paths), size[0], size[1], before["val"]["accuracy"])


def _train(
    *,
    config: FinetuneConfig,
    trainer: Any,
    datasets: dict[str, Any],
    start_loss: float,
    verbose: int,
) -> _Trained:
    """Fit early-stopped on validation loss, best weights restored; the starting weights
    (validation loss ``start_loss``) compete too."""
    start_weights = trainer.get_weights()
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    began = time.perf_counter()
    with warnings.catch_warnings():
        # Skipping unreadable files leaves the epoch length unknown until the first epoch
        # ends, which Keras reports as running out of data: expected here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = trainer.fit(
            datasets["train"],
            validation_data=datasets["val"],
            epochs=config.epochs,
            callbacks=[stopper],
            shuffle=False,  # the training dataset reshuffles itself every epoch
            verbose=verbose,
        )
    seconds = time.perf_counter() - began
    # Early stopping only compares epochs, and an unlucky fine-tuning must not hand back a
    # model worse than the head it started from.
    best_epoch = int(stopper.best_epoch) + 1
    if not min(history.history["val_loss"]) < start_loss:
        trainer.set_weights(start_weights)
        best_epoch = 0
        log.info("finetune: no epoch beat the starting validation loss; kept the starting weights")
    trainable_params = int(sum(np.prod(v.shape) for v in trainer.trainable_weights))
    return _Trained(history.history, best_epoch, seconds, trainable_params)


def _metrics(
    *,
    config: FinetuneConfig,
    start: Start,
    split: Split,
    first: str,
    unfrozen: list[str],
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    trained: _Trained,
    unreadable: dict[str, str],
    warmup: dict[str, Any],
) -> dict[str, Any]:
    """Everything metrics.json records: source, split, scores before and after, training."""
    metrics: dict[str, Any] = {
        "source": str(Path(config.source)),
        "source_kind": start.kind,
        "cache": str(start.cache_path),
        "cache_attrs": start.cache.attrs,
        "class_names": list(start.cache.class_names),
        "split": {"val_split": start.val_split, "test_split": start.test_split,
                  "seed": start.split_seed},
        "n_train": int(split.train.rows.size),
        "n_val": int(split.val.rows.size),
        "n_test": int(split.test.rows.size),
        "val_accuracy_before": before["val"]["accuracy"],
        "val_accuracy_after": after["val"]["accuracy"],
        "val_loss_before": before["val"]["loss"],
        "val_loss_after": after["val"]["loss"],
        "epochs_run": len(trained.history.get("loss", [])),
        "best_epoch": trained.best_epoch,
        "first_unfrozen_layer": first,
        "unfrozen_layers": len(unfrozen),
        "trainable_params": trained.trainable_params,
        "lr": config.lr,
        "momentum": MOMENTUM,
        "fit_seconds": trained.seconds,
        "history": {k: [float(v) for v in vals] for k, vals in trained.history.items()},
        "unreadable": dict(sorted(unreadable.items())),
    }
    if "test" in before:
        metrics["test_accuracy_before"] = before["test"]["accuracy"]
        metrics["test_accuracy_after"] = after["test"]["accuracy"]
    return {**metrics, **warmup}


def _save(
    out_dir: Path,
    *,
    config: FinetuneConfig,
    start: Start,
    feature_model: FeatureModel,
    head: DenseHead,
    metrics: dict[str, Any],
) -> None:
    """Write model.keras, head.json, metrics.json and config.json, each atomically."""
    # Saved frozen, as bases.combine builds end-to-end models; training changed weights only.
    feature_model.model.trainable = False
    meta = head_meta(
        END_TO_END,
        classes=head.classes_.tolist(),
        class_names=list(start.cache.class_names),  # indexed by class id, as the cache's
        input_size=list(feature_model.input_size),
        interpolation=start.cache.attrs["interpolation"],
        jpeg_downscale=recorded_jpeg_downscale(start.cache.attrs),
        source=str(Path(config.source)),
        head="dense",
    )
    model = end_to_end_model(feature_model, head.model_, name="finetuned")
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(out_dir / "model.keras", model.save)
    write_head_meta(out_dir, meta)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(config))


def _log_done(*, metrics: dict[str, Any], unreadable: dict[str, str]) -> None:
    """The images left out, if any, and the accuracy before and after."""
    if unreadable:
        log.info("finetune: %d images could not be read and were left out (listed in "
                 "metrics.json); first: %s", len(unreadable), next(iter(unreadable)))
    log.info("finetune: validation accuracy %.4f -> %.4f, %d epochs in %s",
             metrics["val_accuracy_before"], metrics["val_accuracy_after"],
             metrics["epochs_run"], format_duration(metrics["fit_seconds"]))
