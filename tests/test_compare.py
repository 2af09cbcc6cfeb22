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

from pipeline.cache import CacheWriter, read_attrs
from pipeline.cli import compare_main
from pipeline.compare import (
    SCRATCH_HEAD,
    CompareConfig,
    cache_labels,
    choose,
    make_folds,
    param_grid,
    run_compare,
)
from pipeline.compare.report import accuracy_figure
from pipeline.heads import HEADS, head_name, make_head


def noisy_blobs(n_per_class: int, n_classes: int = 3, noise: float = 3.0, seed: int = 0):
    """Blobs blurred until heads make mistakes, so equal accuracies mean equal predictions."""
    X, y = blobs(n_per_class, n_classes, seed=seed)
    X = X + np.random.default_rng(seed + 100).normal(0.0, noise, X.shape).astype(np.float32)
    return X, y


def write_cache(path, X, y, paths, *, split=None, base="dummy", attrs=None):
    """A cache with chosen paths, row order, base name and other attributes."""
    attrs = {**attrs_for(CLASS_NAMES[: int(np.max(y)) + 1]), "base": base, **(attrs or {})}
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
    assert "(5-fold stratified cross-validation on all 90 rows)" in result.summary()


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


@pytest.mark.parametrize("parts", [("train", "validation", "test"), ("train", "train", "test")])
def test_recorded_test_split_is_scored_once_and_never_chooses(tmp_path, parts):
    X, y = noisy_blobs(30, seed=5)
    split = np.array(parts)[np.arange(len(y)) % 3]
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
    # Scored: the recorded validation rows, else every non-test row by cross-validation.
    assert sum(good["folds"]["sizes"]) == (np.sum(split == "validation") or good["n_pool"])
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


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory):
    """Noisy blobs with a recorded train/validation split (as extract records it)."""
    tmp = tmp_path_factory.mktemp("split")
    X, y = noisy_blobs(40, seed=11)
    split = np.where(np.random.default_rng(3).random(len(y)) < 0.3, "validation", "train")
    return write_cache(tmp / "split.h5", X, y, default_paths(y), split=split), split


def test_a_recorded_split_sweep_chooses_within_the_train_rows(tmp_path, split_cache):
    """With a recorded split, --sweep chooses as GridSearchCV does on the train rows alone,
    refits that point on all of them and scores the validation rows once: the validation
    rows play no part in the choice, so its score is not biased by it."""
    from pipeline.cache import read_cache

    cache_path, split = split_cache
    cache = read_cache(cache_path)
    X, y = np.asarray(cache.features), np.asarray(cache.labels)
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
    _, results = compare(tmp_path, [cache_path], cv=4, seed=0, sweep=True)
    grid = [g["clf__C"] for g in param_grid("logreg", X.shape[1])]
    search = GridSearchCV(make_head("logreg"), {"clf__C": grid},
                          cv=StratifiedKFold(4, shuffle=True, random_state=0)).fit(
                              X[train], y[train])
    entry = pair(results, "logreg")
    assert entry["params"] == search.best_params_
    assert entry["choice"]["folds"] == 4
    assert [g["accuracy_mean"] for g in entry["choice"]["grid"]] == pytest.approx(
        search.cv_results_["mean_test_score"].tolist(), abs=1e-12)
    assert entry["accuracy_mean"] == pytest.approx(search.score(X[val], y[val]), abs=1e-12)
    assert "cross-validation within the train rows" in results["protocol"]


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_a_recorded_split_scores_as_fit_head_does(tmp_path, split_cache, class_weight):
    """compare and fit_head report the same validation accuracy for the same head."""
    from pipeline.fit import FitConfig, run_fit

    cache, split = split_cache
    heads = ["logreg", "linear-svm", "svm", "knn"]
    result, results = compare(tmp_path, [cache], heads=heads, class_weight=class_weight)
    n_val = int(np.sum(split == "validation"))
    assert results["protocol_kind"] == "validation" and results["folds"]["sizes"] == [n_val]
    for head in heads:
        _, metrics = run_fit(FitConfig(str(cache), head=head, out=str(tmp_path / head),
                                       class_weight=class_weight))
        entry = pair(results, head)
        assert metrics["n_val"] == n_val == entry["folds"][0]["n_val"]
        assert entry["accuracy_mean"] == pytest.approx(metrics["accuracy"], abs=1e-12), head
        assert entry["out_of_fold"]["confusion_matrix"] == metrics["confusion_matrix"], head
    accuracies = {pair(results, h)["accuracy_mean"] for h in heads}
    assert len(accuracies) > 1 and max(accuracies) < 1.0  # not trivial
    protocol = f"validation split recorded at extract: fitted on the {len(split) - n_val} " \
               f"train rows, scored on the {n_val} validation rows"
    assert protocol in result.summary()
    assert protocol in (result.out_dir / "report.html").read_text().lower()
    assert f"class weight</th><td>{class_weight or 'none'}<" in (
        result.out_dir / "report.html").read_text()
    from pipeline.compare.history import format_history, read_history

    history = read_history(tmp_path / "history.jsonl")
    assert history[-1]["protocol"] == "validation"
    assert "| split |" in format_history(history)


