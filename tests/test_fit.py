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


def test_test_split_holds_out_a_stratified_seeded_test_set_first():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    split = np.array([""] * len(y))
    train, val, test = split_rows(split, y, 0.2, seed=3, test_split=0.3)
    assert (len(train), len(val), len(test)) == (50, 20, 30)  # fractions of all 100 rows
    assert np.bincount(y[test]).tolist() == [15, 9, 6]
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(y)))
    again = split_rows(split, y, 0.2, seed=3, test_split=0.3)
    for a, b in zip(again, (train, val, test), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(split_rows(split, y, 0.2, seed=4, test_split=0.3)[2], test)
    # No --test-split: exactly the split made before the option existed.
    for a, b in zip(split_rows(split, y, 0.2, 3, test_split=0.0), split_rows(split, y, 0.2, 3),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_test_split_comes_from_the_recorded_train_rows():
    y = np.repeat([0, 1], 50)
    split = np.array((["train"] * 40 + ["validation"] * 10) * 2)
    train, val, test = split_rows(split, y, 0.2, 0, test_split=0.1)
    np.testing.assert_array_equal(val, np.flatnonzero(split == "validation"))
    assert len(test) == 10 and np.bincount(y[test]).tolist() == [5, 5]
    assert set(test) <= set(np.flatnonzero(split == "train"))
    recorded_train = np.flatnonzero(split == "train").tolist()
    assert sorted(np.concatenate([train, test]).tolist()) == recorded_train


def test_test_split_is_refused_when_the_cache_records_a_test_split():
    y = np.repeat([0, 1], 10)
    split = np.array((["train"] * 6 + ["validation"] * 2 + ["test"] * 2) * 2)
    with pytest.raises(ValueError, match=r"records a test split \(4 rows.*`--test-split`.*"
                                         r"Received: --test-split=0.2"):
        split_rows(split, y, 0.2, 0, test_split=0.2)


@pytest.mark.parametrize(("val_split", "test_split", "match"), [
    (0.2, -0.1, r"`--test-split` must be at least 0 and below 1\. Received: --test-split=-0.1"),
    (0.2, 1.0, r"Received: --test-split=1.0"),
    (0.2, float("nan"), r"Received: --test-split=nan"),
    (0.5, 0.5, r"`--val-split` \+ `--test-split` must be below 1.*"
               r"Received: --val-split=0.5, --test-split=0.5"),
])
def test_bad_test_split_is_named_before_the_cache_is_read(tmp_path, val_split, test_split, match):
    with pytest.raises(ValueError, match=match):
        run_fit(FitConfig(cache=str(tmp_path / "missing.h5"), val_split=val_split,
                          test_split=test_split))


def test_test_split_too_small_for_every_class_says_so():
    y = np.repeat([0, 1, 2], 10)
    with pytest.raises(ValueError, match=r"--test-split=0.05: both parts need at least one row"):
        split_rows(np.array([""] * len(y)), y, 0.2, 0, test_split=0.05)


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory):
    X, y = blobs(40, 3, seed=41)
    return make_cache(tmp_path_factory.mktemp("split") / "feats.h5", X, y), y


@pytest.mark.parametrize(("head", "stream"), [*((h, False) for h in HEADS), ("logreg", True),
                                              ("dense", True)])
def test_held_out_test_rows_are_never_trained_or_early_stopped_on(tmp_path, monkeypatch,
                                                                  split_cache, head, stream):
    from pipeline.fit import run as fit_run

    cache, y = split_cache
    seen: dict[str, np.ndarray] = {}
    fit = fit_run._fit

    def spy(config, estimator, *, cache, X, train, val):
        seen.update(train=train, val=val)
        return fit(config, estimator, cache=cache, X=X, train=train, val=val)

    monkeypatch.setattr(fit_run, "_fit", spy)
    out_dir, metrics = run_fit(FitConfig(cache=str(cache), head=head, out=str(tmp_path / "m"),
                                         test_split=0.25, stream=stream, seed=2, **FAST))
    rows = np.loadtxt(out_dir / "test_rows.csv", delimiter=",", skiprows=1, usecols=0, dtype=int)
    np.testing.assert_array_equal(rows, split_rows(np.array([""] * len(y)), y, 0.2, 2,
                                                   test_split=0.25)[2])
    assert not set(rows) & (set(seen["train"]) | set(seen["val"]))
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (66, 24, 30)
    assert (metrics["test_source"], metrics["test_split"], metrics["test_rows"]) == (
        "held out", 0.25, "test_rows.csv")
    assert np.array(metrics["test"]["confusion_matrix"]).sum() == 30
    assert metrics["test"]["accuracy"] >= 0.9
    assert json.loads((out_dir / "config.json").read_text())["test_split"] == 0.25
    report = format_report(metrics)
    assert "test: accuracy=" in report and "held out by --test-split" in report


def test_dense_head_saves_its_training_curve(tmp_path, split_cache):
    from pipeline.fit import format_done

    cache, _ = split_cache
    out_dir, metrics = run_fit(FitConfig(cache=str(cache), head="dense", out=str(tmp_path / "m"),
                                         patience=2, **FAST))
    written = json.loads((out_dir / "metrics.json").read_text())
    history = written["history"]
    assert set(history) == {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert len(history["loss"]) == written["epochs_run"] <= 10
    assert written["best_epoch"] == int(np.argmin(history["val_loss"])) + 1
    assert written["training_curve"] == "training_curve.png"
    assert (out_dir / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert load_head(out_dir).best_epoch_ == written["best_epoch"]
    done = format_done(metrics, out_dir)
    assert f"training_curve.png (training curve, kept epoch {written['best_epoch']} of" in done
    assert "test accuracy" not in done


def test_a_model_from_before_a_new_setting_reruns_without_overwrite(tmp_path, split_cache):
    cache, _ = split_cache
    config = FitConfig(cache=str(cache), out=str(tmp_path / "m"))
    out_dir, _ = run_fit(config)
    old = json.loads((out_dir / "config.json").read_text())
    del old["test_split"]  # as written before --test-split existed
    (out_dir / "config.json").write_text(json.dumps(old))
    run_fit(config)  # the same settings: not "trained with other settings"
    with pytest.raises(ValueError, match=r"--test-split 0\.0 -> 0\.1"):
        run_fit(dataclasses.replace(config, test_split=0.1))


def test_a_solver_stopped_by_its_iteration_limit_is_named_with_its_flag(tmp_path):
    """scikit-learn's ConvergenceWarning says "increase the number of iterations" and names
    no flag: the report names --max-iter and the limit that stopped the solver."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X, y = blobs(n_per_class=30, n_classes=3, shape=(20,), seed=1)
    cache = make_cache(tmp_path / "c.h5", X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # none may reach the user
        _, stopped = run_fit(FitConfig(cache=str(cache), head="linear-svm", max_iter=1,
                                       out=str(tmp_path / "m1")))
        _, converged = run_fit(FitConfig(cache=str(cache), head="linear-svm",
                                         out=str(tmp_path / "m2")))
    assert stopped["max_iter_reached"] == 1
    assert format_report(stopped).splitlines()[-1] == (
        "note: the solver stopped at its limit of 1 iterations before converging; a higher "
        "--max-iter may score better")
    assert "max_iter_reached" not in converged
    assert "--max-iter" not in format_report(converged)
