"""The pipeline under KERAS_BACKEND=jax (a GPU box without TensorFlow runs this way).

Model code uses Keras 3 ops only, so the same commands must give the same cache: every
row in place (checked with index-encoding images through the probe base, with a tail
batch that XLA pads and unreadable files in between) and a real architecture's
features equal to the TensorFlow backend's within float error. A dense head trained
under JAX predicts the same under both backends. The commands run in one
subprocess because a process picks its Keras backend once, at import.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import PYTHON, ROOT, bad_files, write_index_images
from test_extract import check_alignment

from benchmarks.bench import make_images
from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.predict import PredictConfig, run_predict


class JaxRuns(NamedTuple):
    root: Path
    expected: dict[str, int]  # index-encoding image -> its index
    bad: list[str]  # unreadable files among them


def run_under_jax(commands: list[tuple[str, list[str]]]) -> None:
    """Run CLI commands, in order, in one process under KERAS_BACKEND=jax.

    One process for all of them: a JAX + Keras start-up costs seconds on 2 cores. Each
    command is ``(main function name in pipeline.cli, argv)`` and must exit 0.
    """
    code = (
        "import json, sys\n"
        "from pipeline import cli\n"
        "for name, argv in json.loads(sys.argv[1]):\n"
        "    rc = getattr(cli, name)(argv)\n"
        "    if rc: sys.exit(f'{name} {argv} exited {rc}')\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run([PYTHON, "-c", code, json.dumps(commands)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory: pytest.TempPathFactory, probe_model: Path) -> JaxRuns:
    """What the JAX backend wrote, for both tests: one JAX process for the module.

    ``probe/``: index-encoding images (batches of 7: a tail of 2, padded under XLA) and
    unreadable files, extracted through the probe base, a dense head trained on that cache
    and its predictions. ``photos/``: a MobileNetV2 cache of 10 photos.
    """
    import keras

    root = tmp_path_factory.mktemp("jax")
    data = root / "data"
    expected = write_index_images(data, 23)
    bad = bad_files(data / "b")
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    base.save(root / "mobilenetv2.keras")
    make_images(root / "photos", 10)
    hub = _dinov2_preset(root / "dinov2")
    run_under_jax([
        ("extract_main", [str(data), "--base", str(probe_model), "--pooling", "avg",
                          "--batch-size", "7", "--out", str(root / "probe.h5")]),
        # The dense head (Keras) trains and saves under JAX too (its epochs are 2-4x
        # faster there on CPU).
        ("fit_head_main", [str(root / "probe.h5"), "--head", "dense", "--epochs", "3",
                           "--out", str(root / "head")]),
        ("predict_main", [str(root / "head"), str(data),
                          "--out", str(root / "predictions-jax.csv")]),
        ("extract_main", [str(root / "photos"), "--base", str(root / "mobilenetv2.keras"),
                          "--pooling", "avg", "--preprocess", "tf", "--batch-size", "4",
                          "--out", str(root / "photos-jax.h5")]),
        *([("extract_main", [str(root / "photos"), "--base", str(hub), "--pooling",
                             "cls+mean", "--batch-size", "4",
                             "--out", str(root / "dinov2-jax.h5")])] if hub else []),
    ])
    return JaxRuns(root, expected, sorted(bad))


def _dinov2_preset(folder: Path) -> Path | None:
    """A tiny random DINOv2 keras-hub preset (None without keras-hub)."""
    try:
        import keras_hub
    except ImportError:
        return None
    import keras

    keras.utils.set_random_seed(0)
    keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        num_register_tokens=2, image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3),
    ).save_to_preset(str(folder))
    keras_hub.layers.ImageConverter(image_size=(28, 28), scale=1 / 127.5,
                                    offset=-1.0).save_to_preset(str(folder))
    return folder


def test_jax_keras_hub_features_equal_tensorflow_features(jax_runs: JaxRuns,
                                                          tmp_path: Path) -> None:
    """A keras-hub base (converter inside the model, token pooling) under both backends."""
    jax_out = jax_runs.root / "dinov2-jax.h5"
    if not jax_out.exists():
        pytest.skip("keras-hub is not installed")
    tf_out = tmp_path / "tf.h5"
    run_extract(ExtractConfig(data_dir=str(jax_runs.root / "photos"), out=str(tf_out),
                              base=str(jax_runs.root / "dinov2"), pooling="cls+mean",
                              batch_size=4))
    a, b = read_cache(tf_out), read_cache(jax_out)
    assert (a.attrs["backend"], b.attrs["backend"]) == ("tensorflow", "jax")
    assert a.paths == b.paths
    np.testing.assert_allclose(b.features, a.features, rtol=1e-4, atol=1e-4)


def test_jax_backend_keeps_every_row_in_place_and_heads_agree(jax_runs: JaxRuns) -> None:
    root, expected = jax_runs.root, jax_runs.expected
    data, out, heads = root / "data", root / "probe.h5", root / "head"
    cache = read_cache(out)
    assert cache.attrs["backend"] == "jax"
    check_alignment(out, expected, ["a", "b", "c"])
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in cache.skipped) == jax_runs.bad

    # predict.py gives the same answers with the JAX-trained head under either backend.
    metrics = json.loads((heads / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    tf_csv = root / "predictions-tensorflow.csv"
    run_predict(PredictConfig(str(heads), [str(data)], out=str(tf_csv)))  # this process: TF
    tables = {}
    for backend, csv_out in (("jax", root / "predictions-jax.csv"), ("tensorflow", tf_csv)):
        with csv_out.open(newline="") as f:
            tables[backend] = list(csv.reader(f))
    jax_rows, tf_rows = tables["jax"], tables["tensorflow"]
    assert jax_rows[0] == tf_rows[0] and len(jax_rows) == len(expected) + 1
    p_jax = np.array([row[2:] for row in jax_rows[1:]], dtype=np.float64)
    p_tf = np.array([row[2:] for row in tf_rows[1:]], dtype=np.float64)
    assert p_jax.std(axis=0).min() > 1e-3  # answers that differ from image to image
    assert [row[:2] for row in jax_rows] == [row[:2] for row in tf_rows]  # path, class
    np.testing.assert_allclose(p_jax, p_tf, atol=1e-5)


def test_jax_features_equal_tensorflow_features(jax_runs: JaxRuns, tmp_path: Path) -> None:
    tf_out = tmp_path / "tf.h5"
    run_extract(ExtractConfig(data_dir=str(jax_runs.root / "photos"), out=str(tf_out),
                              base=str(jax_runs.root / "mobilenetv2.keras"), pooling="avg",
                              preprocess="tf", batch_size=4))
    jax_out = jax_runs.root / "photos-jax.h5"

    a, b = read_cache(tf_out), read_cache(jax_out)
    assert (a.attrs["backend"], b.attrs["backend"]) == ("tensorflow", "jax")
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    # Untrained batch norms shrink the activations (~1e-10 here): compare on their scale,
    # and make sure any two rows differ far more than the tolerance, so a row out of
    # place could not pass.
    scale = float(np.abs(a.features).max())
    assert scale > 0
    x, y = a.features / scale, b.features / scale
    gaps = np.abs(x[:, None] - x[None]).max(axis=-1) + np.eye(len(x))
    assert gaps.min() > 1e-2
    np.testing.assert_allclose(y, x, atol=1e-4)  # measured: 1.7e-6