def test_class_weight_reaches_the_heads_and_is_checked(tmp_path, capsys):
    X, y = noisy_blobs(30, seed=12)
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:6]])  # owl: rare
    cache = write_cache(tmp_path / "c.h5", X[keep], y[keep], np.asarray(default_paths(y))[keep])
    _, plain = compare(tmp_path, [cache], "plain", heads=["logreg"], cv=3)
    _, balanced = compare(tmp_path, [cache], "balanced", heads=["logreg"], cv=3,
                          class_weight="balanced")
    assert balanced["config"]["class_weight"] == "balanced"
    assert (pair(plain, "logreg")["out_of_fold"]["confusion_matrix"]
            != pair(balanced, "logreg")["out_of_fold"]["confusion_matrix"])
    assert compare_main([str(cache), "--class-weight", "heavy"]) == 2
    assert ("`--class-weight` must be one of none, balanced. Received: --class-weight='heavy'"
            in capsys.readouterr().err)
    with pytest.raises(ValueError, match="Received: --class-weight=heavy"):
        compare(tmp_path, [cache], "x", class_weight="heavy")


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
        ({"heads": ["xgboost"]}, r"xgboost is none of them. Received: heads='xgboost'"),
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
    cache = write_cache(tmp_path / "c.h5", X, y, default_paths(y),
                        attrs={"data_dir": "/data/pets"})
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
    assert "| # | features" in md and "n_neighbors=5" in md and "C=1, gamma=scale" in md
    assert results["config"]["heads"] == ["logreg", "knn", "svm"]
    assert len(pair(results, "svm")["folds"]) == 3
    # The run's settings: the cache's (from its attributes) and the run's own.
    settings = html[html.index("<h2>Settings</h2>"):]
    for text in ("<td>dummy</td><td>top</td><td>avg</td><td>32x32</td><td>none</td>",
                 f"<td>/data/pets</td><td>60</td><td>3</td><td>{read_attrs(cache)['created']}</td>",
                 "<th>heads</th><td>logreg, knn, svm</td>", "<th>folds</th><td>3</td>",
                 "<th>seed</th><td>0</td>", "<th>class weight</th><td>none</td>",
                 f"<th>run started</th><td>{results['started']}</td>",
                 "3-fold stratified cross-validation on all 60 rows"):
        assert text in settings, text
    # A confusion matrix for every pair, each from its own predictions.
    boxes = html.split("<details><summary>#")[1:]
    assert len(boxes) == 3
    for box, row in zip(boxes, result.leaderboard, strict=True):
        assert box.startswith(f"{row['rank']} dummy top avg 32px / {row['head']}: accuracy")
        cm = pair(results, row["head"])["out_of_fold"]["confusion_matrix"]
        cells = [int(c) for c in re.findall(r'<td class="num"[^>]*>(\d+)</td>',
                                            box.split("</details>")[0])]
        assert cells == [n for line in cm for n in line]
    assert len({json.dumps(pair(results, h)["out_of_fold"]["confusion_matrix"])
                for h in ("logreg", "knn", "svm")}) > 1, "the pairs differ"
    assert "choosing" not in html + md


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
    assert second["best"] == "dummy top avg 32px / knn" and second["cv"] == 3
    assert compare_main(["--history", "--history-file", str(history)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| time") and len(table) == 4
    assert "run1" in table[2] and "dummy top avg 32px / knn" in table[3]


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
    assert "skipped scratch images 8px / convnet" in capsys.readouterr().err


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
    with pytest.raises(ValueError, match=r"only 4 row\(s\) to cross-validate.*cv=5"):
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


def test_labels_tell_every_cache_apart():
    attrs = {"base": "MobileNetV2", "layer": "block_13_expand_relu", "pooling": "avg",
             "input_size": [96, 96], "weights": "imagenet"}
    assert cache_labels(["a.h5"], [attrs]) == ["MobileNetV2 block_13_expand_relu avg 96px"]
    other_size = {**attrs, "input_size": [128, 160]}
    other_weights = {**attrs, "weights": "none"}
    labels = cache_labels(["a.h5", "b.h5", "c.h5", "d.h5", "d.h5"],
                          [attrs, other_size, other_weights, attrs, attrs])
    assert len(set(labels)) == 5, labels
    assert labels[1] == "MobileNetV2 block_13_expand_relu avg 128x160px"
    # Only the caches that would share a name get more words: weights, file, position.
    assert labels[0] == "MobileNetV2 block_13_expand_relu avg 96px imagenet (a.h5)"
    assert labels[2] == "MobileNetV2 block_13_expand_relu avg 96px random"
    assert labels[3:] == [f"MobileNetV2 block_13_expand_relu avg 96px imagenet (d.h5) #{i}"
                          for i in (4, 5)]
    # Caches that differ in how their features were computed say so.
    bf16 = {**attrs, "precision": "mixed_bfloat16", "fold_batchnorm": True}
    folded = {**attrs, "precision": "float32", "fold_batchnorm": True}
    dct = {**folded, "jpeg_downscale": "dct"}
    assert cache_labels(["e.h5", "f.h5", "g.h5", "h.h5"], [attrs, folded, bf16, dct]) == [
        "MobileNetV2 block_13_expand_relu avg 96px (fp32, BN unfolded)",
        "MobileNetV2 block_13_expand_relu avg 96px (fp32)",
        "MobileNetV2 block_13_expand_relu avg 96px (bf16)",
        "MobileNetV2 block_13_expand_relu avg 96px (fp32, jpeg-dct)"]
    # A word they all share (the same weights) tells nothing apart: the file name does.
    assert cache_labels(["x.h5", "y.h5"], [attrs, attrs]) == [
        "MobileNetV2 block_13_expand_relu avg 96px (x.h5)",
        "MobileNetV2 block_13_expand_relu avg 96px (y.h5)"]
    for base, name in (("file:my_net.keras", "my_net.keras"),  # as extract records them
                       ("hub:hf://keras/dinov2_small", "dinov2_small"),
                       ("hub:dinov2_with_registers_small", "dinov2_with_registers_small")):
        assert cache_labels(["m.h5"], [{"base": base, "layer": "conv3", "pooling": "max",
                                        "input_size": [64, 64], "weights": "saved"}]) == [
            f"{name} conv3 max 64px"]


def _extents(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


@pytest.mark.parametrize("means", [[0.991, 0.97, 0.962, 0.93], [0.9, 0.6, 0.35, 0.05]])
def test_accuracy_plot_keeps_labels_whole_and_values_readable(means):
    long = "EfficientNetV2B3 block6a_expand_activation cls+mean 300x260px imagenet (a.h5)"
    rows = [{"label": label, "head": head, "accuracy_mean": m, "accuracy_std": 0.012,
             "test_accuracy": m - 0.2 * (i == 1) - 0.01 if i % 2 else None}
            for i, (label, head, m) in enumerate(zip(
                [long, "VGG16 block5_pool avg 224px", long + " #2", "x"],
                ["logreg", "linear-svm", "dense", "knn"], means, strict=True))]
    fig = accuracy_figure(rows, folds=5)
    renderer = _extents(fig)
    ax = fig.axes[0]
    page = fig.bbox
    ticks = [t for t in ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks] == [f"{r['label']} / {r['head']}" for r in rows]
    for t in ticks:  # never clipped: every label lies inside the figure
        box = t.get_window_extent(renderer)
        assert box.x0 >= page.x0 and box.x1 <= page.x1, t.get_text()
    values = [t for t in ax.texts]
    assert [t.get_text().split()[0] for t in values] == [f"{m:.4f}" for m in means]
    boxes = [t.get_window_extent(renderer) for t in values]
    for i, box in enumerate(boxes):
        assert box.x0 > ax.bbox.x1 and box.x1 <= page.x1  # beside the bars, on the page
        assert not any(box.overlaps(other) for other in boxes[i + 1:])
    low = ax.get_xlim()[0]
    assert all(r["test_accuracy"] > low for r in rows if r["test_accuracy"] is not None)
    note = f"the axis starts at {low:.2f}, not at 0"
    assert (note in ax.get_xlabel()) == (low > 0)
    assert (low > 0) == (min(means) > 0.1)


def _scores(results):
    """Everything a run measured except how long it took: what a resumed run must repeat."""
    timing = {"fit_seconds", "predict_ms_per_image", "model_bytes"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in timing}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(results["pairs"]), strip(results["leaderboard"])


def test_a_stopped_run_continues_without_redoing_finished_fits(tmp_path, monkeypatch, capsys):
    import pipeline.compare.fits as fits

    X, y = noisy_blobs(15, seed=13)
    split = np.array(["train", "train", "test"])[np.arange(len(y)) % 3]  # folds + a test refit
    cache = write_cache(tmp_path / "c.h5", X, y, default_paths(y), split=split)
    _, whole = compare(tmp_path, [cache], "whole", heads=["logreg"], cv=3, sweep=True)
    real, calls = fits.fit_and_predict, []

    def fit_until(stop_after):
        def fit(*args, **kwargs):
            if len(calls) == stop_after:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the run
            calls.append(1)
            return real(*args, **kwargs)

        calls.clear()
        monkeypatch.setattr(fits, "fit_and_predict", fit)

    argv = [str(cache), "--heads", "logreg", "--cv", "3", "--sweep", "--out",
            str(tmp_path / "run"), "--history-file", str(tmp_path / "history.jsonl")]
    total = 3 * 5 + 1  # folds x logreg's 5 grid points + the test refit
    fit_until(7)
    assert compare_main(argv) == 130
    stores = list(tmp_path.glob("compare-unfinished-*.jsonl"))
    assert len(stores) == 1 and len(stores[0].read_text().splitlines()) == 7
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"compare: interrupted by Ctrl-C; 7 of {total} fits kept in {stores[0]}: run the "
        "same command again to continue from there.")
    assert not (tmp_path / "run").exists()

    # Other settings never reuse them: everything is fitted again.
    fit_until(None)
    assert compare_main([*argv, "--class-weight", "balanced"]) == 0
    assert len(calls) == total

    # The same command continues: only the missing fits run, and a line cut short by a
    # kill is passed over (and the lines after it stay whole). The report equals the
    # uninterrupted run's.
    with open(stores[0], "a") as f:
        f.write('{"key": "cut sh')
    fit_until(3)
    assert compare_main(argv) == 130
    assert f"; 10 of {total} fits kept in" in capsys.readouterr().err
    fit_until(None)
    assert compare_main(argv) == 0
    assert len(calls) == total - 10
    assert "(10 fits kept from a stopped run)" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert _scores(resumed) == _scores(whole)
    assert not list(tmp_path.glob("compare-unfinished-*.jsonl")), "removed once the report is out"
