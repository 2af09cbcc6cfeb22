"""keras-hub backbones as bases: DINOv2, ViT, SigLIP/CLIP vision towers, ResNet, ...

A base is a keras-hub preset: a handle (``hf://keras/...``, ``kaggle://...``), a built-in
preset name (``dinov2_with_registers_base``) or a local preset folder (what
``Backbone.save_to_preset`` and ``ImageConverter.save_to_preset`` write: config.json,
model.weights.h5, image_converter.json). Its preprocessing is the preset's own
``ImageConverter`` (scale and offset, per channel), applied inside the feature model, so it
runs in the compiled forward pass and can never drift from the preset. Pixels are resized
as ``image_dataset_from_directory`` resizes them (no crop to the aspect ratio, which the
converter would do first by default).

Token outputs (B, tokens, dim) are pooled by ``--pooling``: ``cls`` (the class token),
``mean`` or ``avg`` (mean of the patch tokens, without class and register tokens), ``max``,
``cls+mean`` (the two concatenated: DINOv2's linear-evaluation recipe), ``flatten`` or
``none`` (the token grid kept). Feature maps (B, H, W, C) are pooled as for
``keras.applications`` bases.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "HUB_BACKBONE",
    "HUB_PREFIX",
    "HubBase",
    "hub_feature_extractor",
    "hub_layers",
    "is_hub_base",
    "load_hub_base",
]

HUB_PREFIX = "hub:"  # how a cache records a keras-hub base: hub:<handle or folder>
HUB_BACKBONE = "hub_backbone"  # the backbone's layer in a feature model (finetune unfreezes it)


_REMOTE = ("hf://", "kaggle://", "modelscope://")


# Backbones whose first token is a class token though they have no ``use_class_token``.
_CLASS_TOKEN_MODELS = {"DINOV2Backbone", "DINOV3Backbone", "CLIPVisionEncoder"}


class HubBase(NamedTuple):
    """A loaded keras-hub backbone and what defines its features."""

    backbone: Any
    size: tuple[int, int]
    scale: list[float]
    offset: list[float]
    attrs: dict[str, Any]


def _keras_hub() -> Any:
    try:
        import keras_hub
    except ImportError as exc:
        raise ValueError(
            "keras-hub bases need the keras-hub package: pip install "
            "'bottleneck-pipeline[hub]'."
        ) from exc
    return keras_hub


@functools.cache
def _builtin_presets() -> frozenset[str]:
    try:
        import keras_hub
    except ImportError:
        return frozenset()
    return frozenset(keras_hub.models.Backbone.presets)


def is_hub_base(base: str) -> bool:
    """Whether ``--base`` names a keras-hub preset: a handle, ``hub:...``, a folder with a
    config.json, or a built-in preset name (keras.applications names are checked first by
    the caller)."""
    if base.startswith((HUB_PREFIX, *_REMOTE)):
        return True
    if (Path(base) / "config.json").is_file():
        return True
    return base in _builtin_presets()


def _handle(base: str) -> str:
    """The preset handle of ``--base`` (a local folder as an absolute path)."""
    handle = base.removeprefix(HUB_PREFIX)
    if (Path(handle) / "config.json").is_file():
        return str(Path(handle).resolve())
    return handle


def load_hub_base(base: str, *, weights: str | None, input_size: tuple[int, int] | None,
                  precision: str, seed: int = 0) -> HubBase:
    """Load a keras-hub backbone (its vision tower for image-text models) and its converter.

    Args:
        weights: ``None``/``preset`` (the preset's weights) or ``none`` (random, from the
            preset's config, seeded by ``seed``; for tests and timing).
        input_size: rebuild the backbone for this (H, W) (``image_shape`` override).

    Raises:
        ValueError: keras-hub missing, no image converter in the preset, a bad argument.
        WeightsUnavailableError: the preset cannot be downloaded (offline).
    """
    from pipeline.bases.registry import WeightsUnavailableError
    from pipeline.util.files import file_sha256

    keras_hub = _keras_hub()
    if weights not in (None, "preset", "none"):
        raise ValueError(
            "A keras-hub base carries its weights in its preset: leave --weights unset "
            f"(or 'none' for random weights). Received: weights={weights!r}"
        )
    handle = _handle(base)
    overrides = {"image_shape": (*input_size, 3)} if input_size else {}
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    if weights == "none":
        keras.utils.set_random_seed(seed)
    try:
        backbone = keras_hub.models.Backbone.from_preset(
            handle, load_weights=weights != "none", **overrides)
        converter = _converter_config(handle)
    except FileNotFoundError as exc:
        raise ValueError(
            f"The keras-hub preset {handle} lacks a file ({exc}). A preset folder needs "
            "config.json, model.weights.h5 and image_converter.json (save the converter "
            "with ImageConverter.save_to_preset next to the backbone). "
            f"Received: base={base!r}"
        ) from exc
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # noqa: BLE001 - a download failure has many exception types
        if Path(handle).is_dir():
            raise
        raise WeightsUnavailableError(
            f"Cannot load the keras-hub preset {handle!r} (offline?). On a machine with "
            "network run: python -c \"import keras_hub as h; "
            f"h.models.Backbone.from_preset('{handle}').save_to_preset('PRESET'); "
            f"h.layers.ImageConverter.from_preset('{handle}').save_to_preset('PRESET')\", "
            f"copy the PRESET folder here and pass --base PRESET. Received: base={base!r}"
        ) from exc
    finally:
        keras.config.set_dtype_policy(previous)
    vision = getattr(backbone, "vision_encoder", None)  # SigLIP, CLIP: the image tower
    model = vision if vision is not None else backbone
    shape = model.input_shape
    shape = shape["images"] if isinstance(shape, dict) else shape
    size = input_size or converter.get("image_size") or shape[1:3]
    if size is None or None in tuple(size):
        raise ValueError(f"{handle} accepts any input size: pass --input-size. "
                         "Received: input_size=None")
    weights_file = (Path(handle) / "model.weights.h5" if Path(handle).is_dir()
                    else _downloaded(handle))
    attrs = dict(
        base=HUB_PREFIX + handle,
        base_sha256=file_sha256(weights_file) if weights != "none" else "",
        weights="none" if weights == "none" else "preset",
        base_path=handle if Path(handle).is_dir() else "",
        weights_path="",
        hub_class=type(model).__name__,
        hub_scale=_per_channel(converter.get("scale"), 1.0),
        hub_offset=_per_channel(converter.get("offset"), 0.0),
    )
    return HubBase(model, (int(size[0]), int(size[1])), attrs["hub_scale"],
                   attrs["hub_offset"], attrs)


def _converter_config(handle: str) -> dict[str, Any]:
    """The preset's image converter settings (image_size, scale, offset), read from its
    image_converter.json.

    Why not ``ImageConverter.from_preset``: it resolves the converter class from the
    backbone's, and a vision tower saved alone (SigLIP's, CLIP's) has none registered;
    the settings are all this pipeline uses.
    """
    import json

    from keras_hub.src.utils.preset_utils import get_file

    with open(get_file(handle, "image_converter.json"), encoding="utf-8") as f:
        return dict(json.load(f).get("config", {}))


def _downloaded(handle: str) -> Path:
    """The local copy of a downloaded preset's weights (keras-hub's cache)."""
    from keras_hub.src.utils.preset_utils import get_file

    return Path(get_file(handle, "model.weights.h5"))


def _per_channel(value: Any, default: float) -> list[float]:
    """A converter's scale or offset as three floats (None: the identity)."""
    if value is None:
        return [default] * 3
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * 3 if len(values) == 1 else values


