"""compare: same rows and folds for every pair, scikit-learn's numbers, reports, history."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import write_index_images
from helpers_fit import CLASS_NAMES, attrs_for, blobs, make_cache
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from pipeline.cache import CacheWriter
from pipeline.cli import compare_main
from pipeline.compare import (
    SCRATCH_HEAD,
    CompareConfig,
    choose,
    make_folds,
    param_grid,
    run_compare,
)
from pipeline.heads import HEADS, head_name, make_head


def noisy_blobs(n_per_class: int, n_classes: int = 3, noise: float = 3.0, seed: int = 0):
    """Blobs blurred until heads make mistakes, so equal accuracies mean equal predictions."""
    X, y = blobs(n_per_class, n_classes, seed=seed)
    X = X + np.random.default_rng(seed + 100).normal(0.0, noise, X.shape).astype(np.float32)
    return X, y


def write_cache(path, X, y, paths, *, split=None, base="dummy"):
    """A cache with chosen paths, row order and base name."""
    attrs = {**attrs_for(CLASS_NAMES[: int(np.max(y)) + 1]), "base": base}
    writer = CacheWriter.create(path, attrs=attrs, feature_shape=X.shape[1:], dtype="float32")
    writer.append(X, y, list(paths), list(split) if split is not None else [""] * len(y))
    return writer.finish()


def default_paths(y):
    """The paths make_cache gives its rows."""
    return [f"{CLASS_NAMES[label]}/img_{i:04d}.png" for i, label in enumerate(y)]


def compare(tmp_path, caches, name="report", **kwargs):
    """Run compare into tmp_path/name; return the result and the parsed results.json."""
    kwargs.setdefault("heads", ["logreg"])
    config = CompareConfig(
        caches=[str(c) for c in caches],
        out=str(tmp_path / name),
        history_file=str(tmp_path / "history.jsonl"),
        **kwargs,
    )
    result = run_compare(config)
    return result, json.loads((tmp_path / name / "results.json").read_text())


def pair(results, head, cache=None):
    return next(p for p in results["pairs"]
                if p["head"] == head and (cache is None or p["cache"] == str(cache)))


def fold_accuracies(results, head, cache=None):
    return [f["accuracy"] for f in pair(results, head, cache)["folds"]]


# --- the numbers are scikit-learn's ------------------------------------------------------


def test_logreg_equals_sklearn_cross_val_score(tmp_path):
    X, y = noisy_blobs(30)
    cache = make_cache(tmp_path / "c.h5", X, y)
    result, results = compare(tmp_path, [cache], cv=5, seed=3)
    folds = StratifiedKFold(5, shuffle=True, random_state=3)
    expected = cross_val_score(make_head("logreg", random_state=3), X, y, cv=folds)
    assert 0.6 < expected.mean() < 0.99  # not trivial: equal accuracies mean equal folds
    assert fold_accuracies(results, "logreg") == expected.tolist()
    assert result.leaderboard[0]["accuracy_mean"] == expected.mean()
    assert result.leaderboard[0]["accuracy_std"] == expected.std()


def test_sweep_chooses_what_grid_search_chooses(tmp_path):
    X, y = noisy_blobs(30, seed=1)
    cache = make_cache(tmp_path / "c.h5", X, y)
    _, results = compare(tmp_path, [cache], cv=4, seed=0, sweep=True)
    grid = param_grid("logreg", X.shape[1])
    search = GridSearchCV(
        make_head("logreg"),
        {"clf__C": [g["clf__C"] for g in grid]},
        cv=StratifiedKFold(4, shuffle=True, random_state=0),
        refit=False,
    ).fit(X, y)
    entry = pair(results, "logreg")
    assert entry["params"] == search.best_params_
    assert entry["accuracy_mean"] == search.best_score_
    assert [g["accuracy_mean"] for g in entry["grid"]] == search.cv_results_[
        "mean_test_score"
    ].tolist()


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [
    ["logreg", "knn"],
    # 40 s on 2 cores: every joblib worker imports TensorFlow
    pytest.param(["logreg", "knn", "dense"], marks=pytest.mark.slow),
])
def test_parallel_equals_serial_and_the_seed_repeats(tmp_path, heads):
    X, y = noisy_blobs(20, seed=2)
    cache = make_cache(tmp_path / "c.h5", X, y)
    kwargs = {"heads": heads, "cv": 3, "seed": 5, "epochs": 3}
    _, serial = compare(tmp_path, [cache], "serial", **kwargs)
    _, again = compare(tmp_path, [cache], "again", **kwargs)
    _, parallel = compare(tmp_path, [cache], "parallel", n_jobs=2, **kwargs)
    for head in kwargs["heads"]:
        expected = fold_accuracies(serial, head)
        assert fold_accuracies(again, head) == expected, head
        assert fold_accuracies(parallel, head) == expected, head
        oof = pair(serial, head)["out_of_fold"]["confusion_matrix"]
        assert pair(parallel, head)["out_of_fold"]["confusion_matrix"] == oof, head
    columns = ("head", "accuracy_mean", "accuracy_std", "macro_f1")
    table = [[row[c] for c in columns] for row in serial["leaderboard"]]
    assert [[row[c] for c in columns] for row in parallel["leaderboard"]] == table
    means = [row["accuracy_mean"] for row in serial["leaderboard"]]
    assert means == sorted(means, reverse=True)


# --- same rows, same folds -----------------------------------------------------------------


def test_caches_of_another_base_are_matched_by_path(tmp_path):
    X, y = noisy_blobs(25, seed=4)
    a = make_cache(tmp_path / "a.h5", X, y)
    # Another "base": other features (an affine map, which StandardScaler undoes) and the
    # rows in another order. Matching by row position would scramble the labels.
    perm = np.random.default_rng(0).permutation(len(y))
    b = write_cache(tmp_path / "b.h5", 3.0 * X[perm] + 1.0, y[perm],
                    np.asarray(default_paths(y))[perm], base="otherbase")
    result, results = compare(tmp_path, [a, b], cv=5)
    accs_a, accs_b = fold_accuracies(results, "logreg", a), fold_accuracies(results, "logreg", b)
    assert 0.6 < np.mean(accs_a) < 0.99
    assert accs_a == accs_b
    assert (pair(results, "logreg", a)["out_of_fold"]["confusion_matrix"]
            == pair(results, "logreg", b)["out_of_fold"]["confusion_matrix"])
    assert {row["base"] for row in result.leaderboard} == {"dummy", "otherbase"}
    assert results["folds"]["pool_paths"] == default_paths(y)  # the first cache's order


@pytest.mark.parametrize("change", ["missing", "extra", "label"])
def test_different_image_sets_are_refused_naming_the_difference(tmp_path, capsys, change):
    X, y = blobs(10, 3)
    paths = default_paths(y)
    a = make_cache(tmp_path / "a.h5", X, y)
    if change == "missing":
        b = write_cache(tmp_path / "b.h5", X[2:], y[2:], paths[2:])
        pattern = rf"30 vs 28 images\): 2 \({re.escape(paths[0])}, {re.escape(paths[1])}\) " \
                  r"only in a\.h5; none only in b\.h5"
    elif change == "extra":
        b = write_cache(tmp_path / "b.h5", X, y, [*paths[:-1], "owl/new.png"])
        pattern = rf"1 \({re.escape(paths[-1])}\) only in a\.h5; 1 \(owl/new\.png\) only in b"
    else:
        y2 = y.copy()
        y2[4] = (y[4] + 1) % 3
        b = write_cache(tmp_path / "b.h5", X, y2, paths)
        pattern = rf"1 images have another label in b\.h5 than in a\.h5 \(first: {paths[4]}"
    with pytest.raises(ValueError, match=pattern):
        compare(tmp_path, [a, b])
    assert compare_main([str(a), str(b), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)


def test_recorded_test_split_is_scored_once_and_never_chooses(tmp_path):
    X, y = noisy_blobs(30, seed=5)
    split = np.array(["train", "validation", "test"])[np.arange(len(y)) % 3]
    paths = default_paths(y)
    clean = write_cache(tmp_path / "clean.h5", X, y, paths, split=split)
    # The same cache with the test rows' features destroyed: if they took any part in
    # choosing, the CV scores or the chosen C would move.
    X_bad = X.copy()
    X_bad[split == "test"] = np.random.default_rng(9).normal(0, 50, X_bad[split == "test"].shape)
    broken = write_cache(tmp_path / "broken.h5", X_bad, y, paths, split=split)
    kwargs = {"cv": 3, "sweep": True, "heads": ["logreg", "knn"]}
    _, good = compare(tmp_path, [clean], "good", **kwargs)
    _, bad = compare(tmp_path, [broken], "bad", **kwargs)

    n_test = int(np.sum(split == "test"))
    assert good["n_test"] == n_test and good["n_pool"] == len(y) - n_test
    assert sum(good["folds"]["sizes"]) == good["n_pool"]
    test_paths = {p for p, s in zip(paths, split, strict=True) if s == "test"}
    assert not test_paths & set(good["folds"]["pool_paths"])
    for head in kwargs["heads"]:
        g, b = pair(good, head), pair(bad, head)
        assert g["grid"] == b["grid"] and g["params"] == b["params"], head
        assert g["test"]["n_test"] == n_test and g["test"]["n_fit"] == good["n_pool"]
        assert sum(map(sum, g["test"]["confusion_matrix"])) == n_test
        assert g["test"]["accuracy"] > b["test"]["accuracy"], head
    row = good["leaderboard"][0]
    assert row["test_accuracy"] == pair(good, row["head"])["test"]["accuracy"]


# --- skipping, errors ----------------------------------------------------------------------


def test_a_grid_point_a_head_refuses_is_dropped_not_fatal(tmp_path):
    X, y = noisy_blobs(8, seed=6)  # 24 rows, 3 folds: 16 fitting rows < 25 neighbours
    cache = make_cache(tmp_path / "c.h5", X, y)
    result, results = compare(tmp_path, [cache], cv=3, sweep=True, heads=["knn"])
    entry = pair(results, "knn")
    assert entry["status"] == "ok"
    assert entry["grid"][0]["params"] == {"clf__n_neighbors": 25}
    assert "n_neighbors" in entry["grid"][0]["error"]
    assert entry["params"]["clf__n_neighbors"] < 16 and result.leaderboard


def test_nothing_could_run_writes_the_reason_and_exits_nonzero(tmp_path, capsys):
    X, y = blobs(3, 3)  # 3 rows per class cannot make 5 stratified folds
    cache = make_cache(tmp_path / "c.h5", X, y)
    out = tmp_path / "out"
    code = compare_main([str(cache), "--heads", "logreg,knn", "--out", str(out),
                         "--history-file", str(tmp_path / "h.jsonl")])
    assert code == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("compare: nothing could run") and str(out) in last
    assert "Cannot make 5 stratified folds" in last and "Received: cv=5" in last
    md = (out / "leaderboard.md").read_text()
    assert "Nothing could be scored" in md and md.count("Cannot make 5 stratified folds") == 2
    assert (out / "report.html").is_file() and not (out / "accuracy.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cv": 1}, r"Received: cv=1"),
        ({"heads": ["xgboost"]}, r"Received: heads=\['xgboost'\]"),
        ({"heads": ["svm", "svm"]}, r"a head twice"),
        ({"n_jobs": 0}, r"Received: n_jobs=0"),
        ({"epochs": 0}, r"Received: epochs=0"),
    ],
)
def test_bad_arguments_say_what_was_received(tmp_path, kwargs, message):
    cache = make_cache(tmp_path / "c.h5", *blobs(5, 2))
    with pytest.raises(ValueError, match=message):
        compare(tmp_path, [cache], **kwargs)


# --- outputs -------------------------------------------------------------------------------


def test_report_files_and_plots(tmp_path):
    X, y = noisy_blobs(20, seed=7)
    cache = make_cache(tmp_path / "c.h5", X, y)
    result, results = compare(tmp_path, [cache], cv=3, heads=["logreg", "knn", "svm"])
    out = tmp_path / "report"
    assert result.out_dir == out
    html = (out / "report.html").read_text()
    for name in ("accuracy.png", "confusion.png", "per_class_f1.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
        assert f'<img src="{name}"' in html, name
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["head"] for r in rows] == [r["head"] for r in result.leaderboard]
    means = [float(r["accuracy_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)
    for r in rows:
        assert int(r["model_bytes"]) > 0 and float(r["predict_ms_per_image"]) > 0
        assert float(r["fit_seconds"]) > 0 and r["params"]
    md = (out / "leaderboard.md").read_text()
    assert "| # | base" in md and "n_neighbors=5" in md and "C=1, gamma=scale" in md
    assert results["config"]["heads"] == ["logreg", "knn", "svm"]
    assert len(pair(results, "svm")["folds"]) == 3


def test_history_appends_a_line_per_run_and_prints(tmp_path, capsys):
    cache = make_cache(tmp_path / "c.h5", *noisy_blobs(10, seed=8))
    history = tmp_path / "history.jsonl"
    assert compare_main(["--history", "--history-file", str(history)]) == 0
    assert "No compare runs recorded yet" in capsys.readouterr().out
    compare(tmp_path, [cache], "run1", cv=2)
    compare(tmp_path, [cache], "run2", cv=3, heads=["knn"])
    lines = history.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["out"].endswith("run1") and second["out"].endswith("run2")
    assert second["best"] == "dummy / knn" and second["cv"] == 3
    assert compare_main(["--history", "--history-file", str(history)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| time") and len(table) == 4
    assert "run1" in table[2] and "dummy / knn" in table[3]


def test_scratch_row_on_the_cached_images(tmp_path, probe_model, capsys):
    from pipeline.extract import ExtractConfig, run_extract

    data = tmp_path / "data"
    write_index_images(data, 30)
    cache = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg", out=str(cache)))
    result, results = compare(tmp_path, [cache], cv=2, scratch=str(data), scratch_epochs=2)
    scratch = pair(results, SCRATCH_HEAD)
    assert scratch["status"] == "ok" and scratch["base"] == "scratch"
    assert [f["n_val"] for f in scratch["folds"]] == results["folds"]["sizes"]
    assert {row["head"] for row in result.leaderboard} == {"logreg", SCRATCH_HEAD}
    # An image gone since extraction skips the scratch row only, with the reason.
    next(data.rglob("*.png")).unlink()
    result, results = compare(tmp_path, [cache], "again", cv=2, scratch=str(data))
    assert pair(results, SCRATCH_HEAD)["status"] == "skipped"
    assert "1 of 30 cached images cannot be read" in pair(results, SCRATCH_HEAD)["reason"]
    assert [row["head"] for row in result.leaderboard] == ["logreg"]
    assert "skipped scratch / convnet" in capsys.readouterr().err


# --- small pure pieces ---------------------------------------------------------------------


def test_knn_head():
    head = make_head("knn")
    assert [step for step, _ in head.steps] == ["flatten", "scale", "clf"]
    assert isinstance(head.named_steps["clf"], KNeighborsClassifier)
    assert head_name(head) == "knn" and "knn" in HEADS
    X, y = blobs(20, 3, shape=(2, 2, 4))
    assert (head.fit(X, y).predict(X) == y).mean() >= 0.95


@pytest.mark.parametrize("head", [*HEADS, SCRATCH_HEAD])
def test_every_grid_holds_the_default_point(head):
    grid = param_grid(head, 64)
    assert 1 <= len(grid) <= 9
    if head == SCRATCH_HEAD:
        return
    defaults = make_head(head).get_params()
    if head == "svm":  # gamma "scale" is 1 / n_features on standardised features
        defaults["clf__gamma"] = 1 / 64
    assert {k: defaults[k] for k in grid[0]} in grid


def test_folds_choose_and_grid_errors():
    labels = np.array([0] * 6 + [1] * 4)
    folds = make_folds(labels, 2, 0)
    assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match=r"class 'dog' has only 4 choosing row\(s\).*cv=5"):
        make_folds(labels, 5, 0, class_names=["cat", "dog"])
    with pytest.raises(ValueError, match="at least two"):
        make_folds(np.zeros(6, dtype=int), 2, 0)
    assert choose([[0.5, 0.7], None, [0.6, 0.6], [0.7, 0.5]]) == 0  # first of the ties
    with pytest.raises(ValueError, match="Received: head='tree'"):
        param_grid("tree", 4)


def test_layers_side_by_side_on_the_same_rows_and_folds(tmp_path):
    """Stored layers compare like bases; the report plots accuracy by depth."""
    from conftest import save_png

    from pipeline.extract import ExtractConfig, run_extract

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, shift in (("dark", 0), ("light", 110)):
        (data / c).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.integers(0, 140, (20, 20, 3)) + shift, 0, 255)
            save_png(pixels.astype(np.uint8), data / c / f"{i}.png")
    cache = tmp_path / "multi.h5"
    run_extract(ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32",
                              layer="block_1_expand_relu,block_3_expand,out_relu",
                              pooling="avg", out=str(cache)))
    result, results = compare(tmp_path, [cache], heads=["logreg"], cv=3, layers="all")
    bases = [p["base"] for p in results["pairs"]]
    assert bases == [f"MobileNetV2 @ {n}" for n in
                     ("block_1_expand_relu", "block_3_expand", "out_relu")]
    folds = {json.dumps([(f["n_fit"], f["n_val"]) for f in p["folds"]])
             for p in results["pairs"]}
    assert len(folds) == 1, "every layer is scored on the same folds"
    depth = result.out_dir / "depth.png"
    assert depth.stat().st_size > 1000
    assert "depth.png" in (result.out_dir / "report.html").read_text()
    with pytest.raises(ValueError, match="Received: layers='block_9_add'"):
        compare(tmp_path, [cache], name="x", heads=["logreg"], cv=3, layers="block_9_add")
