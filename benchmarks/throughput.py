"""Images to features: how fast extract turns a folder into a cache, and against what.

a .. e of :func:`benchmarks.bench.run_benchmark` on one shared feature model (b gets it by
patching ``pipeline.extract.engine.build_feature_model``), the decoders, a single-threaded
profile of extract's stages, the storage formats, and re-runs after a folder changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.common import (
    CLASSES,
    REPO_ROOT,
    BenchCase,
    fresh,
    make_images,
    quiet,
    remove_images,
    summary,
    timed,
)
from pipeline.images import has_tensorflow

# --mixed-precision / --jit / --fold-batchnorm of this run (set by run_benchmark), used for
# every model built.
MODEL_OPTIONS: dict[str, Any] = {"mixed_precision": False, "jit": "auto",
                                 "fold_batchnorm": "on"}


def build_case_model(case: BenchCase, seed: int = 0, pooling: str | None = None, *,
                     plain: bool = False) -> Any:
    """The case's FeatureModel as extract builds it: random (seeded) weights, cut and
    pooled. ``plain``: BatchNormalization left as it is, as a Keras user's model runs."""
    from pipeline.bases import build_feature_model

    precision = "mixed_float16" if MODEL_OPTIONS["mixed_precision"] else "float32"
    return build_feature_model(case.base, weights="none", input_size=(case.size, case.size),
                               layer=case.layer, pooling=pooling or case.pooling, seed=seed,
                               precision=precision, jit=MODEL_OPTIONS["jit"],
                               fold_batchnorm=MODEL_OPTIONS["fold_batchnorm"] == "on"
                               and not plain)


def module_preprocess_input(case: BenchCase) -> Callable[..., Any]:
    """The application module's own ``preprocess_input`` (what a Keras user calls)."""
    import keras

    from pipeline.bases import resolve_base

    return getattr(keras.applications, resolve_base(case.base).module).preprocess_input


def decode_all(paths: Sequence[Path], size: tuple[int, int], *, batch_size: int = 32,
               workers: int = 0) -> np.ndarray:
    """All images decoded and resized as extract does: (N, H, W, 3) float32 in 0..255."""
    from pipeline.images.batches import decoded_batches

    # Copies: a batch's buffer is refilled once the next batch is asked for.
    batches = [b.images.copy() for b in decoded_batches(paths, size=size,
                                                        batch_size=batch_size, workers=workers)]
    return np.concatenate(batches)


def measure_decoders(paths: Sequence[Path], sizes: Sequence[int], *, repeats: int,
                     batch_size: int, workers: int) -> list[dict[str, Any]]:
    """``decoded_batches`` alone, decode threads vs worker processes, interleaved.

    Each run includes starting its pool (spawned processes pay their imports), as every
    extract run does. The figure behind ``--decode auto``'s choice.
    """
    from pipeline.images.batches import decoded_batches

    out = []
    for side in sizes:
        seconds: dict[str, list[float]] = {"threads": [], "processes": []}
        for _ in range(repeats):
            for decode, runs in seconds.items():
                batches = decoded_batches(paths, size=(side, side), batch_size=batch_size,
                                          workers=workers, decode=decode)
                runs.append(timed(lambda b=batches: sum(len(x.indices) for x in b))[0])
        stats = {d: summary(runs, len(paths)) for d, runs in seconds.items()}
        out.append({"size": side, **stats,
                    "processes/threads": stats["processes"]["img_s"] / stats["threads"]["img_s"]})
    return out


def forward_seconds(model: Any, x: np.ndarray, batch_size: int) -> float:
    """(a) ``model.predict`` over preprocessed arrays in memory (warm model)."""
    seconds, _ = timed(lambda: model.predict(x, batch_size=batch_size, verbose=0))
    return seconds


def forward_on_batch_seconds(model: Any, x: np.ndarray, batch_size: int) -> float:
    """(a') ``predict_on_batch`` per batch, as extract calls it (warm model)."""

    def run() -> None:
        for i in range(0, len(x), batch_size):
            model.predict_on_batch(x[i:i + batch_size])

    return timed(run)[0]


