"""``--jpeg-downscale dct``: large JPEGs reduced in libjpeg-turbo's DCT domain before the
resize. An explicit option whose pixels differ from Keras': off by default, close to the
exact path, recorded in the cache and followed by everything that decodes for it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import pipeline.images.decode as decode_module
from pipeline.cache import CacheError, read_attrs, read_cache, recorded_jpeg_downscale
from pipeline.extract import ExtractConfig, run_extract
from pipeline.extract.config import validate
from pipeline.images import check_jpeg_downscale, decoded_batches, load_image, read_image
from pipeline.images.kernels import dct_reduction, decode_jpeg
from pipeline.predict import PredictConfig, run_predict
from pipeline.predictor import load_predictor

# Measured on smooth_jpeg below (300x400 and 241x403 -> 24..100 px, every orientation):
# mean |dct - exact| 0.98-1.09 levels, max 3.5-5.0. Most of the mean is the exact path's
# own bias: TF's fast integer IDCT gives R and B ~1.2 levels below libjpeg's accurate one,
# which the reduced decode matches. Photos with fine detail differ more
# (docs/performance.md): the exact path's bilinear kernel aliases, the reduction averages.
MEAN_TOL, MAX_TOL = 1.5, 6.0


def smooth_jpeg(height: int, width: int, *, orientation: int = 1, quality: int = 95,
                mode: str = "RGB", subsampling: int = 2, progressive: bool = False) -> bytes:
    """A JPEG of low-frequency content that differs along each axis and channel, so a
    wrong rotation or flip shows; EXIF ``orientation`` recorded when not 1."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / width,
                       255 * y / height,
                       127 + 100 * np.sin(2 * np.pi * (x / 290 + y / 230))], axis=-1)
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, exif=exif.tobytes(), progressive=progressive,
            **({"subsampling": subsampling} if mode == "RGB" else {}))
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[tuple[int, int] | None, tuple[int, ...]]]:
    """Every libjpeg-turbo decode of this test: (min_size asked, shape decoded)."""
    seen = []

    def spy(data: bytes, min_size: tuple[int, int] | None = None) -> np.ndarray:
        pixels = decode_jpeg(data, min_size)
        seen.append((min_size, pixels.shape))
        return pixels

    monkeypatch.setattr(decode_module, "decode_jpeg", spy)
    return seen


@pytest.mark.parametrize(("stored", "size", "expected"), [
    ((375, 500), (96, 96), 2),  # the benchmark's photos at 96 px
    ((375, 500), (224, 224), 1),  # < 2x: full size, Keras' pixels
    ((750, 1000), (224, 224), 2),
    ((1500, 2000), (224, 224), 4),
    ((3024, 4032), (224, 224), 8),  # a phone photo
    ((192, 192), (96, 96), 2),  # exactly 2x
    ((191, 500), (96, 96), 1),  # one side short of 2x
    ((401, 301), (50, 150), 2),  # each side against its own
    ((6, 6), (1, 1), 1),  # under one DCT block: no reduction
])
def test_reduction_rule(stored, size, expected):
    assert dct_reduction(*stored, size) == expected


@pytest.mark.parametrize(("mode", "subsampling", "progressive"), [
    ("RGB", 2, False), ("RGB", 0, False), ("RGB", 1, False), ("L", 0, False), ("RGB", 2, True)])
@pytest.mark.parametrize(("stored", "size"), [((300, 400), (96, 96)), ((301, 397), (70, 40)),
                                              ((300, 400), (36, 48)), ((300, 400), (20, 20))])
