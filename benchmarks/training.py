"""What the cache buys: training on cached features against training end to end.

One epoch of the dense head on cached features against one epoch of frozen base + head
on decoded images, the dense head's epoch time over cache rows, the scikit-learn heads'
fit times, the copy an appending run starts from, and fit_head's peak memory with and
without ``--stream``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    BenchCase,
    BenchSizes,
    quiet,
    summary,
    timed,
    write_synthetic_cache,
)
from benchmarks.throughput import build_case_model, decode_all
from pipeline.images import has_tensorflow


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

    from pipeline.bases.combine import end_to_end_model

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

    with quiet():
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
    h, e = summary(head, len(paths)), summary(e2e, len(paths))
    out = {"case": case.name, "n_images": len(paths), "head_epoch": h, "end_to_end_epoch": e,
           "ratio": h["median_s"] / e["median_s"]}
    if data_dir is not None and has_tensorflow():
        folder = summary(end_to_end_folder_epoch_seconds(
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
        out.append({"rows": n, "dims": dims, "steps": steps, **summary(runs["dense_head"], n),
                    "keras_defaults": summary(runs["keras_defaults"], n),
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
                runs[name].append(timed(lambda s=start, p=path: s(p).close())[0])
                partial_path(path).unlink()
        med = {k: statistics.median(v) for k, v in runs.items()}
        out.append({"rows": n, "mb": path.stat().st_size / 1e6,
                    **{k: summary(v) for k, v in runs.items()},
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
    return timed(lambda: estimator.fit(X.astype(np.float32), y))[0]


def measure_sklearn(sizes: BenchSizes, *, repeats: int, seed: int) -> list[dict[str, Any]]:
    """Fit seconds of logreg, linear-svm and svm over the rows x dims grid."""
    out = []
    for rows in sizes.sklearn_rows:
        for dims in sizes.sklearn_dims:
            for head in ("logreg", "linear-svm", "svm"):
                # The largest fits take minutes: one run is enough to read their order.
                reps = 1 if rows * dims > 4_000_000 else repeats
                runs = [sklearn_fit_seconds(head, rows, dims, seed=seed) for _ in range(reps)]
                out.append({"head": head, "rows": rows, "dims": dims, **summary(runs)})
    return out


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
