"""finetune: block detection, frozen layers untouched, warm start, the saved end-to-end model.

Training runs use a tiny saved base (two Conv -> BatchNormalization -> ReLU blocks named as
keras.applications name theirs): fine-tuning really moves its top block, so "the frozen
layers did not move" means something. A random-weight MobileNetV2 is useless for that: its
activations shrink block by block (~1e-13 at out_relu), its updates round away in float32
and its features do not separate even plain colours, so a fine-tuning never beats the
starting weights and gives them back. MobileNetV2 checks block detection and, at learning
rate 0, that the end-to-end model computes exactly base + head.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import PYTHON, SCRIPTS, save_png, write_index_images

from pipeline.bases import build_feature_model, feature_model_from_attrs
from pipeline.cache import read_cache
from pipeline.cli import finetune_main
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import (
    FinetuneConfig,
    block_of,
    blocks_of,
    run_finetune,
    set_trainable,
    unfreeze_start,
)
from pipeline.fit import FitConfig, run_fit, split_rows
from pipeline.heads import load_head
from pipeline.images import load_image
from pipeline.predict import PredictConfig, run_predict

COLOURS = {"blue": (40, 60, 200), "green": (50, 180, 60), "red": (200, 50, 40)}
PER_CLASS = 12
# Few, small steps keep every run a few seconds on two CPU cores.
FAST = {"epochs": 2, "batch_size": 8}


def colour_images(folder: Path, classes: tuple[str, ...]) -> None:
    """PER_CLASS noisy images of each colour class, of varied sizes."""
    rng = np.random.default_rng(len(classes))
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = (int(v) for v in rng.integers(12, 24, size=2))
            noisy = np.array(COLOURS[name]) + rng.normal(0, 60, (h, w, 3))
            save_png(np.clip(noisy, 0, 255).astype(np.uint8), folder / name / f"{i:02d}.png")


def tiny_base(path: Path) -> Path:
    """A 16x16 base of two Conv -> BatchNormalization -> ReLU blocks, saved as .keras."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for block in (1, 2):
        x = keras.layers.Conv2D(8, 3, padding="same", name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    keras.Model(inputs, x, name="tiny").save(path)
    return path


def cache_and_head(root: Path, base: str, **extract) -> tuple[Path, Path]:
    """Extract ``root/data`` with ``base`` and fit a dense head: ``(cache, head_dir)``."""
    cache = root / "cache.h5"
    run_extract(ExtractConfig(str(root / "data"), base, out=str(cache), **extract))
    head_dir, _ = run_fit(FitConfig(str(cache), head="dense", epochs=2, out=str(root / "head")))
    return cache, head_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three colour classes, their cache from the tiny base and a dense head on it:
    ``(root, cache, head_dir)``."""
    root = tmp_path_factory.mktemp("finetune")
    colour_images(root / "data", tuple(COLOURS))
    base = tiny_base(root / "tiny.keras")
    cache, head_dir = cache_and_head(root, str(base), preprocess="scale")
    return root, cache, head_dir


@pytest.fixture(scope="module")
def finetuned(trained):
    """The top block fine-tuned at a learning rate that moves it within two epochs without
    overshooting (the head divides the base's outputs by their std, magnifying each step)."""
    root, _, head_dir = trained
    return run_finetune(FinetuneConfig(str(head_dir), unfreeze_top_blocks=1, lr=0.01,
                                       out=str(root / "tuned"), **FAST))


def _images(root: Path, size: tuple[int, int]) -> tuple[list[Path], np.ndarray]:
    paths = sorted((root / "data").rglob("*.png"))
    return paths, np.stack([load_image(p, size) for p in paths])


def _bytes(layer) -> list[bytes]:
    return [w.tobytes() for w in layer.get_weights()]


def test_frozen_weights_and_batchnorm_statistics_are_untouched(trained, finetuned):
    _, _, head_dir = trained
    out, metrics = finetuned
    assert metrics["first_unfrozen_layer"] == "block2_conv"
    assert metrics["unfrozen_layers"] == 1  # block2_bn stays frozen, ReLU has no weights
    # Fine-tuning improved on the start, so these weights are the trained ones.
    assert metrics["best_epoch"] >= 1
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    # The base exactly as the cache was made (the .keras file, sha256-checked), with the
    # plain layers finetune trains (the cache's features were made with them folded).
    assert metrics["cache_attrs"]["fold_batchnorm"]
    fresh = feature_model_from_attrs(metrics["cache_attrs"], fold_batchnorm=False).model
    saved = keras.models.load_model(out / "model.keras", safe_mode=True)
    tuned = saved.get_layer(fresh.name)
    for name in ("block1_conv", "block1_bn", "block2_bn"):
        assert _bytes(fresh.get_layer(name)) == _bytes(tuned.get_layer(name)), name
    assert _bytes(fresh.get_layer("block2_conv")) != _bytes(tuned.get_layer("block2_conv"))
    # The moving statistics are still the initial ones: BatchNormalization never trained.
    for name in ("block1_bn", "block2_bn"):
        mean, variance = tuned.get_layer(name).get_weights()[2:]
        assert not mean.any() and (variance == 1).all()
    # The head's standardisation of the features travels with it and never trains.
    standardise = load_head(head_dir).model_.get_layer("standardise")
    assert _bytes(saved.get_layer("dense_head").get_layer("standardise")) == _bytes(standardise)


def test_zero_learning_rate_predicts_like_base_plus_head(tmp_path):
    """MobileNetV2 (random weights, 32x32, cut after block 2): with lr 0 the end-to-end
    model equals the frozen base's features fed to the head, 'tf' preprocessing included."""
    write_index_images(tmp_path / "data", 36)
    _, head_dir = cache_and_head(tmp_path, "mobilenetv2", weights="none", input_size="32",
                                 layer="block_2_add")
    out, metrics = run_finetune(FinetuneConfig(str(head_dir), unfreeze_top_blocks=1, lr=0.0,
                                               out=str(tmp_path / "still"), **FAST))
    assert metrics["first_unfrozen_layer"] == "block_2_expand"
    _, images = _images(tmp_path, (32, 32))
    expected = load_head(head_dir).predict_proba(
        feature_model_from_attrs(metrics["cache_attrs"]).features(images.copy()))
    # Random features are weak (probabilities differ by ~4e-4 across images): a tight
    # tolerance keeps the comparison from passing on near-uniform outputs alone.
    assert np.ptp(expected, axis=0).max() > 1e-4
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-7)
    assert metrics["val_accuracy_after"] == metrics["val_accuracy_before"]


def test_saved_layout_reloads_and_predicts(trained, finetuned, tmp_path):
    root, cache, head_dir = trained
    out, metrics = finetuned
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "head.json", "metrics.json", "model.keras"]
    head_json = json.loads((out / "head.json").read_text())
    assert head_json["kind"] == "end-to-end"
    assert head_json["classes"] == [0, 1, 2]
    assert head_json["class_names"] == list(COLOURS)
    assert head_json["input_size"] == [16, 16] and head_json["interpolation"] == "bilinear"
    assert metrics["cache_attrs"]["base"] == "file:tiny.keras"
    assert metrics["n_train"] + metrics["n_val"] == 3 * PER_CLASS
    assert metrics["epochs_run"] == FAST["epochs"] and metrics["fit_seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == str(head_dir) and config["unfreeze_top_blocks"] == 1

    # safe_mode=True refuses Lambda layers and custom code; reloaded, the model scores
    # the validation images exactly as run_finetune reported.
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    assert '"Lambda"' not in json.dumps(model.get_config())
    paths, images = _images(root, (16, 16))
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    data = read_cache(cache)
    _, val, _ = split_rows(data.split, data.labels, 0.2, 0)
    row_of = {str(root / "data" / p): i for i, p in enumerate(data.paths)}
    rows = np.array([row_of[str(p)] for p in paths])
    in_val = np.isin(rows, val)
    accuracy = np.mean(predicted[in_val] == data.labels[rows[in_val]])
    assert accuracy == pytest.approx(metrics["val_accuracy_after"])

    # predict.py reads the folder through head.json and gives the same classes.
    result = run_predict(PredictConfig(model=str(out), images=[str(root / "data")],
                                       out=str(tmp_path / "p.csv")))
    assert result.n_predicted == 3 * PER_CLASS and result.kind == "end-to-end"
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["predicted"] for row in table] == [list(COLOURS)[k] for k in predicted]


