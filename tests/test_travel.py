"""Models that travel: a fit_head folder finds its base file after a move (relative path,
``--base``), for predict.py and finetune.py alike, and ``--export DIR`` carries the base for
any head, scikit-learn ones included."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import PYTHON, write_index_images

from pipeline.bases.files import base_file_record, locate_base_file
from pipeline.cli import finetune_main, fit_head_main, predict_main
from pipeline.export import export_model
from pipeline.extract import ExtractConfig, run_extract
from pipeline.fit import FitConfig, run_fit
from pipeline.predict import PredictConfig, run_predict
from pipeline.util.files import file_sha256

TOL = {"rtol": 1e-4, "atol": 1e-5}
CLASSES = ("ant", "bee", "cat")


def tiny_base(path: Path, seed: int = 0) -> Path:
    """A small saved .keras base (8x8 input, a random 1x1 conv), its own file."""
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 1, name="conv")
    model = keras.Model(inputs, conv(inputs))
    rng = np.random.default_rng(seed)
    conv.set_weights([rng.normal(size=(1, 1, 3, 4)).astype(np.float32),
                      np.zeros(4, np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def make_tree(root: Path, head: str = "logreg") -> Path:
    """root/bases/tiny.keras -> root/cache.h5 -> root/models/m; returns the model folder."""
    base = tiny_base(root / "bases" / "tiny.keras")
    run_extract(ExtractConfig(str(root / "data"), str(base), pooling="avg", preprocess="scale",
                              out=str(root / "cache.h5"), batch_size=8))
    model_dir, _ = run_fit(FitConfig(str(root / "cache.h5"), head=head,
                                     out=str(root / "models" / "m"), epochs=3, lr=1e-2))
    return model_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Images outside every model tree, so moving a tree never moves them."""
    data = tmp_path_factory.mktemp("images") / "data"
    write_index_images(data, 24, classes=CLASSES)
    return data


