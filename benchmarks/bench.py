"""Benchmark: how fast the pipeline turns images into a cache, and what the cache buys.

Every figure of docs/performance.md comes from here (``scripts/bench.py`` is a thin
wrapper). One process run measures, on one folder of real JPEGs (random crops, flips and
noise of scikit-learn's two bundled photographs, ~500x375, quality 90):

    a  forward     the feature model's ``model.predict`` on decoded, preprocessed arrays
    b  extract     ``run_extract`` end to end: decode -> forward -> HDF5
    c  keras       ``image_dataset_from_directory`` + ``.map(preprocess_input)`` + predict
    d  naive       one image at a time with PIL, ``predict`` per batch, no overlap
    e  input       decode + resize + preprocess + HDF5 write of zeros, no forward pass

a, b, c and d share one feature model object (random weights, seeded; b gets it by
patching ``pipeline.extract.build_feature_model``), so they differ only in how pixels
reach it. Also timed: a' (``predict_on_batch`` per batch, the entry point extract uses,
faster than ``predict`` for small models) and b with one decode thread. Timing helpers
return seconds; :func:`run_benchmark` states the whole protocol; :func:`format_report`
prints the tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

__all__ = [
    "CASES",
    "BenchCase",
    "BenchConfig",
    "BenchSizes",
    "bench_sizes",
    "end_to_end_epoch_seconds",
    "extract_seconds",
    "fit_rss",
    "format_report",
    "forward_on_batch_seconds",
    "forward_seconds",
    "head_epoch_seconds",
    "input_side_seconds",
    "keras_peer_seconds",
    "machine_info",
    "measure_decoders",
    "measure_append_copy",
    "measure_head_rows",
    "make_images",
    "naive_seconds",
    "run_benchmark",
    "shared_cpu_bound",
    "sklearn_fit_seconds",
    "stage_profile",
    "throughput_ratios",
    "write_synthetic_cache",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("china", "flower")  # one class folder per bundled photograph
IMAGE_SIZE = (375, 500)  # (H, W) of a landscape image, ImageNet-like
TARGETS = {"b/a": 0.95, "b/max(a,a')": 0.95, "b/c": 1.0, "b/min(a,e)": 0.9,
           "b/min(max(a,a'),e)": 0.9, "head/e2e": 0.01, "rerun %": 2.0, "add10 %": 10.0}


@dataclass(frozen=True)
class BenchCase:
    """One feature model to measure: base, input side, cut layer and pooling."""

    name: str
    base: str
    size: int
    layer: str | None
    pooling: str
    input_bound: bool = False
    sweep_workers: bool = True  # also time b with one decode thread (oversubscription check)
    default: bool = True  # run without --cases


CASES = (
    BenchCase("mobilenetv2@224-avg", "mobilenetv2", 224, None, "avg"),
    # Decoding is ~1% of VGG16's work: a one-thread run would tell nothing new.
    BenchCase("vgg16@150-flatten", "vgg16", 150, None, "flatten", sweep_workers=False),
    BenchCase("mobilenetv2@96-block_3_expand-avg", "mobilenetv2", 96, "block_3_expand", "avg",
              input_bound=True),
    # For the GPU box (--cases resnet50@224-avg ...): too slow to be a default on 2 CPU cores.
    BenchCase("resnet50@224-avg", "resnet50", 224, None, "avg", sweep_workers=False,
              default=False),
)


@dataclass
class BenchConfig:
    """Arguments of ``scripts/bench.py``; written into the JSON report."""

    images: int = 384
    repeats: int = 3
    quick: bool = False
    batch_size: int = 32
    workers: int = 0
    seed: int = 0
    data: str = "data/bench"
    out: str = "reports/bench.json"
    parts: tuple[str, ...] = ("throughput", "decoders", "stages", "training", "head_rows",
                              "sklearn", "incremental", "append_copy", "stream", "storage")
    cases: tuple[str, ...] = field(
        default_factory=lambda: tuple(c.name for c in CASES if c.default))
    mixed_precision: bool = False  # GPU box: run every base in mixed_float16
    jit: str = "auto"  # XLA for the forward pass: auto | on | off


@dataclass(frozen=True)
class BenchSizes:
    """Problem sizes for one run (smaller for ``--quick``)."""

    sklearn_rows: tuple[int, ...]
    sklearn_dims: tuple[int, ...]
    stream_rows: tuple[int, ...]
    stream_runs: tuple[tuple[str, bool], ...]  # (head, stream)
    stage_images: int
    head_rows: tuple[int, ...]
    append_rows: tuple[int, ...]


def bench_sizes(quick: bool) -> BenchSizes:
    """Sizes of the secondary measurements: the full grid, or a smoke run's."""
    if quick:
        return BenchSizes((500,), (256,), (16, 64), (("dense", True),), 32, (384,), (64,))
    return BenchSizes(
        (500, 2000, 8000), (256, 2048), (300, 1200, 4800),
        (("dense", True), ("logreg", True), ("dense", False), ("logreg", False)), 64,
        (384, 3840, 38400), (1200, 4800),
    )


# ---------------------------------------------------------------------------- images


def make_images(folder: str | os.PathLike, n: int, *, start: int = 0, seed: int = 0,
                quality: int = 90) -> list[Path]:
    """Write JPEGs ``start .. start+n-1`` into ``folder/<china|flower>/img_#####.jpg``.

    Image ``i`` belongs to class ``i % 2`` and is a function of ``(seed, i)`` alone: a
    random rescale and crop of that class's photograph (landscape 500x375, a quarter
    portrait 375x500), a horizontal flip half the time, Gaussian noise (sigma 3 levels).
    Existing files are kept, so a folder grows without changing what it holds.

    Returns:
        The paths of images ``start .. start+n-1``.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427x640 RGB
    folder = Path(folder)
    paths = []
    for i in range(start, start + n):
        label = i % len(CLASSES)
        path = folder / CLASSES[label] / f"img_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        portrait = rng.random() < 0.25
        h, w = IMAGE_SIZE[::-1] if portrait else IMAGE_SIZE
        src = Image.fromarray(photos[label])
        lowest = max(h / src.height, w / src.width)
        scale = rng.uniform(lowest, lowest * 1.35)
        src = src.resize((int(np.ceil(src.width * scale)), int(np.ceil(src.height * scale))),
                         Image.Resampling.BICUBIC)
        top = int(rng.integers(0, src.height - h + 1))
        left = int(rng.integers(0, src.width - w + 1))
        pixels = np.asarray(src.crop((left, top, left + w, top + h)), dtype=np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = np.clip(pixels + rng.normal(0.0, 3.0, pixels.shape), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=quality)
    return paths


def _remove_images(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _summary(seconds: Sequence[float], n: int | None = None) -> dict[str, Any]:
    """Raw runs, their median, and img/s of the median when ``n`` items were done."""
    med = statistics.median(seconds)
    out: dict[str, Any] = {"seconds": [round(s, 4) for s in seconds], "median_s": med}
    if n is not None:
        out["img_s"] = n / med if med > 0 else float("inf")
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow what the measured code prints (progress lines, Keras' "Found N files")."""
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield sink


