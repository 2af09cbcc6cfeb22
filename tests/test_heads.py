"""Heads: construction, argument errors, the scikit-learn contract, save/load round trips."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
from helpers_fit import blobs, offset_blobs
from sklearn.base import clone, is_classifier
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC, LinearSVC

from pipeline.heads import (
    HEADS,
    DenseHead,
    feature_moments,
    feature_scale,
    head_name,
    head_params,
    load_head,
    make_head,
    save_head,
)

# Few epochs at a high learning rate keep the Keras tests fast (each epoch costs ~0.1 s of
# Keras overhead on CPU); the blobs are separable long before.
FAST = {"epochs": 10, "lr": 1e-2}


def test_unknown_head_names_the_choices_and_the_value():
    with pytest.raises(ValueError, match=r"Expected one of .*'svm'.*Received: head='xgboost'"):
        make_head("xgboost")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"C": -1.0}, r"`C`.*Received: C=-1.0"),
        ({"C": 0.0}, r"Received: C=0.0"),
        ({"C": float("nan")}, r"Received: C=nan"),
        ({"epochs": 0}, r"`epochs`.*Received: epochs=0"),
        ({"epochs": 2.5}, r"Received: epochs=2.5"),
        ({"lr": 0.0}, r"`lr`.*Received: lr=0.0"),
        ({"batch_size": 0}, r"`batch_size`.*Received: batch_size=0"),
        ({"patience": -1}, r"`patience`.*Received: patience=-1"),
        ({"class_weight": "auto"}, r"`class_weight`.*Received: class_weight='auto'"),
    ],
)
@pytest.mark.parametrize("name", ["dense", "logreg"])
def test_bad_arguments_are_rejected_with_received_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_head(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "clf_type", "expected"),
    [
        ("logreg", LogisticRegression, {"clf__C": 2.0, "clf__max_iter": 2000}),
        ("linear-svm", LinearSVC, {"clf__C": 2.0}),
        ("svm", SVC, {"clf__C": 2.0, "clf__kernel": "rbf", "clf__gamma": "scale"}),
    ],
)
def test_sklearn_heads_are_flatten_scale_clf_pipelines(name, clf_type, expected):
    head = make_head(name, C=2.0, class_weight="balanced", random_state=7)
    assert [step for step, _ in head.steps] == ["flatten", "scale", "clf"]
    assert isinstance(head.named_steps["clf"], clf_type)
    params = head.get_params()
    for key, value in expected.items():
        assert params[key] == value, key
    assert params["clf__class_weight"] == "balanced"
    assert params["clf__random_state"] == 7
    assert head_name(head) == name
    assert head_params(head)["clf__C"] == 2.0


def test_make_head_dense_passes_arguments():
    head = make_head("dense", epochs=5, lr=0.01, batch_size=8, patience=2, random_state=3)
    assert isinstance(head, DenseHead)
    assert head.get_params() == {
        "hidden": 256,
        "dropout": 0.5,
        "epochs": 5,
        "lr": 0.01,
        "batch_size": 8,
        "patience": 2,
        "class_weight": None,
        "random_state": 3,
        "verbose": 0,
        "log_epochs": False,
    }
    assert head_name(head) == "dense"


def test_dense_head_follows_the_sklearn_contract():
    head = DenseHead(epochs=3)
    assert is_classifier(head)
    assert clone(head).get_params() == head.get_params()
    assert not hasattr(head, "classes_")  # __init__ learns nothing
    X, y = blobs(30, 3)
    assert head.fit(X, y) is head


def test_dense_classes_order_matches_proba_columns():
    X, y = blobs(60, 3, seed=1)
    names = np.array(["zebra", "ant", "moth"])[y]
    head = DenseHead(**FAST).fit(X, names)
    assert head.classes_.tolist() == ["ant", "moth", "zebra"]
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(head.predict(X), head.classes_[proba.argmax(axis=1)])
    assert (head.predict(X) == names).mean() >= 0.95


def test_dense_two_classes_use_one_sigmoid_unit():
    X, y = blobs(60, 2, seed=2)
    head = DenseHead(**FAST).fit(X, y)
    assert head.model_.output_shape == (None, 1)
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (head.predict(X) == y).mean() >= 0.95


def test_dense_without_validation_data_holds_out_part_and_early_stops():
    X, y = blobs(50, 3, seed=3)
    head = DenseHead(epochs=100, lr=0.05, patience=1).fit(X, y)
    assert "val_loss" in head.history_
    assert len(head.history_["loss"]) < 100


def test_dense_with_too_few_rows_trains_without_early_stopping():
    X, y = blobs(2, 3, seed=4)  # one row per class cannot go to a validation part
    head = DenseHead(epochs=4).fit(X, y)
    assert "val_loss" not in head.history_
    assert len(head.history_["loss"]) == 4


def test_dense_is_seeded():
    X, y = blobs(30, 3, seed=5)
    a = DenseHead(epochs=3, random_state=1).fit(X, y).predict_proba(X)
    b = DenseHead(epochs=3, random_state=1).fit(X, y).predict_proba(X)
    c = DenseHead(epochs=3, random_state=2).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_dense_speed_settings_learn_what_plain_keras_fit_learns(monkeypatch, n_classes):
    # DenseHead runs several steps per Keras call and names the steps per epoch; both are
    # there for speed only, so the weights must equal a plain fit's byte for byte. 45 or
    # 30 rows per class with a 10% holdout leave a partial last batch.
    import keras

    from pipeline.heads import dense

    X, y = blobs(135 // n_classes, n_classes, seed=6)
    fast = DenseHead(epochs=4, random_state=0, patience=1).fit(X, y)

    plain_fit = keras.Model.fit

    def fit_without_steps(self, *args, steps_per_epoch=None, **kwargs):
        return plain_fit(self, *args, **kwargs)

    monkeypatch.setattr(dense, "_STEPS_PER_EXECUTION", 1)
    monkeypatch.setattr(keras.Model, "fit", fit_without_steps)
    plain = DenseHead(epochs=4, random_state=0, patience=1).fit(X, y)
    assert fast.history_ == plain.history_
    for a, b in zip(fast.model_.weights, plain.model_.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dense_balanced_class_weight_trains_on_imbalanced_data():
    X, y = blobs(60, 2, seed=6)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:8]])
    head = DenseHead(class_weight="balanced", **FAST).fit(X[keep], y[keep])
    assert (head.predict(X) == y).mean() >= 0.95


def test_dense_rejects_bad_input():
    X, y = blobs(10, 2)
    with pytest.raises(ValueError, match=r"Received: dropout=1.0"):
        DenseHead(dropout=1.0).fit(X, y)
    with pytest.raises(ValueError, match=r"at least two classes.*Received: classes=\[0\]"):
        DenseHead(epochs=1).fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(ValueError, match=r"validation_data.*Received: \[7\]"):
        DenseHead(epochs=1).fit(X, y, validation_data=(X[:2], np.array([0, 7])))
    head = DenseHead(epochs=1).fit(X, y)
    with pytest.raises(ValueError, match=r"Expected features of shape \(n, 16\)"):
        head.predict(X[:, :8])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 255.0, 1e4])
def test_dense_standardises_features_of_any_scale(scale):
    # Issue 13: on features far from zero the unscaled head predicted one class at every
    # scale, while logreg (StandardScaler inside) separates them perfectly.
    X, y = offset_blobs(60, 3, scale=scale, seed=11)
    head = DenseHead(**FAST).fit(X[::2], y[::2])
    assert (head.predict(X[1::2]) == y[1::2]).mean() >= 0.95


def test_dense_is_chollets_head_after_the_training_rows_statistics():
    import keras

    X, y = offset_blobs(30, 3, scale=255.0, shape=(2, 2, 4), seed=12)
    X_val, y_val = offset_blobs(5, 3, scale=255.0, shape=(2, 2, 4), seed=12)
    head = DenseHead(epochs=1).fit(X, y, validation_data=(X_val, y_val))
    layers = head.model_.layers
    assert [type(layer) for layer in layers] == [
        keras.layers.Flatten,
        keras.layers.Normalization,
        keras.layers.Dense,
        keras.layers.Dropout,
        keras.layers.Dense,
    ]
    hidden, dropout, output = layers[2:]
    assert (hidden.units, hidden.activation.__name__) == (256, "relu")
    assert dropout.rate == 0.5
    assert (output.units, output.activation.__name__) == (3, "softmax")
    # Per flattened feature, from the fitted rows only (not validation_data), in float64.
    norm = head.model_.get_layer("standardise")
    assert not norm.trainable_weights
    rows = X.reshape(len(X), -1).astype(np.float64)
    mean, variance, count = norm.get_weights()
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(variance, rows.var(axis=0), rtol=1e-5)
    assert count == len(X)


def test_tiny_features_are_rescaled_by_a_power_of_two_and_reload(tmp_path):
    # MobileNetV2 with random weights gives features ~1e-11: a float32 variance there is
    # below Keras' epsilon, and the unscaled head gave every class probability 1/3.
    X, y = offset_blobs(30, 3, scale=1e-11, shape=(2, 2, 4), seed=13)
    head = DenseHead(**FAST).fit(X, y)
    assert (head.predict(X) == y).mean() >= 0.95
    names = [layer.name for layer in head.model_.layers]
    assert names == ["flatten", "feature_scale", "standardise", "hidden", "dropout", "output"]
    assert math.log2(head.model_.get_layer("feature_scale").scale).is_integer()
    save_head(head, tmp_path)
    loaded = load_head(tmp_path)
    assert [layer.name for layer in loaded.model_.layers] == names
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_constant_features_are_only_centred():
    X, y = offset_blobs(20, 2, scale=1.0, seed=14)
    X[:, 3] = 0.0
    X[:, 5] = far = np.float32(1234.567)  # a constant far from zero
    head = DenseHead(epochs=2).fit(X, y)
    mean, variance, _ = head.model_.get_layer("standardise").get_weights()
    assert (mean[3], variance[3]) == (0.0, 1.0)
    assert (mean[5], variance[5]) == (far, 1.0)
    assert np.isfinite(head.predict_proba(X)).all()


def test_dense_head_saved_before_standardising_still_loads(tmp_path, monkeypatch):
    # A head fitted before the Normalization layer existed: Flatten -> Dense -> Dropout ->
    # Dense. It loads as it was saved and predicts as it was trained (on raw features).
    X, y = blobs(20, 3, seed=16)
    monkeypatch.setattr(DenseHead, "_standardises", False)
    old = DenseHead(epochs=2).fit(X, y)
    save_head(old, tmp_path)
    monkeypatch.undo()
    loaded = load_head(tmp_path)
    assert [layer.name for layer in loaded.model_.layers] == ["hidden", "dropout", "output"]
    np.testing.assert_array_equal(loaded.predict_proba(X), old.predict_proba(X))


def test_feature_moments_merge_batches_without_losing_precision():
    # Features 1e4 from zero with a std of 1e-2: E[x^2] - E[x]^2 would lose all digits.
    rng = np.random.default_rng(15)
    X = (1e4 + 1e-2 * rng.normal(size=(103, 2, 3))).astype(np.float32)
    rows = X.reshape(len(X), -1).astype(np.float64)
    moments = feature_moments(X[i : i + 10] for i in range(0, len(X), 10))
    assert moments.count == len(X)
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance, rows.var(axis=0), rtol=1e-9)
    with pytest.raises(ValueError, match="Received: 0 rows"):
        feature_moments([])


@pytest.mark.parametrize(
    ("largest_std", "expected"),
    [(1.0, 1.0), (300.0, 1.0), (2.0**-10, 1.0), (0.0, 1.0), (1e4, 2.0**-13), (1e-11, 2.0**37)],
)
def test_feature_scale_is_a_power_of_two_only_far_from_unit_scale(largest_std, expected):
    assert feature_scale(np.array([largest_std / 8, largest_std])) == expected


def _outputs(head, X):
    """Everything a head can say about X, for round-trip comparisons."""
    out = {"predict": head.predict(X)}
    for method in ("predict_proba", "decision_function"):
        if hasattr(head, method):
            out[method] = getattr(head, method)(X)
    return out


@pytest.mark.parametrize("name", HEADS)
def test_saved_head_reloads_and_predicts_identically(tmp_path, name):
    X, y = blobs(40, 3, seed=7)
    head = make_head(name, **FAST).fit(X, y)
    model_path = save_head(head, tmp_path / "out")
    expected_file = "model.keras" if name == "dense" else "model.joblib"
    assert model_path == tmp_path / "out" / expected_file
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [expected_file, "head.json"]
    )
    assert json.loads((tmp_path / "out" / "head.json").read_text())["kind"] == name

    loaded = load_head(tmp_path / "out")
    assert type(loaded) is type(head)
    before, after = _outputs(head, X), _outputs(loaded, X)
    assert before.keys() == after.keys()
    assert len(before) >= 2  # predictions and scores are both compared
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    np.testing.assert_array_equal(loaded.classes_, head.classes_)


@pytest.mark.parametrize("name", ["logreg", "dense"])
def test_unpooled_feature_maps_fit_and_round_trip(tmp_path, name):
    X, y = blobs(40, 3, shape=(2, 2, 4), seed=8)
    head = make_head(name, **FAST).fit(X, y)
    assert (head.predict(X) == y).mean() >= 0.95
    with pytest.raises(ValueError):  # a map of another size is not silently flattened
        head.predict(X[:, :1])
    save_head(head, tmp_path)
    np.testing.assert_array_equal(load_head(tmp_path).predict(X), head.predict(X))


def test_load_head_from_an_empty_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"head\.json is missing"):
        load_head(tmp_path)


class _Lines(logging.Handler):
    """Collects the messages of one logger, whatever the 'pipeline' logger propagates."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def dense_log():
    logger = logging.getLogger("pipeline.heads.dense")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("terminal", [True, False])
