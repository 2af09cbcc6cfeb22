"""Frozen feature models: every ``keras.applications`` base or a saved ``.keras`` model.

A base is resolved to a :class:`FeatureModel`: the Keras model cut at a layer and pooled,
plus the facts that define its features (recorded in every cache): base, weights, layer,
pooling, input size, preprocessing.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.util.files import file_sha256

__all__ = [
    "POOLINGS",
    "PREPROCESS_MODES",
    "BaseSpec",
    "FeatureModel",
    "WeightsUnavailableError",
    "block_of",
    "block_owners",
    "blocks_of",
    "build_feature_model",
    "block_ends",
    "feature_model_from_attrs",
    "layer_index",
    "parse_layers",
    "check_pooling",
    "check_preprocess",
    "default_input_size",
    "preprocess",
    "resolve_base",
]

POOLINGS = ("flatten", "avg", "max", "none")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_MODES = ("auto", "on", "off")
PREPROCESS_MODES = ("none", "scale", "tf", "caffe", "torch")

# What each keras.applications module's preprocess_input does, as an imagenet_utils mode.
# "none": the model carries its own preprocessing (EfficientNet, ConvNeXt, MobileNetV3).
# tests/test_bases.py checks each entry against the module's own preprocess_input.
MODULE_PREPROCESS = {
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet": "caffe",
    "resnet50": "caffe",
    "resnet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "nasnet": "tf",
    "densenet": "torch",
    "efficientnet": "none",
    "efficientnet_v2": "none",
    "convnext": "none",
    "mobilenet_v3": "none",
}

# Default input sizes that are not 224 (the size each model was trained at).
_DEFAULT_SIZES = {
    "InceptionV3": 299,
    "Xception": 299,
    "InceptionResNetV2": 299,
    "NASNetLarge": 331,
    "EfficientNetB1": 240,
    "EfficientNetB2": 260,
    "EfficientNetB3": 300,
    "EfficientNetB4": 380,
    "EfficientNetB5": 456,
    "EfficientNetB6": 528,
    "EfficientNetB7": 600,
    "EfficientNetV2B1": 240,
    "EfficientNetV2B2": 260,
    "EfficientNetV2B3": 300,
    "EfficientNetV2S": 384,
    "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
}


# (pattern, block name template), tried in order. Group 1 is the block's number or name.
# Inception and InceptionResNet name only a block's closing layers (mixed9, block35_1_*):
# the unnamed layers before them belong to them (see block_owners).
_BLOCK_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(block\d+_\d+)(?:_|$)"), "{}"),  # InceptionResNetV2 block35_1_mixed
    (re.compile(r"^block(\d+)[a-z]?(?:_|$)"), "block{}"),  # VGG, Xception, EfficientNet
    (re.compile(r"^block_(\d+)(?:_|$)"), "block_{}"),  # MobileNetV2
    (re.compile(r"^(expanded_conv(?:_\d+)?)(?:_|$)"), "{}"),  # MobileNetV2/V3 first blocks
    (re.compile(r"^(?:conv|pool)(\d+)(?:_|$)"), "conv{}"),  # ResNet, DenseNet (+ transitions)
    (re.compile(r"^conv_(?:dw|pw|pad)_(\d+)(?:_|$)"), "conv_{}"),  # MobileNet (v1)
    (re.compile(r"^(mixed_?\d+[a-z]?)$"), "{}"),  # InceptionV3 mixed9, InceptionResNet mixed_6a
    (re.compile(r"_stage_(\d+)_"), "stage_{}"),  # ConvNeXt
)


def block_of(layer_name: str) -> str | None:
    """The block a layer belongs to by its name, as the architecture names its blocks.

    Examples: ``block5_conv1`` -> ``block5`` (VGG16), ``conv5_block1_1_conv`` -> ``conv5``
    (ResNet50, DenseNet; the ``pool4_*`` transition after a stage -> ``conv4``),
    ``block_16_expand`` -> ``block_16`` (MobileNetV2), ``block7a_expand_conv`` -> ``block7``
    (EfficientNet), ``mixed9`` -> ``mixed9`` (InceptionV3), ``block14_sepconv1`` ->
    ``block14`` (Xception). Layers above the last block (``Conv_1``, ``top_conv``,
    ``out_relu``, pooling) and generically named ones (``conv2d_85``) give None.

    Args:
        layer_name: a Keras layer name.

    Returns:
        The block name, or None when the name does not tell.
    """
    for pattern, template in _BLOCK_PATTERNS:
        match = pattern.search(layer_name)
        if match:
            return template.format(match.group(1))
    return None


def block_owners(names: Sequence[str]) -> list[str | None]:
    """The block of each layer; an unnamed layer belongs to the next named block.

    Inception names only a block's closing concatenation (``mixed9``) and Xception leaves
    its shortcut convolutions unnamed, so a generic name inherits the block that follows
    it. Unnamed layers after the last block (the top) stay None.
    """
    owners = [block_of(name) for name in names]
    following: str | None = None
    for i in range(len(owners) - 1, -1, -1):
        if owners[i] is None:
            owners[i] = following
        else:
            following = owners[i]
    return owners


def blocks_of(model: Any) -> list[str]:
    """The blocks of a model, bottom to top, from its layer names (see :func:`block_of`).

    Args:
        model: a Keras model (anything with ``.layers`` whose items have ``.name``).

    Returns:
        Block names in order of first appearance; empty when the names tell none.
    """
    return list(dict.fromkeys(o for o in block_owners([lyr.name for lyr in model.layers]) if o))


class WeightsUnavailableError(ValueError):
    """ImageNet weights could not be downloaded (an offline box)."""


@dataclass(frozen=True)
class BaseSpec:
    """A keras.applications base: constructor name, module, preprocessing, default size."""

    name: str
    module: str
    preprocess: str
    default_size: int


def default_input_size(name: str) -> int:
    """The input side each keras.applications model was trained at."""
    return _DEFAULT_SIZES.get(name, 224)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def _registry() -> dict[str, BaseSpec]:
    from keras import applications

    specs: dict[str, BaseSpec] = {}
    for attr in dir(applications):
        constructor = getattr(applications, attr)
        if not (attr[:1].isupper() and callable(constructor)):
            continue
        # The defining module (keras.src.applications.<module>) fixes the preprocessing;
        # a public module may not re-export its constructors (mobilenet_v3 does not).
        module_name = constructor.__module__.rsplit(".", 1)[-1]
        if module_name in MODULE_PREPROCESS:
            mode = MODULE_PREPROCESS[module_name]
            specs[_key(attr)] = BaseSpec(attr, module_name, mode, default_input_size(attr))
    return specs


def feature_model_from_attrs(attrs: dict[str, Any], batch_size: int = 32) -> FeatureModel:
    """Rebuild the exact feature model a cache (or a head trained on it) was made with
    (all its recorded layers, the first being the one in ``features``).

    Files recorded by path (a ``.keras`` base, a local weights file) must still hash to
    the recorded sha256, so a changed file can never silently produce other features.

    Raises:
        ValueError: a recorded file is missing or changed.
    """
    base = attrs["base"]
    weights: str | None = attrs["weights"]
    if base.startswith("file:"):
        base, weights = _verified(attrs["base_path"], attrs["base_sha256"], "base"), None
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
    )


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


def resolve_base(name: str) -> BaseSpec:
    """Look up a keras.applications base by case-insensitive name (vgg16, ResNet50, ...).

    Raises:
        ValueError: unknown name; the message lists the closest known names.
    """
    registry = _registry()
    spec = registry.get(_key(name))
    if spec is None:
        names = sorted(s.name for s in registry.values())
        close = difflib.get_close_matches(_key(name), list(registry), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(registry[k].name for k in close)}?" if close else ""
        raise ValueError(
            f"Unknown base. Expected a keras.applications model ({', '.join(names)}) or a "
            f"path to a .keras file.{hint} Received: base={name!r}"
        )
    return spec


def check_pooling(pooling: str) -> str:
    """Validate ``--pooling``."""
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
    return pooling


def check_preprocess(mode: str) -> str:
    """Validate ``--preprocess``."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(
            f"`preprocess` must be one of {PREPROCESS_MODES}. Received: preprocess={mode!r}"
        )
    return mode


def preprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """Apply a preprocessing mode to float32 RGB pixels in 0..255 (in place where possible).

    ``tf``, ``caffe`` and ``torch`` are Keras' own ``imagenet_utils.preprocess_input``, so
    the result equals each application's ``preprocess_input``.
    """
    if mode == "none":
        return x
    if mode == "scale":
        x /= 255.0
        return x
    from keras.applications import imagenet_utils

    return imagenet_utils.preprocess_input(x, data_format="channels_last", mode=mode)


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
                     positions: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
        """Features of every layer for RGB images in 0..255 (``images`` is not changed).

        Args:
            images: (n, H, W, 3) at the model's input size.
            positions: each image's position in the image list (default ``0..n-1``);
                images of one batch of positions share a forward pass, each in its slot.

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
            x = np.zeros((b, *images.shape[1:]), np.float32)
            x[slots] = images[rows]
            for out, got in zip(outputs, self._run(preprocess(x, self.preprocess)), strict=True):
                # Mixed-precision bases return float16/bfloat16: stored as float32.
                out[rows] = got[slots]
        return outputs

    def features(self, images: np.ndarray,
                 positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Features of the first layer (the only one, for a one-layer model)."""
        return self.all_features(images, positions)[0]

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
        outputs = graph(x)
        return [o.numpy() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]

    forward.graph = graph  # for tests: its tracing count
    return forward


