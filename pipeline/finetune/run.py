"""``run_finetune``: the fine-tuning protocol, from a head folder or a cache to a saved model."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.augment import AugmentSpec, augmentation_layers
from pipeline.bases import feature_model_from_attrs
from pipeline.bases.combine import end_to_end_model, preprocessing_layers
from pipeline.cache import Cache
from pipeline.finetune.config import FinetuneConfig, check_config
from pipeline.finetune.data import image_dataset, image_paths
from pipeline.finetune.model import TrainingModel, evaluate, set_trainable, unfreeze_start
from pipeline.finetune.source import resolve_source
from pipeline.fit import split_rows
from pipeline.heads import DenseHead, make_head
from pipeline.heads.persist import END_TO_END, head_meta, write_head_meta
from pipeline.progress import format_duration
from pipeline.util.files import replace_atomically, write_json_atomic

__all__ = ["run_finetune"]

log = logging.getLogger(__name__)

# Chollet's fine-tuning optimizer: SGD with a small learning rate and momentum 0.9.
MOMENTUM = 0.9


def _warm_up(
    config: FinetuneConfig, cache: Cache, train: np.ndarray, val: np.ndarray, verbose: int
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


def run_finetune(config: FinetuneConfig) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the top of the base together with a dense head on the images.

    Protocol:
        1. Validate the arguments (exactly one of ``unfreeze_from``/``unfreeze_top_blocks``).
        2. Resolve the source: a fit_head folder with a dense head (warm start; its
           cache, ``val_split`` and ``seed`` are read from its config.json, and the cache
           must still be the one it was trained on), or a cache.
        3. Split rows exactly as fit_head did (:func:`pipeline.fit.split_rows`), so the
           validation images are never trained on; check every image is still there.
        4. Rebuild the feature model from the cache attributes
           (:func:`pipeline.bases.feature_model_from_attrs`): same base, weights, layer,
           pooling, input size and preprocessing.
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
    cache, attrs = start.cache, start.cache.attrs
    source = Path(config.source)
    name = source.name if start.kind == "head" else source.stem
    out_dir = Path(config.out) if config.out else Path("models") / f"{name}-finetuned"
    labels = cache.labels
    train, val, test = split_rows(
        cache.split, labels, start.val_split, start.split_seed, class_names=cache.class_names
    )
    paths = image_paths(cache, np.concatenate([train, val, test]), config.data_dir)
    train_paths = paths[: train.size]
    val_paths = paths[train.size : train.size + val.size]
    test_paths = paths[train.size + val.size :]

    feature_model = feature_model_from_attrs(attrs)
    base = feature_model.model
    first = config.unfreeze_from or unfreeze_start(base, config.unfreeze_top_blocks)
    # Only flags change here: inference, warm-up and the "before" score are unaffected.
    unfrozen = set_trainable(base, first)
    verbose = 1 if sys.stdout.isatty() else 2
    if start.head is None:
        log.info(
            f"finetune: warming up a fresh dense head on the cached features for up to "
            f"{config.warmup_epochs} epochs (base frozen)"
        )
        warm_start = time.perf_counter()
        head = _warm_up(config, cache, train, val, verbose)
        warmup_seconds = time.perf_counter() - warm_start
    else:
        head = start.head
    if tuple(head.feature_shape_) != feature_model.feature_shape:
        raise ValueError(
            f"The head takes features of shape {tuple(head.feature_shape_)}, but the base "
            f"rebuilt from the cache attributes gives {feature_model.feature_shape}."
        )

    # Targets are column indices of the head's output; rows of classes it never learnt
    # cannot be scored or trained on.
    def targets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen = np.isin(labels[rows], head.classes_)
        return seen, np.searchsorted(head.classes_, labels[rows][seen])

    binary = len(head.classes_) == 2
    if not np.isin(labels[val], head.classes_).any():
        raise ValueError(
            f"No validation image belongs to a class the head knows ({head.classes_.tolist()})."
        )
    unreadable: dict[str, str] = {}
    size, interpolation = feature_model.input_size, attrs["interpolation"]

    def dataset(part: list[str], rows: np.ndarray, shuffle_seed: int | None = None) -> Any:
        seen, y = targets(rows)
        y = y.astype(np.float32) if binary else y
        return image_dataset(
            [p for p, s in zip(part, seen, strict=True) if s],
            y,
            size=size,
            interpolation=interpolation,
            batch_size=config.batch_size,
            shuffle_seed=shuffle_seed,
            unreadable=unreadable,
        )

    # Again: rebuilding a random base and the warm-up reseed on their own.
    keras.utils.set_random_seed(config.seed)
    train_ds = dataset(train_paths, train, shuffle_seed=config.seed)
    val_ds = dataset(val_paths, val)
    test_ds = dataset(test_paths, test) if test.size else None
    trainer = TrainingModel(
        augmentation_layers(AugmentSpec(flip=config.augment_flip), config.seed),
        preprocessing_layers(feature_model.preprocess),
        base,
        head.model_,
    )
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.lr, momentum=MOMENTUM),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],  # binary: threshold 0.5, as DenseHead.predict
    )
    # Evaluation runs in inference mode: no augmentation, so these are base + head scores.
    before = evaluate(trainer, val_ds)
    test_before = evaluate(trainer, test_ds) if test_ds is not None else None
    log.info(
        f"finetune: {attrs['base']} ({attrs['weights']}), unfreezing {len(unfrozen)} layers "
        f"from {first!r} to the top; {len(train_paths)} training / {len(val_paths)} "
        f"validation images at {size[0]}x{size[1]}; validation accuracy before: "
        f"{before['accuracy']:.4f}"
    )
    start_weights = trainer.get_weights()
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    fit_start = time.perf_counter()
    with warnings.catch_warnings():
        # Skipping unreadable files leaves the epoch length unknown until the first epoch
        # ends, which Keras reports as running out of data: expected here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = trainer.fit(
            train_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            callbacks=[stopper],
            shuffle=False,  # train_ds reshuffles itself every epoch
            verbose=verbose,
        )
    fit_seconds = time.perf_counter() - fit_start
    # The starting weights compete too: early stopping only compares epochs, and an
    # unlucky fine-tuning must not hand back a model worse than the head it started from.
    best_epoch = int(stopper.best_epoch) + 1
    if not min(history.history["val_loss"]) < before["loss"]:
        trainer.set_weights(start_weights)
        best_epoch = 0
        log.info("finetune: no epoch beat the starting validation loss; kept the starting weights")
    after = evaluate(trainer, val_ds)
    test_after = evaluate(trainer, test_ds) if test_ds is not None else None
    trainable_params = int(sum(np.prod(v.shape) for v in trainer.trainable_weights))
    # Saved frozen, as bases.combine builds end-to-end models; training changed weights only.
    base.trainable = False

    metrics: dict[str, Any] = {
        "source": str(source),
        "source_kind": start.kind,
        "cache": str(start.cache_path),
        "cache_attrs": attrs,
        "class_names": list(cache.class_names),
        "split": {"val_split": start.val_split, "seed": start.split_seed},
        "n_train": int(train.size),
        "n_val": int(val.size),
        "n_test": int(test.size),
        "val_accuracy_before": before["accuracy"],
        "val_accuracy_after": after["accuracy"],
        "val_loss_before": before["loss"],
        "val_loss_after": after["loss"],
        "epochs_run": len(history.history.get("loss", [])),
        "best_epoch": best_epoch,  # 0: no epoch improved, the starting weights were kept
        "first_unfrozen_layer": first,
        "unfrozen_layers": len(unfrozen),
        "trainable_params": trainable_params,
        "lr": config.lr,
        "momentum": MOMENTUM,
        "fit_seconds": fit_seconds,
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "unreadable": dict(sorted(unreadable.items())),
    }
    if test_ds is not None:
        metrics["test_accuracy_before"] = test_before["accuracy"]
        metrics["test_accuracy_after"] = test_after["accuracy"]
    if start.head is None:
        metrics["warmup_epochs_run"] = len(head.history_.get("loss", []))
        metrics["warmup_seconds"] = warmup_seconds

    meta = head_meta(
        END_TO_END,
        classes=head.classes_.tolist(),
        class_names=list(cache.class_names),  # indexed by class id, as the cache's
        input_size=list(size),
        interpolation=interpolation,
        source=str(source),
        head="dense",
    )
    model = end_to_end_model(feature_model, head.model_, name="finetuned")
    _save(out_dir, model=model, meta=meta, metrics=metrics, config=config)
    if unreadable:
        log.info(
            f"finetune: {len(unreadable)} images could not be read and were left out "
            f"(listed in metrics.json); first: {next(iter(unreadable))}"
        )
    log.info(
        f"finetune: validation accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, "
        f"{metrics['epochs_run']} epochs in {format_duration(fit_seconds)}"
    )
    return out_dir, metrics


def _save(
    out_dir: Path,
    *,
    model: Any,
    meta: dict[str, Any],
    metrics: dict[str, Any],
    config: FinetuneConfig,
) -> None:
    """Write model.keras, head.json, metrics.json and config.json, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(out_dir / "model.keras", model.save)
    write_head_meta(out_dir, meta)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(config))
