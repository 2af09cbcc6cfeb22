"""``FeatureModel``: a base cut at its layers and pooled, run in fixed-shape batches; built
from arguments or rebuilt from a cache's recorded attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.bases.blocks import parse_layers
from pipeline.bases.hub import HUB_PREFIX, is_hub_base
from pipeline.bases.registry import (
    JIT_MODES,
    PRECISIONS,
    build_application,
    check_pooling,
    check_preprocess,
    is_application,
    load_saved_base,
    preprocess,
    resolve_base,
)
from pipeline.util.arrays import aligned_empty, is_aligned
from pipeline.util.files import file_sha256

__all__ = [
    "FeatureModel",
    "build_feature_model",
    "feature_model_from_attrs",
]

log = logging.getLogger(__name__)


@dataclass
class FeatureModel:
    """A frozen base cut at ``layer`` and pooled, run on batches of one fixed shape.

    Float results depend on the batch shape (oneDNN and XLA pick kernels by it, and CPUs
    of one kind differ), and may depend on a row's place in the batch. So every forward
    pass here has exactly ``batch_size`` rows, and an image at position ``p`` of the image
    list always sits in slot ``p % batch_size`` of the batch of positions
    ``p // batch_size`` (zeros elsewhere): whichever engine, shard or resume computes an
    image, it computes it in the same batch shape and slot, so features are bit-identical.
    """

    model: Any
    attrs: dict[str, Any]
    input_size: tuple[int, int]
    preprocess: str
    layers: list[str] = field(default_factory=list)  # one output per layer, in this order
    batch_size: int = 32  # rows of every forward pass
    _forward: Any = field(default=None, init=False, repr=False)  # images -> outputs
    _batch: Any = field(default=None, init=False, repr=False)  # the forward pass's input rows

    @property
    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Shape of one row of features, per layer."""
        shapes = self.model.output_shape
        shapes = shapes if isinstance(shapes, list) else [shapes]
        return [tuple(int(d) for d in shape[1:]) for shape in shapes]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one row of the first layer's features."""
        return self.feature_shapes[0]

    def all_features(self, images: np.ndarray,
                     positions: Sequence[int] | np.ndarray | None = None,
                     preprocessed: bool = False) -> list[np.ndarray]:
        """Features of every layer for RGB images in 0..255 (``images`` is not changed).

        Args:
            images: (n, H, W, 3) at the model's input size.
            positions: each image's position in the image list (default ``0..n-1``);
                images of one batch of positions share a forward pass, each in its slot.
            preprocessed: ``images`` are already preprocessed with this model's mode (by
                the decode workers: ``decoded_batches(preprocess=...)``). A whole batch in
                slot order then goes to the forward pass as it is, with no copy; empty
                slots hold preprocessed zeros either way, so the bytes are the same.

        Returns:
            One float32 array of n rows per layer, in the order of ``images``.
        """
        n = len(images)
        outputs = [np.empty((n, *shape), np.float32) for shape in self.feature_shapes]
        if n == 0:
            return outputs
        b = self.batch_size
        positions = np.arange(n) if positions is None else np.asarray(positions, np.int64)
        groups = positions // b
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            slots = positions[rows] % b
            whole = (len(rows) == b and rows[-1] - rows[0] == b - 1
                     and (slots == np.arange(b)).all())
            if preprocessed and whole:
                x = images[rows[0]:rows[0] + b]
            elif preprocessed:
                x = self._input(images.shape[1:])
                x[...] = self._empty_slot()
                x[slots] = images[rows]
            else:
                x = self._input(images.shape[1:])
                if whole:
                    np.copyto(x, images[rows[0]:rows[0] + b])
                else:
                    x[...] = 0
                    x[slots] = images[rows]
                x = preprocess(x, self.preprocess)
            for out, got in zip(outputs, self._run(x), strict=True):
                # Mixed-precision bases return float16/bfloat16: stored as float32.
                out[rows] = got[slots]
        return outputs

    def features(self, images: np.ndarray,
                 positions: Sequence[int] | np.ndarray | None = None,
                 preprocessed: bool = False) -> np.ndarray:
        """Features of the first layer (the only one, for a one-layer model)."""
        return self.all_features(images, positions, preprocessed)[0]

    def _input(self, shape: tuple[int, ...]) -> np.ndarray:
        """The (batch_size, *shape) float32 array each forward pass reads, reused.

        Why: a fresh multi-MB array per batch is faulted in page by page each time (glibc
        returns large blocks to the OS), and zero-filling then copying through fancy
        indexing made a sixth of the main thread's time in an input-bound extract
        (py-spy). Reuse is safe: ``_run`` returns only after the outputs are NumPy arrays.
        """
        if self._batch is None or self._batch.shape[1:] != tuple(shape):
            # Aligned, so TensorFlow reads it in place (_any_batch_graph).
            self._batch = aligned_empty((self.batch_size, *shape))
        return self._batch

    def _empty_slot(self) -> np.ndarray:
        """An empty slot's pixel, preprocessed: (3,) float32 (zeros before preprocessing)."""
        return preprocess(np.zeros(3, np.float32), self.preprocess)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self._forward is None:
            self._forward = _any_batch_graph(self.model) or self.model.predict_on_batch
        outputs = self._forward(x)
        return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple))
                                        else [outputs])]


