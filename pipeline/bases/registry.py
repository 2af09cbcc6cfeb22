"""The bases by name: ``keras.applications`` constructors, their preprocessing and sizes, and
saved ``.keras`` files; the arguments that choose a base, checked.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.images.kernels import PREPROCESS_MODES, preprocess_pixels

__all__ = [
    "JIT_MODES",
    "MODULE_PREPROCESS",
    "POOLINGS",
    "PRECISIONS",
    "PREPROCESS_MODES",
    "BaseSpec",
    "WeightsUnavailableError",
    "build_application",
    "check_pooling",
    "is_application",
    "check_preprocess",
    "default_input_size",
    "load_saved_base",
    "preprocess",
    "resolve_base",
]

# avg, max: over a feature map's grid or a transformer's patch tokens; cls, mean (= avg),
# cls+mean: transformer tokens (keras-hub bases, pipeline/bases/hub.py).
POOLINGS = ("flatten", "avg", "max", "none", "cls", "mean", "cls+mean")


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


JIT_MODES = ("auto", "on", "off")




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


def is_application(name: str) -> bool:
    """Whether ``name`` is a keras.applications base (case-insensitive)."""
    return _key(name) in _registry()


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
            f"Unknown base. Expected a keras.applications model ({', '.join(names)}), a "
            "path to a .keras file, or a keras-hub preset (a handle such as "
            "hf://keras/..., a built-in preset name, or a preset folder; needs "
            f"pip install 'bottleneck-pipeline[hub]').{hint} Received: base={name!r}"
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
    """Apply a preprocessing mode to float32 RGB pixels in 0..255, in place.

    ``tf``, ``caffe`` and ``torch`` equal Keras' own ``imagenet_utils.preprocess_input``
    bit for bit, so the result equals each application's ``preprocess_input``
    (:func:`pipeline.images.kernels.preprocess_pixels`, which decode workers also run).
    """
    return preprocess_pixels(x, check_preprocess(mode))


_URL = re.compile(r"https?://\S+?\.h5")


def build_application(spec: BaseSpec, weights: str, size: tuple[int, int], seed: int) -> Any:
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


def load_saved_base(path: Path, size: tuple[int, int] | None) -> tuple[Any, tuple[int, int]]:
    import keras

    from pipeline.bases.pooling import register_custom_layers

    register_custom_layers(path)
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
