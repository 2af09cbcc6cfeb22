"""bases: registry, preprocessing equal to each application's own, weights, cut, pooling."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from conftest import PYTHON, SCRIPTS, write_index_images

from pipeline.bases import (
    MODULE_PREPROCESS,
    build_feature_model,
    check_pooling,
    preprocess,
    resolve_base,
)


def test_every_application_is_registered():
    import keras

    constructors = [n for n in dir(keras.applications) if n[:1].isupper()]
    assert len(constructors) > 30
    for name in constructors:
        assert resolve_base(name.lower()).name == name


@pytest.mark.parametrize("module_name", sorted(MODULE_PREPROCESS))
def test_preprocess_mode_equals_application_preprocess_input(module_name):
    import keras

    module = getattr(keras.applications, module_name)
    x = np.random.default_rng(0).uniform(0, 255, (2, 7, 9, 3)).astype(np.float32)
    expected = np.asarray(module.preprocess_input(x.copy()))
    ours = preprocess(x.copy(), MODULE_PREPROCESS[module_name])
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_preprocess_pixels_equals_keras_on_every_level_and_any_shape(mode):
    """The decoders' own NumPy preprocessing: Keras' values bit for bit, for every integer
    level, fractions between them (resized pixels), one image or a batch."""
    from keras.applications import imagenet_utils

    from pipeline.images.kernels import preprocess_pixels

    rng = np.random.default_rng(2)
    levels = np.arange(256 * 3, dtype=np.float32).reshape(16, 16, 3) % 256
    fractions = rng.uniform(0, 255, (3, 5, 4, 3)).astype(np.float32)
    for x in (levels, fractions, fractions[1]):
        expected = np.asarray(imagenet_utils.preprocess_input(
            x.copy(), data_format="channels_last", mode=mode))
        mine = x.copy()
        assert preprocess_pixels(mine, mode) is mine  # in place, BGR included
        assert mine.tobytes() == np.ascontiguousarray(expected).tobytes()
        spread = np.repeat(x.copy(), 2, axis=-2)[..., ::2, :]  # not contiguous
        preprocess_pixels(spread, mode)
        assert np.ascontiguousarray(spread).tobytes() == mine.tobytes()


def test_an_unknown_preprocess_mode_is_named():
    from pipeline.images.kernels import preprocess_pixels

    with pytest.raises(ValueError, match=r"Received: preprocess='mean'"):
        preprocess_pixels(np.zeros((2, 2, 3), np.float32), "mean")
    with pytest.raises(ValueError, match=r"Received: preprocess='mean'"):
        preprocess(np.zeros((2, 2, 3), np.float32), "mean")


def test_names_are_case_insensitive_and_unknown_names_suggest():
    assert resolve_base("VGG16").name == "VGG16"
    assert resolve_base("mobilenet_v2").name == "MobileNetV2"
    assert resolve_base("EfficientNetB0").default_size == 224
    assert resolve_base("inceptionv3").default_size == 299
    with pytest.raises(ValueError, match=r"Did you mean .*VGG16.*Received: base='vgg17'"):
        resolve_base("vgg17")


def test_pooling_message_names_argument_and_value():
    with pytest.raises(ValueError, match=r"Received: pooling='median'"):
        check_pooling("median")


@pytest.mark.parametrize(
    "pooling, shape", [("avg", (1280,)), ("max", (1280,)), ("flatten", (1280,)),
                       ("none", (1, 1, 1280))]
)
def test_pooling_shapes(pooling, shape):
    fm = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), pooling=pooling)
    assert fm.feature_shape == shape
    assert fm.attrs["layer"] == "out_relu" and fm.attrs["preprocess"] == "tf"


def test_layer_cut_equals_the_layer_output():
    import keras

    fm = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32),
                             layer="block_3_expand", pooling="none", seed=5)
    keras.utils.set_random_seed(5)
    full = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    probe = keras.Model(full.inputs, full.get_layer("block_3_expand").output)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(fm.model.predict_on_batch(x), probe.predict_on_batch(x),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Close names: .*block_3_expand.*Received: layer="):
        build_feature_model("mobilenetv2", weights="none", input_size=(32, 32),
                            layer="block_3_expnd")


def test_random_weights_are_seeded():
    def weights(seed):
        fm = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), seed=seed)
        return np.concatenate([w.ravel() for w in fm.model.get_weights()])

    np.testing.assert_array_equal(weights(1), weights(1))
    assert not np.allclose(weights(1), weights(2))


def test_local_weights_file_is_loaded_and_hashed(tmp_path):
    import keras

    keras.utils.set_random_seed(9)
    donor = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mine.weights.h5"
    donor.save_weights(path)
    fm = build_feature_model("mobilenetv2", weights=str(path), input_size=(32, 32),
                             pooling="none")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(fm.model.predict_on_batch(x), donor.predict_on_batch(x), rtol=1e-6)
    assert fm.attrs["weights"].startswith("sha256:") and len(fm.attrs["weights"]) == 71
    with pytest.raises(ValueError, match=r"Received: weights='nope.h5'"):
        build_feature_model("mobilenetv2", weights="nope.h5", input_size=(32, 32))


def test_saved_model_base_refuses_lambda_layers(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    model.save(tmp_path / "evil.keras")
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        build_feature_model(str(tmp_path / "evil.keras"), pooling="avg")


def test_imagenet_offline_names_the_file_to_place(tmp_path):
    write_index_images(tmp_path / "data", 3)
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras_home"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    proc = subprocess.run(
        [PYTHON, str(SCRIPTS / "extract.py"), str(tmp_path / "data"), "--base", "vgg16",
         "--weights", "imagenet", "--input-size", "32", "--out", str(tmp_path / "c.h5")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in last
    assert "keras_home/models/" in last and "--weights" in last
    assert "Traceback" not in proc.stderr


def test_feature_model_rebuilds_from_recorded_attrs(tmp_path, probe_model):
    import shutil

    from pipeline.bases import feature_model_from_attrs

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    named = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), seed=4)
    again = feature_model_from_attrs(named.attrs)
    np.testing.assert_array_equal(again.features(x.copy()), named.features(x.copy()))

    base = tmp_path / "probe.keras"
    shutil.copy(probe_model, base)
    saved = build_feature_model(str(base), pooling="avg", preprocess_mode="scale")
    rebuilt = feature_model_from_attrs(saved.attrs)
    assert rebuilt.preprocess == "scale"
    np.testing.assert_array_equal(rebuilt.features(x[:, :8, :8].copy()),
                                  saved.features(x[:, :8, :8].copy()))
    base.write_bytes(base.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="changed since the cache was made"):
        feature_model_from_attrs(saved.attrs)


def test_mixed_precision_and_jit_forward_pass():
    """The GPU-box switches build and run on CPU too; features come back as float32."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    plain = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32),
                                layer="block_2_add", pooling="avg", seed=3)
    mixed = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32),
                                layer="block_2_add", pooling="avg", seed=3,
                                precision="mixed_bfloat16", jit="on")
    assert mixed.attrs["precision"] == "mixed_bfloat16"
    a, b = plain.features(x.copy()), mixed.features(x.copy())
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.1)
    import keras

    assert keras.config.dtype_policy().name == "float32", "global policy must be restored"
    with pytest.raises(ValueError, match="Received: jit='yes'"):
        build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), jit="yes")