def _any_batch_graph(model: Any) -> Any:
    """TensorFlow without XLA: the forward pass traced once for every batch size, or None.

    ``predict_on_batch`` traces a graph per batch shape, so each run's short tail batch
    paid a second trace (MobileNetV2@224 on CPU: 0.62 s, against 0.07 s to run it); a
    graph with an unknown batch dimension runs full batches as fast (measured) and gives
    the same bytes. Only the execution is TF-specific; the model code stays Keras ops.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or model.jit_compile:
        return None
    import tensorflow as tf

    graph = tf.function(lambda x: model(x, training=False), input_signature=[
        tf.TensorSpec(model.input_shape, tf.float32)])

    def forward(x: np.ndarray) -> list[np.ndarray]:
        # An aligned float32 batch is handed over through DLPack, read in place: TF copies
        # a NumPy argument into a fresh tensor, whose pages are faulted in on every call
        # (batch 256 at 224 px: 0.5 core-ms per image, against 0.002; docs/performance.md).
        # The graph returns before the batch's buffer is refilled.
        if x.dtype == np.float32 and is_aligned(x) and x.flags.writeable:
            x = tf.experimental.dlpack.from_dlpack(x.__dlpack__())
        outputs = graph(x)
        return [o.numpy() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]

    forward.graph = graph  # for tests: its tracing count
    return forward


def _no_map_message(model: Any, layer: str, pooling: str) -> str:
    """Why ``pooling`` cannot apply to ``layer`` (a vector, often a classifier's output),
    naming the last layers that do hold feature maps: cutting there is the usual fix."""
    maps = [lyr.name for lyr in model.layers
            if not isinstance(lyr.output, (list, tuple)) and len(lyr.output.shape) == 4]
    where = (f" Cut the base at a feature map with --layer; its last ones are "
             f"{', '.join(maps[-3:])}." if maps else "")
    return (f"Layer {layer!r} outputs vectors {tuple(model.get_layer(layer).output.shape)} "
            f"(a classifier's output?), not a feature map to pool.{where} Or keep the "
            f"vectors with --pooling none. Received: pooling={pooling!r}")


def _feature_extractor(model: Any, layers: list[str], pooling: str) -> Any:
    """One model, one forward pass, one pooled output per requested layer."""
    import keras

    from pipeline.bases.pooling import pooled

    for name in layers:
        if pooling in ("avg", "max") and len(model.get_layer(name).output.shape) == 2:
            raise ValueError(_no_map_message(model, name, pooling))
    outputs = [pooled(model.get_layer(name).output, pooling, name, i)
               for i, name in enumerate(layers)]
    return keras.Model(model.inputs, outputs if len(outputs) > 1 else outputs[0],
                       name="feature_extractor")


def build_feature_model(
    base: str,
    *,
    weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    preprocess_mode: str | None = None,
    seed: int = 0,
    precision: str = "float32",
    jit: str = "auto",
    batch_size: int = 32,
    fold_batchnorm: bool = False,
) -> FeatureModel:
    """Build the frozen feature extractor and the attributes that define its features.

    Args:
        base: a keras.applications name (case-insensitive) or the path of a ``.keras`` model.
        weights: ``imagenet`` (default for named bases), ``none`` (random, seeded) or a local
            weights file; must be left unset for a ``.keras`` base, which carries its own.
        input_size: (H, W); defaults to the base's training size or the model's input.
        layer: cut the base at this layer's output (default: the base's last layer).
        pooling: flatten | avg | max | none, applied to the layer's output.
        preprocess_mode: for ``.keras`` bases (default ``none``); named bases use their
            own application's ``preprocess_input`` and refuse another.
        seed: seeds random weights.
        precision: ``float32``, or a Keras mixed policy for the GPU box (``mixed_float16``
            on NVIDIA GPUs, ``mixed_bfloat16`` on TPUs and recent CPUs); features are stored
            as float32 either way.
        jit: XLA for the forward pass: ``auto`` (Keras' choice: on with a GPU under
            TensorFlow, always under JAX), ``on`` or ``off``.
        batch_size: rows of every forward pass (see :class:`FeatureModel`).
        fold_batchnorm: fold each frozen BatchNormalization into the convolution before
            it (:mod:`pipeline.bases.fold`): a faster forward pass whose features equal
            the plain one up to float rounding. Recorded in the attributes.

    Raises:
        ValueError: any bad argument, with the value received.
        WeightsUnavailableError: ImageNet weights cannot be downloaded.
    """
    _check_arguments(pooling=pooling, preprocess_mode=preprocess_mode, precision=precision,
                     jit=jit)
    if base.endswith((".keras", ".h5")) or Path(base).is_file():
        loaded = _saved_base(base, weights=weights, input_size=input_size,
                             preprocess_mode=preprocess_mode, precision=precision)
    elif not is_application(base) and is_hub_base(base):
        return _hub_feature_model(base, weights=weights, input_size=input_size, layer=layer,
                                  pooling=pooling, preprocess_mode=preprocess_mode, seed=seed,
                                  precision=precision, jit=jit, batch_size=batch_size,
                                  fold=fold_batchnorm)
    else:
        loaded = _named_base(base, weights=weights, input_size=input_size,
                             preprocess_mode=preprocess_mode, seed=seed, precision=precision)
    loaded.model.trainable = False
    layers = parse_layers(layer, loaded.model)
    feature = _folded(_feature_extractor(loaded.model, layers, pooling), fold_batchnorm)
    if jit != "auto":
        feature.jit_compile = jit == "on"
    size = (int(loaded.size[0]), int(loaded.size[1]))
    attrs = _feature_attrs(loaded, layers=layers, pooling=pooling, seed=seed,
                           precision=precision, fold=fold_batchnorm)
    return FeatureModel(feature, attrs, size, loaded.preprocess, layers, batch_size=batch_size)


def _folded(feature: Any, fold: bool) -> Any:
    """``feature`` with its frozen BatchNormalization folded, when asked."""
    if not fold:
        return feature
    from pipeline.bases.fold import fold_batchnorm

    folded, count = fold_batchnorm(feature)
    log.info("base: %d BatchNormalization layers folded into the layers before them "
             "(--fold-batchnorm off keeps them)", count)
    return folded


def _hub_feature_model(base: str, *, weights: str | None, input_size: tuple[int, int] | None,
                       layer: str | None, pooling: str, preprocess_mode: str | None, seed: int,
                       precision: str, jit: str, batch_size: int, fold: bool) -> FeatureModel:
    """A keras-hub backbone with its converter's preprocessing inside the model.

    Raises:
        ValueError: a bad argument (``--preprocess`` is the preset's, never chosen).
    """
    from pipeline.bases.hub import hub_feature_extractor, hub_layers, load_hub_base

    if preprocess_mode not in (None, "none"):
        raise ValueError(
            "A keras-hub base preprocesses as its preset's image converter says: leave "
            f"--preprocess unset. Received: preprocess={preprocess_mode!r}"
        )
    hub = load_hub_base(base, weights=weights, input_size=input_size, precision=precision,
                        seed=seed)
    layers = hub_layers(layer, hub.backbone)
    feature = _folded(hub_feature_extractor(hub, layers, pooling), fold)
    # Frozen as a whole, so finetune's set_trainable can unfreeze "hub_backbone" again
    # (freezing the backbone first would leave the extractor's copy of it frozen for good).
    feature.trainable = False
    if jit != "auto":
        feature.jit_compile = jit == "on"
    loaded = _Base(hub.backbone, hub.size, "none", hub.attrs)
    attrs = _feature_attrs(loaded, layers=layers, pooling=pooling, seed=seed,
                           precision=precision, fold=fold)
    return FeatureModel(feature, attrs, hub.size, "none", layers, batch_size=batch_size)


class _Base(NamedTuple):
    """A loaded base before the cut: the model, its input size, its preprocessing, and
    the attributes that say which file or application and weights it came from."""

    model: Any
    size: tuple[int, int]
    preprocess: str
    attrs: dict[str, Any]


def _check_arguments(*, pooling: str, preprocess_mode: str | None, precision: str,
                     jit: str) -> None:
    """The arguments that do not depend on the base.

    Raises:
        ValueError: a bad pooling, preprocessing, precision or jit mode.
    """
    check_pooling(pooling)
    if preprocess_mode is not None:
        check_preprocess(preprocess_mode)
    if precision not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {PRECISIONS}. Received: precision={precision!r}"
        )
    if jit not in JIT_MODES:
        raise ValueError(f"`jit` must be one of {JIT_MODES}. Received: jit={jit!r}")


def _saved_base(base: str, *, weights: str | None, input_size: tuple[int, int] | None,
                preprocess_mode: str | None, precision: str) -> _Base:
    """A ``.keras`` base, recorded by file name and sha256.

    Raises:
        ValueError: the file is missing, or weights or a precision were asked for.
    """
    path = Path(base)
    if not path.is_file():
        raise ValueError(f"`base` file not found. Received: base={base!r}")
    if weights not in (None, "saved"):
        raise ValueError(
            "A .keras base carries its own weights: leave --weights unset. "
            f"Received: weights={weights!r}"
        )
    if precision != "float32":
        raise ValueError(
            "A saved .keras base keeps the dtype policy it was saved with; mixed "
            f"precision applies to keras.applications bases. Received: precision={precision!r}"
        )
    model, size = load_saved_base(path, input_size)
    attrs = dict(base=f"file:{path.name}", base_sha256=file_sha256(path), weights="saved",
                 base_path=str(path.resolve()), weights_path="")
    return _Base(model, size, preprocess_mode or "none", attrs)


def _named_base(base: str, *, weights: str | None, input_size: tuple[int, int] | None,
                preprocess_mode: str | None, seed: int, precision: str) -> _Base:
    """A keras.applications base under the asked dtype policy; a local weights file is
    recorded by its sha256.

    Raises:
        ValueError: an unknown base, or another preprocessing than its own.
        WeightsUnavailableError: ImageNet weights cannot be downloaded.
    """
    spec = resolve_base(base)
    if preprocess_mode not in (None, spec.preprocess):
        raise ValueError(
            f"{spec.name} uses its own preprocess_input (mode {spec.preprocess!r}). "
            f"Received: preprocess={preprocess_mode!r}"
        )
    weights = weights or "imagenet"
    size = input_size or (spec.default_size, spec.default_size)
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = build_application(spec, weights, size, seed)
    finally:
        keras.config.set_dtype_policy(previous)
    if weights in ("imagenet", "none"):
        recorded, weights_path = weights, ""
    else:
        recorded, weights_path = f"sha256:{file_sha256(weights)}", str(Path(weights).resolve())
    attrs = dict(base=spec.name, base_sha256="", weights=recorded, base_path="",
                 weights_path=weights_path)
    return _Base(model, size, spec.preprocess, attrs)


def _feature_attrs(loaded: _Base, *, layers: list[str], pooling: str, seed: int,
                   precision: str, fold: bool) -> dict[str, Any]:
    """Every attribute that defines the features: the base's, then the cut and pooling."""
    return {
        **loaded.attrs,
        "layer": layers[0],
        "layers": layers,
        "pooling": pooling,
        "input_size": [int(loaded.size[0]), int(loaded.size[1])],
        "preprocess": loaded.preprocess,
        "seed": int(seed),
        "precision": precision,
        "fold_batchnorm": bool(fold),
    }


def feature_model_from_attrs(attrs: dict[str, Any], batch_size: int = 32,
                             fold_batchnorm: bool | None = None) -> FeatureModel:
    """Rebuild the exact feature model a cache (or a head trained on it) was made with
    (all its recorded layers, the first being the one in ``features``).

    ``fold_batchnorm`` defaults to the recorded choice (caches made before it was
    recorded: not folded); finetune asks for the plain layers, which it trains.

    Files recorded by path (a ``.keras`` base, a local weights file) must still hash to
    the recorded sha256, so a changed file can never silently produce other features.

    Raises:
        ValueError: a recorded file is missing or changed.
    """
    base = attrs["base"]
    weights: str | None = attrs["weights"]
    if base.startswith("file:"):
        base, weights = _verified(attrs["base_path"], attrs["base_sha256"], "base"), None
    elif base.startswith(HUB_PREFIX):
        _check_hub_weights(attrs)
    elif weights.startswith("sha256:"):
        weights = _verified(attrs["weights_path"], weights.removeprefix("sha256:"), "weights")
    return build_feature_model(
        base,
        weights=weights,
        input_size=tuple(attrs["input_size"]),
        layer=",".join(attrs.get("layers") or [attrs["layer"]]),
        pooling=attrs["pooling"],
        preprocess_mode=attrs["preprocess"] if base.endswith(".keras") else None,
        seed=int(attrs.get("seed", 0)),
        precision=attrs.get("precision", "float32"),
        batch_size=batch_size,
        fold_batchnorm=(bool(attrs.get("fold_batchnorm", False)) if fold_batchnorm is None
                        else fold_batchnorm),
    )


def _check_hub_weights(attrs: dict[str, Any]) -> None:
    """A local keras-hub preset must still hold the weights the cache was made with.

    Raises:
        ValueError: the folder is gone or its weights changed.
    """
    if attrs.get("base_path") and attrs.get("base_sha256"):
        _verified(str(Path(attrs["base_path"]) / "model.weights.h5"), attrs["base_sha256"],
                  "base")


def _verified(path: str, sha256: str, what: str) -> str:
    if not path or not Path(path).is_file():
        raise ValueError(
            f"The {what} file this cache was made with is gone. Received: {what}_path={path!r}"
        )
    if file_sha256(path) != sha256:
        raise ValueError(
            f"The {what} file {path} changed since the cache was made (sha256 differs): "
            "its features would not match. Re-extract or restore the file."
        )
    return path
