"""images: folder layouts, Keras order, Keras-equal pixels, every image mode, bad files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import bad_files, save_png, write_index_images
from PIL import Image

from pipeline.images import (
    ImageReadError,
    decode_image,
    index_images,
    load_image,
    parse_size,
)


def test_class_layout_matches_keras_order_and_ids(tmp_path):
    import keras

    write_index_images(tmp_path, 17, classes=("zebra", "apple", "Mango"))
    (tmp_path / "apple" / "nested").mkdir()
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "apple" / "nested" / "deep.PNG")
    index = index_images(tmp_path)
    ds = keras.utils.image_dataset_from_directory(tmp_path, shuffle=False, image_size=(4, 4))
    assert index.class_names == ds.class_names == ["Mango", "apple", "zebra"]
    assert [r.path for r in index.records] == [
        Path(p).relative_to(tmp_path).as_posix() for p in ds.file_paths
    ]
    assert {r.split for r in index.records} == {""}
    for r in index.records:
        assert index.class_names[r.label] == r.path.split("/")[0]


def test_split_layout(tmp_path):
    write_index_images(tmp_path, 12, classes=("a", "b"), splits=("train", "val"))
    # A class that only exists in test still gets its own id.
    (tmp_path / "test" / "c").mkdir(parents=True)
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "test" / "c" / "x.png")
    index = index_images(tmp_path)
    assert index.layout == "splits"
    assert index.class_names == ["a", "b", "c"]
    splits = [r.split for r in index.records]
    assert splits == sorted(splits, key=("train", "validation", "test").index)
    assert set(splits) == {"train", "validation", "test"}
    assert all(r.path.startswith(("train/", "val/", "test/")) for r in index.records)


def test_extension_case_hidden_files_and_root_files(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.JPG", "y.Png", "z.jpeg", ".hidden.png", "notes.txt"):
        Image.new("RGB", (4, 4)).save(tmp_path / "a" / name, format="PNG") if not name.endswith(
            ".txt") else (tmp_path / "a" / name).write_text("hi")
    (tmp_path / "a" / ".git").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / ".git" / "p.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")
    index = index_images(tmp_path)
    assert [r.path for r in index.records] == ["a/x.JPG", "a/y.Png", "a/z.jpeg"]
    assert index.ignored == ["stray.png (file outside any class folder)",
                             "a/.git (hidden folder: not read)",
                             "a/.hidden.png (hidden file: not read)"]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Received: data_dir="):
        index_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="Found no class folders"):
        index_images(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="Found 0 images.*Supported image extensions"):
        index_images(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "bicubic", "area"])
def test_pixels_equal_image_dataset_from_directory(tmp_path, fmt, interpolation):
    import keras

    rng = np.random.default_rng(0)
    (tmp_path / "k").mkdir()
    paths = []
    for i, (h, w) in enumerate([(31, 45), (60, 17), (23, 23)]):
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / "k" / f"{i}.{fmt.lower()}"
        Image.fromarray(base).save(path, format=fmt)
        paths.append(path)
    ds = keras.utils.image_dataset_from_directory(
        tmp_path, image_size=(19, 27), shuffle=False, interpolation=interpolation, batch_size=8)
    expected = np.array(next(iter(ds))[0])
    ours = np.stack([load_image(p, (19, 27), interpolation) for p in sorted(paths)])
    np.testing.assert_array_equal(ours, expected.astype(np.float32))


def encoded(image: Image.Image, fmt: str, **kw) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, check",
    [
        (lambda: Image.new("L", (5, 3), 77), lambda a: (a == 77).all()),
        (lambda: Image.new("RGBA", (5, 3), (10, 20, 30, 0)), lambda a: (a == (10, 20, 30)).all()),
        (lambda: Image.new("LA", (5, 3), (99, 5)), lambda a: (a == 99).all()),
        (lambda: Image.new("1", (5, 3), 1), lambda a: (a == 255).all()),
        (lambda: Image.new("CMYK", (5, 3), (0, 0, 0, 0)), lambda a: (a == 255).all()),
        (lambda: Image.fromarray(np.full((3, 5), 51400, np.uint16)), lambda a: (a == 200).all()),
    ],
    ids=["gray", "rgba", "gray-alpha", "bilevel", "cmyk", "16-bit"],
)
def test_every_mode_becomes_8bit_rgb(tmp_path, make, check):
    image = make()
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encoded(image, fmt))
    pixels = decode_image(path)
    assert pixels.shape == (3, 5, 3) and pixels.dtype == np.uint8
    assert check(pixels)


def test_palette_with_transparency_and_first_gif_frame(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    assert (decode_image(tmp_path / "p.png") == (200, 100, 50)).all()
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert (decode_image(tmp_path / "a.gif") == (255, 0, 0)).all()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    """Both decoders (TF for PNG, Pillow for WebP) orient exactly as ImageOps.exif_transpose."""
    from PIL import ImageOps

    pixels = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"r.{fmt.lower()}"
    Image.fromarray(pixels).save(path, format=fmt, exif=exif, lossless=True)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert expected.shape == ((5, 3, 3) if orientation >= 5 else (3, 5, 3))
    np.testing.assert_array_equal(decode_image(path), expected)


def test_bad_files_give_reasons(tmp_path):
    for name, fragment in bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=fragment):
            decode_image(tmp_path / name)


def test_decompression_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    import pipeline.images

    monkeypatch.setattr(pipeline.images.decode, "MAX_PIXELS", 1000)
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="decompression bomb"):
        decode_image(tmp_path / "big.png")


def test_parse_size():
    assert parse_size("150") == (150, 150)
    assert parse_size("150x200") == (150, 200)
    assert parse_size(None) is None
    for bad in ("0", "abc", "12x", "-3"):
        with pytest.raises(ValueError, match="input_size"):
            parse_size(bad)


@pytest.mark.parametrize("shape, size", [((31, 45), (19, 27)), ((8, 8), (32, 32)),
                                         ((375, 500), (224, 224)), ((1, 7), (3, 2))])
def test_numpy_bilinear_equals_tf_resize(shape, size):
    import tensorflow as tf

    from pipeline.images import resize_bilinear

    x = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    # Bit for bit: the same IEEE float32 operations in the same order (no FMA on either
    # side), so this holds on any CPU.
    np.testing.assert_array_equal(resize_bilinear(x, size), tf.image.resize(x, size).numpy())


def test_bilinear_reuses_work_arrays_safely_across_calls_shapes_and_threads():
    """The per-thread work arrays never leak into a result: every call's output equals
    TF's, earlier results stay intact, and ``out=`` is written and returned."""
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf

    from pipeline.images import resize_bilinear

    rng = np.random.default_rng(1)
    cases = [(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), size)
             for shape, size in [((375, 500), (224, 224)), ((40, 30), (96, 96)),
                                 ((600, 80), (150, 150)), ((375, 500), (96, 96))] * 3]
    expected = [tf.image.resize(x, size).numpy() for x, size in cases]

    def run(case: tuple[np.ndarray, tuple[int, int]]) -> np.ndarray:
        return resize_bilinear(*case)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, cases))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)  # not overwritten by a later call
    out = np.full((150, 150, 3), -1, np.float32)
    assert resize_bilinear(cases[2][0], (150, 150), out=out) is out
    np.testing.assert_array_equal(out, expected[2])


