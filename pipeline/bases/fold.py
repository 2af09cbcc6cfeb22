"""Frozen BatchNormalization folded into the convolution or dense layer that feeds it.

A frozen base's BatchNormalization is an affine map per channel, ``y = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When ``x`` is the output of a
linear layer (a convolution or dense layer with no activation) and nothing else reads
``x``, ``s`` and ``t`` can be moved into that layer's kernel and bias once, at build time.
The forward pass then skips two elementwise passes over every normalised activation: on a
CPU that is 27-35 % of MobileNetV2's forward time (measured, docs/performance.md), and the
bias add fuses into oneDNN's convolution. The features equal the plain forward pass up to
float rounding (the products are formed in another order); ``--fold-batchnorm off`` keeps
the plain pass, bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)


def fold_batchnorm(model: Any) -> tuple[Any, int]:
    """A copy of a functional ``model`` with every foldable BatchNormalization folded.

    A BatchNormalization is folded when it normalises the last axis of the output of a
    Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D or Dense layer that has no
    activation, is called once in ``model``, and whose output nothing else reads (not
    another layer, not a model output). Every other layer is the same object as in
    ``model`` (its weights shared, not copied); a folded layer is a new layer of the same
    class and name, with a bias. A model that is not a flat functional graph (a
    subclassed model) is returned as it is; a nested model is one opaque layer.

    Returns:
        (the folded model, or ``model`` itself when nothing folds; how many were folded).
    """
    import keras

    pairs = _foldable_pairs(model)
    if not pairs:
        return model, 0
    folded = {id(linear): _with_bias(linear) for linear, _ in pairs}
    skipped = {id(norm) for _, norm in pairs}

    def clone(layer: Any) -> Any:
        return folded.get(id(layer), layer)

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if id(layer) in skipped:
            return args[0]  # the folded layer before it already normalised this tensor
        return layer(*args, **kwargs)

    result = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for linear, norm in pairs:
        result.get_layer(linear.name).set_weights(_folded_weights(linear, norm))
    result.trainable = model.trainable
    log.debug("folded %d BatchNormalization layers into the layers before them", len(pairs))
    return result, len(pairs)


def _foldable_pairs(model: Any) -> list[tuple[Any, Any]]:
    """(linear layer, BatchNormalization reading only its output) pairs of ``model``."""
    import keras

    nodes = [node for depth in getattr(model, "_nodes_by_depth", {}).values()
             for node in depth]
    if not nodes:
        return []
    readers: dict[int, list[Any]] = {}  # id(tensor) -> the nodes of this model reading it
    calls: dict[int, int] = {}  # id(layer) -> how many times this model calls it
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            readers.setdefault(id(tensor), []).append(node)
    outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
    pairs = []
    for node in nodes:
        norm = node.operation
        if (not isinstance(norm, keras.layers.BatchNormalization) or calls[id(norm)] != 1
                or len(node.input_tensors) != 1 or len(node.output_tensors) != 1):
            continue
        x = node.input_tensors[0]
        linear = x._keras_history.operation
        if (_is_linear(linear) and calls.get(id(linear)) == 1
                and len(readers.get(id(x), [])) == 1 and id(x) not in outputs
                and norm.axis in (-1, len(x.shape) - 1)
                and not _into_shared_sum(node.output_tensors[0], readers, outputs)):
            pairs.append((linear, norm))
    return pairs


def _into_shared_sum(y: Any, readers: dict[int, list[Any]], outputs: set[int]) -> bool:
    """Whether ``y`` is summed by an Add whose sum an activation reads, and something else.

    Why: TensorFlow's graph optimiser (grappler's remapper, TF 2.21) fuses convolution +
    bias + Add + activation into one op, and fails when the sum has another reader
    ("remapper failed: ... fanout ... exist for missing node"; Xception's shortcuts). It
    then logs an error and skips every fusion of the graph. Such a BatchNormalization is
    left as it is. Sums read once (ResNet) or read by no activation (MobileNetV2: the next
    block's convolution and the next Add) fold: tried, no error.
    """
    import keras

    activations = (keras.layers.Activation, keras.layers.ReLU, keras.layers.ELU,
                   keras.layers.LeakyReLU, keras.layers.PReLU, keras.layers.Softmax)
    for node in readers.get(id(y), []):
        if isinstance(node.operation, keras.layers.Add):
            total = node.output_tensors[0]
            after = readers.get(id(total), [])
            if (len(after) + (id(total) in outputs) > 1
                    and any(isinstance(n.operation, activations) for n in after)):
                return True
    return False


_LINEAR = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
           "SeparableConv1D", "SeparableConv2D", "Dense")


def _is_linear(layer: Any) -> bool:
    """A layer whose output is ``x @ kernel (+ bias)`` per output channel on the last axis."""
    if type(layer).__name__ not in _LINEAR or not layer.built:
        return False
    config = layer.get_config()
    return (config.get("activation") in ("linear", None)
            and config.get("data_format", "channels_last") == "channels_last")


def _with_bias(linear: Any) -> Any:
    """A new layer like ``linear`` (same class, name and settings) with a bias; its
    weights are set once the clone has built it."""
    config = {**linear.get_config(), "use_bias": True, "bias_initializer": "zeros"}
    return type(linear).from_config(config)


def _folded_weights(linear: Any, norm: Any) -> list[np.ndarray]:
    """``linear``'s weights with ``norm``'s scale and shift folded in (in float64, then
    cast to the variables' dtype, so the fold itself adds no rounding beyond one cast)."""
    channels = int(norm.moving_mean.shape[0])
    gamma = _value(norm.gamma) if norm.scale else np.ones(channels)
    beta = _value(norm.beta) if norm.center else np.zeros(channels)
    scale = gamma / np.sqrt(_value(norm.moving_variance) + norm.epsilon)
    shift = beta - _value(norm.moving_mean) * scale
    name = type(linear).__name__
    bias = _value(linear.bias) if linear.use_bias else np.zeros(channels)
    if name.startswith("Separable"):
        depthwise, pointwise = _value(linear.depthwise_kernel), _value(linear.pointwise_kernel)
        kernels = [depthwise, pointwise * scale]
    elif name.startswith("Depthwise"):
        kernel = _value(linear.kernel)  # (..., in, multiplier): output c * m + j
        kernels = [kernel * scale.reshape(kernel.shape[-2:])]
    else:
        kernels = [_value(linear.kernel) * scale]
    dtype = linear.variable_dtype
    return [k.astype(dtype) for k in kernels] + [(bias * scale + shift).astype(dtype)]


def _value(variable: Any) -> np.ndarray:
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable,
                      dtype=np.float64)
