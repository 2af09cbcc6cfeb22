"""Fine-tune the top of the base end to end on the images, warm-started from a dense head.

Chollet's step 3 (2016) and the Keras transfer-learning guide: once a head has learnt on
the frozen base's features, unfreeze the top of the base and train base top + head
together on the (augmented) images with a small learning rate (SGD 1e-4, momentum 0.9).
The head must be trained first: a random head would send large gradients into the
pretrained layers and wreck them.

    head dir or cache -> rebuild base (cache_attrs) + head -> augment -> preprocess ->
    base (inference mode, top blocks trainable) -> head -> end-to-end ``model.keras``

Blocks are found from layer names, as each architecture names them (VGG ``block5_*``,
ResNet/DenseNet ``conv5_*``, MobileNetV2 ``block_16_*``, EfficientNet ``block7*``,
Inception ``mixed9``, Xception ``block14_*``, ...): :func:`block_of`, :func:`unfreeze_start`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.augment import AugmentSpec, augmentation_layers
from pipeline.bases import block_of, block_owners, blocks_of, feature_model_from_attrs, layer_index
from pipeline.bases.combine import end_to_end_model, preprocessing_layers
from pipeline.cache import Cache, CacheError, identity_differences, read_cache
from pipeline.fit import split_rows
from pipeline.heads import DenseHead, load_head, make_head
from pipeline.heads.persist import END_TO_END, head_meta, read_head_meta, write_head_meta
from pipeline.images import ImageReadError, load_image
from pipeline.progress import format_duration
from pipeline.util.files import read_json, replace_atomically, write_json_atomic

__all__ = [
    "FinetuneConfig",
    "block_of",
    "blocks_of",
    "image_dataset",
    "run_finetune",
    "set_trainable",
    "unfreeze_start",
]

log = logging.getLogger(__name__)

# Chollet's fine-tuning optimizer: SGD with a small learning rate and momentum 0.9.
MOMENTUM = 0.9


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


def _learnable(layer: Any) -> bool:
    """Whether unfreezing ``layer`` would train anything (BatchNormalization never does)."""
    frozen_kinds = (keras.layers.BatchNormalization, keras.layers.Normalization)
    return bool(layer.weights) and not isinstance(layer, frozen_kinds)


def unfreeze_start(model: Any, n_blocks: int | str) -> str:
    """The first layer to train when the top ``n_blocks`` blocks of ``model`` are unfrozen.

    Layers are read in ``model.layers`` order; the answer is the first layer with weights
    (BatchNormalization aside) at or after the start of the top ``n_blocks`` blocks, e.g.
    ``block5_conv1`` for VGG16 and 1, ``block_16_expand`` for MobileNetV2 and 1. Counting
    blocks by name, not layers by index, is what Chollet's ``model.layers[:25]`` got wrong.

    Args:
        model: a Keras model built from a ``keras.applications`` base (weights not needed).
        n_blocks: how many blocks, counted from the top, or ``"all"``.

    Returns:
        A layer name of ``model``.

    Raises:
        ValueError: no blocks recognised, or ``n_blocks`` not in 1..number of blocks.
    """
    layers = list(model.layers)
    owners = block_owners([lyr.name for lyr in layers])
    blocks = list(dict.fromkeys(o for o in owners if o))
    if not blocks:
        raise ValueError(
            f"Cannot tell the blocks of {getattr(model, 'name', 'the model')} from its layer "
            "names: pass --unfreeze-from LAYER instead. Received: unfreeze_top_blocks="
            f"{n_blocks}"
        )
    if n_blocks == "all":
        n_blocks = len(blocks)
    if (
        isinstance(n_blocks, bool)
        or not isinstance(n_blocks, (int, np.integer))
        or not (1 <= n_blocks <= len(blocks))
    ):
        raise ValueError(
            f"`unfreeze_top_blocks` must be 1..{len(blocks)} (or 'all'): the base has "
            f"{len(blocks)} blocks, {blocks[0]} .. {blocks[-1]}. "
            f"Received: unfreeze_top_blocks={n_blocks!r}"
        )
    top = set(blocks[-int(n_blocks) :])
    first = next(i for i, owner in enumerate(owners) if owner in top)
    for layer in layers[first:]:
        if _learnable(layer):
            return layer.name
    raise ValueError(f"No layer with weights from {layers[first].name!r} to the top.")


def _sublayers(layer: Any) -> list[Any]:
    """Every layer nested in ``layer`` (ConvNeXt nests Sequential blocks), depth first."""
    out = []
    for child in getattr(layer, "layers", []):
        out.append(child)
        out.extend(_sublayers(child))
    return out


def set_trainable(model: Any, start: str) -> list[str]:
    """Make ``start`` and every layer after it trainable, every layer before it frozen.

    BatchNormalization layers stay frozen everywhere: with ``trainable=False`` they also
    run in inference mode, so their moving statistics never change (Keras 3). Compile
    the model again after this.

    Args:
        model: the feature model (``FeatureModel.model``).
        start: the first layer to train, a name from ``model.layers``.

    Returns:
        Names of the layers that now have trainable weights, bottom to top.

    Raises:
        ValueError: ``start`` is not a layer of ``model``.
    """
    index = layer_index(model, start, "unfreeze_from")
    model.trainable = True  # the containers must be trainable for their layers to count
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= index
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return [lyr.name for lyr in model.layers[index:] if lyr.trainable_weights]


class _TrainingModel(keras.Model):
    """Augmentation -> preprocessing -> base (always in inference mode) -> head.

    A subclass, not a functional model: Keras 3 functional models pass the outer
    ``training`` flag to every nested call, overriding ``base(x, training=False)``. Used
    for training only; the saved model is :func:`pipeline.bases.combine.end_to_end_model`,
    which shares the base and head layers.
    """

    def __init__(self, augment: list, preprocess: list, base: Any, head: Any) -> None:
        super().__init__(name="finetune")
        self.augment = augment
        self.preprocess = preprocess
        self.base = base
        self.head = head

    def call(self, images: Any, training: bool | None = None) -> Any:
        x = images
        for layer in self.augment:
            x = layer(x, training=training)
        for layer in self.preprocess:
            x = layer(x)
        # Inference mode: BatchNormalization keeps its statistics, the base's dropout is off.
        x = self.base(x, training=False)
        return self.head(x, training=training)


def image_dataset(
    paths: Sequence[str],
    targets: np.ndarray,
    *,
    size: tuple[int, int],
    interpolation: str,
    batch_size: int,
    shuffle_seed: int | None = None,
    unreadable: dict[str, str] | None = None,
) -> Any:
    """A ``tf.data`` pipeline of (image, target) batches, decoded as extract decodes them.

    Images are read with :func:`pipeline.images.load_image` (RGB float32 in 0..255 at
    ``size``) in a parallel ``map``; files that cannot be read are left out, as extract
    leaves them out, and recorded in ``unreadable``.

    Args:
        paths: image files.
        targets: one target per file.
        size: (H, W) to resize to.
        interpolation: the resize method the cache recorded.
        batch_size: images per batch (the last batch holds the rest).
        shuffle_seed: shuffle every epoch with this seed; None keeps the order.
        unreadable: filled with path -> reason for files that could not be read.

    Returns:
        A batched, prefetched ``tf.data.Dataset``.
    """
    import tensorflow as tf

    failures = unreadable if unreadable is not None else {}
    blank = np.zeros((*size, 3), np.float32)

    def read(path: bytes) -> tuple[np.ndarray, np.bool_]:
        name = path.decode("utf-8")
        try:
            return load_image(name, size, interpolation), np.bool_(True)
        except ImageReadError as exc:
            failures[name] = str(exc)
            return blank, np.bool_(False)

    def load(path: Any, target: Any) -> tuple[Any, Any, Any]:
        image, ok = tf.numpy_function(read, [path], (tf.float32, tf.bool), stateful=False)
        image.set_shape((*size, 3))
        ok.set_shape(())
        return image, target, ok

    def readable(image: Any, target: Any, ok: Any) -> Any:
        return ok

    def pair(image: Any, target: Any, ok: Any) -> tuple[Any, Any]:
        return image, target

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, dtype=str), targets))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).filter(readable).map(pair)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _evaluate(model: Any, dataset: Any) -> dict[str, float]:
    """Loss and accuracy of the compiled training model, in inference mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        scores = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"loss": float(scores["loss"]), "accuracy": float(scores["accuracy"])}


