"""predict: new images through the recorded base + head equal the cached-feature predictions;
export: base + head as one safe .keras model; combine: preprocessing as Keras layers."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import PYTHON, SCRIPTS, bad_files, write_index_images

from pipeline.bases import PREPROCESS_MODES, build_feature_model, preprocess
from pipeline.bases.combine import end_to_end_model, preprocessing_layers
from pipeline.cache import read_cache
from pipeline.cli import fit_head_main, predict_main
from pipeline.export import export_model
from pipeline.extract import ExtractConfig, run_extract
from pipeline.fit import FitConfig, run_fit
from pipeline.heads import HEADS, load_head
from pipeline.heads.persist import HEAD_FORMAT_VERSION
from pipeline.images import load_image
from pipeline.predict import PredictConfig, run_predict, skipped_path

# Equality here is "same computation, maybe another batch split": float32 round-off only.
TOL = {"rtol": 1e-4, "atol": 1e-5}
# Two datasets: 3 classes through caffe preprocessing into a float32 cache; 2 classes
# (sigmoid dense head, one-column SVM scores) through torch preprocessing into float16.
SETUPS = {
    "3-class": {"classes": ("ant", "bee", "cat"), "preprocess": "caffe", "dtype": "float32"},
    "2-class": {"classes": ("dog", "eel"), "preprocess": "torch", "dtype": "float16"},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, probe_model):
    """{setup: (data dir, cache path, {head: model dir})}: real caches and every head."""
    out = {}
    for name, setup in SETUPS.items():
        root = tmp_path_factory.mktemp(name)
        data = root / "data"
        write_index_images(data, 24, classes=setup["classes"])
        cache = root / "cache.h5"
        run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg",
                                  preprocess=setup["preprocess"], dtype=setup["dtype"],
                                  out=str(cache), batch_size=5))
        heads = {}
        for head in HEADS:
            heads[head], _ = run_fit(FitConfig(str(cache), head=head, out=str(root / head),
                                               epochs=3, lr=1e-2))
        out[name] = (data, cache, heads)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def predict(model, images, out, **kwargs) -> tuple[list[dict[str, str]], object]:
    result = run_predict(PredictConfig(str(model), [str(i) for i in images], str(out), **kwargs))
    return read_csv(out), result


def cached_predictions(cache_path: Path, model_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """What fit_head's head says on the cached features: {path: row}, classes, values."""
    cache = read_cache(cache_path)
    head = load_head(model_dir)
    X = np.asarray(cache.features, dtype=np.float32)
    if hasattr(head, "predict_proba"):
        values = head.predict_proba(X)
    else:
        values = head.decision_function(X)
        values = np.stack([-values, values], axis=1) if values.ndim == 1 else values
    rows = {path: i for i, path in enumerate(cache.paths)}
    names = [cache.class_names[c] for c in head.predict(X)]
    return rows, np.asarray(names), values


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("head", HEADS)
def test_predictions_equal_cached_feature_predictions(models, tmp_path, setup, head):
    data, cache, heads = models[setup]
    rows, names, values = cached_predictions(cache, heads[head])
    predicted, result = predict(heads[head], [data], tmp_path / "p.csv", batch_size=7)
    assert result.n_predicted == len(rows) == len(predicted) and not result.skipped
    prefix = "score" if head in ("linear-svm", "svm") else "p"
    classes = SETUPS[setup]["classes"]
    assert list(predicted[0]) == ["path", "predicted", *(f"{prefix}_{c}" for c in classes)]
    for row in predicted:
        i = rows[Path(row["path"]).relative_to(data).as_posix()]
        assert row["predicted"] == names[i]
        got = [float(row[f"{prefix}_{c}"]) for c in classes]
        np.testing.assert_allclose(got, values[i], **TOL)


