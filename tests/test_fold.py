"""BatchNormalization folded into the layer before it: which ones fold, and the features
stay those of the plain forward pass up to float rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.bases import build_feature_model, feature_model_from_attrs
from pipeline.bases.fold import fold_batchnorm
from pipeline.cache import identity_differences

# Folding forms kernel * scale before the convolution instead of after it: the same
# products in another order, so float32 results differ in their last bits.
RTOL, ATOL = 1e-5, 1e-6


def _norm(layers, name: str, **kwargs):
    return layers.BatchNormalization(name=name, **kwargs)


def _random_statistics(model) -> None:
    """Moving statistics and affine weights far from the identity, so a wrong fold shows."""
    import keras

    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []
            for weight in layer.weights:
                shape = weight.shape
                if "variance" in weight.path:
                    values.append(rng.uniform(0.2, 3.0, shape))
                elif "gamma" in weight.path:
                    values.append(rng.uniform(0.5, 1.5, shape))
                else:  # beta, moving_mean
                    values.append(rng.normal(0.0, 0.5, shape))
            layer.set_weights(values)


def _every_case_model():
    """One model holding every case: each layer's name says whether its BN folds."""
    import keras

    L = keras.layers
    x = keras.Input((12, 12, 4))
    v = keras.Input((5,))
    a = _norm(L, "bn_conv_fold")(L.Conv2D(6, 3, padding="same", use_bias=False,
                                          name="conv")(x))
    b = _norm(L, "bn_biased_fold")(L.Conv2D(6, 1, name="conv_biased")(x))
    c = _norm(L, "bn_depthwise_fold")(L.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                                        use_bias=False, name="depthwise")(x))
    d = _norm(L, "bn_separable_fold")(L.SeparableConv2D(6, 3, padding="same", depth_multiplier=2,
                                                        name="separable")(x))
    e = _norm(L, "bn_plain_fold", center=False, scale=False)(
        L.Conv2D(6, 1, use_bias=False, name="conv_no_affine")(x))
    relu = L.Conv2D(6, 1, activation="relu", name="conv_relu")(x)
    f = _norm(L, "bn_after_relu_keep")(relu)
    shared = L.Conv2D(6, 1, use_bias=False, name="conv_shared")(x)
    g = _norm(L, "bn_shared_input_keep")(shared)
    h = _norm(L, "bn_channels_first_keep", axis=1)(
        L.Conv2D(12, 1, use_bias=False, name="conv_axis1")(x))
    residual = L.Add(name="sum_once")([a, b])  # read once: its BNs fold (ResNet-style)
    shortcut = _norm(L, "bn_into_shared_sum_keep")(
        L.Conv2D(6, 1, use_bias=False, name="conv_shortcut")(x))
    # Read by an activation and by something else (Xception-style): kept.
    twice = L.Add(name="sum_twice")([c[..., :6], shortcut])
    # Read twice, by no activation (MobileNetV2-style): folds.
    convs = _norm(L, "bn_into_sum_read_by_convs_fold")(
        L.Conv2D(6, 1, use_bias=False, name="conv_sum_convs")(x))
    by_convs = L.Add(name="sum_read_by_convs")([a, convs])
    maps = L.Concatenate()([residual, d, e, f, g, shared, L.ReLU()(twice), twice, h[..., :6],
                            L.Conv2D(2, 1, name="reads_sum")(by_convs), by_convs])
    dense = _norm(L, "bn_dense_fold")(L.Dense(3, name="dense")(v))
    output_conv = L.Conv2D(2, 1, use_bias=False, name="conv_is_output")(x)
    out_bn = _norm(L, "bn_of_an_output_keep")(output_conv)
    model = keras.Model([x, v], [maps, dense, output_conv, out_bn])
    _random_statistics(model)
    return model