def test_pipeline_without_tensorflow_reads_the_same_pixels(tmp_path, monkeypatch):
    """A JAX- or torch-only box (no TF) decodes with Pillow and resizes in NumPy."""
    import pipeline.images

    pixels = np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    save_png(pixels, tmp_path / "x.png")
    with_tf = load_image(tmp_path / "x.png", (20, 16))
    monkeypatch.setattr(pipeline.images.decode, "has_tensorflow", lambda: False)
    np.testing.assert_allclose(load_image(tmp_path / "x.png", (20, 16)), with_tf, atol=1e-4)
    with pytest.raises(ValueError, match="Received: interpolation='area'"):
        load_image(tmp_path / "x.png", (20, 16), "area")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "area"])
def test_one_graph_decode_resize_equals_the_eager_ops(tmp_path, orientation, interpolation):
    """read_image's traced decode -> orient -> resize gives the eager path's exact pixels."""
    from pipeline.images import read_image, resize

    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("PNG", "JPEG"):
        path = tmp_path / f"r{orientation}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)).save(
            path, format=fmt, exif=exif)
        pixels, digest = read_image(path, (11, 17), interpolation)
        expected = resize(decode_image(path), (11, 17), interpolation)
        assert pixels.dtype == np.float32 and pixels.shape == (11, 17, 3)
        np.testing.assert_array_equal(pixels, expected)
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_files_give_the_same_reasons_through_read_image(tmp_path):
    from pipeline.images import read_image

    for name, fragment in bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=fragment):
            read_image(tmp_path / name, (8, 8))
