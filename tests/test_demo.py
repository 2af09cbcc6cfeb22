"""The offline demo: the digits it writes, and the whole run in quick mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.cli import extract_main, fit_head_main
from pipeline.demo import HEADS, PRETRAIN_DIGITS, TASK_DIGITS, run_demo, write_digits


def _pngs(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.png"))}


def test_write_digits_layout_counts_and_pixels(tmp_path: Path) -> None:
    digits = load_digits()
    counts = write_digits(tmp_path, per_class_train=7, seed=3)
    files = _pngs(tmp_path)
    assert counts["written"] == len(files) == len(digits.target)  # every scan exactly once

    seen_rows = set()
    for rel, path in files.items():
        group, split, digit, name = rel.split("/")
        row = int(name.removesuffix(".png"))
        seen_rows.add(row)
        # The file name is the load_digits row: label and pixels must match that row.
        assert int(digit) == digits.target[row]
        assert group == ("pretrain" if int(digit) in PRETRAIN_DIGITS else "task")
        assert split in ("train", "validation")
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (8, 8)
            pixels = np.asarray(im, dtype=np.int64)
        np.testing.assert_array_equal(pixels, np.rint(digits.images[row] * 255 / 16))
        np.testing.assert_array_equal(np.rint(pixels * 16 / 255), digits.images[row])
    assert seen_rows == set(range(len(digits.target)))

    for digit in TASK_DIGITS:
        n_train = len(list((tmp_path / "task/train" / str(digit)).glob("*.png")))
        n_val = len(list((tmp_path / "task/validation" / str(digit)).glob("*.png")))
        assert n_train == 7
        assert n_val == np.sum(digits.target == digit) - 7
    for digit in PRETRAIN_DIGITS:
        n_val = len(list((tmp_path / "pretrain/validation" / str(digit)).glob("*.png")))
        assert n_val == round(np.sum(digits.target == digit) * 0.2)
    assert counts["task/train"] == 7 * len(TASK_DIGITS)
    assert sum(counts[k] for k in counts if "/" in k) == len(files)


def test_write_digits_is_idempotent_seeded_and_removes_stale_files(tmp_path: Path) -> None:
    write_digits(tmp_path, per_class_train=5, seed=0)
    before = {rel: (p.read_bytes(), p.stat().st_mtime_ns) for rel, p in _pngs(tmp_path).items()}

    again = write_digits(tmp_path, per_class_train=5, seed=0)
    assert again["written"] == again["removed"] == 0
    after = {rel: (p.read_bytes(), p.stat().st_mtime_ns) for rel, p in _pngs(tmp_path).items()}
    assert after == before  # same bytes, not even rewritten

    # Another split: files move between train and validation, none is left behind twice.
    moved = write_digits(tmp_path, per_class_train=9, seed=1)
    rows = [p.name for p in _pngs(tmp_path).values()]
    assert len(rows) == len(set(rows)) == len(before)
    assert moved["removed"] > 0
    assert moved["task/train"] == 9 * len(TASK_DIGITS)

    other = tmp_path.parent / "other"
    write_digits(other, per_class_train=9, seed=1)
    assert _pngs(other).keys() == _pngs(tmp_path).keys()


def test_write_digits_refuses_a_split_without_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_class_train"):
        write_digits(tmp_path, per_class_train=10_000)
    with pytest.raises(ValueError, match="per_class_train"):
        write_digits(tmp_path, per_class_train=0)


# ~20 s: cheap enough for CI, and it keeps the README's first command honest (as a slow
# test it went stale when the demo gained augmentation).
def test_run_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import keras

    result = run_demo(tmp_path, quick=True, extract=extract_main, fit_head=fit_head_main)
    rows = result.rows

    assert [r["head"] for r in rows] == [*HEADS, "scratch convnet (same images)"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["fit_seconds"] >= 0.0
    for head in HEADS:
        metrics = json.loads((tmp_path / f"models/demo-digits59-{head}/metrics.json").read_text())
        assert metrics["accuracy"] == pytest.approx(rows[HEADS.index(head)]["accuracy"])
    assert (tmp_path / "cache/demo-digits59.h5").is_file()
    base = keras.saving.load_model(tmp_path / "models/demo-digits04-base.keras", safe_mode=True)
    assert base.get_layer("top_conv").output.shape[1:] == (8, 8, 64)

    # The commands a user would type, in the log.
    out = capsys.readouterr().err
    assert "$ python scripts/extract.py" in out and "--layer top_conv" in out
    # Each head is fitted twice: on the cache, and with its augmented copies.
    assert out.count("$ python scripts/fit_head.py") == 2 * len(HEADS)
    assert out.count("--use-augmented") == len(HEADS)
    assert "scratch convnet (same images)" in (tmp_path / "reports/demo.md").read_text()
    assert result.summary().splitlines()[-1].startswith("demo: done in")
    assert result.table in result.summary() and str(result.report) in result.summary()