def test_top_k_columns_rank_the_values(models, tmp_path):
    data, _, heads = models["3-class"]
    rows, _ = predict(heads["logreg"], [data], tmp_path / "p.csv", top_k=2)
    assert list(rows[0])[-4:] == ["top1_class", "top1_p", "top2_class", "top2_p"]
    for row in rows:
        probs = {c: float(row[f"p_{c}"]) for c in SETUPS["3-class"]["classes"]}
        ranked = sorted(probs, key=probs.get, reverse=True)
        assert [row["top1_class"], row["top2_class"]] == ranked[:2]
        assert row["top1_class"] == row["predicted"]
        assert float(row["top1_p"]) == probs[ranked[0]]


def test_unreadable_files_are_listed_and_shift_no_rows(models, tmp_path, capsys):
    data, _, heads = models["3-class"]
    clean, _ = predict(heads["svm"], [data], tmp_path / "clean.csv")
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    expected_reasons = bad_files(mixed / "bee")
    (mixed / ".hidden.png").write_bytes(b"")  # hidden: never listed
    (mixed / "notes.txt").write_text("not an image extension")  # ignored in a folder walk
    out = tmp_path / "mixed.csv"
    rows, result = predict(heads["svm"], [mixed], out, batch_size=4)
    assert [r["path"] for r in rows] == [r["path"].replace(str(data), str(mixed)) for r in clean]
    for got, want in zip(rows, clean, strict=True):
        assert {k: v for k, v in got.items() if k != "path"} == {
            k: v for k, v in want.items() if k != "path"
        }
    listed = {Path(r["path"]).name: r["reason"] for r in read_csv(skipped_path(out))}
    assert set(listed) == set(expected_reasons)
    for name, fragment in expected_reasons.items():
        assert fragment in listed[name]
    assert result.skipped_out == tmp_path / "mixed.skipped.csv"
    err = capsys.readouterr().err
    assert "skipped 3 unreadable files" in err and "zero.png" in err
    # A later clean run to the same --out drops the stale list.
    predict(heads["svm"], [data], out)
    assert not skipped_path(out).exists()


def test_files_and_folders_mix_in_the_order_given(models, tmp_path):
    data, _, heads = models["2-class"]
    one = sorted((data / "eel").iterdir())[0]
    rows, _ = predict(heads["logreg"], [one, data / "dog", one], tmp_path / "p.csv")
    dogs = sorted(str(p) for p in (data / "dog").iterdir())
    assert [r["path"] for r in rows] == [str(one), *dogs, str(one)]


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:40])
    return path


