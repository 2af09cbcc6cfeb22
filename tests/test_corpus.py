"""A corpus of awkward files through a real extraction: each is decoded by a documented
policy or skipped with a reason, and every other row stays present and aligned."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import index_pixel, save_png, write_index_images
from PIL import Image

from pipeline.cache import read_cache
from pipeline.extract import ExtractConfig, run_extract
from pipeline.images import index_images


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


def build_corpus(folder):
    """Write the corpus into ``folder``; return {name: "row" | "skip"}."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    rgb = Image.new("RGB", (12, 9), (10, 200, 30))

    def put(name, data, outcome):
        (folder / name).write_bytes(data)
        expect[name] = outcome

    put("zero-byte.jpg", b"", "skip")
    good = jpeg_bytes(rgb, quality=90)
    put("truncated.jpg", good[: len(good) // 3], "skip")
    flipped = bytearray(good)
    for i in range(20, len(flipped) - 2):  # keep SOI/EOI, wreck the rest
        flipped[i] ^= 0x5A
    put("flipped-bytes.jpg", bytes(flipped), "skip")
    put("text.jpg", b"this is not an image\n", "skip")
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    put("png-named.jpg", png.getvalue(), "row")  # content decides, not the name
    put("cmyk.jpg", jpeg_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0))), "row")
    for name, image in {
        "rgba.png": Image.new("RGBA", (8, 8), (1, 2, 3, 0)),
        "grey.png": Image.new("L", (8, 8), 99),
        "sixteen-bit.png": Image.fromarray(np.full((8, 8), 40000, np.uint16)),
    }.items():
        image.save(folder / name)
        expect[name] = "row"
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(folder / "palette-transparent.png")
    expect["palette-transparent.png"] = "row"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expect["animated.gif"] = "row"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (12, 4), (5, 5, 5)).save(folder / "exif-rotated.jpg", exif=exif)
    expect["exif-rotated.jpg"] = "row"
    Image.new("RGB", (8, 8), (7, 7, 7)).save(folder / "photo.webp", lossless=True)
    expect["photo.webp"] = "row"
    Image.new("RGB", (8, 8)).save(folder / "UPPER.JPEG")
    expect["UPPER.JPEG"] = "row"
    Image.new("RGB", (8, 8)).save(folder / "bitmap.bmp")
    expect["bitmap.bmp"] = "row"
    put("progressive.jpg", jpeg_bytes(rgb, progressive=True), "row")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "scan.tiff")
    expect["scan.tiff"] = "row"
    for name in ("ünïcödé 图像.png", "with spaces and (brackets).png", "x" * 200 + ".png"):
        Image.new("RGB", (8, 8), (3, 3, 3)).save(folder / name)
        expect[name] = "row"
    Image.new("L", (300, 300)).save(folder / "bomb.png")  # over the lowered pixel limit
    expect["bomb.png"] = "skip"
    return expect


def test_corpus_each_file_decoded_or_skipped_with_reason(tmp_path, probe_model, monkeypatch):
    import pipeline.images

    monkeypatch.setattr(pipeline.images.decode, "MAX_PIXELS", 300 * 300 - 1)
    data = tmp_path / "data"
    expected_index = write_index_images(data, 9, classes=("a", "b", "c"))
    expect = build_corpus(data / "b")
    assert len(expect) >= 20
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                              out=str(out), batch_size=5))
    cache = read_cache(out)
    skipped = dict(cache.skipped)
    for name, outcome in expect.items():
        path = f"b/{name}"
        if outcome == "row":
            assert path in cache.paths, f"{name} should have been decoded"
        else:
            assert path in skipped and skipped[path], f"{name} should be skipped with a reason"
    assert "decompression bomb" in skipped["b/bomb.png"]
    # Names round-trip exactly (unicode, spaces, 200 characters).
    assert "b/ünïcödé 图像.png" in cache.paths and f"b/{'x' * 200}.png" in cache.paths
    # The index-encoding images are all present and aligned around the corpus.
    for path, i in expected_index.items():
        row = cache.paths.index(path)
        label = "abc".index(path.split("/")[0])
        np.testing.assert_allclose(cache.features[row], index_pixel(i, label), atol=1e-3)
        assert cache.labels[row] == label
    # Policies visible in the features: alpha dropped, palette expanded, first GIF frame.
    np.testing.assert_allclose(cache.features[cache.paths.index("b/rgba.png")], (1, 2, 3),
                               atol=1e-3)
    np.testing.assert_allclose(cache.features[cache.paths.index("b/animated.gif")],
                               (255, 0, 0), atol=1)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_symlink_and_empty_folder_policy(tmp_path):
    data = tmp_path / "data"
    write_index_images(data, 6, classes=("a", "b"))
    (data / "empty").mkdir()  # keeps its class id: ids never shift when a class empties
    outside = tmp_path / "outside.png"
    save_png(np.zeros((4, 4, 3), np.uint8), outside)
    os.symlink(outside, data / "a" / "escape.png")  # leads outside: ignored
    os.symlink(data / "b" / "img0001.png", data / "a" / "inside.png")  # inside: read
    os.symlink(data / "a", data / "a" / "loop")  # a folder loop: not followed
    os.symlink(data / "b", data / "linked-class")  # symlinked class folder: a class (Keras)
    index = index_images(data)
    assert index.class_names == ["a", "b", "empty", "linked-class"]
    paths = [r.path for r in index.records]
    assert "a/inside.png" in paths and "a/escape.png" not in paths
    assert not any(p.startswith("a/loop/") for p in paths)
    assert [p for p in paths if p.startswith("linked-class/")] == [
        p.replace("b/", "linked-class/") for p in paths if p.startswith("b/")]
    reasons = " | ".join(index.ignored)
    assert "a/escape.png (symlink to a file outside the data folder)" in reasons
    assert "a/loop (symlinked folder: not followed)" in reasons
    assert "linked-class" not in reasons
