"""What every measurement of the benchmark shares: cases, sizes, images, timing.

The feature models measured (:data:`CASES`), the arguments of ``scripts/bench.py``
(:class:`BenchConfig`) and the problem sizes they imply, the benchmark's JPEGs (each a
function of its index alone) and synthetic caches, and the timing helpers.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    parts: tuple[str, ...] = ("throughput", "input", "decoders", "stages", "training",
                              "head_rows", "sklearn", "incremental", "append_copy", "stream",
                              "storage", "fold", "precision", "feed")
    cases: tuple[str, ...] = field(
        default_factory=lambda: tuple(c.name for c in CASES if c.default))
    mixed_precision: bool = False  # GPU box: run every base in mixed_float16
    jit: str = "auto"  # XLA for the forward pass: auto | on | off
    fold_batchnorm: str = "on"  # as extract --fold-batchnorm: on | off
    gpu: bool = False  # the GPU box's run: no naive loop, every core against one worker


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


def remove_images(paths: Sequence[Path]) -> None:
    """Delete the given images (those already gone are fine)."""
    for path in paths:
        path.unlink(missing_ok=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, value)`` of one call of ``fn``."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def timed_batches(run: Callable[[np.ndarray], Any], x: np.ndarray,
                  batch_size: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``run`` on each batch of ``x``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = usage.ru_utime + usage.ru_stime, time.perf_counter()
    for i in range(0, len(x), batch_size):
        run(x[i:i + batch_size])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - wall, usage.ru_utime + usage.ru_stime - cpu


def summary(seconds: Sequence[float], n: int | None = None) -> dict[str, Any]:
    """Raw runs, their median, and img/s of the median when ``n`` items were done."""
    med = statistics.median(seconds)
    out: dict[str, Any] = {"seconds": [round(s, 4) for s in seconds], "median_s": med}
    if n is not None:
        out["img_s"] = n / med if med > 0 else float("inf")
    return out


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow what the measured code prints (progress lines, Keras' "Found N files")."""
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield sink


def fresh(path: Path) -> Path:
    """``path`` with no cache (or partial cache) left from an earlier run."""
    from pipeline.cache import partial_path

    path.unlink(missing_ok=True)
    partial_path(path).unlink(missing_ok=True)
    return path


def write_synthetic_cache(path: Path, rows: int, *, feature_shape: tuple[int, ...] = (7, 7, 512),
                          seed: int = 0, chunk: int = 256) -> Path:
    """A complete cache of unpooled VGG16-like maps (float32), two separable classes."""
    from pipeline.cache import CacheWriter

    rng = np.random.default_rng(seed)
    writer = CacheWriter.create(fresh(path), attrs={"class_names": ["a", "b"],
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
