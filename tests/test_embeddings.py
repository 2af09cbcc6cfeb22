"""Embeddings out: predict --embeddings and export_features write .h5 / .npy / .parquet that
read back to the cache's rows (or the base's forward pass), row i always path i."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import bad_files, index_pixel, write_index_images

from pipeline import embeddings as embeddings_module
from pipeline.cache import read_cache
from pipeline.cli import export_features_main, predict_main
from pipeline.embeddings import (
    EmbeddingRows,
    EmbeddingsWriter,
    check_embeddings_path,
    parquet_group_rows,
    rows_path,
)
from pipeline.extract import ExtractConfig, run_extract
from pipeline.fit import FitConfig, run_fit
from pipeline.predict import PredictConfig, run_predict, skipped_path

FORMATS = [".h5", ".npy", ".parquet"]
CLASSES = ("a", "b", "c")
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, probe_model):
    """(data dir, {relative path: index}, cache, logreg model dir) on the identity probe.

    With ``--preprocess none`` and avg pooling, an image's features are its constant
    colour, which encodes its own index: a row that moved is caught by its values.
    """
    root = tmp_path_factory.mktemp("embeddings")
    data = root / "data"
    index = write_index_images(data, 18, classes=CLASSES, splits=("train", "validation"))
    cache = root / "cache.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                              out=str(cache), batch_size=4))
    model, _ = run_fit(FitConfig(str(cache), head="logreg", out=str(root / "logreg")))
    return data, index, cache, model


def colour_of(relative: str, index: dict[str, int]) -> np.ndarray:
    """The features the probe gives for an image: its colour, from its index and class."""
    i = index[relative]
    return np.asarray(index_pixel(i, i % len(CLASSES)), dtype=np.float32)


def read_back(path: Path) -> dict[str, object]:
    """Every column of an embeddings file as lists / arrays, whatever its format."""
    if path.suffix == ".h5":
        with h5py.File(path) as f:
            out = {"features": f["features"][:], "path": list(f["paths"].asstr()[:]),
                   "attrs": dict(f.attrs)}
            if "labels" in f:
                names = json.loads(f.attrs["class_names"])
                out["label_id"] = f["labels"][:].tolist()
                out["label"] = [names[i] for i in out["label_id"]]
                out["split"] = list(f["split"].asstr()[:])
            return out
    if path.suffix == ".npy":
        with open(rows_path(path), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        out = {"features": np.load(path), "path": [r["path"] for r in rows]}
        if rows and "label" in rows[0]:
            out.update(label=[r["label"] for r in rows],
                       label_id=[int(r["label_id"]) for r in rows],
                       split=[r["split"] for r in rows])
        return out
    table = pq.read_table(path)
    shape = json.loads(table.schema.metadata[b"feature_shape"])
    columns = table.to_pydict()
    columns["features"] = np.asarray(columns["features"], np.float32).reshape(-1, *shape)
    columns["attrs"] = json.loads(table.schema.metadata[b"attrs"])
    return columns


def leftovers(folder: Path) -> list[str]:
    """Temporary files a writer left behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("suffix", FORMATS)