def test_warm_up_without_a_trained_head(tmp_path, capsys):
    """From a two-class cache (sigmoid head): a fresh dense head is warmed up on the
    cached features, then block2 is fine-tuned; through the command line."""
    colour_images(tmp_path / "data", ("blue", "red"))
    base = tiny_base(tmp_path / "tiny.keras")
    cache = tmp_path / "cache.h5"
    run_extract(ExtractConfig(str(tmp_path / "data"), str(base), preprocess="scale",
                              out=str(cache)))
    out = tmp_path / "warm"
    code = finetune_main([str(cache), "--unfreeze-top-blocks", "1", "--warmup-epochs", "3",
                          "--epochs", "2", "--batch-size", "8", "--lr", "0.1",
                          "--augment-flip", "none", "--out", str(out)])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("finetune: done.") and str(out) in last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source_kind"] == "cache" and 1 <= metrics["warmup_epochs_run"] <= 3
    assert metrics["first_unfrozen_layer"] == "block2_conv"
    assert json.loads((out / "head.json").read_text())["classes"] == [0, 1]
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    probs = model.predict(_images(tmp_path, (16, 16))[1], verbose=0)
    assert probs.shape == (2 * PER_CLASS, 1) and np.all((probs >= 0) & (probs <= 1))


@pytest.mark.parametrize(
    "base, size, expected",
    [
        # Chollet's script froze model.layers[:25], counted for Keras 1's VGG16 (with
        # ZeroPadding layers); in today's 19-layer VGG16 that freezes block 5 too.
        ("vgg16", 32, "block5_conv1"),
        ("resnet50", 32, "conv5_"),
        ("mobilenetv2", 32, "block_16_expand"),
    ],
)
def test_unfreeze_top_block_of_real_bases(base, size, expected):
    model = build_feature_model(base, weights="none", input_size=(size, size)).model
    names = [layer.name for layer in model.layers]
    first = unfreeze_start(model, 1)
    if expected.endswith("_"):  # the first layer of that stage, whatever its suffix
        expected = next(name for name in names if name.startswith(expected))
    assert first == expected
    trainable = set_trainable(model, first)
    index = names.index(first)
    assert trainable[0] == first
    for i, layer in enumerate(model.layers):
        if i < index or isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable_weights, layer.name
    assert model.trainable_weights