def _fresh(path: Path) -> Path:
    """``path`` with no cache (or partial cache) left from an earlier run."""
    from pipeline.cache import partial_path

    path.unlink(missing_ok=True)
    partial_path(path).unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- the models


# --mixed-precision / --jit of this run (set by run_benchmark), used for every model built.
_MODEL_OPTIONS: dict[str, Any] = {"mixed_precision": False, "jit": "auto"}


def build_case_model(case: BenchCase, seed: int = 0, pooling: str | None = None) -> Any:
    """The case's FeatureModel: random (seeded) weights, cut and pooled."""
    from pipeline.bases import build_feature_model

    precision = "mixed_float16" if _MODEL_OPTIONS["mixed_precision"] else "float32"
    return build_feature_model(case.base, weights="none", input_size=(case.size, case.size),
                               layer=case.layer, pooling=pooling or case.pooling, seed=seed,
                               precision=precision, jit=_MODEL_OPTIONS["jit"])


def module_preprocess_input(case: BenchCase) -> Callable[..., Any]:
    """The application module's own ``preprocess_input`` (what a Keras user calls)."""
    import keras

    from pipeline.bases import resolve_base

    return getattr(keras.applications, resolve_base(case.base).module).preprocess_input


def decode_all(paths: Sequence[Path], size: tuple[int, int], *, batch_size: int = 32,
               workers: int = 0) -> np.ndarray:
    """All images decoded and resized as extract does: (N, H, W, 3) float32 in 0..255."""
    from pipeline.extract import decoded_batches

    batches = [b.images for b in decoded_batches(paths, size=size, batch_size=batch_size,
                                                 workers=workers)]
    return np.concatenate(batches)


def measure_decoders(paths: Sequence[Path], sizes: Sequence[int], *, repeats: int,
                     batch_size: int, workers: int) -> list[dict[str, Any]]:
    """``decoded_batches`` alone, decode threads vs worker processes, interleaved.

    Each run includes starting its pool (spawned processes pay their imports), as every
    extract run does. The figure behind ``--decode auto``'s choice.
    """
    from pipeline.extract import decoded_batches

    out = []
    for side in sizes:
        seconds: dict[str, list[float]] = {"threads": [], "processes": []}
        for _ in range(repeats):
            for decode, runs in seconds.items():
                batches = decoded_batches(paths, size=(side, side), batch_size=batch_size,
                                          workers=workers, decode=decode)
                runs.append(_timed(lambda b=batches: sum(len(x.indices) for x in b))[0])
        stats = {d: _summary(runs, len(paths)) for d, runs in seconds.items()}
        out.append({"size": side, **stats,
                    "processes/threads": stats["processes"]["img_s"] / stats["threads"]["img_s"]})
    return out


# ---------------------------------------------------------------------------- a .. e


def forward_seconds(model: Any, x: np.ndarray, batch_size: int) -> float:
    """(a) ``model.predict`` over preprocessed arrays in memory (warm model)."""
    seconds, _ = _timed(lambda: model.predict(x, batch_size=batch_size, verbose=0))
    return seconds


def forward_on_batch_seconds(model: Any, x: np.ndarray, batch_size: int) -> float:
    """(a') ``predict_on_batch`` per batch, as extract calls it (warm model)."""

    def run() -> None:
        for i in range(0, len(x), batch_size):
            model.predict_on_batch(x[i:i + batch_size])

    return _timed(run)[0]


def extract_config(case: BenchCase, data_dir: Path, out: Path, *, batch_size: int,
                   workers: int = 0, seed: int = 0, **options: Any) -> Any:
    """The ExtractConfig of ``extract.py DATA --base B --weights none ...`` for a case."""
    from pipeline.extract import ExtractConfig

    return ExtractConfig(str(data_dir), case.base, weights="none", input_size=str(case.size),
                         layer=case.layer, pooling=options.pop("pooling", case.pooling),
                         batch_size=batch_size, out=str(out), seed=seed, workers=workers,
                         log_every=3600.0, **_MODEL_OPTIONS, **options)


def extract_seconds(config: Any, feature_model: Any | None = None) -> tuple[float, Any]:
    """(b) ``run_extract`` into a fresh file; wall seconds and the ExtractResult.

    With ``feature_model``, run_extract uses that (already built, warm) model instead of
    building its own, so a, b, c and d run the very same model object.
    """
    from pipeline.extract import run_extract

    _fresh(Path(config.out))
    patch = (mock.patch("pipeline.extract.build_feature_model", return_value=feature_model)
             if feature_model is not None else contextlib.nullcontext())
    with patch, _quiet():
        return _timed(lambda: run_extract(config))


def keras_peer_dataset(data_dir: Path, case: BenchCase, batch_size: int) -> Any:
    """The Keras guide's pipeline: ``image_dataset_from_directory`` + ``preprocess_input``."""
    import keras

    preprocess_input = module_preprocess_input(case)
    with _quiet():
        ds = keras.utils.image_dataset_from_directory(
            data_dir, shuffle=False, image_size=(case.size, case.size), batch_size=batch_size)
    return ds.map(lambda x, y: (preprocess_input(x), y))


def keras_peer_seconds(data_dir: Path, case: BenchCase, model: Any, out: Path,
                       batch_size: int) -> float:
    """(c) dataset -> ``model.predict`` -> ``np.save``, timed from building the dataset."""

    def run() -> None:
        features = model.predict(keras_peer_dataset(data_dir, case, batch_size), verbose=0)
        np.save(out, features)

    return _timed(run)[0]