def _outputs(model: Any) -> dict[str, Any]:
    """The tensors ``--layer`` can name: the pyramid outputs (DINOv2's ``stage1`` ..), the
    layers' outputs, and the backbone's output under its last layer's name."""
    named = {layer.name: layer.output for layer in model.layers[1:]
             if not isinstance(layer.output, (list, tuple, dict))}
    named.update(getattr(model, "pyramid_outputs", None) or {})
    named[model.layers[-1].name] = model.output
    return named


def hub_layers(layer: str | None, model: Any) -> list[str]:
    """``--layer`` for a keras-hub backbone: None (its output), a name or ``a,b,c``.

    Raises:
        ValueError: an unknown name; the message lists the names there are.
    """
    if layer is None:
        return [model.layers[-1].name]
    names = [name.strip() for name in layer.split(",") if name.strip()]
    known = _outputs(model)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"{type(model).__name__} has no output {name!r}; it has {', '.join(known)}."
                f"{hint} Received: layer={layer!r}"
            )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`layer` must list distinct output names. Received: layer={layer!r}")
    return names


def _prefix_tokens(model: Any) -> tuple[int, bool]:
    """(tokens before the patch tokens, whether the first is a class token)."""
    has_class = bool(getattr(model, "use_class_token",
                             type(model).__name__ in _CLASS_TOKEN_MODELS))
    return int(has_class) + int(getattr(model, "num_register_tokens", 0) or 0), has_class


def hub_feature_extractor(loaded: HubBase, layers: list[str], pooling: str) -> Any:
    """Raw 0..255 pixels -> the converter's scale and offset -> the backbone -> one pooled
    output per name in ``layers``.

    Raises:
        ValueError: a pooling that does not fit an output (``cls`` without a class token,
            a token pooling of a feature map, ``avg`` of an already pooled vector).
    """
    import keras

    from pipeline.bases.pooling import TokenPooling, pooled

    model = loaded.backbone
    outputs = _outputs(model)
    inner = keras.Model(model.input, [outputs[name] for name in layers], name=HUB_BACKBONE)
    pixels = keras.Input((*loaded.size, 3), name="pixels")
    x = keras.layers.Rescaling(loaded.scale, loaded.offset, name="hub_image_converter")(pixels)
    found = inner({"images": x} if isinstance(model.input, dict) else x)
    found = found if isinstance(found, (list, tuple)) else [found]
    prefix, has_class = _prefix_tokens(model)
    pooled_outputs = []
    for i, (name, tensor) in enumerate(zip(layers, found, strict=True)):
        if len(tensor.shape) == 3 and pooling in TokenPooling.MODES:
            if pooling in ("cls", "cls+mean") and not has_class:
                raise ValueError(
                    f"{type(model).__name__} has no class token: use --pooling mean, max, "
                    f"flatten or none. Received: pooling={pooling!r}")
            pooled_outputs.append(
                TokenPooling(pooling, prefix, name=f"bottleneck_tokens_{i}")(tensor))
        else:
            pooled_outputs.append(pooled(tensor, pooling, name, i))
    return keras.Model(pixels, pooled_outputs if len(pooled_outputs) > 1
                       else pooled_outputs[0], name="feature_extractor")