def _validate(config: FinetuneConfig) -> None:
    """Raise a Keras-style ValueError for the first invalid argument."""
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


@dataclass
class _Start:
    """What fine-tuning starts from: the cache rows, the split, and (maybe) a trained head."""

    kind: str  # "head" or "cache"
    cache_path: Path
    cache: Cache
    val_split: float
    split_seed: int
    head: DenseHead | None


def _read_output(path: Path) -> dict[str, Any]:
    """A JSON file of a fit_head output folder; a missing one says what was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {path.parent} a fit_head output folder?")
    return read_json(path)


def _start(config: FinetuneConfig) -> _Start:
    """Resolve ``config.source``: a dense-head folder (warm start) or a cache (warm-up)."""
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
        return _Start(
            "head", cache_path, cache, float(fit_config["val_split"]), int(fit_config["seed"]), head
        )
    if source.suffix in (".h5", ".hdf5") or source.is_file():
        return _Start("cache", source, read_cache(source), config.val_split, config.seed, None)
    raise ValueError(
        "`source` must be a fit_head output folder with a dense head, or a cache .h5 file. "
        f"Received: source={str(source)!r} (not found)"
    )


def _image_paths(cache: Cache, rows: np.ndarray, data_dir: str | None) -> list[str]:
    """Absolute paths of the cached rows; refuses a missing folder or moved images."""
    root = Path(data_dir or cache.attrs.get("data_dir", ""))
    if not str(root) or not root.is_dir():
        raise ValueError(
            f"The image folder is missing: the cache recorded data_dir={str(root)!r}. Fine-"
            "tuning trains on the images themselves: pass --data-dir where they are now. "
            f"Received: data_dir={str(root)!r}"
        )
    paths = [root / cache.paths[i] for i in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} images listed in the cache are missing from "
            f"{root} (first: {missing[0].relative_to(root)}). Were they moved? Pass "
            f"--data-dir where they are now, or re-extract. Received: data_dir={str(root)!r}"
        )
    return [str(p) for p in paths]


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
    _validate(config)
    # Seed before anything is built: the loaded head's dropout draws its seed when created.
    keras.utils.set_random_seed(config.seed)
    start = _start(config)
    cache, attrs = start.cache, start.cache.attrs
    source = Path(config.source)
    name = source.name if start.kind == "head" else source.stem
    out_dir = Path(config.out) if config.out else Path("models") / f"{name}-finetuned"
    labels = cache.labels
    train, val, test = split_rows(
        cache.split, labels, start.val_split, start.split_seed, class_names=cache.class_names
    )
    paths = _image_paths(cache, np.concatenate([train, val, test]), config.data_dir)
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
    trainer = _TrainingModel(
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
    before = _evaluate(trainer, val_ds)
    test_before = _evaluate(trainer, test_ds) if test_ds is not None else None
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
    after = _evaluate(trainer, val_ds)
    test_after = _evaluate(trainer, test_ds) if test_ds is not None else None
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