def test_dense_head_logs_one_line_per_epoch_on_a_terminal_only(monkeypatch, capsys, dense_log,
                                                               terminal):
    monkeypatch.setattr("pipeline.heads.dense.stderr_is_terminal", lambda: terminal)
    X, y = blobs(20, 3, seed=31)
    head = DenseHead(epochs=4, lr=1e-2, patience=10, log_epochs=True)
    head.fit(X, y, validation_data=(X[:15], y[:15]))
    epochs = [line for line in dense_log if "epoch " in line and "/4:" in line]
    # A log file gets a line at most every 30 s (none in this fast fit) and the last one.
    assert [line.split(":")[1] for line in epochs] == (
        [" epoch 1/4", " epoch 2/4", " epoch 3/4", " epoch 4/4"] if terminal else [" epoch 4/4"]
    )
    assert re.fullmatch(r"dense head: epoch 4/4: loss [\d.e-]+, val loss [\d.e-]+, "
                        r"accuracy [\d.]+, val accuracy [\d.]+ \(\d+\.\d s\)", epochs[-1])
    assert f"kept the weights of epoch {head.best_epoch_}" in dense_log[-1]
    assert capsys.readouterr().out == ""  # no Keras progress bar


def test_dense_head_is_quiet_unless_asked(dense_log):
    X, y = blobs(10, 2, seed=32)
    DenseHead(epochs=2).fit(X, y)
    assert dense_log == []


