"""keras-hub backbones as bases: tiny random-weight presets saved as local folders; cached
features equal a plain keras-hub forward pass of the same converted pixels, pooled by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_index_images

from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.images import load_image

keras_hub = pytest.importorskip("keras_hub")

SCALE = [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]
OFFSET = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]


def save_preset(backbone, folder: Path, size: int) -> Path:
    """A local preset folder as keras-hub writes one: backbone and image converter."""
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ImageConverter(image_size=(size, size), scale=SCALE,
                                    offset=OFFSET).save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    """A DINOv2 with register tokens (a 2-block token model), a ViT, a SigLIP vision tower
    saved alone (no class token; a pooled head) and a ResNet."""
    import keras

    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    dino = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        num_register_tokens=2, image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3))
    vit = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1,
                                       num_heads=2, hidden_dim=16, mlp_dim=32)
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3))
    siglip = keras_hub.models.SigLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3))
    return {"siglip": save_preset(siglip, root / "siglip", 32),
            "dino": save_preset(dino, root / "dino", 28),
            "vit": save_preset(vit, root / "vit", 32),
            "resnet": save_preset(resnet, root / "resnet", 32)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub-data")
    write_index_images(root, 7, classes=("a", "b"))
    return root


def reference(preset: Path, data: Path, paths: list[str], size: int,
              output: str | None = None) -> np.ndarray:
    """keras-hub's own forward pass of the converted pixels (no pooling)."""
    import keras

    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    pixels = np.stack([load_image(data / p, (size, size)) for p in paths])
    x = pixels * np.float32(SCALE) + np.float32(OFFSET)
    if output is not None:
        backbone = keras.Model(backbone.input, backbone.pyramid_outputs[output])
    return np.asarray(backbone.predict({"images": x} if isinstance(backbone.input, dict)
                                       else x, verbose=0))


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean", "none"])
def test_dinov2_tokens_pooled_equal_a_plain_keras_hub_forward_pass(tmp_path, presets, data,
                                                                   pooling):
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(presets["dino"]), pooling=pooling, batch_size=4,
                              out=str(out)))
    cache = read_cache(out)
    tokens = reference(presets["dino"], data, cache.paths, 28)  # (n, 1 + 2 + 4, 16)
    patches = tokens[:, 3:]  # class token, 2 registers, then the 2x2 patch grid
    expected = {"cls": tokens[:, 0], "mean": patches.mean(1),
                "cls+mean": np.concatenate([tokens[:, 0], patches.mean(1)], -1),
                "none": tokens}[pooling]
    np.testing.assert_allclose(cache.features, expected, rtol=1e-5, atol=1e-5)
    assert cache.attrs["base"] == f"hub:{presets['dino'].resolve()}"
    assert cache.attrs["hub_class"] == "DINOV2Backbone"
    np.testing.assert_allclose(cache.attrs["hub_scale"], SCALE)
    assert len(cache.attrs["base_sha256"]) == 64


def test_intermediate_blocks_in_one_pass_and_other_backbones(tmp_path, presets, data):
    out = tmp_path / "blocks.h5"
    run_extract(ExtractConfig(str(data), str(presets["dino"]), layer="stage1,stage2",
                              pooling="cls", batch_size=4, out=str(out)))
    first = read_cache(out, layer="stage1")
    np.testing.assert_allclose(
        first.features, reference(presets["dino"], data, first.paths, 28, "stage1")[:, 0],
        rtol=1e-5, atol=1e-5)
    vit_out, resnet_out = tmp_path / "vit.h5", tmp_path / "resnet.h5"
    run_extract(ExtractConfig(str(data), str(presets["vit"]), pooling="cls", out=str(vit_out)))
    vit = read_cache(vit_out)
    np.testing.assert_allclose(vit.features, reference(presets["vit"], data, vit.paths, 32)[:, 0],
                               rtol=1e-5, atol=1e-5)
    run_extract(ExtractConfig(str(data), str(presets["resnet"]), out=str(resnet_out)))
    resnet = read_cache(resnet_out)  # a feature map: avg pooling, as for keras.applications
    np.testing.assert_allclose(
        resnet.features, reference(presets["resnet"], data, resnet.paths, 32).mean((1, 2)),
        rtol=1e-5, atol=1e-5)


