"""Changing data: content hashes decide; only added or changed images are extracted again."""

from __future__ import annotations

import os
import time

import numpy as np
from conftest import index_pixel, save_png, write_index_images

from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract


def config(data, probe_model, out, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                         out=str(out), batch_size=4, **kw)


def colour_of(cache, path):
    return cache.features[cache.paths.index(path)]


def test_changed_deleted_touched_and_fixed_files(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 12)
    (data / "a" / "broken.png").write_bytes(b"")
    out = tmp_path / "c.h5"
    run_extract(config(data, probe_model, out, augment=2))
    paths = sorted(expected)
    changed, deleted, touched = paths[0], paths[1], paths[2]
    save_png(np.full((6, 6, 3), 250, np.uint8), data / changed)  # new bytes, same name
    os.remove(data / deleted)
    later = time.time_ns() + 10**9
    os.utime(data / touched, ns=(later, later))  # same bytes, new mtime
    save_png(np.full((6, 6, 3), (1, 2, 3), np.uint8), data / "a" / "broken.png")  # fixed

    result = run_extract(config(data, probe_model, out, augment=2))
    assert result.changes == {"deleted": 1, "changed": 1, "relabelled": 0, "retried_skipped": 1}
    assert result.n_new_rows == 2  # the changed image and the fixed one
    cache = read_cache(out, augmented=True)
    assert deleted not in cache.paths and len(cache.paths) == 12
    np.testing.assert_allclose(colour_of(cache, changed), (250, 250, 250), atol=1e-3)
    np.testing.assert_allclose(colour_of(cache, "a/broken.png"), (1, 2, 3), atol=1e-3)
    for path, i in expected.items():
        if path not in (changed, deleted):
            label = "abc".index(path.split("/")[0])
            np.testing.assert_allclose(colour_of(cache, path), index_pixel(i, label), atol=1e-3)
    assert cache.skipped == []
    # Augmented copies followed their rows (constant images: copy == source).
    np.testing.assert_allclose(cache.augmented_features, cache.features[cache.augmented_source],
                               atol=1e-3)
    assert len(cache.augmented_source) == 2 * len(cache.paths)
    # The touched file was hashed once and its new stat recorded: now nothing to do.
    assert run_extract(config(data, probe_model, out, augment=2)).status == "up-to-date"


def test_touched_only_is_up_to_date(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 5)
    out = tmp_path / "c.h5"
    run_extract(config(data, probe_model, out))
    before = read_cache(out)
    later = time.time_ns() + 10**9
    for path in expected:
        os.utime(data / path, ns=(later, later))
    again = run_extract(config(data, probe_model, out))
    assert again.status == "up-to-date" and again.n_new_rows == 0
    np.testing.assert_array_equal(read_cache(out).features, before.features)


def test_same_image_in_two_splits_is_reported_as_leakage(tmp_path, probe_model, capsys):
    data = tmp_path / "data"
    write_index_images(data, 12, splits=("train", "validation"))
    pixels = np.full((5, 5, 3), 99, np.uint8)
    save_png(pixels, data / "train" / "a" / "dup.png")
    save_png(pixels, data / "validation" / "a" / "dup.png")
    run_extract(config(data, probe_model, tmp_path / "c.h5"))
    err = capsys.readouterr().err
    assert "leakage" in err and "train/a/dup.png == validation/a/dup.png" in err
    assert read_cache(tmp_path / "c.h5").attrs["leaks"] == 1
