"""fit_head --stream: heads trained from HDF5 in batches match in-memory quality."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_fit import blobs, make_cache, offset_blobs

from pipeline.fit import FitConfig, run_fit
from pipeline.heads import load_head


@pytest.mark.parametrize("head", ["logreg", "linear-svm", "dense"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_streamed_heads_learn_and_reload(tmp_path, head, n_classes):
    X, y = blobs(n_per_class=80, n_classes=n_classes, shape=(2, 2, 4))
    cache = make_cache(tmp_path / "c.h5", X, y, batch=50)
    out = tmp_path / head
    _, metrics = run_fit(FitConfig(str(cache), head=head, out=str(out), stream=True,
                                   epochs=15, lr=1e-2, batch_size=16))
    assert metrics["stream"] is True
    assert metrics["accuracy"] >= 0.95
    reloaded = load_head(out)
    np.testing.assert_array_equal(reloaded.predict(X[:20]), reloaded.predict(X[:20]))
    assert set(reloaded.predict(X[:20]).tolist()) <= set(range(n_classes))


def test_stream_matches_in_memory_split_and_counts(tmp_path):
    X, y = blobs(n_per_class=50, n_classes=3)
    cache = make_cache(tmp_path / "c.h5", X, y)
    _, plain = run_fit(FitConfig(str(cache), head="logreg", out=str(tmp_path / "a")))
    _, streamed = run_fit(FitConfig(str(cache), head="logreg", out=str(tmp_path / "b"),
                                    stream=True))
    for key in ("n_train", "n_val", "n_test"):
        assert plain[key] == streamed[key]
    assert abs(plain["accuracy"] - streamed["accuracy"]) <= 0.05


def test_stream_refuses_rbf_svm_and_nan(tmp_path):
    X, y = blobs(n_per_class=20, n_classes=2)
    cache = make_cache(tmp_path / "c.h5", X, y)
    with pytest.raises(ValueError, match="Received: head='svm'"):
        run_fit(FitConfig(str(cache), head="svm", out=str(tmp_path / "s"), stream=True))
    X[3] = np.nan
    bad = make_cache(tmp_path / "bad.h5", X, y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        run_fit(FitConfig(str(bad), head="logreg", out=str(tmp_path / "n"), stream=True))


@pytest.mark.parametrize("scale", [
    # The two ends run by default (6-8 s each on 2 cores); test_heads covers all four in memory.
    1e-3, pytest.param(1.0, marks=pytest.mark.slow), pytest.param(255.0, marks=pytest.mark.slow),
    1e4,
])
def test_streamed_dense_standardises_like_the_in_memory_one(tmp_path, scale):
    # Issue 13: statistics from one pass over the streamed training batches, the same as
    # the in-memory head's (it fits on the same training rows: fit_head early-stops on val).
    X, y = offset_blobs(n_per_class=40, n_classes=3, scale=scale, shape=(2, 2, 4), seed=21)
    cache = make_cache(tmp_path / "c.h5", X, y, batch=50)
    config = {"head": "dense", "epochs": 10, "lr": 1e-2, "batch_size": 16}
    _, metrics = run_fit(FitConfig(str(cache), out=str(tmp_path / "s"), stream=True, **config))
    assert metrics["accuracy"] >= 0.95
    run_fit(FitConfig(str(cache), out=str(tmp_path / "m"), **config))
    streamed, in_memory = (load_head(tmp_path / name).model_ for name in ("s", "m"))
    names = [layer.name for layer in in_memory.layers]
    assert [layer.name for layer in streamed.layers] == names
    if "feature_scale" in names:
        assert streamed.get_layer("feature_scale").scale == in_memory.get_layer(
            "feature_scale").scale
    for a, b in zip(streamed.get_layer("standardise").get_weights(),
                    in_memory.get_layer("standardise").get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