def test_inception_top_two_blocks_match_the_keras_guide():
    # keras.io: "we chose to train the top 2 inception blocks, i.e. we will freeze the
    # first 249 layers and unfreeze the rest".
    model = build_feature_model("inceptionv3", weights="none", input_size=(75, 75)).model
    first = unfreeze_start(model, 2)
    assert [layer.name for layer in model.layers].index(first) == 249


def test_top_block_of_a_cut_base():
    model = build_feature_model("vgg16", weights="none", input_size=(32, 32), layer="block4_pool",
                                pooling="flatten").model
    assert blocks_of(model) == ["block1", "block2", "block3", "block4"]
    assert unfreeze_start(model, 1) == "block4_conv1"
    assert unfreeze_start(model, "all") == "block1_conv1"


@pytest.mark.parametrize(
    "name, block",
    [
        ("block5_conv1", "block5"),  # VGG16
        ("block5_pool", "block5"),
        ("conv5_block1_1_conv", "conv5"),  # ResNet50, DenseNet
        ("pool1_pool", "conv1"),
        ("pool4_conv", "conv4"),  # DenseNet transition after stage 4
        ("block_16_expand", "block_16"),  # MobileNetV2
        ("block_16_project_BN", "block_16"),
        ("expanded_conv_depthwise", "expanded_conv"),
        ("Conv_1", None),
        ("out_relu", None),
        ("block7a_expand_conv", "block7"),  # EfficientNet
        ("top_conv", None),
        ("mixed9", "mixed9"),  # InceptionV3: only the closing concatenation is named
        ("mixed9_1", None),
        ("conv2d_85", None),
        ("block14_sepconv1", "block14"),  # Xception
        ("block35_1_mixed", "block35_1"),  # InceptionResNetV2
        ("mixed_6a", "mixed_6a"),
        ("conv_7b", None),
        ("convnext_tiny_stage_3_block_0_depthwise_conv", "stage_3"),
        ("expanded_conv_10_expand", "expanded_conv_10"),  # MobileNetV3
        ("conv_dw_13", "conv_13"),  # MobileNet
        ("input_layer", None),
        ("bottleneck_avg_pool", None),
    ],
)
def test_block_of(name, block):
    assert block_of(name) == block