def extract_config(case: BenchCase, data_dir: Path, out: Path, *, batch_size: int,
                   workers: int = 0, seed: int = 0, **options: Any) -> Any:
    """The ExtractConfig of ``extract.py DATA --base B --weights none ...`` for a case."""
    from pipeline.extract import ExtractConfig

    return ExtractConfig(str(data_dir), case.base, weights="none", input_size=str(case.size),
                         layer=case.layer, pooling=options.pop("pooling", case.pooling),
                         batch_size=batch_size, out=str(out), seed=seed, workers=workers,
                         log_every=3600.0, **MODEL_OPTIONS, **options)


def extract_seconds(config: Any, feature_model: Any | None = None) -> tuple[float, Any]:
    """(b) ``run_extract`` into a fresh file; wall seconds and the ExtractResult.

    With ``feature_model``, run_extract uses that (already built, warm) model instead of
    building its own, so a, b, c and d run the very same model object.
    """
    from pipeline.extract import run_extract

    fresh(Path(config.out))
    patch = (mock.patch("pipeline.extract.engine.build_feature_model", return_value=feature_model)
             if feature_model is not None else contextlib.nullcontext())
    with patch, quiet():
        return timed(lambda: run_extract(config))


def keras_peer_dataset(data_dir: Path, case: BenchCase, batch_size: int) -> Any:
    """The Keras guide's pipeline: ``image_dataset_from_directory`` + ``preprocess_input``."""
    import keras

    preprocess_input = module_preprocess_input(case)
    with quiet():
        ds = keras.utils.image_dataset_from_directory(
            data_dir, shuffle=False, image_size=(case.size, case.size), batch_size=batch_size)
    return ds.map(lambda x, y: (preprocess_input(x), y))


def keras_peer_seconds(data_dir: Path, case: BenchCase, model: Any, out: Path,
                       batch_size: int) -> float:
    """(c) dataset -> ``model.predict`` -> ``np.save``, timed from building the dataset."""

    def run() -> None:
        features = model.predict(keras_peer_dataset(data_dir, case, batch_size), verbose=0)
        np.save(out, features)

    return timed(run)[0]


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

    return timed(run)[0]


def input_side_seconds(paths: Sequence[Path], root: Path, feature_model: Any, out: Path, *,
                       batch_size: int, workers: int = 0, dtype: str = "float32") -> float:
    """(e) decode + resize + preprocess + HDF5 append of zero features; no forward pass.

    The zeros have the feature model's shape and dtype, and every column extract writes
    (sha256, size, mtime) is written too, so as many bytes are written as in (b).
    """
    from pipeline.cache import CacheWriter
    from pipeline.images.batches import decoded_batches

    names = [p.relative_to(root).as_posix() for p in paths]
    shape = feature_model.feature_shape

    def run() -> None:
        stats = [os.stat(p) for p in paths]
        writer = CacheWriter.create(fresh(out), attrs={"class_names": list(CLASSES)},
                                    feature_shape=shape, dtype=dtype)
        zeros = np.zeros((batch_size, *shape), dtype=dtype)
        try:
            # Preprocessed by the decoders, as extract has them do.
            for batch in decoded_batches(paths, size=feature_model.input_size,
                                         batch_size=batch_size, workers=workers,
                                         preprocess=feature_model.preprocess):
                rows = batch.indices
                writer.append(zeros[:len(rows)], [0] * len(rows), [names[i] for i in rows],
                              [""] * len(rows), sha256=getattr(batch, "digests", None),
                              size=[stats[i].st_size for i in rows],
                              mtime_ns=[stats[i].st_mtime_ns for i in rows])
            writer.finish()
        finally:
            writer.close()

    return timed(run)[0]


def shared_cpu_bound(forward_img_s: float, input_img_s: float) -> float:
    """img/s when forward and input side each need all cores: 1 / (1/a + 1/e).

    On a CPU-only box both stages draw on the same cores, so overlapping them cannot
    beat this (min(a, e) is reachable only when the forward pass runs elsewhere, on a GPU).
    """
    return 1.0 / (1.0 / forward_img_s + 1.0 / input_img_s)


