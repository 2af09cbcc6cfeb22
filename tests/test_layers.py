"""Several layers in one forward pass: each equals its own extraction; fit/predict pick one."""

from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest
from conftest import save_png

from pipeline.cache import CacheError, read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.fit import FitConfig, format_report, run_fit

LAYERS = ["block_1_expand_relu", "block_3_expand", "out_relu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers") / "data"
    rng = np.random.default_rng(0)
    for c, shift in (("dark", 0), ("light", 120)):
        (root / c).mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(rng.integers(0, 130, (24, 24, 3)) + shift, 0, 255).astype(np.uint8)
            save_png(pixels, root / c / f"{i:02d}.png")
    return root


def config(data, out, layer, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32", layer=layer,
                         pooling="avg", out=str(out), batch_size=6, seed=2, **kw)


def test_each_stored_layer_equals_its_own_extraction(tmp_path, images):
    out = tmp_path / "multi.h5"
    run_extract(config(images, out, ",".join(LAYERS)))
    with h5py.File(out) as f:
        assert [k for k in f["layers"]] == sorted(LAYERS[1:])
    multi = {name: read_cache(out, layer=name) for name in LAYERS}
    assert multi[LAYERS[0]].attrs["layers"] == [LAYERS[0]]
    np.testing.assert_array_equal(read_cache(out).features, multi[LAYERS[0]].features)
    for name in LAYERS:
        single = tmp_path / f"{name}.h5"
        run_extract(config(images, single, name))
        np.testing.assert_allclose(multi[name].features, read_cache(single).features,
                                   rtol=1e-5, atol=1e-6)
        assert multi[name].paths == read_cache(single).paths
    with pytest.raises(CacheError, match=r"Received: layer='block_9_add'"):
        read_cache(out, layer="block_9_add")


def test_all_blocks_and_fit_predict_on_a_chosen_layer(tmp_path, images, caplog):
    from pipeline.predict import PredictConfig, run_predict

    out = tmp_path / "blocks.h5"
    run_extract(config(images, out, "all-blocks"))
    cache = read_cache(out)
    layers = cache.attrs["layers"]
    assert 2 <= len(layers) <= 8 and layers[-1] == "out_relu"
    head_dir = tmp_path / "head"
    _, metrics = run_fit(FitConfig(str(out), head="logreg", out=str(head_dir), layer=layers[1],
                                   val_split=0.3))
    assert metrics["cache_attrs"]["layer"] == layers[1]
    assert format_report(metrics).startswith(f"layer={layers[1]}  head=logreg")
    with caplog.at_level("WARNING"):  # no --layer: the first one, said out loud
        run_fit(FitConfig(str(out), head="logreg", out=str(tmp_path / "first"),
                          val_split=0.3))
    assert f"training on the first, {layers[0]}. Choose another with --layer" in caplog.text
    _, streamed = run_fit(FitConfig(str(out), head="logreg", out=str(tmp_path / "s"),
                                    layer=layers[1], val_split=0.3, stream=True))
    assert streamed["n_train"] == metrics["n_train"]
    csv = tmp_path / "p.csv"
    run_predict(PredictConfig(str(head_dir), [str(images)], out=str(csv)))
    from pipeline.heads import load_head

    chosen = read_cache(out, layer=layers[1])
    expected = load_head(head_dir).predict(chosen.features)
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    by_path = {r[0]: r[1] for r in rows}
    for path, label in zip(chosen.paths, expected, strict=True):
        assert by_path[str(images / path)].endswith(chosen.class_names[int(label)])


def test_resume_changes_and_augmentation_keep_every_layer_aligned(tmp_path, images):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(images, data)
    out = tmp_path / "c.h5"
    run_extract(config(data, out, ",".join(LAYERS), augment=2))
    first = sorted((data / "dark").iterdir())[0]
    save_png(np.full((24, 24, 3), 255, np.uint8), first)
    later = time.time_ns() + 10**9
    os.utime(first, ns=(later, later))
    os.remove(sorted((data / "light").iterdir())[0])
    result = run_extract(config(data, out, ",".join(LAYERS), augment=2))
    assert result.changes["changed"] == 1 and result.changes["deleted"] == 1
    single = tmp_path / "single.h5"
    run_extract(config(data, single, LAYERS[1]))
    reference = read_cache(single)
    for name in LAYERS:
        cache = read_cache(out, layer=name, augmented=True)
        assert len(cache.features) == len(cache.paths) == 27
        assert len(cache.augmented_features) == 2 * 27
    cache = read_cache(out, layer=LAYERS[1])
    order = [cache.paths.index(p) for p in reference.paths]
    np.testing.assert_allclose(cache.features[order], reference.features, rtol=1e-5, atol=1e-6)


def test_layer_sizes_are_checked_against_free_disk(tmp_path, images, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(CacheError, match=r"would take .* GB but .* free"):
        run_extract(ExtractConfig(str(images), "mobilenetv2", weights="none", input_size="32",
                                  layer="block_1_expand_relu,out_relu", pooling="none",
                                  out=str(tmp_path / "big.h5")))
    err = capsys.readouterr().err
    assert "layer block_1_expand_relu: features (16, 16, 96)" in err