def test_early_stopping_records_the_epoch_whose_weights_it_keeps():
    rng = np.random.default_rng(33)
    # Labels that are noise: the validation loss rises soon, so early stopping ends it.
    X, y = rng.normal(size=(80, 8)).astype(np.float32), np.repeat([0, 1], 40)
    head = DenseHead(epochs=60, lr=5e-2, patience=2, dropout=0.0, random_state=0)
    head.fit(X[:60], y[:60], validation_data=(X[60:], y[60:]))
    val_loss = head.history_["val_loss"]
    assert head.stopped_epoch_ == len(val_loss) < 60
    assert head.best_epoch_ == int(np.argmin(val_loss)) + 1 == len(val_loss) - 2
    assert set(head.history_) == {"loss", "val_loss", "accuracy", "val_accuracy"}
    # The kept weights are the best epoch's: scoring the validation rows gives its loss.
    kept = head.model_.evaluate(X[60:], y[60:].astype(np.float32), verbose=0, return_dict=True)
    assert kept["loss"] == pytest.approx(val_loss[head.best_epoch_ - 1], rel=1e-4, abs=1e-6)


def test_training_curve_png_marks_the_kept_epoch(tmp_path):
    from pipeline.heads.curve import plot_training_curve

    history = {"loss": [1.0, 0.5, 0.4], "val_loss": [0.9, 0.6, 0.7],
               "accuracy": [0.5, 0.8, 0.9], "val_accuracy": [0.6, 0.7, 0.7]}
    path = plot_training_curve(history, 2, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temp file left
    with pytest.raises(ValueError, match="no epoch"):
        plot_training_curve({"loss": []}, None, tmp_path / "empty.png")
