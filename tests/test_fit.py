"""fit: splits, the run_fit protocol end to end on synthetic caches, and its error messages."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers_fit import CLASS_NAMES, blobs, make_cache

from pipeline.cache import CacheError
from pipeline.fit import FitConfig, format_report, run_fit, split_rows
from pipeline.heads import HEADS, load_head

# Few epochs at a high learning rate keep the dense head fast; the blobs separate early.
FAST = {"epochs": 10, "lr": 1e-2}
METRICS_KEYS = {
    "head",
    "params",
    "cache",
    "cache_attrs",
    "class_names",
    "n_train",
    "n_val",
    "n_test",
    "fit_seconds",
    "accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
}


def _fit(tmp_path, X, y, head, **kwargs):
    cache = make_cache(
        tmp_path / "feats.h5", X, y, **{k: kwargs.pop(k) for k in ("split",) if k in kwargs}
    )
    config = FitConfig(cache=str(cache), head=head, out=str(tmp_path / "model"), **kwargs)
    return run_fit(config)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", HEADS)
def test_every_head_learns_a_separable_cache(tmp_path, head, n_classes):
    X, y = blobs(70, n_classes, seed=n_classes)
    _, metrics = _fit(tmp_path, X, y, head, **FAST)
    assert metrics["accuracy"] >= 0.95
    assert metrics["macro_f1"] >= 0.95
    assert metrics["class_names"] == CLASS_NAMES[:n_classes]


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_unpooled_feature_maps(tmp_path, head):
    X, y = blobs(60, 3, shape=(2, 2, 4), seed=11)
    out_dir, metrics = _fit(tmp_path, X, y, head, **FAST)
    assert metrics["accuracy"] >= 0.95
    assert (load_head(out_dir).predict(X) == y).mean() >= 0.95


def test_float16_cache_is_read_and_fitted(tmp_path):
    X, y = blobs(50, 3, seed=12)
    cache = make_cache(tmp_path / "f16.h5", X.astype(np.float16), y, dtype="float16")
    _, metrics = run_fit(FitConfig(cache=str(cache), out=str(tmp_path / "m")))
    assert metrics["accuracy"] >= 0.95


def test_outputs_and_their_keys(tmp_path):
    X, y = blobs(50, 3, seed=13)
    out_dir, metrics = _fit(tmp_path, X, y, "logreg", C=0.5, seed=4)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json",
        "head.json",
        "metrics.json",
        "model.joblib",
    ]
    written = json.loads((out_dir / "metrics.json").read_text())
    assert METRICS_KEYS <= written.keys()
    assert "test" not in written  # no test split in an unsplit cache
    assert written["accuracy"] == metrics["accuracy"]
    assert written["head"] == "logreg"
    assert written["params"]["clf__C"] == 0.5
    assert written["cache_attrs"]["base"] == "dummy"
    assert set(written["per_class"]) == {"cat", "dog", "owl"}
    assert {"precision", "recall", "f1-score", "support"} <= written["per_class"]["dog"].keys()
    matrix = np.array(written["confusion_matrix"])
    assert matrix.shape == (3, 3)
    assert matrix.sum() == written["n_val"] == 30  # 20% of 150 rows
    assert written["n_train"] == 120
    assert written["fit_seconds"] > 0

    config = json.loads((out_dir / "config.json").read_text())
    assert config == dataclasses.asdict(
        FitConfig(cache=str(tmp_path / "feats.h5"), head="logreg", out=str(out_dir), C=0.5, seed=4)
    )
    report = format_report(metrics)
    assert "head=logreg" in report and "n_train=120" in report and "n_val=30" in report
    assert "macro-F1=" in report and "cat " in report  # class names, not ids


def test_default_out_dir_is_models_stem_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y = blobs(20, 2)
    cache = make_cache(tmp_path / "flowers-vgg16.h5", X, y)
    out_dir, _ = run_fit(FitConfig(cache=str(cache), head="linear-svm"))
    assert out_dir == tmp_path.joinpath("models", "flowers-vgg16-linear-svm").relative_to(tmp_path)
    assert (tmp_path / out_dir / "model.joblib").exists()


def test_recorded_split_is_used_exactly(tmp_path):
    X, y = blobs(60, 3, seed=14)  # 180 rows
    split = np.array(["train"] * 100 + ["validation"] * 50 + ["test"] * 30)
    np.random.default_rng(0).shuffle(split)
    train, val, test = split_rows(split, y, 0.2, 0)
    np.testing.assert_array_equal(train, np.flatnonzero(split == "train"))
    np.testing.assert_array_equal(val, np.flatnonzero(split == "validation"))
    np.testing.assert_array_equal(test, np.flatnonzero(split == "test"))

    out_dir, metrics = _fit(tmp_path, X, y, "logreg", split=list(split))
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (100, 50, 30)
    assert np.array(metrics["confusion_matrix"]).sum() == 50
    test_metrics = json.loads((out_dir / "metrics.json").read_text())["test"]
    assert np.array(test_metrics["confusion_matrix"]).sum() == 30
    assert test_metrics["accuracy"] >= 0.95
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= test_metrics.keys()
    assert "test: accuracy=" in format_report(metrics)


def test_recorded_split_without_validation_carves_it_from_train():
    y = np.repeat([0, 1], 50)
    split = np.array(["train"] * 40 + ["test"] * 10 + ["train"] * 40 + ["test"] * 10)
    train, val, test = split_rows(split, y, 0.25, 0)
    np.testing.assert_array_equal(test, np.flatnonzero(split == "test"))
    assert len(val) == 20 and np.bincount(y[val]).tolist() == [10, 10]
    assert set(train) | set(val) == set(np.flatnonzero(split == "train"))
    assert not set(train) & set(val)


def test_unsplit_cache_is_split_stratified_and_seeded():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    split = np.array([""] * len(y))
    train, val, test = split_rows(split, y, 0.2, seed=3)
    assert len(test) == 0
    assert len(val) == 20
    assert np.bincount(y[val]).tolist() == [10, 6, 4]  # class proportions kept
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(y)))
    again = split_rows(split, y, 0.2, seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    other = split_rows(split, y, 0.2, seed=4)
    assert not np.array_equal(other[1], val)


@pytest.mark.parametrize("val_split", [0.0, 1.0, 1.5, -0.1])
def test_bad_val_split(tmp_path, val_split):
    with pytest.raises(ValueError, match=rf"`val_split`.*Received: val_split={val_split}"):
        split_rows(np.array(["", ""]), np.array([0, 1]), val_split, 0)
    # run_fit checks it before looking at the cache (which does not exist here).
    with pytest.raises(ValueError, match=rf"Received: val_split={val_split}"):
        run_fit(FitConfig(cache=str(tmp_path / "missing.h5"), val_split=val_split))


def test_class_too_small_to_stratify_is_named():
    y = np.array([0] * 10 + [1] * 10 + [2])
    with pytest.raises(ValueError, match=r"class 'owl' has only 1 row"):
        split_rows(np.array([""] * len(y)), y, 0.2, 0, class_names=CLASS_NAMES)


def test_unknown_head_is_rejected_before_reading_the_cache(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown head.*Received: head='forest'"):
        run_fit(FitConfig(cache=str(tmp_path / "missing.h5"), head="forest"))


def test_bad_C_names_argument_and_value(tmp_path):
    X, y = blobs(10, 2)
    cache = make_cache(tmp_path / "c.h5", X, y)
    with pytest.raises(ValueError, match=r"`C`.*Received: C=-1.0"):
        run_fit(FitConfig(cache=str(cache), C=-1.0, out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_incomplete_cache_says_how_to_resume(tmp_path):
    X, y = blobs(10, 2)
    final = make_cache(tmp_path / "part.h5", X, y, finish=False)
    assert not final.exists() and final.with_name("part.h5.partial").exists()
    with pytest.raises(CacheError, match=r"unfinished extraction.*resume"):
        run_fit(FitConfig(cache=str(final), out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_one_class_in_training_rows_is_named(tmp_path):
    X, y = blobs(20, 2)
    y = np.ones_like(y)
    with pytest.raises(ValueError, match=r"only one class \('dog'\)"):
        _fit(tmp_path, X, y, "logreg")


def test_one_class_in_recorded_train_split_is_named(tmp_path):
    X, y = blobs(20, 2)
    split = np.where(y == 0, "train", "validation")
    with pytest.raises(ValueError, match=r"only one class \('cat'\)"):
        _fit(tmp_path, X, y, "logreg", split=list(split))


def test_nan_features_are_counted_and_first_path_named(tmp_path):
    X, y = blobs(20, 2)
    X[5, 3] = np.nan
    X[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 40 rows .*NaN or infinite.*first: \w+/img_0005"):
        _fit(tmp_path, X, y, "logreg")


def test_a_class_without_validation_rows_is_said_so_not_scored_zero():
    metrics = {"head": "logreg", "n_train": 9, "n_val": 3, "n_test": 0,
               "n_train_augmented": 0, "fit_seconds": 0.1, "accuracy": 1.0, "macro_f1": 1.0,
               "per_class": {"cat": {"f1-score": 1.0, "support": 3},
                             "dog": {"f1-score": 0.0, "support": 0}}}
    report = format_report(metrics)
    assert "cat 1.000" in report and "dog - (no validation rows)" in report
    assert "dog 0.000" not in report


def test_head_options_reach_the_heads_and_bad_values_are_named():
    from pipeline.heads import make_head

    dense = make_head("dense", hidden=8, dropout=0.1)
    assert (dense.hidden, dense.dropout) == (8, 0.1)
    assert make_head("knn", k=3).get_params()["clf__n_neighbors"] == 3
    assert make_head("logreg", max_iter=50).get_params()["clf__max_iter"] == 50
    assert make_head("linear-svm", max_iter=70).get_params()["clf__max_iter"] == 70
    for bad, match in ((dict(k=0), "Received: k=0"), (dict(dropout=1.0), "dropout=1.0"),
                       (dict(hidden=0), "hidden=0"), (dict(max_iter=0), "max_iter=0")):
        with pytest.raises(ValueError, match=match):
            make_head("logreg", **bad)


def test_a_model_trained_otherwise_is_never_replaced_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out: models/<cache>-<head>/
    X, y = blobs(40, 2, seed=21)
    cache = make_cache(tmp_path / "feats.h5", X, y)
    first, _ = run_fit(FitConfig(cache=str(cache)))
    before = (first / "model.joblib").read_bytes()
    again, _ = run_fit(FitConfig(cache=str(cache)))  # the same settings: a re-run
    assert again == first
    with pytest.raises(ValueError, match=r"other settings \(--C 1\.0 -> 0\.01\).*--overwrite"
                                         r".*Received: out="):
        run_fit(FitConfig(cache=str(cache), C=0.01))
    assert (first / "model.joblib").read_bytes() == before  # refused before training
    replaced, _ = run_fit(FitConfig(cache=str(cache), C=0.01, overwrite=True))
    assert json.loads((replaced / "config.json").read_text())["C"] == 0.01