def test_bad_choices_are_named(tmp_path, presets, data):
    with pytest.raises(ValueError,
                       match=r"needs transformer tokens.*avg, max.*Received: pooling='cls'"):
        run_extract(ExtractConfig(str(data), str(presets["resnet"]), pooling="cls",
                                  out=str(tmp_path / "a.h5")))
    with pytest.raises(ValueError, match=r"has no output 'stage9'.*stage1.*Received: layer"):
        run_extract(ExtractConfig(str(data), str(presets["dino"]), layer="stage9",
                                  out=str(tmp_path / "b.h5")))
    with pytest.raises(ValueError, match=r"leave --preprocess unset"):
        run_extract(ExtractConfig(str(data), str(presets["dino"]), preprocess="tf",
                                  out=str(tmp_path / "c.h5")))


def test_a_changed_preset_is_refused_on_rebuild(tmp_path, presets, data):
    """A cache (and a head trained on it) names its preset folder and weights' sha256: a
    changed weights file can never silently give other features."""
    import shutil

    from pipeline.bases import feature_model_from_attrs

    preset = tmp_path / "dino"
    shutil.copytree(presets["dino"], preset)
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(preset), pooling="cls", out=str(out)))
    attrs = read_cache(out).attrs
    rebuilt = feature_model_from_attrs(attrs)
    assert rebuilt.attrs["base_sha256"] == attrs["base_sha256"]
    with open(preset / "model.weights.h5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="changed since the cache was made"):
        feature_model_from_attrs(attrs)


def test_a_preset_that_cannot_download_says_what_to_fetch_and_where(monkeypatch):
    """Offline (here simulated: the download raises as requests does without network)."""
    from pipeline.bases import WeightsUnavailableError, build_feature_model

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    with pytest.raises(WeightsUnavailableError,
                       match=r"save_to_preset\('PRESET'\).*--base PRESET. Received: base="):
        build_feature_model("hf://keras/dinov2_small")


def test_random_weights_from_a_preset_config(presets):
    from pipeline.bases import build_feature_model

    fm = build_feature_model(str(presets["vit"]), weights="none", pooling="cls", seed=4)
    assert fm.attrs["weights"] == "none" and fm.attrs["base_sha256"] == ""
    assert fm.feature_shape == (16,)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    again = build_feature_model(str(presets["vit"]), weights="none", pooling="cls", seed=4)
    np.testing.assert_array_equal(fm.features(x), again.features(x))  # seeded


def test_a_head_on_a_hub_cache_predicts_new_images_as_on_its_cached_rows(tmp_path, presets,
                                                                         data):
    """fit_head and predict work on these caches unchanged: predict rebuilds the preset
    (converter inside the model, token pooling) and gives the head's cached-row answers."""
    import csv

    from pipeline.fit import FitConfig, run_fit
    from pipeline.heads import load_head
    from pipeline.predict import PredictConfig, run_predict

    cache_path = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(presets["dino"]), pooling="cls+mean",
                              batch_size=4, out=str(cache_path)))
    model_dir, _ = run_fit(FitConfig(str(cache_path), head="logreg", out=str(tmp_path / "m")))
    cache = read_cache(cache_path)
    expected = load_head(model_dir).predict_proba(np.asarray(cache.features, np.float32))
    run_predict(PredictConfig(str(model_dir), [str(data)], str(tmp_path / "p.csv"),
                              batch_size=4))
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cache.paths)
    for row in rows:
        i = cache.paths.index(Path(row["path"]).relative_to(data).as_posix())
        got = [float(row[f"p_{c}"]) for c in cache.class_names]
        np.testing.assert_allclose(got, expected[i], rtol=1e-4, atol=1e-5)