def test_every_foldable_batchnorm_folds_and_outputs_match():
    import keras

    model = _every_case_model()
    folded, count = fold_batchnorm(model)
    kept = sorted(layer.name for layer in folded.layers
                  if isinstance(layer, keras.layers.BatchNormalization))
    assert kept == sorted(layer.name for layer in model.layers if layer.name.endswith("_keep"))
    assert count == sum(layer.name.endswith("_fold") for layer in model.layers) == 7
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 12, 12, 4)).astype(np.float32),
         rng.normal(size=(3, 5)).astype(np.float32)]
    for got, want in zip(folded.predict_on_batch(x), model.predict_on_batch(x), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # Names stay, so a layer is found as before; the original model is untouched.
    assert folded.get_layer("conv").use_bias and not model.get_layer("conv").use_bias


def test_a_model_with_nothing_to_fold_is_returned_as_it_is():
    import keras

    x = keras.Input((4, 4, 3))
    model = keras.Model(x, keras.layers.Conv2D(2, 1, activation="relu")(x))
    assert fold_batchnorm(model) == (model, 0)


def test_folded_model_saves_and_loads_in_safe_mode(tmp_path):
    import keras

    folded, count = fold_batchnorm(_every_case_model())
    assert count
    path = tmp_path / "folded.keras"
    folded.save(path)
    again = keras.models.load_model(path, compile=False, safe_mode=True)
    x = [np.ones((1, 12, 12, 4), np.float32), np.ones((1, 5), np.float32)]
    for got, want in zip(again.predict_on_batch(x), folded.predict_on_batch(x), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def bn_base(tmp_path_factory) -> Path:
    """A saved .keras base with MobileNet-like conv/depthwise + BN blocks, real statistics."""
    import keras

    L = keras.layers
    x = inputs = keras.Input((16, 16, 3))
    x = L.ReLU(6.0)(_norm(L, "bn0")(L.Conv2D(8, 3, strides=2, use_bias=False, name="c0")(x)))
    x = L.ReLU(6.0)(_norm(L, "bn1")(L.DepthwiseConv2D(3, padding="same", use_bias=False,
                                                       name="dw1")(x)))
    x = _norm(L, "bn2")(L.Conv2D(8, 1, use_bias=False, name="pw2")(x))
    model = keras.Model(inputs, x, name="bn_base")
    _random_statistics(model)
    path = tmp_path_factory.mktemp("bn") / "bn_base.keras"
    model.save(path)
    return path


def test_feature_model_fold_is_recorded_and_rebuilt(bn_base):
    import keras

    plain = build_feature_model(str(bn_base), pooling="avg")
    folded = build_feature_model(str(bn_base), pooling="avg", fold_batchnorm=True)
    assert plain.attrs["fold_batchnorm"] is False and folded.attrs["fold_batchnorm"] is True
    images = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(folded.features(images), plain.features(images),
                               rtol=RTOL, atol=ATOL)

    def norms(fm):
        return sum(isinstance(layer, keras.layers.BatchNormalization)
                   for layer in fm.model.layers)

    assert norms(plain) == 3 and norms(folded) == 0
    # predict rebuilds what the cache recorded; a cache from before the choice was
    # recorded was not folded; finetune asks for the plain layers.
    assert norms(feature_model_from_attrs(folded.attrs)) == 0
    old = {k: v for k, v in folded.attrs.items() if k != "fold_batchnorm"}
    assert norms(feature_model_from_attrs(old)) == 3
    assert norms(feature_model_from_attrs(folded.attrs, fold_batchnorm=False)) == 3


def test_a_cache_from_before_the_choice_reads_as_not_folded():
    assert identity_differences({"pooling": "avg"}, {"pooling": "avg",
                                                     "fold_batchnorm": False}) == []
    assert identity_differences({"pooling": "avg"}, {"pooling": "avg",
                                                     "fold_batchnorm": True}) == [
        "  fold_batchnorm: cache has False, this run has True"]
    assert identity_differences({}, {"fold_batchnorm": True},
                                {"fold_batchnorm": "--fold-batchnorm"}) == [
        "  fold_batchnorm: cache has False, this run has True (--fold-batchnorm)"]


def test_extract_records_the_fold_and_refuses_to_resume_with_the_other(tmp_path, bn_base):
    from conftest import write_index_images

    from pipeline.cache import CacheError, read_cache
    from pipeline.extract import ExtractConfig, run_extract

    data = tmp_path / "data"
    write_index_images(data, 6)
    out = tmp_path / "c.h5"

    def config(fold: str) -> ExtractConfig:
        return ExtractConfig(str(data), str(bn_base), preprocess="none", pooling="avg",
                             batch_size=4, out=str(out), fold_batchnorm=fold)

    run_extract(config("off"))
    assert not read_cache(out).attrs["fold_batchnorm"]
    with pytest.raises(CacheError, match=r"fold_batchnorm: cache has False, this run has "
                       r"True \(--fold-batchnorm\)\n(.|\n)*append with `fold_batchnorm`='off'"):
        run_extract(config("on"))
    out.unlink()
    run_extract(config("on"))
    assert read_cache(out).attrs["fold_batchnorm"]
    with pytest.raises(CacheError, match="fold_batchnorm: cache has True, this run has False"):
        run_extract(config("off"))
    with pytest.raises(ValueError, match=r"Received: fold_batchnorm='yes'"):
        run_extract(config("yes"))