@pytest.mark.parametrize("jit", ["on", "off"])
def test_every_forward_pass_has_the_batch_shape(jit):
    """A short tail or a lone image runs padded to ``batch_size`` rows (one XLA compile;
    without XLA one graph, traced once), and features equal a plain forward pass."""
    import keras

    fm = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), jit=jit,
                             batch_size=8)
    shapes = []
    run = fm.model.predict_on_batch

    def recorded(x):
        shapes.append(x.shape[0])
        return run(x)

    fm.model.predict_on_batch = recorded
    x = np.random.default_rng(0).uniform(0, 255, (11, 32, 32, 3)).astype(np.float32)
    plain = keras.Model(fm.model.inputs, fm.model.outputs).predict(
        keras.applications.mobilenet_v2.preprocess_input(x.copy()), verbose=0)
    before = x.copy()
    features = np.concatenate([fm.features(x[:8]), fm.features(x[8:], positions=[8, 9, 10])])
    np.testing.assert_array_equal(x, before)  # the caller's pixels are left alone
    if jit == "on":
        assert shapes == [8, 8]
    else:
        assert shapes == [] and fm._forward.graph.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(features, plain, rtol=1e-4, atol=1e-5)


def test_an_image_gets_the_same_bytes_in_any_company():
    """Float results can depend on the batch shape and a row's place in it (oneDNN picks
    kernels by shape; CPUs differ). A row computed alone, in a resumed tail, among other
    neighbours or split over two calls is computed in the same slot of the same shape:
    byte-identical features on any CPU."""
    fm = build_feature_model("mobilenetv2", weights="none", input_size=(32, 32), batch_size=4)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (10, 32, 32, 3)).astype(np.float32)
    whole = fm.features(x)
    alone = np.concatenate([fm.features(x[i:i + 1], positions=[i]) for i in range(10)])
    resumed = fm.features(x[5:], positions=range(5, 10))
    others = x.copy()
    others[[0, 2, 3]] = rng.uniform(0, 255, (3, 32, 32, 3))  # row 1's neighbours change
    scattered = fm.features(x[[1, 6, 9]], positions=[1, 6, 9])  # three batches in one call
    assert alone.tobytes() == whole.tobytes()
    assert resumed.tobytes() == whole[5:].tobytes()
    assert fm.features(others)[1].tobytes() == whole[1].tobytes()
    assert scattered.tobytes() == whole[[1, 6, 9]].tobytes()