_URL = re.compile(r"https?://\S+?\.h5")


def _build_application(spec: BaseSpec, weights: str, size: tuple[int, int], seed: int) -> Any:
    import keras

    constructor = getattr(keras.applications, spec.name)
    shape = (*size, 3)
    if weights == "none":
        keras.utils.set_random_seed(seed)
        return constructor(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:
            match = _URL.search(str(exc))
            if "URL fetch failure" not in str(exc) or not match:
                raise
            url = match.group(0)
            fname = url.rsplit("/", 1)[-1]
            home = os.environ.get("KERAS_HOME", "~/.keras")
            raise WeightsUnavailableError(
                f"Cannot download the ImageNet weights of {spec.name} (offline?). Place the "
                f"file {fname} in {home}/models/{fname} (download it from {url} on a machine "
                "with network), or pass it directly with --weights /path/to/"
                f"{fname}. Received: weights='imagenet'"
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            "`weights` must be 'imagenet', 'none' or the path of a weights file. "
            f"Received: weights={weights!r} (no such file)"
        )
    return constructor(include_top=False, weights=str(path), input_shape=shape)


def _load_saved_base(path: Path, size: tuple[int, int] | None) -> tuple[Any, tuple[int, int]]:
    import keras

    # safe_mode refuses Lambda layers and arbitrary code in an untrusted file.
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError(f"A base must have one image input; {path} has {len(shape)} inputs.")
    fixed = shape[1:3]
    if None in fixed:
        if size is None:
            raise ValueError(
                f"{path.name} accepts any input size: pass --input-size. Received: input_size=None"
            )
        return model, size
    fixed = (int(fixed[0]), int(fixed[1]))
    if size is not None and size != fixed:
        raise ValueError(
            f"{path.name} takes {fixed[0]}x{fixed[1]} inputs. "
            f"Received: input_size={size[0]}x{size[1]}"
        )
    return model, fixed


def layer_index(model: Any, name: str, argument: str = "layer") -> int:
    """Position of the layer called ``name`` in ``model.layers``.

    Raises:
        ValueError: no such layer; the message names ``argument`` and close names.
    """
    names = [lyr.name for lyr in model.layers]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"`{argument}` must name a layer of {model.name} ({len(names)} layers, "
            f"{names[0]!r} .. {names[-1]!r}).{hint} Received: {argument}={name!r}"
        )
    return names.index(name)


ALL_BLOCKS = "all-blocks"
MAX_BLOCK_LAYERS = 8


