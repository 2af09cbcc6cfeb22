"""extract from a manifest (LABELS.csv): the folder tree's cache, errors by line, missing
files skipped, an edited manifest relabels its rows."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import index_pixel, save_png, write_index_images

from pipeline.cache import read_cache
from pipeline.cli import extract_main, extract_parser
from pipeline.extract import ExtractConfig, run_extract
from pipeline.extract.config import default_out
from pipeline.images import index_data, index_images, index_manifest, read_path_list


def write_manifest(path: Path, rows: list[tuple[str, ...]],
                   header: tuple[str, ...] = ("path", "label", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n", encoding="utf-8")
    return path


def manifest_of(data: Path, *, shuffle: int = 0) -> list[tuple[str, str, str]]:
    """(path, label, split) of every image of a folder tree, as a Kaggle manifest lists
    them: in no useful order, some spelled absolute or with './', 'val' for validation."""
    index = index_images(data)
    rows = []
    for i, r in enumerate(index.records):
        path = [r.path, f"./{r.path}", str(data / r.path)][i % 3]
        split = "val" if r.split == "validation" else r.split
        rows.append((path, index.class_names[r.label], split))
    random.Random(shuffle).shuffle(rows)
    return rows


def probe_config(data: Path, probe: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), str(probe), pooling="avg", preprocess="none",
                         out=str(out), batch_size=4, **kw)


@pytest.mark.parametrize("splits", [None, ("train", "validation", "test")])
def test_a_manifest_gives_the_cache_of_the_folder_tree_it_describes(tmp_path, splits):
    data = tmp_path / "data"
    write_index_images(data, 14, splits=splits)
    # Nested files: the folder walk lists a folder's own files before its subfolders'.
    inner = data.joinpath(*(["train"] if splits else []), "a")
    (inner / "sub").mkdir()
    save_png(np.full((9, 7, 3), 200, np.uint8), inner / "sub" / "deep.png")
    save_png(np.full((7, 9, 3), 90, np.uint8), inner / "zz.png")
    labels = write_manifest(data / "LABELS.csv", manifest_of(data, shuffle=3))

    caches = {}
    for name, source in (("folder", data), ("manifest", labels)):
        caches[name] = tmp_path / f"{name}.h5"
        run_extract(ExtractConfig(str(source), "mobilenetv2", weights="none", input_size="32",
                                  pooling="avg", batch_size=4, out=str(caches[name])))
    folder, manifest = (read_cache(caches[n]) for n in ("folder", "manifest"))
    assert manifest.paths == folder.paths  # row by row, not only as sets
    assert manifest.class_names == folder.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(manifest.labels, folder.labels)
    np.testing.assert_array_equal(manifest.split, folder.split)
    np.testing.assert_array_equal(manifest.features, folder.features)
    for key in ("layout", "data_dir", "n_rows", "n_skipped"):
        assert manifest.attrs[key] == folder.attrs[key], key
    with h5py.File(caches["folder"]) as f, h5py.File(caches["manifest"]) as g:
        for name in ("sha256", "size", "mtime_ns"):
            np.testing.assert_array_equal(f[name][:], g[name][:])
    assert manifest.attrs["manifest"] == str(labels.resolve())
    assert manifest.attrs["manifest_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert "manifest" not in folder.attrs


def test_rows_follow_the_tree_order_not_the_manifest_order(tmp_path):
    rows = [("b/2.png", "b", ""), ("a/x/1.png", "a", ""), ("a/9.png", "a", ""),
            ("/elsewhere/0.png", "b", ""), ("a/x-y/1.png", "a", "")]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.png").write_bytes(b"")  # one listed file exists, the rest need not
    index = index_manifest(write_manifest(tmp_path / "m.csv", rows))
    # As the folder walk sorts its folders: "a/x" before "a/x-y" ("a/x" is a prefix).
    assert [r.path for r in index.records] == [
        "a/9.png", "a/x/1.png", "a/x-y/1.png", "/elsewhere/0.png", "b/2.png"]
    assert [r.label for r in index.records] == [0, 0, 0, 1, 1]
    assert index.layout == "classes" and index.root == tmp_path


def test_every_problem_is_reported_with_its_line(tmp_path):
    rows = [("a/1.png", "a", "train"),        # line 2: fine
            ("a/2.png", "", "train"),         # line 3: empty label
            ("./a/1.png", "a", "test"),       # line 4: the path of line 2 again
            ("b/3.png", "b", "dev"),          # line 5: unknown split
            ("", "b", "train")]               # line 6: empty path
    labels = write_manifest(tmp_path / "LABELS.csv", rows)
    with pytest.raises(ValueError) as caught:
        index_manifest(labels)
    message = str(caught.value)
    assert message.startswith(f"{labels}: 4 problems in the manifest:")
    assert "empty label. Received: label='' (line 3)" in message
    assert "duplicate path, first listed on line 2. Received: path='./a/1.png' (line 4)" in message
    assert "Received: split='dev' (line 5)" in message
    assert "allowed: train, validation, val (read as validation), test or empty" in message
    assert "empty path (line 6)" in message


@pytest.mark.parametrize("text, message", [
    ("", "is empty. Expected a header row"),
    ("path,label\n", "1 problem in the manifest:\n  no rows after the header"),
    ("file,label\na.png,a\n", "has no `path` column: its first row must name the columns "
                              "path,label[,split] (any order; other columns are ignored). "
                              "Received: columns=['file', 'label']"),
    ("a.png,cat\n", "has no `path` or `label` column"),
    ("path,label,label\na.png,a,b\n", "names column `label` twice"),
    ("path,label,split\na.png,a,train\nb.png,b,\n",
     "1 of 2 rows have no split while the others have one (fit_head refuses such a mix)"),
])
def test_bad_manifests_are_refused_naming_the_file(tmp_path, text, message):
    labels = tmp_path / "LABELS.csv"
    labels.write_text(text, encoding="utf-8")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^" + re.escape(str(labels))) as caught:
        index_manifest(labels)
    assert message in str(caught.value)


def test_header_is_read_in_any_order_and_case_with_a_bom_and_extra_columns(tmp_path):
    labels = tmp_path / "m.csv"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.png").write_bytes(b"")
    labels.write_bytes("\ufeffLabel, Notes ,PATH\n cat ,hi, c/1.png\n\ndog,,d/2.png\n"
                       .encode())
    index = index_manifest(labels)
    assert index.class_names == ["cat", "dog"]
    assert [(r.path, r.label, r.split) for r in index.records] == [("c/1.png", 0, ""),
                                                                   ("d/2.png", 1, "")]
    assert index.notes == {"d/2.png": "listed in m.csv line 4 but not found"}


def test_a_missing_file_is_skipped_named_by_its_line_and_retried(tmp_path, probe_model,
                                                                   capsys):
    data = tmp_path / "data"
    expected = write_index_images(data, 6)
    rows = [(path, path.split("/")[0], "") for path in sorted(expected)]
    rows.insert(2, ("a/late.png", "a", ""))
    labels = write_manifest(tmp_path / "LABELS.csv", [(f"data/{p}", c, s) for p, c, s in rows])
    out = tmp_path / "c.h5"
    result = run_extract(probe_config(labels, probe_model, out))
    assert (result.n_rows, result.n_skipped) == (6, 1)
    cache = read_cache(out)
    assert [path for path, _ in cache.skipped] == ["data/a/late.png"]
    assert "cannot read file" in cache.skipped[0][1]
    err = capsys.readouterr().err
    assert "data/a/late.png: cannot read file" in err
    assert "(listed in LABELS.csv line 4 but not found)" in err
    for row, path in enumerate(cache.paths):
        label = "abc".index(path.split("/")[1])
        np.testing.assert_allclose(cache.features[row],
                                   index_pixel(expected[path.removeprefix("data/")], label),
                                   atol=1e-3)
    assert run_extract(probe_config(labels, probe_model, out)).status == "up-to-date"
    save_png(np.full((5, 5, 3), 33, np.uint8), data / "a" / "late.png")  # it arrives
    again = run_extract(probe_config(labels, probe_model, out))
    assert (again.n_rows, again.n_skipped, again.n_new_rows) == (7, 0, 1)


def test_a_manifest_none_of_whose_files_exist_is_an_error(tmp_path):
    labels = write_manifest(tmp_path / "LABELS.csv", [("a/1.png", "a"), ("b/1.png", "b")],
                            header=("path", "label"))
    with pytest.raises(ValueError, match=r"None of the 2 files listed in .*LABELS\.csv "
                                         r"exists .*Received: path='a/1\.png' \(line 2\)"):
        index_manifest(labels)


def test_an_edited_manifest_relabels_only_the_rows_it_changed(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 9, splits=("train", "validation"))
    rows = [(p, p.split("/")[1], p.split("/")[0]) for p in sorted(expected)]
    labels = write_manifest(data / "LABELS.csv", rows)
    out = tmp_path / "c.h5"
    run_extract(probe_config(labels, probe_model, out))
    assert run_extract(probe_config(labels, probe_model, out)).status == "up-to-date"
    # Same files, same classes; one image gets another label, another moves to train.
    moved, relabelled = rows[-1][0], rows[0][0]
    rows[-1] = (moved, rows[-1][1], "train")
    rows[0] = (relabelled, "c" if rows[0][1] != "c" else "a", rows[0][2])
    write_manifest(labels, rows)
    result = run_extract(probe_config(labels, probe_model, out))
    assert result.changes["relabelled"] == 2 and result.n_new_rows == 2
    cache = read_cache(out)
    assert sorted(cache.paths) == sorted(expected)
    want = {path: (cache.class_names.index(label), split) for path, label, split in rows}
    for row, path in enumerate(cache.paths):
        assert (cache.labels[row], cache.split[row]) == want[path], path
        i = expected[path]
        np.testing.assert_allclose(cache.features[row], index_pixel(i, i % 3), atol=1e-3)
    assert cache.attrs["manifest_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert run_extract(probe_config(labels, probe_model, out)).status == "up-to-date"


def test_default_cache_name_and_cli(tmp_path, probe_model, monkeypatch, capsys):
    data = tmp_path / "kaggle"
    expected = write_index_images(data / "images", 3)
    labels = write_manifest(data / "LABELS.csv",
                            [(f"images/{p}", p.split("/")[0]) for p in expected],
                            header=("path", "label"))
    config = ExtractConfig(str(labels), "vgg16", weights="none")
    assert default_out(config, (32, 32)).name == "kaggle-LABELS-vgg16-32x32-top-random-avg.h5"
    monkeypatch.chdir(tmp_path)
    assert extract_main([str(labels), "--base", str(probe_model), "--pooling", "avg",
                         "--preprocess", "none"]) == 0
    assert "3 rows" in capsys.readouterr().out
    assert (tmp_path / "cache" / "kaggle-LABELS-probe-8x8-top-avg.h5").exists()
    assert "manifest" in extract_parser().format_help()


def test_a_data_file_that_is_no_manifest_is_refused(tmp_path):
    notes = tmp_path / "labels.txt"
    notes.write_text("path,label\n")
    with pytest.raises(ValueError, match=r"must be a folder of class folders or a \.csv "
                                         r"manifest .*Received: data_dir='.*labels\.txt'"):
        index_data(notes)
    with pytest.raises(ValueError, match=r"Cannot read .*nothing\.csv"):
        index_data(tmp_path / "nothing.csv")


def test_path_lists_read_a_path_column_or_one_path_per_line(tmp_path):
    (tmp_path / "l.txt").write_text(" a.png \n\n/abs/b.png\n", encoding="utf-8")
    assert [(e.path, e.line) for e in read_path_list(tmp_path / "l.txt")] == [
        (tmp_path / "a.png", 1), (Path("/abs/b.png"), 3)]
    write_manifest(tmp_path / "l.csv", [("cat", "x/c.png")], header=("label", "path"))
    assert [(e.path, e.line) for e in read_path_list(tmp_path / "l.csv")] == [
        (tmp_path / "x" / "c.png", 2)]
    (tmp_path / "bad.csv").write_text("file\nx.png\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no `path` column: its first row must name the "
                                         r"columns path \("):
        read_path_list(tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: 1 problem in the list of images:\n"
                                         r"  it names no path"):
        read_path_list(tmp_path / "empty.txt")