def test_export_round_trips_the_cache_rows(setup, tmp_path, monkeypatch, capsys, suffix):
    data, index, cache_path, _ = setup
    # Blocks of a few rows, so the stream crosses many block edges.
    monkeypatch.setattr(embeddings_module, "READ_BYTES", 64)
    out = tmp_path / f"all{suffix}"
    assert export_features_main([str(cache_path), str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("export-features: done. 18 rows of layer identity_conv (all splits)")
    assert last.endswith(f"written to {out}" + (f" (+ rows in {rows_path(out)})"
                                                if suffix == ".npy" else ""))
    cache = read_cache(cache_path)
    got = read_back(out)
    assert got["path"] == cache.paths
    np.testing.assert_array_equal(got["features"], cache.features)
    assert got["label_id"] == cache.labels.tolist()
    assert got["label"] == [cache.class_names[i] for i in cache.labels]
    assert got["split"] == cache.split.tolist()
    for row, path in zip(got["features"], got["path"], strict=True):
        np.testing.assert_array_equal(row, colour_of(path, index))
    if suffix != ".npy":
        attrs = got["attrs"]
        for key in ("base", "layer", "pooling", "interpolation", "preprocess", "dtype"):
            assert attrs[key] == cache.attrs[key]
        size = attrs["input_size"]
        assert (json.loads(size) if suffix == ".h5" else size) == [8, 8]
        assert attrs["source"] == str(cache_path)
    assert leftovers(tmp_path) == []


def test_export_of_one_split(setup, tmp_path, capsys):
    _, _, cache_path, _ = setup
    out = tmp_path / "val.parquet"
    assert export_features_main([str(cache_path), str(out), "--split", "validation"]) == 0
    assert "(split 'validation')" in capsys.readouterr().out.strip().splitlines()[-1]
    cache = read_cache(cache_path)
    got = read_back(out)
    keep = cache.split == "validation"
    assert 0 < keep.sum() < len(keep)
    assert got["split"] == ["validation"] * int(keep.sum())
    assert got["path"] == [p for p, k in zip(cache.paths, keep, strict=True) if k]
    np.testing.assert_array_equal(got["features"], cache.features[keep])


def test_nothing_to_export_fails_and_writes_nothing(setup, tmp_path, capsys):
    _, _, cache_path, _ = setup
    out = tmp_path / "test.npy"
    assert export_features_main([str(cache_path), str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: `--split` must be one of the splits")
    assert "['train', 'validation']" in err and err.endswith("Received: --split='test'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["{cache}", "{tmp}/x.csv"], "`OUT` must end in .h5, .npy or .parquet. "
                                 "Received: OUT='{tmp}/x.csv'"),
    (["{cache}", "{cache}"], "OUT would overwrite the cache being read"),
    (["{tmp}/missing.h5", "{tmp}/x.h5"], "Cache file not found"),
    (["{cache}", "{tmp}/x.h5", "--layer", "nope"], "Received: --layer='nope'"),
])
def test_export_errors_are_one_line(setup, tmp_path, capsys, argv, message):
    _, _, cache_path, _ = setup
    values = {"cache": cache_path, "tmp": tmp_path}
    assert export_features_main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.format(**values) in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_chosen_layer_of_a_multi_layer_cache(tmp_path):
    """Two stored layers: ``first`` is the colour, ``second`` twice it."""
    import keras

    inputs = keras.Input((8, 8, 3))
    first = keras.layers.Conv2D(3, 1, use_bias=False, name="first")
    second = keras.layers.Conv2D(3, 1, use_bias=False, name="second")
    model = keras.Model(inputs, second(first(inputs)))
    first.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    second.set_weights([2 * np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    model.save(tmp_path / "two.keras")
    index = write_index_images(tmp_path / "data", 7, classes=CLASSES)
    cache_path = tmp_path / "multi.h5"
    run_extract(ExtractConfig(str(tmp_path / "data"), str(tmp_path / "two.keras"),
                              layer="first,second", pooling="avg", preprocess="none",
                              out=str(cache_path), batch_size=4))
    for layer, scale in (("second", 2.0), (None, 1.0)):
        out = tmp_path / f"{layer or 'default'}.h5"
        argv = [str(cache_path), str(out)] + (["--layer", layer] if layer else [])
        assert export_features_main(argv) == 0
        got = read_back(out)
        for row, path in zip(got["features"], got["path"], strict=True):
            np.testing.assert_array_equal(row, scale * colour_of(path, index))
        assert got["attrs"]["layer"] == (layer or "first")
        assert json.loads(got["attrs"]["layers"]) == [layer or "first"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_predict_embeddings_equal_the_cached_features(setup, tmp_path, capsys, suffix):
    data, index, cache_path, model = setup
    out, emb = tmp_path / "p.csv", tmp_path / f"emb{suffix}"
    assert predict_main([str(model), str(data), "--out", str(out), "--embeddings", str(emb),
                         "--batch-size", "5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("predict: done. 18 images") and f"predictions in {out}" in last
    assert f"embeddings in {emb}" in last
    got = read_back(emb)
    with open(out, newline="", encoding="utf-8") as f:
        predicted = list(csv.DictReader(f))
    assert got["path"] == [row["path"] for row in predicted]
    if suffix == ".h5":  # one forward pass for both outputs: the same predictions as without
        run_predict(PredictConfig(str(model), [str(data)], str(tmp_path / "q.csv")))
        with open(tmp_path / "q.csv", newline="", encoding="utf-8") as f:
            assert list(csv.DictReader(f)) == predicted
    cache = read_cache(cache_path)
    cached = dict(zip(cache.paths, cache.features, strict=True))
    relative = [Path(p).relative_to(data).as_posix() for p in got["path"]]
    assert sorted(relative) == sorted(cache.paths)
    np.testing.assert_allclose(got["features"], np.stack([cached[r] for r in relative]), **TOL)
    for row, path in zip(got["features"], relative, strict=True):
        np.testing.assert_allclose(row, colour_of(path, index), **TOL)
    if suffix != ".npy":
        assert got["attrs"]["base"] == cache.attrs["base"]
        assert got["attrs"]["source"] == str(model)


def test_embeddings_alone_write_no_csv_and_list_skipped_files(setup, tmp_path, monkeypatch):
    data, index, _, model = setup
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    expected = bad_files(mixed / "train" / "b")
    monkeypatch.chdir(tmp_path)
    emb = tmp_path / "out" / "emb.npy"
    result = run_predict(PredictConfig(str(model), [str(mixed)], embeddings=str(emb),
                                       batch_size=4))
    assert result.out is None and not (tmp_path / "predictions.csv").exists()
    assert result.embeddings == emb and result.n_predicted == 18
    assert {Path(p).name for p, _ in result.skipped} == set(expected)
    assert result.skipped_out == skipped_path(emb) == tmp_path / "out" / "emb.skipped.csv"
    got = read_back(emb)
    assert not any(Path(p).name in expected for p in got["path"])
    for row, path in zip(got["features"], got["path"], strict=True):
        np.testing.assert_allclose(row, colour_of(Path(path).relative_to(mixed).as_posix(),
                                                  index), **TOL)


@pytest.mark.parametrize("flag_value, message", [
    ("x.csv", "error: `--embeddings` must end in .h5, .npy or .parquet. "
              "Received: --embeddings='x.csv'"),
    ("p.npy", "error: `--out` and `--embeddings` must name different files."),
])
def test_predict_refuses_bad_embeddings_before_any_work(setup, tmp_path, capsys, monkeypatch,
                                                        flag_value, message):
    data, _, _, model = setup
    monkeypatch.chdir(tmp_path)
    argv = [str(model), str(data), "--out", "p.rows.csv", "--embeddings", flag_value]
    assert predict_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_embeddings_of_an_end_to_end_model(setup, tmp_path):
    data, _, _, _ = setup
    folder = tmp_path / "finetuned"
    folder.mkdir()
    (folder / "head.json").write_text(json.dumps({"kind": "end-to-end", "source": "m/dense"}))
    with pytest.raises(ValueError, match=r"made from m/dense\). Received: model="):
        run_predict(PredictConfig(str(folder), [str(data)], embeddings=str(tmp_path / "e.h5")))
    assert not (tmp_path / "e.h5").exists()


@pytest.mark.parametrize("suffix", FORMATS)
def test_writer_streams_maps_and_an_error_keeps_the_old_file(tmp_path, suffix):
    out = tmp_path / f"maps{suffix}"
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 2, 3, 4)).astype(np.float16) for n in (1, 7, 300)]
    names = [f"dir/with, comma\nand newline {i}.png" for i in range(308)]
    with EmbeddingsWriter(out, attrs={"layer": "x", "pooling": "none"}) as writer:
        start = 0
        for chunk in chunks:
            writer.append(EmbeddingRows(names[start:start + len(chunk)], chunk))
            start += len(chunk)
    got = read_back(out)
    want = np.concatenate(chunks)
    assert got["path"] == names
    np.testing.assert_array_equal(got["features"], want)  # float16 widens exactly
    if suffix != ".parquet":
        assert got["features"].dtype == np.float16
    before = out.read_bytes()
    with pytest.raises(KeyError), EmbeddingsWriter(out, attrs={}) as writer:
        writer.append(EmbeddingRows(names[:2], want[:2]))
        raise KeyError("a failure half way")
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def test_a_missing_pyarrow_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r'pip install "bottleneck-pipeline\[parquet\]"\. '
                                         r"Received: --embeddings='e.parquet'"):
        check_embeddings_path("e.parquet")
    assert check_embeddings_path("E.NPY") == ".npy"


def test_parquet_row_groups_are_bounded():
    assert parquet_group_rows(4) == 1 << 20
    assert parquet_group_rows(2048 * 4) == 8192
    assert parquet_group_rows(10**9) == 1024