def block_ends(model: Any, cap: int = MAX_BLOCK_LAYERS) -> list[str]:
    """The last layer of every block the architecture names (VGG ``block*_pool``, ResNet
    ``conv*_block*_out``, MobileNetV2 ``block_*_add``...), then the model's output layer;
    at most ``cap`` layers, spread evenly from the bottom and always keeping the top."""
    names = [lyr.name for lyr in model.layers]
    owners = block_owners(names)
    ends = [names[i] for i in range(len(names) - 1)
            if owners[i] is not None and owners[i] != owners[i + 1]]
    ends = list(dict.fromkeys([*ends, names[-1]]))
    if len(ends) > cap:
        picks = np.linspace(0, len(ends) - 1, cap).round().astype(int)
        ends = [ends[i] for i in sorted(set(picks.tolist()))]
    return ends


def parse_layers(layer: str | None, model: Any) -> list[str]:
    """``--layer``: None (the base's last layer), a name, ``a,b,c`` or ``all-blocks``.

    Raises:
        ValueError: an unknown layer name, or no blocks to pick from.
    """
    if layer is None:
        return [model.layers[-1].name]
    if layer == ALL_BLOCKS:
        ends = block_ends(model)
        if len(ends) < 2:
            raise ValueError(
                f"{model.name} names no blocks in its layers; list the layers instead. "
                f"Received: layer={layer!r}"
            )
        return ends
    names = [name.strip() for name in layer.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`layer` must list distinct layer names. Received: layer={layer!r}")
    for name in names:
        layer_index(model, name)
    return names


def _pooled(x: Any, pooling: str, layer: str, index: int) -> Any:
    """One layer's output, pooled as asked (layer names kept unique per output)."""
    import keras

    rank = len(x.shape)
    if pooling in ("avg", "max") and rank != 4:
        raise ValueError(
            f"pooling={pooling!r} needs a 4-D feature map, but layer {layer!r} outputs shape "
            f"{tuple(x.shape)}. Use --pooling flatten or none. Received: pooling={pooling!r}"
        )
    suffix = "" if index == 0 else f"_{index}"
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=f"bottleneck_avg_pool{suffix}")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=f"bottleneck_max_pool{suffix}")(x)
    if pooling == "flatten" and rank > 2:
        return keras.layers.Flatten(name=f"bottleneck_flatten{suffix}")(x)
    return x


def _feature_extractor(model: Any, layers: list[str], pooling: str) -> Any:
    """One model, one forward pass, one pooled output per requested layer."""
    import keras

    outputs = [_pooled(model.get_layer(name).output, pooling, name, i)
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

    Raises:
        ValueError: any bad argument, with the value received.
        WeightsUnavailableError: ImageNet weights cannot be downloaded.
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
    attrs: dict[str, Any] = {}
    if base.endswith((".keras", ".h5")) or Path(base).is_file():
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
        model, size = _load_saved_base(path, input_size)
        mode = preprocess_mode or "none"
        attrs.update(base=f"file:{path.name}", base_sha256=file_sha256(path), weights="saved",
                     base_path=str(path.resolve()), weights_path="")
    else:
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
            model = _build_application(spec, weights, size, seed)
        finally:
            keras.config.set_dtype_policy(previous)
        mode = spec.preprocess
        if weights in ("imagenet", "none"):
            recorded, weights_path = weights, ""
        else:
            recorded, weights_path = f"sha256:{file_sha256(weights)}", str(Path(weights).resolve())
        attrs.update(base=spec.name, base_sha256="", weights=recorded, base_path="",
                     weights_path=weights_path)
    model.trainable = False
    layers = parse_layers(layer, model)
    feature = _feature_extractor(model, layers, pooling)
    if jit != "auto":
        feature.jit_compile = jit == "on"
    attrs.update(
        layer=layers[0],
        layers=layers,
        pooling=pooling,
        input_size=[int(size[0]), int(size[1])],
        preprocess=mode,
        seed=int(seed),
        precision=precision,
    )
    return FeatureModel(feature, attrs, (int(size[0]), int(size[1])), mode, layers,
                        batch_size=batch_size)
