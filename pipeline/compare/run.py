"""Many heads on many caches, scored on the same rows and the same folds: a leaderboard.

The question this answers is "which base and which head, for these images?", so every
number in one run must be comparable with every other: one set of rows (caches of the
same images are matched by path), one set of stratified folds, one seed, one protocol
(:func:`run_compare` states it). This module holds that protocol as a list of named
steps and the scoring of the fits; the arguments live in :mod:`pipeline.compare.config`,
the pure decisions in :mod:`pipeline.compare.decisions`, the loading of rows in
:mod:`pipeline.compare.data`, the fits and the parallel loop in
:mod:`pipeline.compare.fits`. The report itself (tables, plots, HTML) is written by
:mod:`pipeline.compare.report`, the history line by :mod:`pipeline.compare.history`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score

from pipeline.cache import Cache
from pipeline.compare.config import (
    SCRATCH_HEAD,
    CompareConfig,
    CompareResult,
    check_config,
    default_out,
)
from pipeline.compare.data import cache_entries, load_caches, load_data
from pipeline.compare.decisions import (
    Pair,
    choose,
    choosing_rows,
    fold_of,
    leaderboard,
    make_folds,
    make_pairs,
    param_grid,
)
from pipeline.compare.fits import FitTask, build_estimator, run_tasks
from pipeline.compare.history import append_history, history_entry
from pipeline.compare.report import write_report
from pipeline.fit import evaluate
from pipeline.heads import head_params
from pipeline.progress import Progress

__all__ = ["run_compare"]

log = logging.getLogger(__name__)


def run_compare(config: CompareConfig) -> CompareResult:
    """Score every (cache, head) pair on the same rows and folds; write leaderboard + report.

    Protocol:
        1. Check every argument (Keras-style errors), then read every cache. Caches of
           the same images made with different bases are aligned by image path to the
           first cache's row order; different image sets (counts and the first paths
           only in one), classes, labels or splits are refused.
        2. Rows: the cache's ``test`` rows are held out; the choosing pool is every other
           row (train, validation, or "" when no split is recorded). Validation rows
           join the pool: K folds use every labelled row instead of one fixed split.
        3. Folds: ``StratifiedKFold(cv, shuffle=True, random_state=seed)`` over the pool,
           the same folds for every pair. A pool that cannot be folded (one class, a
           class with fewer than ``cv`` rows) skips every pair with that reason.
        4. Fits: for each pair, grid point and fold, a fresh head (``random_state=seed``)
           is fitted on the fold's other K-1 parts and predicts the fold. Without
           ``sweep`` the grid is the single default point; with it, :func:`param_grid`.
           The dense head and the scratch convnet early-stop on a seeded 10% of the
           fitting rows, never on the fold being scored. Fits run in parallel with joblib
           (``n_jobs``); every task is seeded by itself, so serial and parallel runs give
           identical numbers.
        5. Choosing (``sweep``): the grid point with the highest mean accuracy over the K
           folds (ties: the earlier, more regularised point), and that point's per-fold
           scores are reported — one level of CV, not nested. With a recorded test split
           this is the linear-probe protocol of Kornblith et al. (2019, "Do Better
           ImageNet Models Transfer Better?") and CLIP_benchmark: choose the
           regularisation on held-out parts of the training data, refit on all of it,
           score the untouched test set once. Without a test split, the chosen point's CV
           mean is slightly optimistic (it won a comparison on the same folds); the
           untuned defaults are the opposite: a probe without the sweep usually reads a
           few points low. A grid point a head refuses (e.g. more neighbours than
           fitting rows) is dropped; a pair with no usable point is skipped.
        6. Test: with test rows, each scored pair is refitted once with its chosen
           parameters on the whole pool and scored once on the test rows. Test scores
           are reported, never used to choose or to rank.
        7. Report: leaderboard sorted by mean CV accuracy (``leaderboard.csv``,
           ``leaderboard.md``), ``results.json`` (config, folds, every grid point's
           per-fold scores, out-of-fold and test metrics), ``report.html`` with plots,
           and one line appended to ``history_file``.

    Args:
        config: caches, heads, folds, seed and outputs.

    Returns:
        The leaderboard, skipped pairs and output paths; ``leaderboard`` is empty when
        nothing could run (the report says why).

    Raises:
        ValueError: a bad argument, or caches that do not hold the same images.
        FileNotFoundError: a cache or the scratch folder does not exist.
        pipeline.cache.CacheError: a cache is incomplete or damaged.
    """
    start = time.perf_counter()
    started = datetime.now().astimezone()
    check_config(config)
    out_dir = Path(config.out) if config.out else default_out(started)

    entries = cache_entries(config.caches, config.layers)
    caches, orders = load_caches(entries)
    ref = caches[0]
    labels = np.asarray(ref.labels, dtype=np.int64)
    class_names = list(ref.class_names)
    pool, test = choosing_rows(ref.split)
    data, data_skips = load_data(caches, orders, scratch=config.scratch)
    folds, fold_problem = _folds(labels=labels[pool], class_names=class_names, config=config)
    pairs = make_pairs(config, entries, caches, data_skips, fold_problem,
                       [int(np.prod(x.shape[1:])) for x in data])

    cv_tasks = _cv_tasks(pairs=pairs, folds=folds, pool=pool)
    runnable = sum(pair.skip is None for pair in pairs)
    progress = Progress(len(cv_tasks) + (runnable if test.size else 0), "compare", unit="fits")
    cv_out = run_tasks(cv_tasks, pairs, data, labels, config=config, progress=progress)
    outcomes = _by_pair(tasks=cv_tasks, results=cv_out)
    pair_results = _score_pairs(pairs=pairs, outcomes=outcomes, folds=folds, pool=pool,
                                labels=labels, class_names=class_names, config=config)
    if test.size:
        _score_test(pairs=pairs, pair_results=pair_results, data=data, labels=labels,
                    pool=pool, test=test, class_names=class_names, config=config,
                    progress=progress)
    progress.close()

    board = leaderboard(pair_results)
    skipped = [
        {"cache": r["cache"], "base": r["base"], "head": r["head"], "reason": r["reason"]}
        for r in pair_results if r["status"] != "ok"
    ]
    seconds = time.perf_counter() - start
    results = _results(
        config=config, started=started, seconds=seconds, out_dir=out_dir, entries=entries,
        caches=caches, pool=pool, test=test, folds=folds, fold_problem=fold_problem,
        pair_results=pair_results, board=board, skipped=skipped,
    )
    outputs = write_report(out_dir, results)
    append_history(Path(config.history_file), history_entry(results))
    return CompareResult(
        out_dir=out_dir,
        leaderboard=board,
        skipped=skipped,
        n_pool=int(pool.size),
        n_test=int(test.size),
        outputs=outputs,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------
# Steps of run_compare


def _folds(
    *, labels: np.ndarray, class_names: Sequence[str], config: CompareConfig
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str | None]:
    """The pool's folds, or no folds and why: a pool that cannot be folded skips every pair."""
    try:
        return make_folds(labels, config.cv, config.seed, class_names=class_names), None
    except ValueError as exc:
        return [], str(exc)


def _cv_tasks(
    *, pairs: Sequence[Pair], folds: Sequence[tuple[np.ndarray, np.ndarray]], pool: np.ndarray
) -> list[FitTask]:
    """One task per runnable pair, grid point and fold: fit on the fold's rest, score it."""
    return [
        (p, g, k, pool[fit], pool[val])
        for p, pair in enumerate(pairs) if pair.skip is None
        for g in range(len(pair.grid))
        for k, (fit, val) in enumerate(folds)
    ]


def _by_pair(
    *, tasks: Sequence[FitTask], results: Sequence[dict[str, Any]]
) -> dict[int, dict[tuple[int, int], dict[str, Any]]]:
    """The fold tasks' outcomes by pair, then by (grid point, fold)."""
    outcomes: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    for (p, g, k, _, _), result in zip(tasks, results, strict=True):
        outcomes.setdefault(p, {})[(g, k)] = result
    return outcomes


def _score_pairs(
    *,
    pairs: Sequence[Pair],
    outcomes: dict[int, dict[tuple[int, int], dict[str, Any]]],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    pool: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    config: CompareConfig,
) -> list[dict[str, Any]]:
    """Each pair's result: scored with its chosen grid point, or skipped with the reason."""
    pair_results = []
    for p, pair in enumerate(pairs):
        entry: dict[str, Any] = {"cache": pair.cache, "base": pair.base, "head": pair.head}
        if pair.skip is None:
            scored = _score_pair(pair=pair, outcomes=outcomes[p], folds=folds, pool=pool,
                                 labels=labels, class_names=class_names)
            pair.skip = scored.pop("skip", None)
            entry.update(scored)
        if pair.skip is not None:
            entry.update(status="skipped", reason=pair.skip)
            log.warning("compare: skipped %s / %s: %s", pair.base, pair.head, pair.skip)
        else:
            chosen = pair.grid[entry["chosen"]]
            entry.update(status="ok", params=chosen,
                         params_shown=_format_params(_shown_params(pair, chosen, config)))
        pair_results.append(entry)
    return pair_results


def _score_test(
    *,
    pairs: Sequence[Pair],
    pair_results: list[dict[str, Any]],
    data: Sequence[np.ndarray],
    labels: np.ndarray,
    pool: np.ndarray,
    test: np.ndarray,
    class_names: Sequence[str],
    config: CompareConfig,
    progress: Progress,
) -> None:
    """Refit each scored pair on the whole pool with its chosen params; score the test once."""
    tasks = [
        (p, r["chosen"], None, pool, test)
        for p, r in enumerate(pair_results) if r["status"] == "ok"
    ]
    for (p, _, _, _, _), out in zip(
        tasks, run_tasks(tasks, pairs, data, labels, config=config, progress=progress),
        strict=True,
    ):
        if "error" in out:
            pair_results[p]["test"] = {"error": out["error"]}
            continue
        pair_results[p]["test"] = {
            **evaluate(_Predicted(), out["pred"], labels[test], class_names),
            "n_fit": int(pool.size),
            "n_test": int(test.size),
            "fit_seconds": out["fit_seconds"],
            "predict_ms_per_image": 1000.0 * out["predict_seconds"] / test.size,
            "model_bytes": out["model_bytes"],
        }


def _results(
    *,
    config: CompareConfig,
    started: datetime,
    seconds: float,
    out_dir: Path,
    entries: Sequence[tuple[str, str | None]],
    caches: Sequence[Cache],
    pool: np.ndarray,
    test: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    fold_problem: str | None,
    pair_results: list[dict[str, Any]],
    board: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``results`` dict the report and ``results.json`` are made from."""
    ref = caches[0]
    return {
        "config": dataclasses.asdict(config),
        "protocol": (
            f"{config.cv}-fold StratifiedKFold(shuffle=True, random_state={config.seed}) "
            "over the non-test rows, the same folds for every pair; "
            + ("parameters chosen by mean CV accuracy over a small grid (not nested); "
               if config.sweep else "library-default parameters (no sweep); ")
            + ("refit on all non-test rows, scored once on the test rows."
               if test.size else "no test split recorded: CV scores only.")
        ),
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
        "out_dir": str(out_dir),
        "class_names": list(ref.class_names),
        "n_rows": int(len(ref.labels)),
        "n_pool": int(pool.size),
        "n_test": int(test.size),
        "folds": {
            "k": config.cv,
            "seed": config.seed,
            "problem": fold_problem,
            "sizes": [int(len(val)) for _, val in folds],
            # fold_of_pool_row[i]: the fold that scores pool row i (paths: pool_paths).
            "fold_of_pool_row": fold_of(folds, pool.size),
            "pool_paths": [ref.paths[i] for i in pool],
        },
        "caches": [
            {"path": path, **{k: c.attrs.get(k) for k in (
                "base", "weights", "layer", "pooling", "input_size", "dtype", "n_rows")}}
            for (path, _), c in zip(entries, caches, strict=True)
        ],
        "pairs": pair_results,
        "leaderboard": board,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------
# Scoring the fits


class _Predicted:
    """Lets :func:`pipeline.fit.evaluate` score stored predictions: its input is its output."""

    @staticmethod
    def predict(X: np.ndarray) -> np.ndarray:
        return np.asarray(X)


def _shown_params(pair: Pair, params: dict[str, Any], config: CompareConfig) -> dict[str, Any]:
    """The swept knobs of a pair's head with their values (defaults when not swept)."""
    if pair.head == SCRATCH_HEAD:
        return {}
    estimator = build_estimator(
        pair.head, params, seed=config.seed, epochs=config.epochs,
        scratch_epochs=config.scratch_epochs,
    )
    values = head_params(estimator)
    keys = param_grid(pair.head, 1)[0].keys()
    return {key.split("__")[-1]: values[key] for key in keys}


def _format_params(params: dict[str, Any]) -> str:
    """``k=v, ...`` as the leaderboard shows parameters (floats to 3 significant digits)."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _score_pair(
    *,
    pair: Pair,
    outcomes: dict[tuple[int, int], dict[str, Any]],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    pool: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Per-fold scores of every grid point, the chosen point and its aggregate metrics."""
    grid_results = []
    for g, params in enumerate(pair.grid):
        fold_out = [outcomes[(g, k)] for k in range(len(folds))]
        error = next((o["error"] for o in fold_out if "error" in o), None)
        accs = None
        if error is None:
            accs = [
                float(accuracy_score(labels[pool[val]], o["pred"]))
                for o, (_, val) in zip(fold_out, folds, strict=True)
            ]
        grid_results.append({
            "params": params,
            "fold_accuracy": accs,
            "accuracy_mean": None if accs is None else float(np.mean(accs)),
            "error": error,
        })
    scores = [r["fold_accuracy"] for r in grid_results]
    if all(s is None for s in scores):
        return {"grid": grid_results, "skip": grid_results[0]["error"]}
    g = choose(scores)
    per_fold = []
    oof = np.empty(len(pool), dtype=labels.dtype)
    for k, (fit, val) in enumerate(folds):
        o = outcomes[(g, k)]
        oof[val] = o["pred"]
        m = evaluate(_Predicted(), o["pred"], labels[pool[val]], class_names)
        per_fold.append({
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "fit_seconds": o["fit_seconds"],
            "predict_ms_per_image": 1000.0 * o["predict_seconds"] / len(val),
            "model_bytes": o["model_bytes"],
            "n_fit": int(len(fit)),
            "n_val": int(len(val)),
        })
    accs = [f["accuracy"] for f in per_fold]
    warned = [outcomes[(g, k)]["warnings"] for k in range(len(folds))]
    warned = [w for w in warned if w]
    return {
        "grid": grid_results,
        "chosen": g,
        "notes": (
            [f"did not converge in {len(warned)} of {len(folds)} folds ({warned[0][0]})"]
            if warned else []
        ),
        "folds": per_fold,
        # Population std (ddof=0), as sklearn's cv_results_ std_test_score.
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "macro_f1_mean": float(np.mean([f["macro_f1"] for f in per_fold])),
        "fit_seconds": float(np.mean([f["fit_seconds"] for f in per_fold])),
        "predict_ms_per_image": float(np.mean([f["predict_ms_per_image"] for f in per_fold])),
        "model_bytes": int(round(np.mean([f["model_bytes"] for f in per_fold]))),
        "out_of_fold": evaluate(_Predicted(), oof, labels[pool], class_names),
    }
