"""The input side alone: ``decoded_batches`` against a bare decode + resize, in one run.

Per output size, interleaved ``repeats`` times so drifting load hits every method alike:

    bare         one loop in this process: read the file, libjpeg-turbo decode, NumPy resize
                 (the same library calls extract makes, nothing else)
    threads-K    ``decoded_batches(decode="threads", workers=K)``
    processes-K  ``decoded_batches(decode="processes", workers=K)``: batch workers
    bare-x2      bare in two warm worker processes, half the files each: what two cores of
                 this machine give on this work at all (the ceiling for "2 workers / 1")

"2 workers / 1" is given twice: on whole runs' wall time, and once the pools have started
(each run's wall time less its pool's start, timed alone): the scaling of decoding itself,
which is what a long run sees.

Core-ms per image is CPU time (this process's threads + finished worker processes, from
``getrusage``) over images; a decoder's overhead is its core-ms over bare's (the header
check, EXIF, sha256, batching, shared memory, the pool's start). A pool's start (spawned
workers import NumPy, Pillow and libjpeg-turbo) is a one-off: it is also measured alone, on
one image per worker, and the steady core-ms per image leaves it out. The parent's core-ms
per image is what one feeding process pays, so 1000 / it is the rate one parent can feed.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import summary

__all__ = ["measure_input_side"]


def _cpu() -> tuple[float, float]:
    """(this process's CPU seconds, finished children's CPU seconds)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _bare(paths: Sequence[Path], size: tuple[int, int]) -> None:
    from pipeline.images.kernels import decode_jpeg, resize_bilinear

    for path in paths:
        resize_bilinear(decode_jpeg(path.read_bytes()), size)


def _bare_in_pool(paths: Sequence[Path], size: tuple[int, int], processes: int) -> float:
    """Wall seconds of bare over ``paths`` split across ``processes`` warm processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        list(pool.map(_bare, [paths[:processes]] * processes, [size] * processes))  # warm
        start = time.perf_counter()
        list(pool.map(_bare, [paths[k::processes] for k in range(processes)],
                      [size] * processes))
        return time.perf_counter() - start


def _ours(paths: Sequence[Path], size: tuple[int, int], *, decode: str, workers: int,
          batch_size: int) -> int:
    from pipeline.images.batches import decoded_batches

    return sum(len(b.indices) for b in decoded_batches(
        paths, size=size, batch_size=batch_size, workers=workers, decode=decode))


def _timed_cpu(fn: Any) -> dict[str, float]:
    wall, (me, kids) = time.perf_counter(), _cpu()
    fn()
    me2, kids2 = _cpu()
    return {"wall_s": time.perf_counter() - wall, "parent_cpu_s": me2 - me,
            "children_cpu_s": kids2 - kids}


def measure_input_side(paths: Sequence[Path], sizes: Sequence[int], *, repeats: int,
                       batch_size: int, workers: Sequence[int] = (1, 2)) -> list[dict[str, Any]]:
    """Bare decode + resize against both decoders at each worker count (module docstring).

    Returns:
        Per size: each method's median wall seconds, img/s, core-ms and parent core-ms per
        image; each method's core-ms over bare's; processes-2 / processes-1 speed-up.
    """
    n = len(paths)
    methods = {"bare": lambda size, files=paths: _bare(files, size)}
    for decode in ("threads", "processes"):
        for k in workers:
            methods[f"{decode}-{k}"] = (
                lambda size, files=paths, d=decode, k=k: _ours(
                    files, size, decode=d, workers=k, batch_size=batch_size))
    out = []
    for side in sizes:
        size = (side, side)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
        for fn in methods.values():  # untimed warm-up: file cache, kernels' plans
            fn(size)
        starts: dict[str, list[float]] = {name: [] for name in methods}
        start_walls: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                runs[name].append(_timed_cpu(lambda f=fn, size=size: f(size)))
                k = int(name.rsplit("-", 1)[1]) if "-" in name else 1
                start = _timed_cpu(lambda f=fn, k=k, size=size: f(size, files=paths[:k]))
                starts[name].append(start["parent_cpu_s"] + start["children_cpu_s"])
                start_walls[name].append(start["wall_s"])
        result: dict[str, Any] = {"size": side, "n_images": n, "methods": {}}
        for name, rs in runs.items():
            median = lambda key, rs=rs: float(np.median([r[key] for r in rs]))  # noqa: E731
            core_s = float(np.median([r["parent_cpu_s"] + r["children_cpu_s"] for r in rs]))
            start_s = float(np.median(starts[name]))
            result["methods"][name] = {
                **summary([r["wall_s"] for r in rs], n),
                "core_ms_per_img": 1e3 * core_s / n,
                "start_core_s": start_s,
                "start_wall_s": float(np.median(start_walls[name])),
                # img/s once started: what the workers give a long run
                "steady_img_s": n / max(median("wall_s")
                                        - float(np.median(start_walls[name])), 1e-9),
                "steady_core_ms_per_img": 1e3 * max(core_s - start_s, 0.0) / n,
                "parent_core_ms_per_img": 1e3 * median("parent_cpu_s") / n,
            }
        bare = result["methods"]["bare"]["core_ms_per_img"]
        result["core_ms_over_bare"] = {
            name: m["core_ms_per_img"] / bare for name, m in result["methods"].items()}
        result["steady_core_ms_over_bare"] = {
            name: m["steady_core_ms_per_img"] / bare for name, m in result["methods"].items()}
        if 1 in workers and 2 in workers:
            one = np.median([_bare_in_pool(paths, size, 1) for _ in range(repeats)])
            two = np.median([_bare_in_pool(paths, size, 2) for _ in range(repeats)])
            result["two_workers_over_one"] = {
                "bare (this machine's ceiling)": float(one / two),
                **{d: result["methods"][f"{d}-2"]["img_s"] / result["methods"][f"{d}-1"]["img_s"]
                   for d in ("threads", "processes")}}
            # The same once the pools have started (a start is a one-off, timed alone on
            # one image per worker): how the decoding itself scales.
            result["two_workers_over_one_steady"] = {
                d: result["methods"][f"{d}-2"]["steady_img_s"]
                / result["methods"][f"{d}-1"]["steady_img_s"] for d in ("threads", "processes")}
        if len(workers) == 2 and workers != (1, 2):  # the GPU box: every core against one
            k = max(workers)
            result["k_workers_over_one"] = {
                d: (k, result["methods"][f"{d}-{k}"]["img_s"]
                    / result["methods"][f"{d}-1"]["img_s"]) for d in ("threads", "processes")}
        out.append(result)
    return out