def test_libjpeg_turbo_decodes_at_the_reduced_size(stored, size, mode, subsampling,
                                                   progressive):
    """simplejpeg picks the smallest M/8 scale at least ``min_size``: exactly the 1/2,
    1/4 or 1/8 the rule chose, for every chroma subsampling, grayscale and progressive."""
    d = dct_reduction(*stored, size)
    assert d > 1
    reduced = (-(-stored[0] // d), -(-stored[1] // d))
    data = smooth_jpeg(*stored, mode=mode, subsampling=subsampling, progressive=progressive)
    assert decode_jpeg(data, reduced).shape == (*reduced, 3)


@pytest.mark.parametrize("size", [(24, 24), (48, 64), (75, 100)])
def test_dct_is_close_to_the_exact_path_and_decodes_less(tmp_path, decodes, size):
    path = write(tmp_path / "big.jpg", smooth_jpeg(300, 400))
    exact = load_image(path, size)
    assert decodes.pop() == (None, (300, 400, 3))
    reduced = load_image(path, size, jpeg_downscale="dct")
    min_size, shape = decodes.pop()
    d = dct_reduction(300, 400, size)
    assert d > 1 and shape[:2] == min_size == (-(-300 // d), -(-400 // d))
    diff = np.abs(reduced - exact)
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL
    assert diff.max() > 0  # other pixels: the option is not Keras' path


@pytest.mark.parametrize("name", ["small.jpg", "big.png"])
def test_small_jpegs_and_other_formats_are_unchanged(tmp_path, name):
    """A JPEG under 2x the size, and any non-JPEG, decode byte for byte as with off."""
    if name.endswith(".jpg"):
        path = write(tmp_path / name, smooth_jpeg(90, 130))
    else:
        path = tmp_path / name
        Image.open(io.BytesIO(smooth_jpeg(300, 400))).save(path)
    size = (48, 48)
    off = read_image(path, size)
    dct = read_image(path, size, jpeg_downscale="dct")
    assert off[1] == dct[1]
    np.testing.assert_array_equal(off[0], dct[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_to_the_reduced_decode(tmp_path, decodes, orientation):
    """The stored image is 241x403; EXIF 5-8 turn it to 403x241, and the output size
    (of the turned image) is compared with the stored sides swapped: 100x60 asks 1/4
    for every orientation (unswapped, 5-8 would get 1/2). Its sides are no multiples of
    4: the padded edge row and column of the reduced decode move with every flip and
    turn (a box left at the top left is off by up to 3 levels on average)."""
    path = write(tmp_path / "r.jpg", smooth_jpeg(241, 403, orientation=orientation))
    size = (100, 60) if orientation >= 5 else (60, 100)
    exact = load_image(path, size)
    reduced = load_image(path, size, jpeg_downscale="dct")
    assert decodes[-1] == ((61, 101), (61, 101, 3))
    diff = np.abs(reduced - exact)
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL


def test_unknown_value_is_refused():
    with pytest.raises(ValueError, match=r"`jpeg_downscale` must be one of \('off', 'dct'\). "
                                         r"Received: jpeg_downscale='on'"):
        check_jpeg_downscale("on")
    with pytest.raises(ValueError, match="jpeg_downscale='fast'"):
        validate(ExtractConfig("data", "vgg16", jpeg_downscale="fast"))


def test_the_flag_is_parsed_and_checked(capsys):
    from pipeline.cli import extract_main, extract_parser

    args = extract_parser().parse_args(["data", "--base", "vgg16", "--jpeg-downscale", "dct"])
    assert ExtractConfig(**{k: v for k, v in vars(args).items() if k != "merge"}
                         ).jpeg_downscale == "dct"
    assert extract_parser().parse_args(["data", "--base", "vgg16"]).jpeg_downscale == "off"
    assert extract_main(["data", "--base", "vgg16", "--jpeg-downscale", "on"]) == 2
    assert ("error: `--jpeg-downscale` must be one of off, dct. Received: --jpeg-downscale='on'"
            in capsys.readouterr().err)


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_both_decoders_give_the_single_image_pixels(tmp_path, decode):
    paths = [write(tmp_path / f"{i}.jpg", smooth_jpeg(200 + 40 * i, 300, orientation=1 + i))
             for i in range(4)]
    size = (40, 40)
    batches = list(decoded_batches(paths, size=size, batch_size=4, workers=2, decode=decode,
                                   jpeg_downscale="dct"))
    assert len(batches) == 1 and batches[0].indices == [0, 1, 2, 3]
    for path, image in zip(paths, batches[0].images, strict=True):
        np.testing.assert_array_equal(image, load_image(path, size, jpeg_downscale="dct"))


# ---------------------------------------------------------------------------------------
# Recorded in the cache, and followed downstream


def jpeg_folder(root: Path, n: int = 6) -> Path:
    """Class folders of ``n`` 64x80 noisy JPEGs: through the 8x8 probe, DCT-reduced at
    1/8, and their mean colours differ between off and dct by far more than float noise."""
    rng = np.random.default_rng(n)
    for i in range(n):
        pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        path = root / ("a", "b")[i % 2] / f"img{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def probe_config(data: Path, probe: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), str(probe), pooling="avg", preprocess="none",
                         out=str(out), batch_size=4, **kw)


@pytest.fixture(scope="module")
def dct_cache(tmp_path_factory, probe_model) -> tuple[Path, Path]:
    """(data folder, cache extracted with jpeg_downscale="dct")."""
    root = tmp_path_factory.mktemp("dct")
    data = jpeg_folder(root / "data")
    out = root / "dct.h5"
    run_extract(probe_config(data, probe_model, out, jpeg_downscale="dct"))
    return data, out


def test_cache_records_the_option_and_its_features_are_the_dct_pixels(dct_cache, tmp_path,
                                                                      probe_model):
    data, out = dct_cache
    attrs = read_attrs(out)
    assert attrs["jpeg_downscale"] == "dct" and attrs["config"]["jpeg_downscale"] == "dct"
    cache = read_cache(out)
    features = np.asarray(cache.features)
    dct = np.stack([load_image(data / p, (8, 8), jpeg_downscale="dct").mean(axis=(0, 1))
                    for p in cache.paths])
    off = np.stack([load_image(data / p, (8, 8)).mean(axis=(0, 1)) for p in cache.paths])
    np.testing.assert_allclose(features, dct, atol=1e-3)
    assert np.abs(features - off).max() > 1.0  # the test tells the two paths apart
    plain = tmp_path / "off.h5"
    run_extract(probe_config(data, probe_model, plain))
    assert read_attrs(plain)["jpeg_downscale"] == "off"
    np.testing.assert_allclose(np.asarray(read_cache(plain).features), off, atol=1e-3)


def test_another_value_is_refused_naming_the_flag(dct_cache, tmp_path, probe_model):
    data, out = dct_cache
    copy = tmp_path / "c.h5"
    copy.write_bytes(out.read_bytes())
    with pytest.raises(CacheError, match=r"jpeg_downscale: cache has 'dct', this run has "
                                         r"'off' \(--jpeg-downscale\)"):
        run_extract(probe_config(data, probe_model, copy))


def test_a_cache_from_before_the_option_means_off(tmp_path, probe_model):
    """A cache written before ``jpeg_downscale`` existed has neither the attribute nor the
    config field: the same command finds it up to date, and new images are appended."""
    data = jpeg_folder(tmp_path / "data")
    out = tmp_path / "old.h5"
    run_extract(probe_config(data, probe_model, out))
    config = {k: v for k, v in read_attrs(out)["config"].items() if k != "jpeg_downscale"}
    with h5py.File(out, "r+") as f:
        del f.attrs["jpeg_downscale"]
        f.attrs["config"] = json.dumps(config)
    assert "jpeg_downscale" not in read_attrs(out)
    assert run_extract(probe_config(data, probe_model, out)).status == "up-to-date"
    Image.fromarray(np.full((64, 80, 3), 9, np.uint8)).save(data / "a" / "new.jpg")
    added = run_extract(probe_config(data, probe_model, out))
    assert added.n_new_rows == 1
    with pytest.raises(CacheError, match=r"cache has 'off', this run has 'dct'"):
        run_extract(probe_config(data, probe_model, out, jpeg_downscale="dct"))


@pytest.fixture(scope="module")
def dct_head(dct_cache, tmp_path_factory) -> Path:
    """A dense head fitted on the dct cache."""
    from pipeline.fit import FitConfig, run_fit

    model_dir, _ = run_fit(FitConfig(str(dct_cache[1]), head="dense", epochs=2,
                                     out=str(tmp_path_factory.mktemp("head") / "m")))
    return Path(model_dir)


def test_predict_decodes_new_images_as_the_cache_recorded(dct_cache, dct_head, tmp_path):
    data, out = dct_cache
    cache = read_cache(out)
    emb = tmp_path / "e.npy"
    run_predict(PredictConfig(str(dct_head), [str(data / p) for p in cache.paths],
                              embeddings=str(emb), batch_size=3))
    # Off-decoded features differ by > 1 (test_cache_records_...): predict followed "dct".
    np.testing.assert_allclose(np.load(emb), np.asarray(cache.features), atol=1e-3)


def test_an_export_records_the_option_and_is_read_back(dct_head, tmp_path):
    from pipeline.export import export_model

    exported = export_model(dct_head, tmp_path / "x.keras")
    assert json.loads(exported.with_suffix(".json").read_text())["jpeg_downscale"] == "dct"
    assert load_predictor(exported).jpeg_downscale == "dct"
    assert load_predictor(dct_head).jpeg_downscale == "dct"


def test_a_model_from_before_the_option_reads_off():
    assert recorded_jpeg_downscale({}, {"interpolation": "bilinear"}) == "off"
    assert recorded_jpeg_downscale({"jpeg_downscale": None}, {"jpeg_downscale": "dct"}) == "dct"


def test_benchmark_prints_both_paths_side_by_side(tmp_path, capsys):
    """benchmarks/jpeg_downscale.py runs (its figures are in docs/performance.md)."""
    from benchmarks.jpeg_downscale import main

    assert main(["--images", "10", "--repeats", "1", "--parts", "speed", "rule", "pixels",
                 "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for header in ("off_core_ms  dct_core_ms  speedup", "K1_speedup", "off_to_box  dct_to_box"):
        assert header in out
    assert "2000x1500" in out


def test_finetune_trains_on_the_recorded_decoding_and_records_it(dct_head, tmp_path,
                                                                 monkeypatch):
    import pipeline.finetune.data as finetune_data
    from pipeline.finetune import FinetuneConfig, run_finetune

    seen = set()

    def spy(path, size, interpolation="bilinear", jpeg_downscale="off"):
        seen.add(jpeg_downscale)
        return load_image(path, size, interpolation, jpeg_downscale)

    monkeypatch.setattr(finetune_data, "load_image", spy)
    out, _ = run_finetune(FinetuneConfig(str(dct_head), unfreeze_from="identity_conv", lr=0.0,
                                         epochs=1, batch_size=4, out=str(tmp_path / "tuned")))
    assert seen == {"dct"}
    assert json.loads((out / "head.json").read_text())["jpeg_downscale"] == "dct"
    assert load_predictor(out).jpeg_downscale == "dct"


def test_compare_scratch_decodes_as_the_cache_recorded(dct_cache):
    from pipeline.compare.data import load_scratch_images

    data, out = dct_cache
    attrs, paths = read_attrs(out), read_cache(out).paths
    images, problem = load_scratch_images(data, paths, attrs)
    assert problem is None
    expected = np.stack([load_image(data / p, (8, 8), jpeg_downscale="dct") for p in paths])
    np.testing.assert_array_equal(images, expected)


_WITHOUT_TF = """
import sys
sys.modules["tensorflow"] = None  # any import of TF now fails loudly
import numpy as np
import pipeline.images.decode as decode
decode.has_tensorflow = lambda: False
from pipeline.images import load_image
paths = sys.argv[2:]
np.save(sys.argv[1], np.stack([load_image(p, (30, 40), jpeg_downscale="dct") for p in paths]))
"""


def test_dct_pixels_are_the_same_without_tensorflow(tmp_path):
    """A JAX- or torch-only box (TensorFlow hidden) gets the same dct pixels."""
    import subprocess
    import sys

    paths = [write(tmp_path / f"{o}.jpg", smooth_jpeg(241, 403, orientation=o,
                                                      mode="L" if o == 3 else "RGB"))
             for o in (1, 3, 6, 8)]
    out = tmp_path / "pixels.npy"
    subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(out), *map(str, paths)],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    expected = np.stack([load_image(p, (30, 40), jpeg_downscale="dct") for p in paths])
    np.testing.assert_array_equal(np.load(out), expected)
