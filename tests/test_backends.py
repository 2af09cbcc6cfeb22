"""The pipeline under KERAS_BACKEND=jax (a GPU box without TensorFlow runs this way).

Model code uses Keras 3 ops only, so the same commands must give the same cache: every
row in place (checked with index-encoding images through the probe base, with a tail
batch that XLA pads and unreadable files in between) and a real architecture's
features equal to the TensorFlow backend's within float error. A dense head trained
under JAX predicts the same under both backends. The scripts run in subprocesses
because a process picks its Keras backend once, at import.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
from conftest import PYTHON, SCRIPTS, bad_files, write_index_images
from test_extract import check_alignment

from pipeline.bench import make_images
from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.predict import PredictConfig, run_predict


def run_script(script: str, *args: str, backend: str = "jax") -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([PYTHON, str(SCRIPTS / script), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_jax_backend_keeps_every_row_in_place_and_heads_agree(
    tmp_path: Path, probe_model: Path,
) -> None:
    data = tmp_path / "data"
    expected = write_index_images(data, 23)  # batches of 7: a tail of 2, padded under XLA
    bad = bad_files(data / "b")
    out = tmp_path / "jax.h5"
    run_script("extract.py", str(data), "--base", str(probe_model), "--pooling", "avg",
               "--batch-size", "7", "--out", str(out))
    cache = read_cache(out)
    assert cache.attrs["backend"] == "jax"
    check_alignment(out, expected, ["a", "b", "c"])
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in cache.skipped) == sorted(bad)

    # The dense head (Keras) trains and saves under JAX too (its epochs are 2-4x faster
    # there on CPU), and predict.py gives the same answers with it under either backend.
    heads = tmp_path / "head"
    run_script("fit_head.py", str(out), "--head", "dense", "--epochs", "3", "--out", str(heads))
    metrics = json.loads((heads / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    tables = {}
    for backend in ("jax", "tensorflow"):
        csv_out = tmp_path / f"predictions-{backend}.csv"
        if backend == "jax":
            run_script("predict.py", str(heads), str(data), "--out", str(csv_out))
        else:  # this test process runs TensorFlow: no second process start needed
            run_predict(PredictConfig(str(heads), [str(data)], out=str(csv_out)))
        with csv_out.open(newline="") as f:
            tables[backend] = list(csv.reader(f))
    jax_rows, tf_rows = tables["jax"], tables["tensorflow"]
    assert jax_rows[0] == tf_rows[0] and len(jax_rows) == len(expected) + 1
    p_jax = np.array([row[2:] for row in jax_rows[1:]], dtype=np.float64)
    p_tf = np.array([row[2:] for row in tf_rows[1:]], dtype=np.float64)
    assert p_jax.std(axis=0).min() > 1e-3  # answers that differ from image to image
    assert [row[:2] for row in jax_rows] == [row[:2] for row in tf_rows]  # path, class
    np.testing.assert_allclose(p_jax, p_tf, atol=1e-5)


def test_jax_features_equal_tensorflow_features(tmp_path: Path) -> None:
    import keras

    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    model = tmp_path / "mobilenetv2.keras"
    base.save(model)
    data = tmp_path / "data"
    make_images(data, 10)
    common = dict(base=str(model), pooling="avg", preprocess="tf", batch_size=4)
    tf_out = tmp_path / "tf.h5"
    run_extract(ExtractConfig(data_dir=str(data), out=str(tf_out), **common))
    jax_out = tmp_path / "jax.h5"
    run_script("extract.py", str(data), "--base", str(model), "--pooling", "avg",
               "--preprocess", "tf", "--batch-size", "4", "--out", str(jax_out))

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
