"""Augmented feature passes: alignment, determinism, extending K, fit on originals + copies."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import save_png, write_index_images

from pipeline.augment import AugmentSpec, augment_batch, batch_seed
from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.fit import FitConfig, run_fit


def probe(data: Path, probe_model: Path, out: Path, augment: int, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                         out=str(out), augment=augment, batch_size=4, **kw)


def augmented(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f[f"augmented/{name}"][:] for name in ("features", "source", "pass")}


def test_copies_point_at_their_training_rows(tmp_path, probe_model):
    """Constant images stay constant under flips, rotations, zooms and shifts (reflect
    fill), so through the identity probe each copy must equal its source row exactly."""
    data = tmp_path / "data"
    write_index_images(data, 24, splits=("train", "validation"))
    out = tmp_path / "c.h5"
    run_extract(probe(data, probe_model, out, augment=2))
    cache = read_cache(out, augmented=True)
    train = np.flatnonzero(cache.split == "train")
    pairs = zip(cache.augmented_source.tolist(), cache.augmented_pass.tolist(), strict=True)
    assert sorted(pairs) == sorted((int(r), k) for r in train for k in (0, 1))
    np.testing.assert_allclose(cache.augmented_features, cache.features[cache.augmented_source],
                               atol=1e-3)


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    """Noisy images, so augmentation visibly changes features."""
    root = tmp_path_factory.mktemp("aug") / "data"
    rng = np.random.default_rng(0)
    for c in ("u", "v"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            save_png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), root / c / f"{i}.png")
    return root


def mobilenet(data: Path, out: Path, augment: int) -> ExtractConfig:
    return ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32",
                         pooling="flatten", layer="block_2_add", out=str(out), augment=augment,
                         batch_size=6, seed=1)


def test_seeded_identical_and_extending_k_extracts_only_new_passes(tmp_path, textured):
    once = tmp_path / "once.h5"
    run_extract(mobilenet(textured, once, augment=3))
    twice = tmp_path / "twice.h5"
    run_extract(mobilenet(textured, twice, augment=1))
    first = augmented(twice)
    result = run_extract(mobilenet(textured, twice, augment=3))
    assert result.status == "extracted" and result.n_new_rows == 0
    extended = augmented(twice)
    # The summary says what was added: passes 1 and 2 of every image, not "0 new images".
    assert result.n_new_augmented == len(extended["pass"]) - len(first["pass"]) > 0
    assert f"0 new images and {result.n_new_augmented} augmented copies" in result.summary()
    # The pass already stored was kept as it was; only passes 1 and 2 were added.
    for name in first:
        np.testing.assert_array_equal(extended[name][: len(first[name])], first[name])
    assert sorted(set(extended["pass"].tolist())) == [0, 1, 2]
    # ... and the result is the same set of copies a single K=3 run makes.
    single = augmented(once)

    def by_key(d):
        order = np.lexsort((d["source"], d["pass"]))
        return d["features"][order]

    np.testing.assert_array_equal(by_key(extended), by_key(single))
    assert run_extract(mobilenet(textured, twice, augment=3)).status == "up-to-date"
    cache = read_cache(once, augmented=True)
    originals = cache.features[cache.augmented_source]
    assert not np.allclose(cache.augmented_features, originals), "augmentation changed nothing"


def test_fit_uses_copies_of_training_rows_only(tmp_path, textured):
    out = tmp_path / "c.h5"
    run_extract(mobilenet(textured, out, augment=2))
    _, plain = run_fit(FitConfig(str(out), head="logreg", out=str(tmp_path / "p"), val_split=0.3))
    _, more = run_fit(FitConfig(str(out), head="logreg", out=str(tmp_path / "a"), val_split=0.3,
                                use_augmented=True))
    assert more["n_train_augmented"] == 2 * plain["n_train"]
    assert more["n_val"] == plain["n_val"]
    with pytest.raises(ValueError, match="use_augmented=True"):
        plain_cache = tmp_path / "plain.h5"
        run_extract(mobilenet(textured, plain_cache, augment=0))
        run_fit(FitConfig(str(plain_cache), out=str(tmp_path / "x"), use_augmented=True))


def test_augment_batch_is_a_pure_function_of_seed():
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    a = augment_batch(x.copy(), AugmentSpec(), 5)
    np.testing.assert_array_equal(a, augment_batch(x.copy(), AugmentSpec(), 5))
    assert not np.array_equal(a, augment_batch(x.copy(), AugmentSpec(), 6))
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2) != batch_seed(0, 2, 2)
    with pytest.raises(ValueError, match="Received: augment_flip='diagonal'"):
        AugmentSpec(flip="diagonal")