def naive_seconds(paths: Sequence[Path], case: BenchCase, model: Any, out: Path,
                  batch_size: int) -> float:
    """(d) Chollet-era loop: PIL open/convert/resize one by one, predict per batch, save.

    Resizing is nearest-neighbour, the default of Keras' ``load_img`` of that era.
    """
    from PIL import Image

    preprocess_input = module_preprocess_input(case)

    def run() -> None:
        features = []
        for i in range(0, len(paths), batch_size):
            batch = []
            for path in paths[i:i + batch_size]:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((case.size, case.size),
                                                  Image.Resampling.NEAREST)
                    batch.append(np.asarray(im, dtype=np.float32))
            x = preprocess_input(np.stack(batch))
            features.append(model.predict(x, batch_size=batch_size, verbose=0))
        np.save(out, np.concatenate(features))

    return _timed(run)[0]


def input_side_seconds(paths: Sequence[Path], root: Path, feature_model: Any, out: Path, *,
                       batch_size: int, workers: int = 0, dtype: str = "float32") -> float:
    """(e) decode + resize + preprocess + HDF5 append of zero features; no forward pass.

    The zeros have the feature model's shape and dtype, and every column extract writes
    (sha256, size, mtime) is written too, so as many bytes are written as in (b).
    """
    from pipeline.bases import preprocess
    from pipeline.cache import CacheWriter
    from pipeline.extract import decoded_batches

    names = [p.relative_to(root).as_posix() for p in paths]
    shape = feature_model.feature_shape

    def run() -> None:
        stats = [os.stat(p) for p in paths]
        writer = CacheWriter.create(_fresh(out), attrs={"class_names": list(CLASSES)},
                                    feature_shape=shape, dtype=dtype)
        zeros = np.zeros((batch_size, *shape), dtype=dtype)
        try:
            for batch in decoded_batches(paths, size=feature_model.input_size,
                                         batch_size=batch_size, workers=workers):
                preprocess(batch.images, feature_model.preprocess)
                rows = batch.indices
                writer.append(zeros[:len(rows)], [0] * len(rows), [names[i] for i in rows],
                              [""] * len(rows), sha256=getattr(batch, "digests", None),
                              size=[stats[i].st_size for i in rows],
                              mtime_ns=[stats[i].st_mtime_ns for i in rows])
            writer.finish()
        finally:
            writer.close()

    return _timed(run)[0]


def shared_cpu_bound(forward_img_s: float, input_img_s: float) -> float:
    """img/s when forward and input side each need all cores: 1 / (1/a + 1/e).

    On a CPU-only box both stages draw on the same cores, so overlapping them cannot
    beat this (min(a, e) is reachable only when the forward pass runs elsewhere, on a GPU).
    """
    return 1.0 / (1.0 / forward_img_s + 1.0 / input_img_s)