def test_an_exported_hub_base_and_head_predicts_as_the_model_folder(tmp_path, presets, data):
    """fit_head --export writes converter + backbone + token pooling + head as one .keras
    file, predict --export DIR the same without the head beside it; predict loads both
    (keras-hub and TokenPooling registered) with the same answers."""
    import csv

    from pipeline.cli import fit_head_main, predict_main

    cache = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(presets["dino"]), pooling="cls+mean",
                              out=str(cache)))
    exported = tmp_path / "e2e.keras"
    assert fit_head_main([str(cache), "--head", "dense", "--epochs", "2", "--out",
                          str(tmp_path / "m"), "--export", str(exported)]) == 0
    # An export folder too: features.keras (converter + backbone + pooling) + the head.
    assert predict_main([str(tmp_path / "m"), "--export", str(tmp_path / "exported")]) == 0
    tables = []
    for model in (tmp_path / "m", exported, tmp_path / "exported"):
        out = tmp_path / f"{model.stem}.csv"
        assert predict_main([str(model), str(data), "--out", str(out)]) == 0
        with open(out, newline="", encoding="utf-8") as f:
            tables.append(list(csv.DictReader(f)))
    folder, single, packed = tables
    assert [r["path"] for r in folder] == [r["path"] for r in single] == [r["path"] for r in packed]
    for a, b in [*zip(folder, single, strict=True), *zip(folder, packed, strict=True)]:
        assert a["predicted"] == b["predicted"]
        np.testing.assert_allclose([float(a["p_a"]), float(a["p_b"])],
                                   [float(b["p_a"]), float(b["p_b"])], rtol=1e-4, atol=1e-5)


def test_a_siglip_vision_tower_pooled_head_and_its_blocks(tmp_path, presets, data):
    """A tower saved alone loads (its converter read from image_converter.json); its pooled
    head output is stored as is, its blocks' tokens are mean-pooled (no class token)."""
    import keras

    block = "sig_lip_vision_encoder_encoder_block_1"
    out = tmp_path / "s.h5"
    run_extract(ExtractConfig(str(data), str(presets["siglip"]), pooling="none",
                              out=str(out)))
    head = read_cache(out)
    np.testing.assert_allclose(head.features,
                               reference(presets["siglip"], data, head.paths, 32),
                               rtol=1e-5, atol=1e-5)
    out = tmp_path / "b.h5"
    run_extract(ExtractConfig(str(data), str(presets["siglip"]), pooling="mean", layer=block,
                              out=str(out)))
    cache = read_cache(out)
    tower = keras_hub.models.Backbone.from_preset(str(presets["siglip"]))
    x = (np.stack([load_image(data / p, (32, 32)) for p in cache.paths])
         * np.float32(SCALE) + np.float32(OFFSET))
    tokens = keras.Model(tower.input, tower.get_layer(block).output).predict(
        {"images": x} if isinstance(tower.input, dict) else x, verbose=0)
    np.testing.assert_allclose(cache.features, tokens.mean(1), rtol=1e-5, atol=1e-5)


def test_finetune_unfreezes_the_top_transformer_blocks(tmp_path, presets, data):
    """--unfreeze-top-blocks N trains the top N blocks of the backbone's encoder (and the
    norm after it), --unfreeze-from hub_backbone all of it; the model predict loads."""
    import json

    from pipeline.bases import build_feature_model
    from pipeline.cli import finetune_main, predict_main
    from pipeline.finetune import set_trainable, unfreeze_start

    vit = build_feature_model(str(presets["vit"]), pooling="cls").model
    assert unfreeze_start(vit, "all") == "hub_backbone/transformer_block_1"
    cache = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(presets["dino"]), pooling="cls", out=str(cache)))
    head_dir = tmp_path / "m"
    assert fit_head_main_ok(cache, head_dir)
    params = {}
    for flag, value in (("--unfreeze-top-blocks", "1"), ("--unfreeze-from", "hub_backbone")):
        out = tmp_path / value
        assert finetune_main([str(head_dir), flag, value, "--epochs", "1",
                              "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        params[value] = metrics["trainable_params"]
    assert metrics["first_unfrozen_layer"] == "hub_backbone"
    assert 0 < params["1"] < params["hub_backbone"]
    assert predict_main([str(out), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    dino = build_feature_model(str(presets["dino"]), pooling="cls").model
    assert set_trainable(dino, unfreeze_start(dino, 1)) == [
        "hub_backbone/layers_1", "hub_backbone/dinov2_backbone_layernorm"]
    with pytest.raises(ValueError, match=r"must be 1\.\.2 .*Received: unfreeze_top_blocks=3"):
        unfreeze_start(dino, 3)


def fit_head_main_ok(cache: Path, out: Path) -> bool:
    from pipeline.cli import fit_head_main

    return fit_head_main([str(cache), "--head", "dense", "--epochs", "2", "--out",
                          str(out)]) == 0