@pytest.mark.parametrize("name, message", [
    ("broken.jpg", "No image could be read, so nothing was predicted and {out} was not "
                   "written. First of 1 unreadable: {path}: "),
    ("cache.h5", "{path} is an HDF5 file (a feature cache?), not an image: predict takes "
                 "image files, folders or lists of paths (.txt, .csv). "
                 "Received: IMAGES_OR_DIR_OR_LIST=['{path}']"),
    ("notes.md", "{path} is a text file, not an image: predict takes image files, folders "
                 "or lists of paths (.txt, .csv). Received: IMAGES_OR_DIR_OR_LIST=['{path}']"),
    ("gone.txt", "None of the 2 listed files exists ({path.parent}/ant/gone.png: listed in "
                 "{path} line 1 but not found); a list's paths are relative to its folder, "
                 "or absolute. Received: IMAGES_OR_DIR_OR_LIST=['{path}']"),
])
def test_predicting_nothing_fails_and_writes_nothing(models, tmp_path, capsys, name, message):
    data, cache, heads = models["3-class"]
    path = tmp_path / name
    if name == "broken.jpg":
        _truncated_jpeg(path)
    elif name == "cache.h5":
        shutil.copy(cache, path)
    elif name == "notes.md":
        path.write_text("\n".join(str(p) for p in sorted((data / "ant").iterdir())) + "\n")
    else:
        path.write_text("ant/gone.png\n/nowhere/gone.png\n")
    out = tmp_path / "p.csv"
    assert predict_main([str(heads["logreg"]), str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: " + message.format(path=path, out=out)), err[-1]
    assert not any("Traceback" in line for line in err)
    assert not out.exists() and not skipped_path(out).exists()


def test_files_that_are_no_images_are_named_among_good_ones(models, tmp_path):
    data, cache, heads = models["3-class"]
    one = sorted((data / "bee").iterdir())[0]
    (tmp_path / "notes.md").write_text(f"{one}\n")
    out = tmp_path / "p.csv"
    rows, result = predict(heads["logreg"], [cache, one, tmp_path / "notes.md"], out)
    assert [r["path"] for r in rows] == [str(one)]
    assert result.skipped == [
        (str(cache), "an HDF5 file (a feature cache?), not an image"),
        (str(tmp_path / "notes.md"), "a text file, not an image"),
    ]


def test_lists_of_paths_predict_the_files_they_name(models, tmp_path, capsys):
    data, _, heads = models["3-class"]
    files = [p for c in ("ant", "cat") for p in sorted((data / c).iterdir())[:2]]
    direct, _ = predict(heads["logreg"], files, tmp_path / "direct.csv")
    lists = data.parent / "lists"  # a list's relative paths start from its own folder
    lists.mkdir(exist_ok=True)
    text = lists / "batch.txt"
    text.write_text(f"../data/ant/{files[0].name}\n\n {files[1]} \n", encoding="utf-8")
    table = lists / "more.CSV"  # a manifest serves: its path column is read, its label not
    table.write_text(f"label,path\ncat,../data/cat/{files[2].name}\nant,../data/ant/gone.png\n"
                     f"cat,{files[3]}\n", encoding="utf-8")
    out = tmp_path / "p.csv"
    rows, result = predict(heads["logreg"], [text, table], out)
    assert [Path(r["path"]).resolve() for r in rows] == [p.resolve() for p in files]
    for got, want in zip(rows, direct, strict=True):
        assert {k: v for k, v in got.items() if k != "path"} == {
            k: v for k, v in want.items() if k != "path"}
    gone = str(lists / "../data/ant/gone.png")
    assert result.skipped == [(gone, f"listed in {table} line 3 but not found")]
    assert read_csv(skipped_path(out)) == [{"path": gone, "reason": result.skipped[0][1]}]
    assert "gone.png: listed in" in capsys.readouterr().err


@pytest.mark.parametrize("setup", list(SETUPS))
def test_exported_model_equals_predict(models, tmp_path, setup):
    data, _, heads = models[setup]
    bottleneck, _ = predict(heads["dense"], [data], tmp_path / "dense.csv")
    exported = export_model(heads["dense"], tmp_path / "export" / "head.keras")
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["kind"] == "end-to-end" and meta["input_size"] == [8, 8]
    assert list(meta)[:2] == ["format_version", "kind"]
    assert meta["format_version"] == HEAD_FORMAT_VERSION  # one version for head.json and X.json
    end_to_end, result = predict(exported, [data], tmp_path / "e2e.csv")
    assert result.kind == "end-to-end"
    assert [r["path"] for r in end_to_end] == [r["path"] for r in bottleneck]
    assert [r["predicted"] for r in end_to_end] == [r["predicted"] for r in bottleneck]
    columns = [c for c in bottleneck[0] if c.startswith("p_")]
    got = np.array([[float(r[c]) for c in columns] for r in end_to_end])
    want = np.array([[float(r[c]) for c in columns] for r in bottleneck])
    np.testing.assert_allclose(got, want, **TOL)

    # The file alone: plain Keras, safe_mode, usable as a layer of a larger model.
    model = keras.models.load_model(exported, safe_mode=True, compile=False)
    images = np.stack([load_image(r["path"], (8, 8)) for r in bottleneck])
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, keras.layers.Identity()(model(inputs)))
    probs = np.asarray(outer.predict_on_batch(images))
    if probs.shape[1] == 1:
        probs = np.concatenate([1 - probs, probs], axis=1)
    np.testing.assert_allclose(probs, want, **TOL)


def test_mean_colour_cache_is_standardised_by_the_head_and_its_export(tmp_path, probe_model):
    """Issue 13's cache: three mean colours in 0..255 (the probe base), the blue one encoding
    the class. logreg scored 1.0 and the dense head one class; the exported model must apply
    the head's standardisation to the raw features itself."""
    data = tmp_path / "data"
    write_index_images(data, 60)
    cache_path = tmp_path / "cache.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                              out=str(cache_path)))
    model_dir, metrics = run_fit(FitConfig(str(cache_path), head="dense", out=str(tmp_path / "m"),
                                           epochs=10, lr=1e-2))
    assert metrics["accuracy"] >= 0.95
    cache = read_cache(cache_path)
    X = np.asarray(cache.features, dtype=np.float32)
    assert X.max() > 50  # raw colours, not scaled ones
    want = load_head(model_dir).predict_proba(X)
    exported = export_model(model_dir, tmp_path / "e.keras")
    model = keras.models.load_model(exported, safe_mode=True, compile=False)
    assert "standardise" in {layer.name for layer in model.get_layer("dense_head").layers}
    images = np.stack([load_image(data / path, (8, 8)) for path in cache.paths])
    np.testing.assert_allclose(model.predict_on_batch(images), want, **TOL)


def test_finetune_layout_folder_is_read(models, tmp_path):
    """A finetune output folder: model.keras + head.json (end-to-end) + metrics.json."""
    data, _, heads = models["3-class"]
    exported = export_model(heads["dense"], tmp_path / "e.keras")
    meta = json.loads(exported.with_suffix(".json").read_text())
    folder = tmp_path / "finetuned"
    folder.mkdir()
    shutil.copy(exported, folder / "model.keras")
    attrs = meta.pop("cache_attrs")
    (folder / "head.json").write_text(json.dumps(meta))
    (folder / "metrics.json").write_text(json.dumps({"cache_attrs": attrs}))
    from_file, _ = predict(exported, [data], tmp_path / "a.csv")
    from_folder, _ = predict(folder, [data], tmp_path / "b.csv")
    from_model_file, _ = predict(folder / "model.keras", [data], tmp_path / "c.csv")
    assert from_file == from_folder == from_model_file


def test_export_refuses_other_heads_and_bad_names(models, tmp_path, capsys):
    _, cache, heads = models["3-class"]
    with pytest.raises(ValueError, match="Received: head='svm'"):
        export_model(heads["svm"], tmp_path / "svm.keras")
    with pytest.raises(ValueError, match="Received: --export="):
        export_model(heads["dense"], tmp_path / "dense.h5")
    with pytest.raises(ValueError, match="needs no export"):
        export_model(export_model(heads["dense"], tmp_path / "e.keras"), tmp_path / "again")
    with pytest.raises(ValueError, match="would overwrite"):
        export_model(heads["dense"], heads["dense"] / "model.keras")
    # fit_head refuses before training: no model folder appears.
    out = tmp_path / "never"
    code = fit_head_main([str(cache), "--head", "logreg", "--out", str(out),
                          "--export", str(tmp_path / "x.keras")])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: `--export FILE.keras` needs a dense head")


def test_export_is_still_importable_from_predict():
    import pipeline.export
    import pipeline.predict

    assert pipeline.predict.export_model is pipeline.export.export_model
    assert pipeline.predict.check_exportable is pipeline.export.check_exportable


def test_fit_head_and_predict_export_from_the_command_line(models, tmp_path, capsys):
    data, cache, _ = models["2-class"]
    target = tmp_path / "fit.keras"
    assert fit_head_main([str(cache), "--head", "dense", "--epochs", "2", "--out",
                          str(tmp_path / "dense"), "--export", str(target)]) == 0
    assert target.is_file() and target.with_suffix(".json").is_file()
    again = tmp_path / "again.keras"
    assert predict_main([str(tmp_path / "dense"), "--export", str(again)]) == 0
    assert keras.models.load_model(again, safe_mode=True).output_shape == (None, 1)
    out = tmp_path / "p.csv"
    assert predict_main([str(target), str(data), "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("predict: done. 24 images") and last.endswith(f"predictions in {out}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{data}"], "Received: MODEL="),
        (["{model}"], "No images given"),
        (["{model}", "{missing}"], "Received: IMAGES_OR_DIR_OR_LIST="),
        (["{model}", "{empty}"], "Found 0 images"),
        (["{model}", "{data}", "--top-k", "0"], "Received: --top-k=0"),
        (["{model}", "{data}", "--top-k", "4"], "Received: --top-k=4"),
        (["{model}", "{data}", "--batch-size", "0"], "Received: --batch-size=0"),
    ],
)
def test_cli_errors_are_one_line(models, tmp_path, capsys, args, message):
    data, _, heads = models["3-class"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    values = {"missing": tmp_path / "nope", "data": data, "model": heads["logreg"],
              "empty": tmp_path / "empty"}
    argv = [a.format(**values) for a in args] + ["--out", str(tmp_path / "p.csv")]
    assert predict_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "p.csv").exists()


def test_script_reports_one_line(tmp_path):
    proc = subprocess.run([PYTHON, str(SCRIPTS / "predict.py"), str(tmp_path / "nope"), "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: `MODEL` must be")


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_preprocessing_layers_equal_preprocess(tmp_path, mode):
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    inputs = keras.Input((None, None, 3))
    y = inputs
    for layer in preprocessing_layers(mode):
        y = layer(y)
    model = keras.Model(inputs, y)
    model.save(tmp_path / "p.keras")
    loaded = keras.models.load_model(tmp_path / "p.keras", safe_mode=True)
    assert not loaded.trainable_weights
    got = np.asarray(loaded.predict_on_batch(x))
    np.testing.assert_allclose(got, preprocess(x.copy(), mode), rtol=1e-6, atol=1e-5)


def test_preprocessing_layers_refuse_unknown_mode():
    with pytest.raises(ValueError, match="Received: preprocess='yolo'"):
        preprocessing_layers("yolo")


def test_end_to_end_resize_equals_decoding_at_size(tmp_path, probe_model):
    write_index_images(tmp_path / "data", 3, classes=("a",))
    path = sorted((tmp_path / "data" / "a").iterdir())[0]
    feature_model = build_feature_model(str(probe_model), pooling="avg", preprocess_mode="tf")
    head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    fixed = end_to_end_model(feature_model, head)
    resizing = end_to_end_model(feature_model, head, resize_to=(8, 8), name="resizing")
    raw = np.asarray(keras.utils.load_img(path), dtype=np.float32)[None]
    at_size = load_image(path, (8, 8))[None]
    np.testing.assert_allclose(resizing.predict_on_batch(raw), fixed.predict_on_batch(at_size),
                               **TOL)
    assert len(fixed.trainable_weights) == 2  # the head's; base and preprocessing frozen
    with pytest.raises(ValueError, match=r"Received: resize_to=\(9, 8\)"):
        end_to_end_model(feature_model, head, resize_to=(9, 8))
    wrong = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Received: head_model="):
        end_to_end_model(feature_model, wrong)


def test_named_base_with_random_weights(tmp_path):
    """A keras.applications base (BatchNorm, tf preprocessing) rebuilt from its seed."""
    data = tmp_path / "data"
    write_index_images(data, 8, classes=("a", "b"))
    cache = tmp_path / "cache.h5"
    run_extract(ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32",
                              pooling="avg", out=str(cache), seed=5))
    model_dir, _ = run_fit(FitConfig(str(cache), head="dense", out=str(tmp_path / "m"),
                                     epochs=2, val_split=0.5))
    rows, names, values = cached_predictions(cache, model_dir)
    bottleneck, _ = predict(model_dir, [data], tmp_path / "p.csv",
                            embeddings=str(tmp_path / "p.h5"))
    exported, _ = predict(export_model(model_dir, tmp_path / "e.keras"), [data],
                          tmp_path / "e.csv")
    for got, end_to_end in zip(bottleneck, exported, strict=True):
        i = rows[Path(got["path"]).relative_to(data).as_posix()]
        assert got["predicted"] == end_to_end["predicted"] == names[i]
        for row in (got, end_to_end):
            np.testing.assert_allclose([float(row["p_a"]), float(row["p_b"])], values[i], **TOL)
    # The decoders preprocess for the bottleneck predictor: its features are the cache's.
    cached = read_cache(cache)
    with h5py.File(tmp_path / "p.h5") as f:
        for path, row in zip(f["paths"].asstr()[:], f["features"][:], strict=True):
            want = cached.features[rows[Path(path).relative_to(data).as_posix()]]
            np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _misfiled(data: Path, root: Path) -> tuple[Path, list[str]]:
    """A copy of ``data`` with two ant images filed under bee: the known wrong answers."""
    labelled = root / "labelled"
    shutil.copytree(data, labelled)
    moved = []
    for path in sorted((labelled / "ant").iterdir())[:2]:
        shutil.move(path, labelled / "bee" / path.name)
        moved.append(str(labelled / "bee" / path.name))
    return labelled, moved


def test_evaluate_scores_a_labelled_folder(models, tmp_path, capsys):
    data, _, heads = models["3-class"]
    clean, _ = predict(heads["logreg"], [data], tmp_path / "clean.csv")
    assert all(Path(r["path"]).parent.name == r["predicted"] for r in clean)  # all right
    labelled, moved = _misfiled(data, tmp_path)
    out = tmp_path / "eval" / "preds.csv"
    assert predict_main([str(heads["logreg"]), str(labelled), "--evaluate", "--out",
                         str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(clean)
    assert f"evaluate: accuracy {(n - 2) / n:.4f} ({n - 2}/{n} right)" in printed
    assert "confusion matrix (rows: true class, columns: predicted):" in printed
    # rows ant, bee, cat: 6 ants, 2 of the 10 "bees" are ants, 8 cats.
    assert "    ant  bee  cat" in printed and "  bee    2    8    0" in printed
    wrong = read_csv(out.with_name("preds.misclassified.csv"))
    assert sorted(r["path"] for r in wrong) == sorted(moved)
    assert {(r["true"], r["predicted"]) for r in wrong} == {("bee", "ant")}
    by_path = {r["path"]: r for r in read_csv(out)}
    for r in wrong:
        assert r["confidence"] == by_path[r["path"]]["p_ant"]
    metrics = json.loads(out.with_name("preds.metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx((n - 2) / n)
    assert metrics["confusion_matrix"] == [[6, 0, 0], [2, 8, 0], [0, 0, 8]]
    assert metrics["n_misclassified"] == 2 and metrics["class_names"] == ["ant", "bee", "cat"]
    assert 0 < metrics["macro_f1"] < 1


def test_evaluate_reads_a_manifest_and_refuses_unknown_classes(models, tmp_path, monkeypatch):
    data, _, heads = models["3-class"]
    labelled, moved = _misfiled(data, tmp_path)
    manifest = tmp_path / "labels.csv"
    rows = [(str(p), p.parent.name) for p in sorted(labelled.rglob("*.png"))]
    manifest.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows)
                        + "gone.png,ant\n")
    result = run_predict(PredictConfig(str(heads["svm"]), [str(manifest)], str(tmp_path / "p.csv"),
                                       evaluate=True))
    assert result.evaluation["n_misclassified"] == 2 and result.evaluation["n_skipped"] == 1
    assert result.evaluation["confidence"] == "decision score"
    wrong = read_csv(tmp_path / "p.misclassified.csv")
    assert sorted(r["path"] for r in wrong) == sorted(moved)
    assert "gone.png,listed in labels.csv line" in (tmp_path / "p.skipped.csv").read_text()

    write_index_images(labelled, 4, classes=("dog", "eel", "ant", "bee"))
    import pipeline.predict

    def never(*args, **kwargs):
        raise AssertionError("unknown classes are refused before the model loads")

    monkeypatch.setattr(pipeline.predict, "load_predictor", never)
    with pytest.raises(ValueError, match=r"does not know: 'dog' \(1 images\), 'eel' \(1 images\)"
                                         r"\. The model's classes are 'ant', 'bee', 'cat'"):
        run_predict(PredictConfig(str(heads["svm"]), [str(labelled)], str(tmp_path / "q.csv"),
                                  evaluate=True))
    assert not (tmp_path / "q.csv").exists()
    with pytest.raises(ValueError, match="needs one labelled folder"):
        run_predict(PredictConfig(str(heads["svm"]), [str(data), str(data)], evaluate=True))