def throughput_ratios(img_s: dict[str, float], input_bound: bool) -> dict[str, float]:
    """b/a, b/c (and b/min(a, e) for an input-bound case) from img/s per method, plus b
    against the shared-CPU bound 1/(1/a' + 1/e) with the faster forward entry point a'."""
    ratios = {"b/a": img_s["b"] / img_s["a"], "b/d": img_s["b"] / img_s["d"]}
    if "c" in img_s:  # no Keras peer without TensorFlow
        ratios["b/c"] = img_s["b"] / img_s["c"]
    fastest = max(img_s["a"], img_s["a_on_batch"])
    ratios["b/max(a,a')"] = img_s["b"] / fastest
    if input_bound:
        ratios["b/min(a,e)"] = img_s["b"] / min(img_s["a"], img_s["e"])
        ratios["b/min(max(a,a'),e)"] = img_s["b"] / min(fastest, img_s["e"])
    ratios["b/shared_cpu_bound"] = img_s["b"] / shared_cpu_bound(fastest, img_s["e"])
    return ratios


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (else: no tf.data peer, Pillow decoding)."""
    from pipeline.images import has_tensorflow as found

    return found()


def measure_throughput(case: BenchCase, data_dir: Path, work: Path, paths: Sequence[Path], *,
                       repeats: int, batch_size: int, workers: int, seed: int) -> dict[str, Any]:
    """a .. e for one case, interleaved (a b c d e, a b c d e, ...) so drifting load hits
    all methods alike; medians of ``repeats`` runs after one untimed warm-up of each
    model entry point (tracing is a one-off cost, measured separately as ``cold_s``)."""
    from pipeline.bases import preprocess

    n = len(paths)
    build_s, fm = _timed(lambda: build_case_model(case, seed))
    model = fm.model
    x = preprocess(decode_all(paths, fm.input_size, batch_size=batch_size, workers=workers),
                   fm.preprocess)
    trace_s, _ = _timed(lambda: model.predict_on_batch(x[:batch_size]))
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)
    peer = has_tensorflow()  # the Keras peer reads images with tf.data
    if peer:
        model.predict(keras_peer_dataset(data_dir, case, batch_size).take(1), verbose=0)
    skip = {"b_1_worker"} if not case.sweep_workers else set()
    skip |= {"c"} if not peer else set()
    runs: dict[str, list[float]] = {k: [] for k in ("a", "a_on_batch", "b", "b_1_worker", "c",
                                                    "d", "e") if k not in skip}
    b_loop: list[float] = []
    for _ in range(repeats):
        runs["a"].append(forward_seconds(model, x, batch_size))
        runs["a_on_batch"].append(forward_on_batch_seconds(model, x, batch_size))
        config = extract_config(case, data_dir, work / "b.h5", batch_size=batch_size,
                                workers=workers, seed=seed)
        seconds, result = extract_seconds(config, fm)
        runs["b"].append(seconds)
        b_loop.append(result.seconds)
        if case.sweep_workers:
            config.workers = 1
            runs["b_1_worker"].append(extract_seconds(config, fm)[0])
        if peer:
            runs["c"].append(keras_peer_seconds(data_dir, case, model, work / "c.npy",
                                                batch_size))
        runs["d"].append(naive_seconds(paths, case, model, work / "d.npy", batch_size))
        runs["e"].append(input_side_seconds(paths, data_dir, fm, work / "e.h5",
                                            batch_size=batch_size, workers=workers))
    methods = {k: _summary(v, n) for k, v in runs.items()}
    methods["b_loop"] = _summary(b_loop, n)
    img_s = {k: v["img_s"] for k, v in methods.items()}
    return {
        "case": asdict(case), "n_images": n, "feature_shape": list(fm.feature_shape),
        "cold_s": {"build": build_s, "first_batch_trace": trace_s},
        "methods": methods, "ratios": throughput_ratios(img_s, case.input_bound),
    }


# ---------------------------------------------------------------------------- stages


def stage_profile(case: BenchCase, paths: Sequence[Path], work: Path, *, batch_size: int,
                  seed: int = 0) -> dict[str, float]:
    """Single-thread milliseconds per image of each stage of extract, timed one by one.

    Stages: read the file, its sha256, Pillow header (size, EXIF), ``tf.io.decode_image``,
    ``tf.image.resize`` + copy (without TensorFlow: Pillow's decode and the NumPy
    resize), the whole ``load_image`` (their sum plus call overhead),
    ``np.stack``, ``preprocess``, forward (``predict_on_batch``, all cores) and the HDF5
    append of the real features. What a stage costs here it costs in every pipeline
    that does the same work; whether it limits throughput depends on what overlaps it.
    """
    from PIL import Image

    from pipeline.bases import preprocess
    from pipeline.cache import CacheWriter
    from pipeline.images import load_image, resize_bilinear

    if has_tensorflow():
        import tensorflow as tf

        def decode(data: bytes) -> np.ndarray:
            return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()

        def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            return np.array(tf.image.resize(pixels, size), dtype=np.float32)
    else:
        def decode(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))

        resize = resize_bilinear

    fm = build_case_model(case, seed)
    size = fm.input_size
    totals = dict.fromkeys(("read", "sha256", "header", "decode", "resize", "load_image",
                            "stack", "preprocess", "forward", "write"), 0.0)
    load_image(paths[0], size)  # warm up the TF ops
    images = []
    for path in paths:
        t, data = _timed(path.read_bytes)
        totals["read"] += t
        totals["sha256"] += _timed(lambda d=data: hashlib.sha256(d).hexdigest())[0]
        totals["header"] += _timed(lambda d=data: Image.open(io.BytesIO(d)).getexif())[0]
        t, pixels = _timed(lambda d=data: decode(d))
        totals["decode"] += t
        totals["resize"] += _timed(lambda p=pixels: resize(p, size))[0]
        t, image = _timed(lambda p=path: load_image(p, size))
        totals["load_image"] += t
        images.append(image)
    writer = CacheWriter.create(_fresh(work / "stages.h5"), attrs={"class_names": list(CLASSES)},
                                feature_shape=fm.feature_shape, dtype="float32")
    first = fm.model.predict_on_batch(preprocess(np.stack(images[:batch_size]), fm.preprocess))
    try:
        # An untimed first commit: creating the first chunk is a one-off cost.
        writer.append(np.asarray(first, np.float32), [0] * len(first),
                      [f"warm{j}.jpg" for j in range(len(first))], [""] * len(first))
        for i in range(0, len(images), batch_size):
            t, x = _timed(lambda i=i: np.stack(images[i:i + batch_size]))
            totals["stack"] += t
            totals["preprocess"] += _timed(lambda x=x: preprocess(x, fm.preprocess))[0]
            t, features = _timed(lambda x=x: fm.model.predict_on_batch(x))
            totals["forward"] += t
            k = len(x)
            totals["write"] += _timed(lambda f=features, k=k, i=i: writer.append(
                np.asarray(f, np.float32), [0] * k, [f"{j}.jpg" for j in range(i, i + k)],
                [""] * k))[0]
    finally:
        writer.close()
    return {stage: 1000.0 * t / len(paths) for stage, t in totals.items()}


# ---------------------------------------------------------------------------- training


def _epoch_timer() -> Any:
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall seconds of every epoch (the first includes tracing; use the second)."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _head_model(feature_shape: tuple[int, ...], batch_size: int, seed: int) -> Any:
    """DenseHead's own compiled Keras model (Chollet's head, Adam, two classes)."""
    import keras

    from pipeline.heads import DenseHead

    keras.utils.set_random_seed(seed)
    # _build is DenseHead's model factory; fit() adds early stopping we do not want here.
    return DenseHead(batch_size=batch_size, random_state=seed)._build(feature_shape, 2)


def head_epoch_seconds(features: np.ndarray, labels: np.ndarray, *, batch_size: int,
                       repeats: int = 1, seed: int = 0,
                       keras_defaults: bool = False) -> list[float]:
    """Seconds of epochs 2 .. repeats+1 of the dense head on cached features.

    The first epoch (graph tracing) is left out. ``keras_defaults``: the baseline, the same
    model compiled and fitted with Keras' defaults instead of DenseHead's speed settings.
    """
    import keras

    model = _head_model(tuple(features.shape[1:]), batch_size, seed)
    # As DenseHead.fit passes it (one data iterator per epoch).
    fit_kwargs = {"steps_per_epoch": -(-len(features) // batch_size)}
    if keras_defaults:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                      metrics=["accuracy"])
        fit_kwargs = {}
    timer = _epoch_timer()
    model.fit(features, labels.astype(np.float32), epochs=1 + repeats, batch_size=batch_size,
              callbacks=[timer], verbose=0, **fit_kwargs)
    return timer.seconds[1:]


def _end_to_end_epochs(feature_model: Any, data: tuple[Any, ...], fit_kwargs: dict[str, Any], *,
                       batch_size: int, repeats: int, seed: int) -> list[float]:
    """Seconds of epochs 2 .. repeats+1 of frozen base + ``_head_model`` fitted on ``data``
    (epoch 1 holds graph tracing); preprocessing runs as layers inside the model."""
    import keras

    from pipeline.combine import end_to_end_model

    head = _head_model(feature_model.feature_shape, batch_size, seed)
    model = end_to_end_model(feature_model, head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=["accuracy"])
    timer = _epoch_timer()
    model.fit(*data, epochs=1 + repeats, callbacks=[timer], verbose=0, **fit_kwargs)
    return timer.seconds[1:]


def end_to_end_epoch_seconds(feature_model: Any, images: np.ndarray, labels: np.ndarray, *,
                             batch_size: int, repeats: int = 1, seed: int = 0) -> list[float]:
    """Seconds of epochs 2 .. repeats+1 of frozen base + the same head on decoded images.

    Images are already decoded and resized in memory (the end-to-end side pays no
    decoding).
    """
    return _end_to_end_epochs(feature_model, (images, labels.astype(np.float32)),
                              {"batch_size": batch_size}, batch_size=batch_size,
                              repeats=repeats, seed=seed)


def end_to_end_folder_epoch_seconds(feature_model: Any, data_dir: Path, *, batch_size: int,
                                    repeats: int = 1, seed: int = 0) -> list[float]:
    """Seconds of epochs 2 .. repeats+1 of frozen base + the same head trained the Keras
    guide's way: ``image_dataset_from_directory`` reads and decodes the images every epoch.
    """
    import keras

    with _quiet():
        ds = keras.utils.image_dataset_from_directory(
            data_dir, label_mode="binary", shuffle=True, seed=seed,
            image_size=feature_model.input_size, batch_size=batch_size)
    # The dataset reshuffles itself every epoch; fit's own shuffle does not apply to it.
    return _end_to_end_epochs(feature_model, (ds,), {"shuffle": False}, batch_size=batch_size,
                              repeats=repeats, seed=seed)


def measure_training(case: BenchCase, paths: Sequence[Path], labels: np.ndarray, *,
                     repeats: int, batch_size: int, workers: int, seed: int,
                     data_dir: Path | None = None) -> dict[str, Any]:
    """Dense head epoch on the cache vs frozen base + head epoch on the images: held
    decoded in memory, and (with TensorFlow and ``data_dir``) read from the folder."""
    fm = build_case_model(case, seed)
    images = decode_all(paths, fm.input_size, batch_size=batch_size, workers=workers)
    features = np.concatenate([fm.features(images[i:i + batch_size].copy())
                               for i in range(0, len(images), batch_size)])
    head = head_epoch_seconds(features, labels, batch_size=batch_size, repeats=repeats, seed=seed)
    e2e = end_to_end_epoch_seconds(fm, images, labels, batch_size=batch_size, repeats=repeats,
                                   seed=seed)
    h, e = _summary(head, len(paths)), _summary(e2e, len(paths))
    out = {"case": case.name, "n_images": len(paths), "head_epoch": h, "end_to_end_epoch": e,
           "ratio": h["median_s"] / e["median_s"]}
    if data_dir is not None and has_tensorflow():
        folder = _summary(end_to_end_folder_epoch_seconds(
            fm, data_dir, batch_size=batch_size, repeats=repeats, seed=seed), len(paths))
        out.update(end_to_end_folder_epoch=folder,
                   ratio_folder=h["median_s"] / folder["median_s"])
    return out


def measure_head_rows(rows: Sequence[int], *, dims: int, batch_size: int, repeats: int,
                      seed: int) -> list[dict[str, Any]]:
    """Dense head epoch seconds on synthetic ``rows x dims`` features: how Keras' fixed
    cost per epoch and per step share the time as the cache grows, side by side with the
    same head under Keras' default fit settings (the baseline)."""
    out = []
    rng = np.random.default_rng(seed)
    for n in rows:
        features = rng.standard_normal((n, dims), dtype=np.float32)
        labels = (rng.random(n) < 0.5).astype(np.int64)
        runs = {name: head_epoch_seconds(features, labels, batch_size=batch_size,
                                         repeats=repeats, seed=seed, keras_defaults=defaults)
                for name, defaults in (("keras_defaults", True), ("dense_head", False))}
        steps = -(-n // batch_size)
        ours, baseline = (statistics.median(runs[k]) for k in ("dense_head", "keras_defaults"))
        out.append({"rows": n, "dims": dims, "steps": steps, **_summary(runs["dense_head"], n),
                    "keras_defaults": _summary(runs["keras_defaults"], n),
                    "ms_per_step": 1000 * ours / steps, "speedup": baseline / ours})
    return out


def measure_append_copy(work: Path, rows: Sequence[int], *, repeats: int,
                        seed: int) -> list[dict[str, Any]]:
    """The copy a run that adds images starts from: ``CacheWriter.copy_of`` (a byte copy of
    the complete cache) side by side with the row-by-row copy it replaced (``copy_selected``, which
    still rewrites partial caches), interleaved, on synthetic VGG16-like caches."""
    import h5py

    from pipeline.cache import CacheWriter, decode_attrs, partial_path
    from pipeline.cache.writer import copy_selected

    def row_copy(path: Path) -> CacheWriter:
        with h5py.File(path, "r") as f:
            attrs = decode_attrs(f.attrs)
            n, m = int(attrs.get("n_rows", 0)), int(attrs.get("n_skipped", 0))
            return copy_selected(f, attrs, path, np.arange(n), np.arange(m))

    out = []
    for n in rows:
        path = write_synthetic_cache(work / f"append-{n}.h5", n, seed=seed)
        runs: dict[str, list[float]] = {"byte_copy": [], "row_copy": []}
        for _ in range(repeats):
            for name, start in (("byte_copy", CacheWriter.copy_of), ("row_copy", row_copy)):
                runs[name].append(_timed(lambda s=start, p=path: s(p).close())[0])
                partial_path(path).unlink()
        med = {k: statistics.median(v) for k, v in runs.items()}
        out.append({"rows": n, "mb": path.stat().st_size / 1e6,
                    **{k: _summary(v) for k, v in runs.items()},
                    "speedup": med["row_copy"] / med["byte_copy"]})
        path.unlink()
    return out


def sklearn_fit_seconds(head: str, rows: int, dims: int, *, seed: int = 0) -> float:
    """Fit seconds of a scikit-learn head on synthetic two-class data (rows x dims)."""
    from sklearn.datasets import make_classification

    from pipeline.heads import make_head

    X, y = make_classification(n_samples=rows, n_features=dims, n_informative=min(32, dims),
                               n_redundant=0, class_sep=1.0, random_state=seed)
    estimator = make_head(head, random_state=seed)
    return _timed(lambda: estimator.fit(X.astype(np.float32), y))[0]


def measure_sklearn(sizes: BenchSizes, *, repeats: int, seed: int) -> list[dict[str, Any]]:
    """Fit seconds of logreg, linear-svm and svm over the rows x dims grid."""
    out = []
    for rows in sizes.sklearn_rows:
        for dims in sizes.sklearn_dims:
            for head in ("logreg", "linear-svm", "svm"):
                # The largest fits take minutes: one run is enough to read their order.
                reps = 1 if rows * dims > 4_000_000 else repeats
                runs = [sklearn_fit_seconds(head, rows, dims, seed=seed) for _ in range(reps)]
                out.append({"head": head, "rows": rows, "dims": dims, **_summary(runs)})
    return out


# ---------------------------------------------------------------------------- incremental


def cli_extract_seconds(config: Any) -> float:
    """Wall seconds of ``python scripts/extract.py`` for ``config`` (process start-up in)."""
    args = [sys.executable, str(REPO_ROOT / "scripts" / "extract.py"), config.data_dir,
            "--base", config.base, "--weights", "none", "--input-size", config.input_size,
            "--pooling", config.pooling, "--batch-size", str(config.batch_size),
            "--out", config.out, "--seed", str(config.seed), "--log-every", "3600"]
    if config.layer:
        args += ["--layer", config.layer]
    if config.mixed_precision:
        args += ["--mixed-precision"]
    args += ["--jit", config.jit]
    seconds, proc = _timed(lambda: subprocess.run(args, cwd=REPO_ROOT, capture_output=True,
                                                  text=True, check=False))
    if proc.returncode != 0:
        raise RuntimeError(f"extract.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def measure_incremental(case: BenchCase, folder: Path, work: Path, n: int, *, repeats: int,
                        batch_size: int, seed: int) -> dict[str, Any]:
    """Full extraction, a re-run on unchanged data, and a run after adding 10% images.

    In-process (run_extract, building its own model each time, as a user's run does) and
    as ``scripts/extract.py`` subprocesses (start-up and imports included).
    """
    from pipeline.extract import run_extract

    make_images(folder, n, seed=seed)
    extra = max(1, n // 10)
    new = [folder / CLASSES[i % 2] / f"img_{i:05d}.jpg" for i in range(n, n + extra)]
    _remove_images(new)
    config = extract_config(case, folder, work / "incr.h5", batch_size=batch_size, seed=seed)
    runs: dict[str, list[float]] = {k: [] for k in ("full", "rerun", "add10", "cli_full",
                                                    "cli_rerun", "cli_add10")}
    for _ in range(repeats):
        _fresh(Path(config.out))
        with _quiet():
            runs["full"].append(_timed(lambda: run_extract(config))[0])
            runs["rerun"].append(_timed(lambda: run_extract(config))[0])
            make_images(folder, extra, start=n, seed=seed)
            runs["add10"].append(_timed(lambda: run_extract(config))[0])
        _remove_images(new)
        _fresh(Path(config.out))
        runs["cli_full"].append(cli_extract_seconds(config))
        runs["cli_rerun"].append(cli_extract_seconds(config))
        make_images(folder, extra, start=n, seed=seed)
        runs["cli_add10"].append(cli_extract_seconds(config))
        _remove_images(new)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cold = _timed(lambda: build_case_model(case, seed))[0]
    return {
        "case": case.name, "n_images": n, "n_added": extra,
        "runs": {k: _summary(v) for k, v in runs.items()},
        "model_build_s": cold,
        "rerun_pct": 100 * med["rerun"] / med["full"],
        "add10_pct": 100 * med["add10"] / med["full"],
        "cli_rerun_pct": 100 * med["cli_rerun"] / med["cli_full"],
        "cli_add10_pct": 100 * med["cli_add10"] / med["cli_full"],
    }


# ---------------------------------------------------------------------------- stream RSS

_RSS_SCRIPT = """
import json, re, resource, sys, time

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\\s+(\\d+) kB", text).group(1))

cfg = json.loads(sys.argv[1])
from pipeline.fit import FitConfig, run_fit
after_imports = status("VmRSS")
start = time.perf_counter()
if cfg:
    run_fit(FitConfig(**cfg))
print("BENCH", json.dumps({"vmhwm_kb": status("VmHWM"), "after_imports_kb": after_imports,
                           "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           "seconds": time.perf_counter() - start}))
"""


def write_synthetic_cache(path: Path, rows: int, *, feature_shape: tuple[int, ...] = (7, 7, 512),
                          seed: int = 0, chunk: int = 256) -> Path:
    """A complete cache of unpooled VGG16-like maps (float32), two separable classes."""
    from pipeline.cache import CacheWriter

    rng = np.random.default_rng(seed)
    writer = CacheWriter.create(_fresh(path), attrs={"class_names": ["a", "b"],
                                                     "base": "synthetic"},
                                feature_shape=feature_shape, dtype="float32")
    try:
        for start in range(0, rows, chunk):
            labels = np.arange(start, min(rows, start + chunk)) % 2
            x = rng.standard_normal((len(labels), *feature_shape), dtype=np.float32)
            x[..., :16] += labels.reshape(-1, *([1] * len(feature_shape))).astype(np.float32)
            writer.append(x, labels.tolist(), [f"r{i:07d}.jpg" for i in range(start,
                          start + len(labels))], [""] * len(labels))
        return writer.finish()
    finally:
        writer.close()


def fit_rss(cache: Path | None, out: Path, *, head: str = "dense", stream: bool = True,
            epochs: int = 2, batch_size: int = 32) -> dict[str, Any]:
    """Peak RSS (MB) and seconds of one ``run_fit`` in a fresh subprocess.

    ``cache=None`` measures the baseline: the same imports, no fit. Linux carries a
    parent's high-water mark into its forked child's ``ru_maxrss`` at exec, so the fit
    runs as a grandchild forked by a small ``sh``: its ``ru_maxrss`` is then its own
    (the report also keeps ``VmHWM``, which agrees).
    """
    cfg: dict[str, Any] = {}
    if cache is not None:
        cfg = {"cache": str(cache), "head": head, "stream": stream, "epochs": epochs,
               "batch_size": batch_size, "out": str(out)}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # "; exit" keeps sh from exec'ing python in its own (inherited) process.
    args = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", _RSS_SCRIPT,
            json.dumps(cfg)]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"fit subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    r = json.loads(line.removeprefix("BENCH "))
    return {"peak_rss_mb": r["ru_maxrss_kb"] / 1024, "vmhwm_mb": r["vmhwm_kb"] / 1024,
            "after_imports_mb": r["after_imports_kb"] / 1024, "seconds": r["seconds"]}


def measure_stream_rss(sizes: BenchSizes, work: Path, *, seed: int) -> dict[str, Any]:
    """Peak RSS of fit_head (stream and in-memory) on caches of 1x, 4x, 16x rows."""
    baseline = fit_rss(None, work)
    runs = []
    for rows in sizes.stream_rows:
        cache = write_synthetic_cache(work / f"synthetic-{rows}.h5", rows, seed=seed)
        size_mb = cache.stat().st_size / 1e6
        for head, stream in sizes.stream_runs:
            result = fit_rss(cache, work / f"fit-{rows}-{head}-{stream}", head=head,
                             stream=stream)
            runs.append({"rows": rows, "cache_mb": size_mb, "head": head, "stream": stream,
                         **result, "above_baseline_mb": result["peak_rss_mb"]
                         - baseline["peak_rss_mb"]})
        cache.unlink()
    return {"baseline": baseline, "runs": runs}


# ---------------------------------------------------------------------------- storage


def measure_storage(case: BenchCase, data_dir: Path, work: Path, n: int, *, repeats: int,
                    batch_size: int, workers: int, seed: int) -> list[dict[str, Any]]:
    """File size and extraction speed for float32/float16 and none/lzf/gzip.

    Run on the case's pooling and on its unpooled map (``pooling=none``), where the
    volume is large enough for the choice to matter.
    """
    out = []
    for pooling in (case.pooling, "none"):
        fm = build_case_model(case, seed, pooling=pooling)
        fm.model.predict_on_batch(np.zeros((batch_size, case.size, case.size, 3), np.float32))
        for dtype, compression in (("float32", "none"), ("float16", "none"),
                                   ("float32", "lzf"), ("float32", "gzip"),
                                   ("float16", "gzip")):
            seconds, size_mb = [], 0.0
            for _ in range(repeats):
                config = extract_config(case, data_dir, work / "storage.h5", pooling=pooling,
                                        batch_size=batch_size, workers=workers, seed=seed,
                                        dtype=dtype, compression=compression)
                t, result = extract_seconds(config, fm)
                seconds.append(t)
                size_mb = result.path.stat().st_size / 1e6
            out.append({"pooling": pooling, "feature_shape": list(fm.feature_shape),
                        "dtype": dtype, "compression": compression, "file_mb": size_mb,
                        **_summary(seconds, n)})
    return out


# ---------------------------------------------------------------------------- protocol


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, versions: what the figures were measured on."""
    import h5py
    import keras
    import sklearn

    tf_version, gpus = "absent", []
    if has_tensorflow():
        import tensorflow as tf

        tf_version = tf.__version__
        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    if keras.backend.backend() == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform != "cpu"]
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model, "nproc": os.cpu_count(), "memory_gib": round(mem_gb, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "tensorflow": tf_version, "keras": keras.__version__,
        "backend": keras.backend.backend(), "h5py": h5py.__version__,
        "sklearn": sklearn.__version__, "numpy": np.__version__,
        "gpus": gpus,
        "loadavg_start": os.getloadavg(),
        # The pipeline changes under active development: which code was measured.
        "code_sha256": {name: _code_sha256(REPO_ROOT / "pipeline" / name) for name in
                        ("extract.py", "images.py", "cache", "bases.py", "heads/stream.py",
                         "fit.py")},
    }


def _code_sha256(path: Path) -> str:
    """Short sha256 of a module, or of a package's modules in name order; for a module that
    became a package (``extract.py`` -> ``extract/``), of that package."""
    if not path.exists() and path.suffix == ".py" and path.with_suffix("").is_dir():
        path = path.with_suffix("")
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement and return the raw numbers (what the JSON report holds).

    Protocol: make (or reuse) ``config.images`` JPEGs under ``<data>/images-N``; then, per
    case, time a .. e interleaved, ``repeats`` times, on one shared warm feature model
    (medians reported; b/a, b/c, b/min(a, e)); time each stage of extract single-threaded
    on a subset; compare one epoch of the dense head on cached features with one epoch
    of frozen base + head on decoded images (2nd epoch, so compile and tracing are out);
    time the scikit-learn heads over a rows x dims grid; time a full extraction, a
    re-run on unchanged data and a run after adding 10% images, in-process and as CLI
    subprocesses; measure fit_head's peak RSS on 1x/4x/16x caches in subprocesses; and
    measure file size and speed per dtype and compression.
    """
    _MODEL_OPTIONS.update(mixed_precision=config.mixed_precision, jit=config.jit)
    data = Path(config.data)
    # One folder per image count: a, b, c, d and e must all see exactly these images.
    images_dir, work = data / f"images-{config.images}", data / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sizes = bench_sizes(config.quick)
    kw = {"batch_size": config.batch_size, "seed": config.seed}
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config), "machine": machine_info(), "targets": TARGETS,
    }
    paths = make_images(images_dir, config.images, seed=config.seed)
    paths = sorted(paths, key=lambda p: (p.parent.name, p.name))  # extract's order
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    cases = [c for c in CASES if c.name in config.cases]
    sections = set(config.parts)

    def part(name: str, fn: Callable[[], Any]) -> None:
        if name in sections:
            log(f"bench: {name} ...")
            seconds, results[name] = _timed(fn)
            log(f"bench: {name} done in {seconds:.0f} s")

    part("throughput", lambda: [
        measure_throughput(c, images_dir, work, paths, repeats=config.repeats,
                           workers=config.workers, **kw) for c in cases])
    part("decoders", lambda: measure_decoders(
        paths, sorted({c.size for c in cases}), repeats=config.repeats,
        batch_size=config.batch_size, workers=config.workers))
    part("stages", lambda: {
        c.name: stage_profile(c, paths[:sizes.stage_images], work, **kw) for c in cases})
    part("training", lambda: [
        measure_training(c, paths, labels, repeats=config.repeats, workers=config.workers,
                         data_dir=images_dir, **kw) for c in cases if not c.input_bound])
    part("head_rows", lambda: measure_head_rows(
        sizes.head_rows, dims=1280, batch_size=config.batch_size, repeats=config.repeats,
        seed=config.seed))
    part("sklearn", lambda: measure_sklearn(sizes, repeats=config.repeats, seed=config.seed))
    part("incremental", lambda: measure_incremental(
        cases[0], data / f"incremental-{config.images}", work, config.images,
        repeats=config.repeats, **kw))
    part("append_copy", lambda: measure_append_copy(work, sizes.append_rows,
                                                    repeats=config.repeats, seed=config.seed))
    part("stream", lambda: measure_stream_rss(sizes, work, seed=config.seed))
    storage_case = next((c for c in cases if c.input_bound), cases[-1])
    part("storage", lambda: {"case": storage_case.name, "runs": measure_storage(
        storage_case, images_dir, work, len(paths), repeats=config.repeats,
        workers=config.workers, **kw)})
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["machine"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(work, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------- report


def _met(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def format_report(results: dict[str, Any]) -> str:
    """The tables ``scripts/bench.py`` prints (every number is also in the JSON)."""
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['nproc']} cores, {m['memory_gib']} GiB, GPUs "
             f"{m['gpus'] or 'none'}, TF {m['tensorflow']} / Keras {m['keras']} "
             f"({m['backend']}), load {m['loadavg_start'][0]:.2f}"
             f" -> {m.get('loadavg_end', (0,))[0]:.2f}"]
    names = {"a": "a forward (predict)", "a_on_batch": "a' forward (predict_on_batch)",
             "b": "b run_extract", "b_loop": "b run_extract (loop only)",
             "b_1_worker": "b run_extract, 1 decode thread",
             "c": "c keras dataset", "d": "d naive PIL loop", "e": "e input side only"}
    for t in results.get("throughput", []):
        lines.append(f"\n{t['case']['name']}: {t['n_images']} images, features "
                     f"{tuple(t['feature_shape'])}")
        for key, label in names.items():
            if key not in t["methods"]:
                continue
            s = t["methods"][key]
            lines.append(f"  {label:32s} {s['img_s']:8.1f} img/s  ({s['median_s']:.2f} s)")
        for key, value in t["ratios"].items():
            target = TARGETS.get(key)
            verdict = f"  target >= {target}: {_met(value, target)}" if target else ""
            lines.append(f"  {key:32s} {value:8.3f}{verdict}")
    if "decoders" in results:
        lines.append("\ndecoded_batches alone (pool start included), img/s:")
        for r in results["decoders"]:
            lines.append(f"  {r['size']:4d} px  threads {r['threads']['img_s']:7.1f}  processes "
                         f"{r['processes']['img_s']:7.1f}  processes/threads "
                         f"{r['processes/threads']:.2f}")
    if "stages" in results:
        lines.append("\nstages, single-thread ms per image:")
        keys = list(next(iter(results["stages"].values())))
        lines.append(f"  {'case':36s}" + "".join(f"{k:>11s}" for k in keys))
        for case, st in results["stages"].items():
            lines.append(f"  {case:36s}" + "".join(f"{st[k]:11.2f}" for k in keys))
    for t in results.get("training", []):
        lines.append(
            f"\ntraining {t['case']} ({t['n_images']} images): head epoch "
            f"{t['head_epoch']['median_s']:.3f} s, base+head epoch "
            f"{t['end_to_end_epoch']['median_s']:.2f} s, ratio 1/{1 / t['ratio']:.0f} "
            f"(target <= 1/100: {_met(t['ratio'], 0.01, False)})")
        if "end_to_end_folder_epoch" in t:
            lines.append(
                f"  base+head epoch read from the folder (image_dataset_from_directory) "
                f"{t['end_to_end_folder_epoch']['median_s']:.2f} s, ratio "
                f"1/{1 / t['ratio_folder']:.0f}")
    if "head_rows" in results:
        lines.append("\ndense head epoch on synthetic rows:")
        for r in results["head_rows"]:
            lines.append(f"  {r['rows']:6d} x {r['dims']}  {r['median_s']:7.3f} s  "
                         f"{r['ms_per_step']:5.2f} ms/step  (Keras defaults "
                         f"{r['keras_defaults']['median_s']:.3f} s: x{r['speedup']:.2f})")
    if "append_copy" in results:
        lines.append("\nstarting an append (copy of the complete cache, fsync included):")
        for r in results["append_copy"]:
            lines.append(f"  {r['rows']:6d} rows, {r['mb']:7.1f} MB  byte copy "
                         f"{r['byte_copy']['median_s']:6.2f} s  row copy "
                         f"{r['row_copy']['median_s']:6.2f} s  x{r['speedup']:.1f}")
    if "sklearn" in results:
        lines.append("\nscikit-learn heads, fit seconds (rows x dims):")
        for r in results["sklearn"]:
            lines.append(f"  {r['head']:11s} {r['rows']:6d} x {r['dims']:5d}  "
                         f"{r['median_s']:8.2f} s")
    if "incremental" in results:
        inc = results["incremental"]
        r = {k: v["median_s"] for k, v in inc["runs"].items()}
        lines.append(
            f"\nincremental ({inc['case']}, {inc['n_images']} images, +{inc['n_added']}):\n"
            f"  in-process: full {r['full']:.2f} s, re-run {r['rerun']:.3f} s "
            f"({inc['rerun_pct']:.2f}%, target <= 2%: {_met(inc['rerun_pct'], 2, False)}), "
            f"+10% {r['add10']:.2f} s ({inc['add10_pct']:.1f}%, target ~10%)\n"
            f"  CLI: full {r['cli_full']:.2f} s, re-run {r['cli_rerun']:.2f} s "
            f"({inc['cli_rerun_pct']:.1f}%), +10% {r['cli_add10']:.2f} s "
            f"({inc['cli_add10_pct']:.1f}%); model build {inc['model_build_s']:.2f} s")
    if "stream" in results:
        s = results["stream"]
        lines.append(f"\nfit_head peak RSS (baseline imports only: "
                     f"{s['baseline']['peak_rss_mb']:.0f} MB):")
        for r in s["runs"]:
            mode = "stream" if r["stream"] else "memory"
            lines.append(f"  {r['head']:7s} {mode:7s} {r['rows']:5d} rows {r['cache_mb']:7.0f} MB"
                         f" cache  peak {r['peak_rss_mb']:7.0f} MB "
                         f"(+{r['above_baseline_mb']:.0f})  {r['seconds']:.1f} s")
    if "storage" in results:
        lines.append(f"\nstorage ({results['storage']['case']}):")
        for r in results["storage"]["runs"]:
            lines.append(f"  {r['pooling']:7s} {r['dtype']:8s} {r['compression']:5s} "
                         f"{r['file_mb']:8.2f} MB  {r['img_s']:7.1f} img/s")
    return "\n".join(lines)