@pytest.mark.parametrize("base, mode", [("mobilenetv2", "tf"), ("resnet50", "caffe"),
                                        ("densenet121", "torch"), ("efficientnetb0", "none")])
def test_pixels_preprocessed_by_the_decoders_give_the_same_bytes(base, mode):
    """``preprocessed=True`` (the decode workers preprocessed, a whole batch goes to the
    forward pass without a copy) gives the bytes of preprocessing here, for whole batches,
    a short tail and scattered rows whose empty slots hold preprocessed zeros; a batch
    TensorFlow reads in place (aligned) and one it copies (not aligned) alike, and the
    batch is left as it was (EfficientNet rescales its input inside the model)."""
    from pipeline.images.kernels import preprocess_pixels
    from pipeline.util.arrays import aligned_empty, is_aligned

    fm = build_feature_model(base, weights="none", input_size=(32, 32), batch_size=4)
    assert fm.preprocess == mode
    x = np.random.default_rng(3).uniform(0, 255, (10, 32, 32, 3)).astype(np.float32)
    ready = aligned_empty(x.shape)
    ready[...] = preprocess_pixels(x.copy(), mode)
    shifted = aligned_empty((x.size + 1,))[1:].reshape(x.shape)  # 4 bytes off
    shifted[...] = ready
    assert is_aligned(ready) and not is_aligned(shifted)
    kept = ready.copy()
    for rows in (np.arange(10), np.array([1, 6, 9]), np.arange(8, 10)):
        raw = fm.features(x[rows], positions=rows)
        for fed in (ready, shifted):
            batch = fed[rows] if len(rows) < 10 else fed  # fed: the decoders' ring itself
            assert fm.features(batch, positions=rows, preprocessed=True).tobytes() \
                == raw.tobytes()
    assert ready.tobytes() == kept.tobytes() == shifted.tobytes()  # only read


def test_a_classifier_output_points_to_its_last_feature_maps(tmp_path):
    """A .keras base saved with its classifier: the message names --layer and the layers
    holding feature maps, not --pooling flatten on class scores."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="scores")(x)
    path = tmp_path / "classifier.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match=r"'scores' outputs vectors .*--layer; its last ones "
                                         r"are .*conv_a, conv_b\..*Received: pooling='avg'"):
        build_feature_model(str(path), pooling="avg")