def throughput_ratios(img_s: dict[str, float], input_bound: bool) -> dict[str, float]:
    """b/a, b/c (and b/min(a, e) for an input-bound case, or whenever the forward pass runs
    on a GPU: ``input_bound=True``) from img/s per method, plus b against the shared-CPU
    bound 1/(1/a' + 1/e) with the faster forward entry point a'."""
    ratios = {"b/a": img_s["b"] / img_s["a"]}
    if "d" in img_s:  # the naive loop is left out on the GPU box (minutes per run)
        ratios["b/d"] = img_s["b"] / img_s["d"]
    if "c" in img_s:  # no Keras peer without TensorFlow
        ratios["b/c"] = img_s["b"] / img_s["c"]
    fastest = max(img_s["a"], img_s["a_on_batch"])
    ratios["b/max(a,a')"] = img_s["b"] / fastest
    if "a_on_batch_plain" in img_s:  # what folding BatchNormalization gives the forward pass
        ratios["a'/a' plain"] = img_s["a_on_batch"] / img_s["a_on_batch_plain"]
    if input_bound:
        ratios["b/min(a,e)"] = img_s["b"] / min(img_s["a"], img_s["e"])
        ratios["b/min(max(a,a'),e)"] = img_s["b"] / min(fastest, img_s["e"])
    ratios["b/shared_cpu_bound"] = img_s["b"] / shared_cpu_bound(fastest, img_s["e"])
    return ratios