class _Layer:
    """A stand-in layer: a name and, for convolutions, one weight."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.weights = [0.0] if name.startswith(("conv2d", "block", "dense")) else []


def test_unnamed_layers_belong_to_the_block_they_lead_into():
    names = ["input_layer", "mixed8", "conv2d_80", "activation_80", "mixed9_0", "concatenate",
             "mixed9", "conv2d_89", "mixed9_1", "mixed10", "conv2d_top", "avg_pool"]
    model = SimpleNamespace(layers=[_Layer(n) for n in names], name="inception")
    assert blocks_of(model) == ["mixed8", "mixed9", "mixed10"]
    assert unfreeze_start(model, 1) == "conv2d_89"
    assert unfreeze_start(model, 2) == "conv2d_80"


def _raises(config, match):
    with pytest.raises(ValueError, match=match):
        run_finetune(config)


def test_argument_errors_come_first(tmp_path):
    missing = str(tmp_path / "nothing")
    _raises(FinetuneConfig(missing), r"exactly one of .*Received: unfreeze_from=None")
    _raises(FinetuneConfig(missing, unfreeze_from="Conv_1", unfreeze_top_blocks=1),
            "exactly one of")
    _raises(FinetuneConfig(missing, unfreeze_top_blocks=0), "unfreeze_top_blocks=0")
    _raises(FinetuneConfig(missing, unfreeze_top_blocks=1, lr=-1.0), "Received: lr=-1.0")
    _raises(FinetuneConfig(missing, unfreeze_top_blocks=1, augment_flip="diagonal"),
            "flip='diagonal'")
    _raises(FinetuneConfig(missing, unfreeze_top_blocks=1), "Received: source=")


def test_layer_and_block_errors(trained):
    _, _, head_dir = trained
    _raises(FinetuneConfig(str(head_dir), unfreeze_from="block2_cnv"),
            r"Close names: block2_conv.*Received: unfreeze_from='block2_cnv'")
    _raises(FinetuneConfig(str(head_dir), unfreeze_top_blocks=3),
            r"must be 1\.\.2 .*block1 \.\. block2\. Received: unfreeze_top_blocks=3")


def test_source_and_image_errors(trained, tmp_path):
    root, cache, head_dir = trained
    logreg, _ = run_fit(FitConfig(str(cache), head="logreg", out=str(tmp_path / "logreg")))
    _raises(FinetuneConfig(str(logreg), unfreeze_top_blocks=1), "needs a dense head.*'logreg'")
    _raises(FinetuneConfig(str(head_dir), unfreeze_top_blocks=1,
                           data_dir=str(tmp_path / "gone")), "image folder is missing")
    moved = tmp_path / "moved"
    shutil.copytree(root / "data", moved)
    (moved / "green" / "04.png").unlink()
    _raises(FinetuneConfig(str(head_dir), unfreeze_top_blocks=1, data_dir=str(moved)),
            r"1 of 36 images .* missing .*first: green/04\.png")


def test_cli_errors_are_one_line(trained, capsys):
    _, _, head_dir = trained
    assert finetune_main([str(head_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Pass exactly one of") and len(err) == 1
    proc = subprocess.run([PYTHON, str(SCRIPTS / "finetune.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--unfreeze-top-blocks" in proc.stdout


def test_a_heads_held_out_test_rows_stay_out_of_fine_tuning(trained, tmp_path):
    from pipeline.finetune.data import split_images
    from pipeline.finetune.source import resolve_source

    _, cache, _ = trained
    head_dir, metrics = run_fit(FitConfig(str(cache), head="dense", epochs=1, test_split=0.25,
                                          out=str(tmp_path / "head")))
    start = resolve_source(FinetuneConfig(str(head_dir), unfreeze_top_blocks=1))
    assert start.test_split == 0.25
    split = split_images(start.cache, val_split=start.val_split, seed=start.split_seed,
                         data_dir=None, test_split=start.test_split)
    held_out = np.loadtxt(head_dir / "test_rows.csv", delimiter=",", skiprows=1, usecols=0,
                          dtype=int)
    np.testing.assert_array_equal(split.test.rows, held_out)
    assert split.train.rows.size == metrics["n_train"] and split.val.rows.size == metrics["n_val"]