def predictions(model: Path, images: Path, out: Path, **kwargs) -> list[dict[str, str]]:
    run_predict(PredictConfig(str(model), [str(images)], str(out), **kwargs))
    with open(out, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_same(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["predicted"] for r in got] == [r["predicted"] for r in want]
    columns = [c for c in want[0] if c.startswith(("p_", "score_"))]
    np.testing.assert_allclose([[float(r[c]) for c in columns] for r in got],
                               [[float(r[c]) for c in columns] for r in want], **TOL)


def test_a_model_folder_moved_with_its_base_still_predicts(tmp_path, images):
    shutil.copytree(images, tmp_path / "a" / "data")
    model = make_tree(tmp_path / "a")
    record = json.loads((model / "metrics.json").read_text())["base_file"]
    assert record["relative"] == "../../bases/tiny.keras"
    assert record["sha256"] == file_sha256(tmp_path / "a" / "bases" / "tiny.keras")
    before = predictions(model, images, tmp_path / "before.csv")

    # The whole tree moves: the recorded absolute path is gone, the relative one holds.
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert_same(predictions(tmp_path / "b" / "models" / "m", images, tmp_path / "b.csv"),
                before)

    # The model alone moves: nothing where it looked; the error names both paths and --base.
    alone = tmp_path / "c" / "m"
    shutil.move(tmp_path / "b" / "models" / "m", alone)
    with pytest.raises(ValueError) as err:
        predictions(alone, images, tmp_path / "c.csv")
    message = str(err.value)
    assert "tiny.keras) is gone" in message
    assert f"{tmp_path / 'bases' / 'tiny.keras'} (relative to the model folder)" in message
    assert str(tmp_path / "a" / "bases" / "tiny.keras") in message
    assert "--base PATH" in message and not (tmp_path / "c.csv").exists()

    # --base says where it is now.
    moved_base = tmp_path / "b" / "bases" / "tiny.keras"
    assert_same(predictions(alone, images, tmp_path / "c.csv", base=str(moved_base)), before)

    # --base to another file is refused, even under the same name.
    other = tiny_base(tmp_path / "other" / "tiny.keras", seed=1)
    with pytest.raises(ValueError, match=r"not the base file the head was trained on.*"
                                         r"Received: --base="):
        predictions(alone, images, tmp_path / "d.csv", base=str(other))
    code = predict_main([str(alone), str(images), "--out", str(tmp_path / "d.csv"),
                         "--base", str(other)])
    assert code == 2 and not (tmp_path / "d.csv").exists()

    # Said before Keras loads (the whole point of a quick error).
    code = ("import sys; from pipeline.cli import predict_main; "
            f"rc = predict_main([{str(alone)!r}, {str(images)!r}]); "
            "print(rc, 'keras' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"] and "--base PATH" in proc.stderr

    # A base copied into the model folder is found there.
    shutil.copy(moved_base, alone / "tiny.keras")
    assert_same(predictions(alone, images, tmp_path / "e.csv"), before)


def test_finetune_finds_the_base_as_predict_does(tmp_path, images, capsys):
    """A dense-head folder moved with its base fine-tunes; the base moved alone is named
    with ``--base``; ``--base`` says where it is, and no other file is taken for it."""
    shutil.copytree(images, tmp_path / "a" / "data")
    model = make_tree(tmp_path / "a", head="dense")
    cache = str(tmp_path / "a" / "cache.h5")  # stays, with the images it names
    fast = ["--unfreeze-from", "conv", "--epochs", "1", "--batch-size", "8"]

    def finetune(source: Path, out: str, *extra: str) -> int:
        return finetune_main([str(source), *fast, "--out", str(tmp_path / out), *extra])

    # Head folder and base move together: found relative to the head folder.
    (tmp_path / "b").mkdir()
    shutil.move(model, tmp_path / "b" / "models" / "m")
    shutil.move(tmp_path / "a" / "bases", tmp_path / "b" / "bases")
    moved = tmp_path / "b" / "models" / "m"
    assert finetune(moved, "t1", "--cache", cache) == 0
    assert (tmp_path / "t1" / "model.keras").is_file()
    capsys.readouterr()

    # The base moves alone: the error names the paths tried and this command with --base.
    base = Path(shutil.move(tmp_path / "b" / "bases", tmp_path / "c")) / "tiny.keras"
    assert finetune(moved, "t2", "--cache", cache) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: The base file this model was trained on (tiny.keras) is gone")
    assert f"{tmp_path / 'b' / 'bases' / 'tiny.keras'} (relative to the model folder)" in err
    assert err.endswith(f"finetune.py {moved} ... --base PATH.")
    assert not (tmp_path / "t2").exists()

    assert finetune(moved, "t2", "--cache", cache, "--base", str(base)) == 0
    assert (tmp_path / "t2" / "model.keras").is_file()
    capsys.readouterr()

    other = tiny_base(tmp_path / "other" / "tiny.keras", seed=1)
    assert finetune(moved, "t3", "--cache", cache, "--base", str(other)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not the base file the head was trained on" in err
    assert err.endswith(f"Received: --base={str(other)!r}") and not (tmp_path / "t3").exists()

    # From the cache itself (a fresh head warmed up): --base says where its base is now.
    assert finetune(Path(cache), "t4", "--warmup-epochs", "2") == 2
    assert f"finetune.py {cache} ... --base PATH." in capsys.readouterr().err
    assert finetune(Path(cache), "t4", "--warmup-epochs", "2", "--base", str(other)) == 2
    assert "not the base file" in capsys.readouterr().err
    assert finetune(Path(cache), "t4", "--warmup-epochs", "2", "--base", str(base)) == 0


def test_a_changed_base_file_is_named_as_changed(tmp_path, images):
    shutil.copytree(images, tmp_path / "data")
    model = make_tree(tmp_path)
    tiny_base(tmp_path / "bases" / "tiny.keras", seed=2)  # replaced by another model
    with pytest.raises(ValueError, match=r"is gone or changed \(sha256 differs\).*another file"):
        predictions(model, images, tmp_path / "p.csv")


def test_base_is_refused_for_models_without_a_base_file(tmp_path):
    attrs = {"base": "mobilenetv2", "weights": "imagenet", "base_path": "", "weights_path": ""}
    assert locate_base_file(attrs, model_dir=tmp_path) == attrs
    assert base_file_record(attrs, tmp_path) is None
    with pytest.raises(ValueError, match=r"is no local file. Received: --base='x.keras'"):
        locate_base_file(attrs, model_dir=tmp_path, base="x.keras")


def test_weights_files_and_preset_folders_are_found_as_base_files_are(tmp_path):
    """The same rules for a keras.applications base's local weights file and for a local
    keras-hub preset folder (its model.weights.h5 hashed)."""
    model_dir = tmp_path / "old" / "model"
    model_dir.mkdir(parents=True)
    weights = tmp_path / "old" / "w.h5"
    weights.write_bytes(b"weights")
    attrs = {"base": "vgg16", "weights": f"sha256:{file_sha256(weights)}", "base_path": "",
             "weights_path": str(weights)}
    record = base_file_record(attrs, model_dir)
    assert record["attr"] == "weights_path" and record["relative"] == "../w.h5"
    shutil.move(tmp_path / "old", tmp_path / "new")
    found = locate_base_file(attrs, model_dir=tmp_path / "new" / "model", record=record)
    assert found["weights_path"] == str((tmp_path / "new" / "w.h5").resolve())

    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "model.weights.h5").write_bytes(b"preset weights")
    attrs = {"base": f"hub:{preset}", "weights": "preset", "base_path": str(preset),
             "base_sha256": file_sha256(preset / "model.weights.h5"), "weights_path": ""}
    shutil.move(preset, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="keras-hub preset folder"):
        locate_base_file(attrs, model_dir=tmp_path / "m")
    found = locate_base_file(attrs, model_dir=tmp_path / "m", base=tmp_path / "elsewhere")
    assert found["base"] == f"hub:{(tmp_path / 'elsewhere').resolve()}"


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_an_exported_folder_predicts_with_nothing_else_left(tmp_path, images, head, monkeypatch):
    shutil.copytree(images, tmp_path / "tree" / "data")
    model = make_tree(tmp_path / "tree", head=head)
    before = predictions(model, images, tmp_path / "before.csv")
    exported = export_model(model, tmp_path / "export")
    assert {p.name for p in exported.iterdir()} >= {"features.keras", "head.json",
                                                   "metrics.json", "config.json"}
    archive = export_model(model, tmp_path / "export.zip")
    if head == "dense":  # the single-file form carries its base too
        export_model(model, tmp_path / "single.keras")
    # Another machine: no cache, no base file, no model folder, no original paths.
    shutil.rmtree(tmp_path / "tree")
    if head == "dense":
        monkeypatch.chdir(tmp_path)
        assert_same(predictions(Path("single.keras"), images, tmp_path / "s.csv"), before)
        with pytest.raises(ValueError, match=r"^single.keras holds the model's base"):
            predictions(Path("single.keras"), images, tmp_path / "s.csv", base="b.keras")
    shipped = shutil.move(exported, tmp_path / "elsewhere" / "model")
    assert_same(predictions(Path(shipped), images, tmp_path / "after.csv"), before)
    assert_same(predictions(archive, images, tmp_path / "zip.csv"), before)
    with pytest.raises(ValueError, match=r"features.keras holds the model's base, so `--base` "
                                         r"has nothing to replace"):
        predictions(Path(shipped), images, tmp_path / "x.csv", base=str(tmp_path / "b.keras"))
    # An earlier export is replaced; a folder holding other things is not.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no earlier export"):
        export_model(shipped, tmp_path / "busy")
    assert export_model(shipped, shipped.parent / "again") == shipped.parent / "again"
    assert export_model(shipped, shipped.parent / "again").is_dir()


def test_an_archive_holding_anything_but_an_export_is_refused(tmp_path):
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("head.json", "{}")
        z.writestr("features.keras", "")
        z.writestr("../escape.txt", "outside")
    with pytest.raises(ValueError, match=r"is no export archive .*'\.\./escape\.txt'"):
        run_predict(PredictConfig(str(archive), ["x.png"]))
    (tmp_path / "not.zip").write_text("plain text")
    with pytest.raises(ValueError, match="not a readable zip archive"):
        run_predict(PredictConfig(str(tmp_path / "not.zip"), ["x.png"]))


def test_export_from_the_command_line(tmp_path, images, capsys):
    shutil.copytree(images, tmp_path / "data")
    base = tiny_base(tmp_path / "bases" / "tiny.keras")
    run_extract(ExtractConfig(str(tmp_path / "data"), str(base), pooling="avg",
                              out=str(tmp_path / "cache.h5")))
    cache = str(tmp_path / "cache.h5")
    # fit_head refuses a .keras export of a scikit-learn head before training.
    assert fit_head_main([cache, "--head", "svm", "--out", str(tmp_path / "svm"),
                          "--export", str(tmp_path / "svm.keras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: `--export FILE.keras` needs a dense head") and "folder" in err
    assert not (tmp_path / "svm").exists()
    assert fit_head_main([cache, "--head", "svm", "--out", str(tmp_path / "svm"),
                          "--export", str(tmp_path / "svm-export")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        f"exported base + head to {tmp_path / 'svm-export'}/")
    assert predict_main([str(tmp_path / "svm"), "--export", str(tmp_path / "x.tar")]) == 2
    assert "Received: --export=" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "svm"), str(images), "--export",
                         str(tmp_path / "svm.zip"), "--out", str(tmp_path / "z.csv")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f"predict: exported base + head to {tmp_path / 'svm.zip'}"
    out = tmp_path / "p.csv"
    assert predict_main([str(tmp_path / "svm-export"), str(images), "--out", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f))[0].keys() >= {"score_ant", "score_bee", "score_cat"}


def test_a_base_named_like_the_folders_own_files_is_not_looked_for_there(tmp_path):
    """A base saved as model.keras is never confused with a dense head's model.keras."""
    base = tmp_path / "bases" / "model.keras"
    base.parent.mkdir()
    base.write_bytes(b"the base")
    attrs = {"base": "file:model.keras", "base_path": str(base),
             "base_sha256": file_sha256(base), "weights": "saved", "weights_path": ""}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.keras").write_bytes(b"a dense head")
    base.unlink()
    with pytest.raises(ValueError, match=r"\(model.keras\) is gone\. Tried: [^;]+ \(recorded "
                                         r"path\)\. Pass"):
        locate_base_file(attrs, model_dir=model_dir)
