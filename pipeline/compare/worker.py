"""The joblib loop over the fits, and what each worker process runs.

A worker is a fresh process; importing :mod:`pipeline.compare.fits` there loads Keras and
TensorFlow, whose start-up lines (``absl::InitializeLog``, ``cudart_stub``, a failed
``cuInit``) would be printed once per worker into the progress output. This module imports
nothing heavy, so unpickling a task (:func:`numbered_fit`) does not load them; the task
loads them through :func:`pipeline.util.quiet.load_backend` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.util.quiet import load_backend

if TYPE_CHECKING:
    from pipeline.compare.config import CompareConfig
    from pipeline.compare.decisions import Pair
    from pipeline.compare.fits import FitTask
    from pipeline.compare.store import FitStore
    from pipeline.progress import Progress

__all__ = ["numbered_fit", "run_tasks"]


def numbered_fit(i: int, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """:func:`~pipeline.compare.fits.fit_and_predict` with the task's position, for results
    that come unordered."""
    load_backend()
    from pipeline.compare.fits import fit_and_predict

    return i, fit_and_predict(*args, **kwargs)


def run_tasks(
    tasks: list[FitTask],
    pairs: Sequence[Pair],
    data: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    config: CompareConfig,
    progress: Progress,
    keys: Sequence[str],
    store: FitStore,
) -> list[dict[str, Any]]:
    """Run ``(pair, grid point, fold, fit_rows, score_rows)`` tasks with joblib.

    Fits the store already holds (a stopped run's) are not run again; each new one is
    added to the store the moment it ends, whichever worker ran it.

    Args:
        tasks: the fits to run; ``pair`` indexes ``pairs``, ``grid point`` its grid.
        pairs: the pairs, with their grids.
        data: the aligned data arrays the pairs read.
        labels: integer labels of every row.
        config: seed, epochs, class weights and ``n_jobs``.
        progress: moved once per finished (or kept) fit.
        keys: each task's :func:`~pipeline.compare.store.fit_key`.
        store: the finished fits.

    Returns:
        One :func:`fit_and_predict` result per task, in task order.
    """
    from joblib import Parallel, delayed

    results: list[dict[str, Any] | None] = [store.get(key) for key in keys]
    todo = [i for i, result in enumerate(results) if result is None]
    if len(todo) < len(tasks):
        progress.update(len(tasks) - len(todo))
    jobs = (
        delayed(numbered_fit)(
            i,
            pairs[tasks[i][0]].head,
            pairs[tasks[i][0]].grid[tasks[i][1]],
            data[pairs[tasks[i][0]].data],
            labels,
            tasks[i][3],
            tasks[i][4],
            seed=config.seed,
            epochs=config.epochs,
            scratch_epochs=config.scratch_epochs,
            class_weight=config.class_weight,
        )
        for i in todo
    )
    if todo:
        # Unordered: each fit is kept as soon as it ends, not when the ones before it do.
        for i, result in Parallel(n_jobs=config.n_jobs, return_as="generator_unordered")(jobs):
            store.add(keys[i], result)
            results[i] = result
            progress.update()
    return [r for r in results if r is not None]