def measure_throughput(case: BenchCase, data_dir: Path, work: Path, paths: Sequence[Path], *,
                       repeats: int, batch_size: int, workers: int, seed: int,
                       gpu: bool = False) -> dict[str, Any]:
    """a .. e for one case, interleaved (a b c d e, a b c d e, ...) so drifting load hits
    all methods alike; medians of ``repeats`` runs after one untimed warm-up of each
    model entry point (tracing is a one-off cost, measured separately as ``cold_s``)."""
    from pipeline.bases import preprocess

    n = len(paths)
    build_s, fm = timed(lambda: build_case_model(case, seed))
    model = fm.model
    # The Keras user's model (c, d): the same base, cut and weights, BatchNormalization
    # not folded. Without folding it is extract's model itself.
    folded = MODEL_OPTIONS["fold_batchnorm"] == "on"
    plain = build_case_model(case, seed, plain=True).model if folded else model
    x = preprocess(decode_all(paths, fm.input_size, batch_size=batch_size, workers=workers),
                   fm.preprocess)
    trace_s, _ = timed(lambda: model.predict_on_batch(x[:batch_size]))
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)
    plain.predict_on_batch(x[:batch_size])
    import keras

    # The Keras peer reads images with tf.data and maps preprocess_input over them as TF
    # ops: under another backend (a JAX box that also has TensorFlow) that map fails.
    peer = has_tensorflow() and keras.backend.backend() == "tensorflow"
    if peer:
        plain.predict(keras_peer_dataset(data_dir, case, batch_size).take(1), verbose=0)
    skip = {"b_1_worker"} if not case.sweep_workers or gpu else set()
    skip |= {"c"} if not peer else set()
    skip |= {"d"} if gpu else set()
    skip |= {"a_on_batch_plain"} if not folded else set()
    runs: dict[str, list[float]] = {k: [] for k in ("a", "a_on_batch", "a_on_batch_plain", "b",
                                                    "b_1_worker", "c", "d", "e")
                                    if k not in skip}
    b_loop: list[float] = []
    for _ in range(repeats):
        runs["a"].append(forward_seconds(model, x, batch_size))
        runs["a_on_batch"].append(forward_on_batch_seconds(model, x, batch_size))
        if "a_on_batch_plain" in runs:
            runs["a_on_batch_plain"].append(forward_on_batch_seconds(plain, x, batch_size))
        config = extract_config(case, data_dir, work / "b.h5", batch_size=batch_size,
                                workers=workers, seed=seed)
        seconds, result = extract_seconds(config, fm)
        runs["b"].append(seconds)
        b_loop.append(result.seconds)
        if "b_1_worker" in runs:
            config.workers = 1
            runs["b_1_worker"].append(extract_seconds(config, fm)[0])
        if peer:
            runs["c"].append(keras_peer_seconds(data_dir, case, plain, work / "c.npy",
                                                batch_size))
        if "d" in runs:
            runs["d"].append(naive_seconds(paths, case, plain, work / "d.npy", batch_size))
        runs["e"].append(input_side_seconds(paths, data_dir, fm, work / "e.h5",
                                            batch_size=batch_size, workers=workers))
    methods = {k: summary(v, n) for k, v in runs.items()}
    methods["b_loop"] = summary(b_loop, n)
    img_s = {k: v["img_s"] for k, v in methods.items()}
    return {
        "case": asdict(case), "n_images": n, "feature_shape": list(fm.feature_shape),
        "cold_s": {"build": build_s, "first_batch_trace": trace_s},
        "methods": methods, "ratios": throughput_ratios(img_s, case.input_bound or gpu),
    }


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
        t, data = timed(path.read_bytes)
        totals["read"] += t
        totals["sha256"] += timed(lambda d=data: hashlib.sha256(d).hexdigest())[0]
        totals["header"] += timed(lambda d=data: Image.open(io.BytesIO(d)).getexif())[0]
        t, pixels = timed(lambda d=data: decode(d))
        totals["decode"] += t
        totals["resize"] += timed(lambda p=pixels: resize(p, size))[0]
        t, image = timed(lambda p=path: load_image(p, size))
        totals["load_image"] += t
        images.append(image)
    writer = CacheWriter.create(fresh(work / "stages.h5"), attrs={"class_names": list(CLASSES)},
                                feature_shape=fm.feature_shape, dtype="float32")
    first = fm.model.predict_on_batch(preprocess(np.stack(images[:batch_size]), fm.preprocess))
    try:
        # An untimed first commit: creating the first chunk is a one-off cost.
        writer.append(np.asarray(first, np.float32), [0] * len(first),
                      [f"warm{j}.jpg" for j in range(len(first))], [""] * len(first))
        for i in range(0, len(images), batch_size):
            t, x = timed(lambda i=i: np.stack(images[i:i + batch_size]))
            totals["stack"] += t
            totals["preprocess"] += timed(lambda x=x: preprocess(x, fm.preprocess))[0]
            t, features = timed(lambda x=x: fm.model.predict_on_batch(x))
            totals["forward"] += t
            k = len(x)
            totals["write"] += timed(lambda f=features, k=k, i=i: writer.append(
                np.asarray(f, np.float32), [0] * k, [f"{j}.jpg" for j in range(i, i + k)],
                [""] * k))[0]
    finally:
        writer.close()
    return {stage: 1000.0 * t / len(paths) for stage, t in totals.items()}


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
    seconds, proc = timed(lambda: subprocess.run(args, cwd=REPO_ROOT, capture_output=True,
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
    remove_images(new)
    config = extract_config(case, folder, work / "incr.h5", batch_size=batch_size, seed=seed)
    runs: dict[str, list[float]] = {k: [] for k in ("full", "rerun", "add10", "cli_full",
                                                    "cli_rerun", "cli_add10")}
    for _ in range(repeats):
        fresh(Path(config.out))
        with quiet():
            runs["full"].append(timed(lambda: run_extract(config))[0])
            runs["rerun"].append(timed(lambda: run_extract(config))[0])
            make_images(folder, extra, start=n, seed=seed)
            runs["add10"].append(timed(lambda: run_extract(config))[0])
        remove_images(new)
        fresh(Path(config.out))
        runs["cli_full"].append(cli_extract_seconds(config))
        runs["cli_rerun"].append(cli_extract_seconds(config))
        make_images(folder, extra, start=n, seed=seed)
        runs["cli_add10"].append(cli_extract_seconds(config))
        remove_images(new)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cold = timed(lambda: build_case_model(case, seed))[0]
    return {
        "case": case.name, "n_images": n, "n_added": extra,
        "runs": {k: summary(v) for k, v in runs.items()},
        "model_build_s": cold,
        "rerun_pct": 100 * med["rerun"] / med["full"],
        "add10_pct": 100 * med["add10"] / med["full"],
        "cli_rerun_pct": 100 * med["cli_rerun"] / med["cli_full"],
        "cli_add10_pct": 100 * med["cli_add10"] / med["cli_full"],
    }


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
                        **summary(seconds, n)})
    return out
