"""Keras parity: each folder or file case held against Keras itself.

Rows, labels, order and pixels equal ``keras.utils.image_dataset_from_directory(
shuffle=False)`` for every file Keras reads; where we deviate on purpose (README "Folder
policy", docs/reliability.md) the test shows what Keras does and what we do instead.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import save_png
from PIL import Image

from pipeline.images import ImageReadError, decode_image, index_images, load_image

SIZE = (16, 16)  # 8x8 images, resized up: every output pixel depends on the decode
needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")


class Rows(NamedTuple):
    class_names: list[str]
    paths: list[str]  # relative to the data folder, '/'-separated
    labels: list[int]
    pixels: np.ndarray  # (N, H, W, 3) float32


def random_pixels(seed: int, shape: tuple[int, ...] = (8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def keras_rows(root: Path, interpolation: str = "bilinear") -> Rows:
    """What ``image_dataset_from_directory(shuffle=False)`` yields for ``root``."""
    import keras

    ds = keras.utils.image_dataset_from_directory(
        root, shuffle=False, image_size=SIZE, batch_size=64, interpolation=interpolation,
        verbose=False)
    batches = list(ds)
    return Rows(
        ds.class_names,
        [Path(p).relative_to(root).as_posix() for p in ds.file_paths],
        [int(y) for _, labels in batches for y in np.asarray(labels)],
        np.concatenate([np.asarray(x) for x, _ in batches]).astype(np.float32),
    )


def our_rows(root: Path, interpolation: str = "bilinear") -> Rows:
    """The same through index_images + load_image (extract's decode path)."""
    index = index_images(root)
    return Rows(
        index.class_names,
        [r.path for r in index.records],
        [r.label for r in index.records],
        np.stack([load_image(root / r.path, SIZE, interpolation) for r in index.records]),
    )


def assert_same_rows(ours: Rows, theirs: Rows) -> None:
    assert ours.class_names == theirs.class_names
    assert ours.paths == theirs.paths
    assert ours.labels == theirs.labels
    np.testing.assert_array_equal(ours.pixels, theirs.pixels)


@needs_symlinks
def test_symlinked_class_folders_are_classes_as_in_keras(tmp_path):
    """A class folder that is a symlink is listed and read, wherever it points; symlinked
    folders deeper inside a class are not descended (os.walk), so no loop is endless."""
    data = tmp_path / "data"
    for i, rel in enumerate(["a/1.png", "a/2.png", "b/1.png", "b/sub/2.png"]):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(random_pixels(i), data / rel)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_png(random_pixels(10), outside / "real.png")
    os.symlink("real.png", outside / "alias.png")  # a file link inside the linked folder
    os.symlink(data / "b", data / "linked")  # -> another class: a class of its own
    os.symlink(outside, data / "ext")  # -> outside the data folder
    os.symlink(data, data / "all")  # -> the data folder itself: walked once, no loop
    os.symlink(data / "a", data / "a" / "loop")  # nested: not descended
    os.symlink(outside, data / "b" / "deeper")  # nested: not descended
    ours, theirs = our_rows(data), keras_rows(data)
    assert_same_rows(ours, theirs)
    assert ours.class_names == ["a", "all", "b", "ext", "linked"]
    assert {"ext/alias.png", "ext/real.png", "linked/sub/2.png"} <= set(ours.paths)
    ignored = index_images(data).ignored
    assert "a/loop (symlinked folder: not followed)" in ignored
    assert "b/deeper (symlinked folder: not followed)" in ignored
    assert not any(p.split("/")[1] in ("loop", "deeper") for p in ours.paths)


def png_with_chunk(pixels: np.ndarray, kind: bytes, body: bytes, *, after_idat: bool) -> bytes:
    """A PNG of ``pixels`` with one extra chunk, before the first IDAT or after the last."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    plain = buffer.getvalue()
    chunk = (struct.pack(">I", len(body)) + kind + body
             + struct.pack(">I", zlib.crc32(kind + body)))
    at = plain.rindex(b"IEND") - 4 if after_idat else plain.index(b"IDAT") - 4
    return plain[:at] + chunk + plain[at:]


TWO_MB = zlib.compress(b"x" * 2_000_000)  # 2 KB on disk, 2 MB inflated (Pillow's cap: 1 MB)


@pytest.mark.parametrize("kind, body, after_idat", [
    (b"zTXt", b"Comment\0\0" + TWO_MB, False),
    (b"zTXt", b"Comment\0\0" + TWO_MB, True),
    (b"iTXt", b"Comment\0\1\0\0\0" + TWO_MB, False),
    (b"iCCP", b"profile\0\0" + TWO_MB, False),
], ids=["zTXt", "zTXt-after-IDAT", "iTXt", "iCCP"])
def test_png_with_a_huge_compressed_chunk_decodes_as_in_keras(tmp_path, monkeypatch, kind,
                                                               body, after_idat):
    from PIL import PngImagePlugin

    import pipeline.images

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    save_png(random_pixels(1), data / "a" / "0.png")
    data_bytes = png_with_chunk(random_pixels(2), kind, body, after_idat=after_idat)
    assert len(data_bytes) < 5000
    (data / "a" / "1.png").write_bytes(data_bytes)
    cap = PngImagePlugin.MAX_TEXT_CHUNK
    assert_same_rows(our_rows(data), keras_rows(data))
    assert PngImagePlugin.MAX_TEXT_CHUNK == cap  # no global side effect
    monkeypatch.setattr(pipeline.images.decode, "has_tensorflow", lambda: False)  # Pillow decodes
    np.testing.assert_array_equal(decode_image(data / "a" / "1.png"), random_pixels(2))


def test_cmyk_jpeg_pixels_equal_keras(tmp_path, monkeypatch):
    """TF decodes CMYK JPEGs (as Keras); without TF, Pillow's CMYK -> RGB differs by a few
    levels (documented)."""
    import pipeline.images

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(random_pixels(i, (8, 8, 4)), "CMYK").save(data / "a" / f"{i}.jpg")
    theirs = keras_rows(data)
    assert_same_rows(our_rows(data), theirs)
    monkeypatch.setattr(pipeline.images.decode, "has_tensorflow", lambda: False)
    without_tf = our_rows(data)
    assert 0 < np.abs(without_tf.pixels - theirs.pixels).max() <= 8


def test_bmp_tf_cannot_decode_is_read_with_pillow(tmp_path):
    """Deviation: a 1-bit BMP stops Keras' dataset (TF reads 8, 24, 32 bits per pixel);
    we decode it with Pillow. Every BMP TF reads keeps Keras' pixels."""
    import tensorflow as tf

    one_bit = tmp_path / "one-bit"
    (one_bit / "a").mkdir(parents=True)
    bits = Image.fromarray(random_pixels(3, (8, 8)) > 127)
    assert bits.mode == "1"
    bits.save(one_bit / "a" / "bits.bmp")
    with pytest.raises(tf.errors.InvalidArgumentError, match="channels"):
        keras_rows(one_bit)
    expected = np.repeat(np.where(np.asarray(bits), 255, 0).astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(decode_image(one_bit / "a" / "bits.bmp"), expected)
    ours = our_rows(one_bit)
    assert ours.paths == ["a/bits.bmp"]
    np.testing.assert_array_equal(
        ours.pixels[0], tf.image.resize(expected, SIZE).numpy())

    tf_reads = tmp_path / "tf-reads"
    (tf_reads / "a").mkdir(parents=True)
    for mode in ("L", "P", "RGB", "RGBA"):
        Image.fromarray(random_pixels(4)).convert(mode).save(tf_reads / "a" / f"{mode}.bmp")
    assert_same_rows(our_rows(tf_reads), keras_rows(tf_reads))


def jpeg_bytes(pixels: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


def test_truncated_jpeg_is_skipped_in_plain_words_and_silently(tmp_path, capfd):
    """Keras stops on a truncated JPEG; we skip it, with a plain reason and nothing printed
    by TF's decoder on stderr."""
    import tensorflow as tf

    from pipeline.images import read_image

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    whole = jpeg_bytes(random_pixels(5, (64, 64, 3)))
    (data / "a" / "cut.jpg").write_bytes(whole[: len(whole) * 9 // 10])
    with pytest.raises(tf.errors.InvalidArgumentError):
        keras_rows(data)
    capfd.readouterr()
    for cut in (0.3, 0.6, 0.9, 0.99):
        for progressive in (False, True):
            path = tmp_path / f"cut-{cut}-{progressive}.jpg"
            whole = jpeg_bytes(random_pixels(5, (64, 64, 3)), progressive=progressive)
            path.write_bytes(whole[: int(len(whole) * cut)])
            for read in (decode_image, lambda p: read_image(p, SIZE)):
                with pytest.raises(ImageReadError) as caught:
                    read(path)
                assert "truncated" in str(caught.value), str(caught.value)
    err = capfd.readouterr().err
    assert "Input file read error" not in err and "JPEG" not in err, err


def damaged(fmt: str, how: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(6, (24, 40, 3))).save(buffer, format=fmt)
    data = bytearray(buffer.getvalue())
    if how == "cut":
        return bytes(data[: len(data) * 2 // 3])
    for i in range(len(data) // 2, len(data) - 2):  # keep the header, wreck the pixels
        data[i] ^= 0x5A
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_skip_reasons_are_plain_words(tmp_path, fmt, how):
    """No decoder internals ({{function_node ...}}, [Op:...]) in any skip reason."""
    from pipeline.images import read_image

    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(damaged(fmt, how))
    try:
        read_image(path, SIZE)
    except ImageReadError as exc:
        reason = str(exc)
        assert not any(s in reason for s in ("{{", "function_node", "[Op:", "[[")), reason
        assert "\n" not in reason


def test_interpolation_is_case_insensitive_as_in_keras(tmp_path, probe_model):
    from pipeline.cache import read_cache
    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.images import check_interpolation

    assert check_interpolation("Bicubic") == "bicubic"
    with pytest.raises(ValueError, match="Received: interpolation='cubic'"):
        check_interpolation("cubic")
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    for i in range(2):
        save_png(random_pixels(i), data / "a" / f"{i}.png")
    assert_same_rows(our_rows(data, "Bicubic"), keras_rows(data, "Bicubic"))
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                              interpolation="Bicubic", out=str(out)))
    cache = read_cache(out)
    assert cache.attrs["interpolation"] == "bicubic"


def test_hidden_entries_inside_a_class_deviation(tmp_path):
    """Keras skips only hidden class folders; inside a class it reads hidden files and hidden
    folders. We skip those too (macOS ._ files, NAS thumbnail folders) and list each one."""
    data = tmp_path / "data"
    for i, rel in enumerate(["a/x.png", "a/.hidden.png", "a/.thumbs/t.png", "a/sub/.y.png",
                             ".hidden-class/z.png", "b/z.png"]):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(random_pixels(i), data / rel)
    theirs, ours = keras_rows(data), our_rows(data)
    assert theirs.class_names == ours.class_names == ["a", "b"]
    hidden = {"a/.hidden.png", "a/.thumbs/t.png", "a/sub/.y.png"}
    assert hidden <= set(theirs.paths)
    keep = [i for i, p in enumerate(theirs.paths) if p not in hidden]
    assert_same_rows(ours, Rows(theirs.class_names, [theirs.paths[i] for i in keep],
                                [theirs.labels[i] for i in keep], theirs.pixels[keep]))
    ignored = index_images(data).ignored
    assert "a/.hidden.png (hidden file: not read)" in ignored
    assert "a/sub/.y.png (hidden file: not read)" in ignored
    assert "a/.thumbs (hidden folder: not read)" in ignored
    assert not any(".hidden-class" in entry for entry in ignored)  # Keras skips it too


@needs_symlinks
def test_symlinked_file_leading_outside_deviation(tmp_path):
    """Keras reads a symlinked file wherever it points; we read it only when its target is
    inside the data folder or inside the class folder it was found through."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    save_png(random_pixels(0), data / "a" / "0.png")
    save_png(random_pixels(1), tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", data / "a" / "escape.png")
    os.symlink(data / "a" / "0.png", data / "a" / "inside.png")
    theirs, ours = keras_rows(data), our_rows(data)
    assert theirs.paths == ["a/0.png", "a/escape.png", "a/inside.png"]
    assert ours.paths == ["a/0.png", "a/inside.png"]
    np.testing.assert_array_equal(ours.pixels, theirs.pixels[[0, 2]])
    assert ("a/escape.png (symlink to a file outside the data folder)"
            in index_images(data).ignored)


def write_jpeg_corpus(folder: Path) -> None:
    """JPEGs of every chroma subsampling, baseline and progressive, grayscale, odd sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i, (subsampling, progressive, mode, quality) in enumerate(
        (s, p, m, q) for s in (0, 1, 2) for p in (False, True) for m in ("RGB", "L")
        for q in (60, 95)
    ):
        h, w = rng.integers(9, 70, 2)
        # Smooth gradients plus noise: chroma upsampling and the IDCT both show.
        base = np.linspace(0, 255, int(h) * int(w) * 3).reshape(int(h), int(w), 3)
        noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(noisy).convert(mode)
        image.save(folder / f"{i:02d}.jpg", quality=quality, progressive=progressive,
                   subsampling=subsampling if mode == "RGB" else -1)


_WITHOUT_TF = """
import sys
sys.modules["tensorflow"] = None  # any import of TF now fails loudly
import numpy as np
import pipeline.images.decode as decode
decode.has_tensorflow = lambda: False
from pipeline.images import index_images, load_image
root = sys.argv[1]
index = index_images(root)
np.save(sys.argv[2], np.stack([load_image(index.root / r.path, (16, 16)) for r in index.records]))
"""


@pytest.mark.parametrize("tensorflow", ["installed", "hidden"])
def test_jpeg_pixels_equal_keras_with_and_without_tensorflow(tmp_path, tensorflow):
    """libjpeg-turbo with TF's settings decodes JPEGs to TF's bytes, so a JAX- or torch-only
    box (TensorFlow hidden here) reads the pixels Keras reads."""
    import subprocess
    import sys

    write_jpeg_corpus(tmp_path / "data" / "a")
    theirs = keras_rows(tmp_path / "data")
    ours = our_rows(tmp_path / "data")
    if tensorflow == "hidden":
        out = tmp_path / "pixels.npy"
        subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(tmp_path / "data"), str(out)],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        ours = ours._replace(pixels=np.load(out))
    assert_same_rows(ours, theirs)


def test_jpeg_header_walk_reads_what_pillow_reads(tmp_path):
    """Size, components and EXIF orientation from the JPEG's own markers equal Pillow's,
    on every subsampling, progressive, grayscale, CMYK, each orientation, with an XMP
    segment and a thumbnail-bearing EXIF block before the frame header."""
    import io

    from pipeline.images.formats import exif_orientation, jpeg_header

    write_jpeg_corpus(tmp_path / "corpus")
    files = [p.read_bytes() for p in sorted((tmp_path / "corpus").iterdir())]
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files.append(jpeg_bytes(random_pixels(orientation, (9, 13, 3)), exif=exif.tobytes()))
    cmyk = io.BytesIO()
    Image.fromarray(random_pixels(3, (6, 7, 4)), "CMYK").save(cmyk, "JPEG")
    files.append(cmyk.getvalue())
    payload = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    xmp = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    exif = Image.Exif()
    exif[0x0112] = 6
    with_xmp = jpeg_bytes(random_pixels(9, (5, 11, 3)), exif=exif.tobytes())
    files.append(with_xmp[:2] + xmp + with_xmp[2:])
    for data in files:
        header = jpeg_header(data)
        with Image.open(io.BytesIO(data)) as im:
            assert (header.width, header.height) == im.size
            assert header.components == len(im.getbands())
            assert exif_orientation(header.exif) == im.getexif().get(0x0112, 1)
            assert header.complete
    assert exif_orientation(jpeg_header(files[-1]).exif) == 6


def test_png_orientation_is_read_without_decoding_the_pixels(tmp_path, monkeypatch):
    """An eXIf chunk after the pixel data, and ImageMagick's raw EXIF text profile, are
    found by walking the chunks, as Pillow finds them after decoding every pixel."""
    from PIL import PngImagePlugin

    from pipeline.images.formats import png_orientation

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(3, (5, 7, 3))).save(buffer, format="PNG", exif=exif)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert png_orientation(data) == im.getexif()[0x0112] == 6
    # Moved after IDAT: Pillow finds it only after decoding the pixels; so do we, without.
    start = data.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(data[start : start + 4], "big")
    chunk, rest = data[start:end], data[:start] + data[end:]
    iend = rest.index(b"IEND") - 4
    late = rest[:iend] + chunk + rest[iend:]
    with Image.open(io.BytesIO(late)) as im:
        assert png_orientation(late) == im.getexif()[0x0112] == 6
    raw = exif.tobytes().hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw) // 2}\n{raw}\n", zip=True)
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(4, (5, 7, 3))).save(buffer, format="PNG", pnginfo=info)
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        assert png_orientation(buffer.getvalue()) == im.getexif()[0x0112] == 6
    assert png_orientation(save_png_bytes(random_pixels(5))) == 1


def save_png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
