"""Benchmark: how fast the pipeline turns images into a cache, and what the cache buys.

Every figure of docs/performance.md comes from here (``scripts/bench.py`` is a thin
wrapper). One process run measures, on one folder of real JPEGs (random crops, flips and
noise of scikit-learn's two bundled photographs, ~500x375, quality 90):

    a  forward     the feature model's ``model.predict`` on decoded, preprocessed arrays
    b  extract     ``run_extract`` end to end: decode -> forward -> HDF5
    c  keras       ``image_dataset_from_directory`` + ``.map(preprocess_input)`` + predict
    d  naive       one image at a time with PIL, ``predict`` per batch, no overlap
    e  input       decode + resize + preprocess + HDF5 write of zeros, no forward pass

a and b share one feature model object (random weights, seeded; b gets it by patching
``pipeline.extract.engine.build_feature_model``), built as extract builds it:
BatchNormalization folded into the convolutions unless ``--fold-batchnorm off``. c and d run
the Keras user's model: the same base, cut and weights, not folded (the one object of all
four when folding is off). Also timed: a' (``predict_on_batch`` per batch, the entry point
extract uses, faster than ``predict`` for small models), a' of the unfolded model, and b
with one decode thread. Timing helpers
return seconds; :func:`run_benchmark` states the whole protocol; :func:`format_report`
prints the tables.

The measurements live beside this module: ``common.py`` (cases, sizes, images, timing),
``throughput.py`` (a .. e, decoders, stages, storage, incremental runs) and
``training.py`` (heads on the cache against end to end, scikit-learn, memory). This module
states the protocol and writes the report; every public name of the benchmark can be
imported from here. It lives outside the ``pipeline`` package, which does not ship it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import resource
import shutil
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CASES,
    CLASSES,
    REPO_ROOT,
    TARGETS,
    BenchCase,
    BenchConfig,
    BenchSizes,
    bench_sizes,
    make_images,
    timed,
    write_synthetic_cache,
)
from benchmarks.feed import measure_feed
from benchmarks.fold import FOLD_BASES, measure_fold
from benchmarks.input_side import measure_input_side
from benchmarks.precision import PRECISION_BASES, measure_precision
from benchmarks.throughput import (
    MODEL_OPTIONS,
    extract_seconds,
    forward_on_batch_seconds,
    forward_seconds,
    input_side_seconds,
    keras_peer_seconds,
    measure_decoders,
    measure_incremental,
    measure_storage,
    measure_throughput,
    naive_seconds,
    shared_cpu_bound,
    stage_profile,
    throughput_ratios,
)
from benchmarks.training import (
    end_to_end_epoch_seconds,
    fit_rss,
    head_epoch_seconds,
    measure_append_copy,
    measure_head_rows,
    measure_sklearn,
    measure_stream_rss,
    measure_training,
    sklearn_fit_seconds,
)
from pipeline.images import has_tensorflow

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
    measure file size and speed per dtype and compression; and time the forward pass of
    several bases with BatchNormalization folded against plain, and with each mixed
    precision policy against float32 (speed and feature drift).
    """
    MODEL_OPTIONS.update(mixed_precision=config.mixed_precision, jit=config.jit,
                         fold_batchnorm=config.fold_batchnorm)
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
            seconds, results[name] = timed(fn)
            log(f"bench: {name} done in {seconds:.0f} s")

    part("throughput", lambda: [
        measure_throughput(c, images_dir, work, paths, repeats=config.repeats,
                           workers=config.workers, gpu=config.gpu, **kw) for c in cases])
    # On the GPU box one worker alone would take minutes over 10,000 images: 2,000 tell.
    part("input", lambda: measure_input_side(
        paths[:2000] if config.gpu else paths, sorted({c.size for c in cases}),
        repeats=config.repeats,
        batch_size=config.batch_size,
        workers=(1, max(2, (os.cpu_count() or 2) - 1)) if config.gpu else (1, 2)))
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
    part("fold", lambda: measure_fold(FOLD_BASES[:2] if config.quick else FOLD_BASES,
                                      n=64 if config.quick else 256, repeats=config.repeats,
                                      seed=config.seed))
    # On the GPU box at the benchmark's size and batch, where mixed precision is meant.
    part("precision", lambda: measure_precision(
        PRECISION_BASES[:1] if config.quick else PRECISION_BASES,
        size=224 if config.gpu else 128,
        n=32 if config.quick else 2048 if config.gpu else 128,
        batch_size=config.batch_size, repeats=config.repeats, seed=config.seed))
    # The largest case's size: where the parent's pass over the pixels costs the most.
    part("feed", lambda: measure_feed(
        paths[:2000] if config.gpu else paths, size=max(c.size for c in cases),
        batch_size=config.batch_size, repeats=config.repeats,
        workers=max(1, (os.cpu_count() or 2) - 1)))
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["machine"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(work, ignore_errors=True)
    return results


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
             "a_on_batch_plain": "a' forward, BN not folded",
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
    for r in results.get("input", []):
        lines.append(f"\ninput side at {r['size']} px ({r['n_images']} JPEGs): img/s, core-ms "
                     "per image (all, steady), parent core-ms per image, steady core-ms / bare")
        for name, m in r["methods"].items():
            lines.append(f"  {name:12s} {m['img_s']:8.1f}  {m['core_ms_per_img']:6.2f} "
                         f"{m['steady_core_ms_per_img']:6.2f}  {m['parent_core_ms_per_img']:7.3f}"
                         f"  x{r['steady_core_ms_over_bare'][name]:.2f}"
                         f"  (pool start {m['start_core_s']:.2f} core-s)")
        steady = r.get("two_workers_over_one_steady", {})
        for decode, ratio in r.get("two_workers_over_one", {}).items():
            started = (f"; once started {steady[decode]:.2f} (target >= 1.8: "
                       f"{_met(steady[decode], 1.8)})" if decode in steady else "")
            lines.append(f"  {decode}: 2 workers / 1 worker {ratio:.2f}{started}")
        for decode, (k, ratio) in r.get("k_workers_over_one", {}).items():
            lines.append(f"  {decode}: {k} workers / 1 worker {ratio:.2f}")
    for r in results.get("feed", []):
        lines.append(f"\nfeeding the forward pass, {r['mode']} preprocessing, {r['size']} px, "
                     f"batch {r['batch_size']}, {r['workers']} decode processes: img/s, parent "
                     "core-ms per image")
        for name, label in (("parent", "preprocessed in the parent"),
                            ("decoders", "preprocessed in the decoders")):
            lines.append(f"  {label:30s} {r[name]['img_s']:8.1f}  "
                         f"{r[name]['parent_core_ms_per_img']:7.3f}")
        value = r["decoders"]["parent_core_ms_per_img"]
        lines.append(f"  decoders / parent {r['decoders/parent core-ms']:.2f}; parent <= 0.1 "
                     f"core-ms per image: {_met(value, 0.1, higher_is_better=False)}")
    if "fold" in results:
        lines.append("\nBatchNormalization folded (random statistics), predict_on_batch: img/s "
                     "plain -> folded, core-ms per image, folded/plain, max relative difference")
        for r in results["fold"]:
            lines.append(
                f"  {r['base']:16s} {r['n_folded']:4d} folded  {r['plain']['img_s']:7.1f} -> "
                f"{r['folded']['img_s']:7.1f}  {r['plain']['core_ms_per_img']:6.2f} -> "
                f"{r['folded']['core_ms_per_img']:6.2f}  x{r['folded/plain img_s']:.2f}  "
                f"{r['max_relative_difference']:.1e}")
    if "precision" in results:
        lines.append("\nmixed precision against float32 (BN folded): img/s, core-ms per image, "
                     "max |diff| / feature scale, median relative diff, cosine min / median")
        for r in results["precision"]:
            lines.append(
                f"  {r['base']:16s} {r['policy']:15s} {r['img_s']:7.1f} "
                f"{r['core_ms_per_img']:7.2f}  {r['max_abs_over_scale']:.1e}  "
                f"{r['median_relative']:.1e}  {r['min_cosine']:.6f} / {r['median_cosine']:.6f}")
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
