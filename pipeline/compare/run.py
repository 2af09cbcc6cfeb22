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
from collections.abc import Callable, Sequence
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
    RowPlan,
    choose,
    computed_text,
    fold_of,
    leaderboard,
    make_folds,
    make_pairs,
    param_grid,
    plan_rows,
)
from pipeline.compare.fits import FitTask, build_estimator
from pipeline.compare.history import append_history, history_entry
from pipeline.compare.report import write_report
from pipeline.compare.store import FitStore, data_identity, fit_key, store_path
from pipeline.compare.worker import run_tasks
from pipeline.fit import evaluate
from pipeline.heads import head_params
from pipeline.interrupts import Interrupted
from pipeline.progress import Progress

__all__ = ["CompareInterrupted", "run_compare"]

log = logging.getLogger(__name__)


def run_compare(config: CompareConfig) -> CompareResult:
    """Score every (cache, head) pair on the same rows; write leaderboard + report.

    Protocol:
        1. Check every argument (Keras-style errors), then read every cache. Caches of
           the same images made with different bases are aligned by image path to the
           first cache's row order; different image sets (counts and the first paths
           only in one), classes, labels or splits are refused.
        2. Rows (:func:`plan_rows`): the cache's ``test`` rows are held out. When the
           caches record a train/validation split, every head is fitted on the train rows
           and scored on the validation rows, the rows fit_head uses (so both report the
           same accuracy). Otherwise every other row is cross-validated:
           ``StratifiedKFold(cv, shuffle=True, random_state=seed)``, the same folds for
           every pair. Rows that cannot be split (one class, a class with fewer than
           ``cv`` rows) skip every pair with that reason.
        3. Fits: for each pair, grid point and fold, a fresh head (``random_state=seed``,
           ``class_weight``) is fitted on the fold's fitting rows and predicts its scored
           rows. Without ``sweep`` the grid is the single default point; with it,
           :func:`param_grid`. The dense head and the scratch convnet early-stop on a
           seeded 10% of the fitting rows, never on the rows being scored. Fits run in
           parallel with joblib (``n_jobs``); every task is seeded by itself, so serial
           and parallel runs give identical numbers. Each finished fit is kept on disk
           (:mod:`pipeline.compare.store`): a stopped run, run again, fits only the rest.
        4. Choosing (``sweep``): the grid point with the highest mean accuracy over the
           folds (ties: the earlier, more regularised point), and that point's per-fold
           scores are reported — one level of CV, not nested. With a recorded test split
           this is the linear-probe protocol of Kornblith et al. (2019, "Do Better
           ImageNet Models Transfer Better?") and CLIP_benchmark: choose the
           regularisation on held-out parts of the training data, refit on all of it,
           score the untouched test set once. Without a test split, the chosen point's
           mean is slightly optimistic (it won a comparison on the same rows); the
           untuned defaults are the opposite: a probe without the sweep usually reads a
           few points low. A grid point a head refuses (e.g. more neighbours than
           fitting rows) is dropped; a pair with no usable point is skipped.
        5. Test: with test rows, each scored pair is refitted once with its chosen
           parameters on every non-test row and scored once on the test rows. Test
           scores are reported, never used to choose or to rank.
        6. Report: leaderboard sorted by mean accuracy (``leaderboard.csv``,
           ``leaderboard.md``), ``results.json`` (config, rows, every grid point's
           per-fold scores, scored-row and test metrics), ``report.html`` with the
           settings, plots and every pair's confusion matrix, and one line appended to
           ``history_file``; the kept fits are then deleted.

    Args:
        config: caches, heads, folds, seed and outputs.

    Returns:
        The leaderboard, skipped pairs and output paths; ``leaderboard`` is empty when
        nothing could run (the report says why).

    Raises:
        ValueError: a bad argument, or caches that do not hold the same images.
        FileNotFoundError: a cache or the scratch folder does not exist.
        pipeline.cache.CacheError: a cache is incomplete or damaged.
        CompareInterrupted: Ctrl-C or SIGTERM during the fits (the finished ones are kept).
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
    plan = plan_rows(ref.split, labels, cv=config.cv, seed=config.seed,
                     class_names=class_names)
    data, data_skips = load_data(caches, orders, scratch=config.scratch)
    pairs = make_pairs(config, entries, caches, data_skips, plan.problem,
                       [int(np.prod(x.shape[1:])) for x in data])
    store, keys = _open_store(config=config, entries=entries, pairs=pairs, out_dir=out_dir)

    inner = _choice_folds(config=config, plan=plan, pairs=pairs, labels=labels)
    choice_tasks = [task for task in _cv_tasks(pairs=pairs, folds=inner, pool=plan.pool)
                    if len(pairs[task[0]].grid) > 1]
    runnable = sum(pair.skip is None for pair in pairs)
    total = (len(choice_tasks) + runnable * len(plan.folds) if inner else
             sum(len(pair.grid) for pair in pairs if pair.skip is None) * len(plan.folds))
    total += runnable if plan.test.size else 0
    progress = Progress(total, "compare", unit="fits")
    try:
        choices = {}
        if choice_tasks:  # the grid point, chosen on the train rows alone
            choice_out = run_tasks(choice_tasks, pairs, data, labels, config=config,
                                   progress=progress, keys=keys(choice_tasks), store=store)
            choices = _choose_inside(pairs=pairs, folds=inner, pool=plan.pool, labels=labels,
                                     outcomes=_by_pair(tasks=choice_tasks, results=choice_out))
        cv_tasks = _cv_tasks(pairs=pairs, folds=plan.folds, pool=plan.pool)
        cv_out = run_tasks(cv_tasks, pairs, data, labels, config=config, progress=progress,
                           keys=keys(cv_tasks), store=store)
        outcomes = _by_pair(tasks=cv_tasks, results=cv_out)
        pair_results = _score_pairs(pairs=pairs, outcomes=outcomes, plan=plan, labels=labels,
                                    class_names=class_names, config=config)
        for p, choice in choices.items():
            pair_results[p]["choice"] = choice
        if plan.test.size:
            _score_test(pairs=pairs, pair_results=pair_results, data=data, labels=labels,
                        plan=plan, class_names=class_names, config=config,
                        progress=progress, keys=keys, store=store)
    except KeyboardInterrupt as exc:
        raise stopped(exc, store=store, total=total) from None
    finally:
        progress.close()
        store.close()

    board = leaderboard(pair_results)
    skipped = [
        {"cache": r["cache"], "base": r["base"], "label": r["label"], "head": r["head"],
         "reason": r["reason"]}
        for r in pair_results if r["status"] != "ok"
    ]
    seconds = time.perf_counter() - start
    results = _results(
        config=config, started=started, seconds=seconds, out_dir=out_dir, entries=entries,
        caches=caches, plan=plan, pairs=pairs, pair_results=pair_results, board=board,
        skipped=skipped,
    )
    outputs = write_report(out_dir, results)
    append_history(Path(config.history_file), history_entry(results))
    store.remove()  # the report holds every result now
    return CompareResult(
        out_dir=out_dir,
        leaderboard=board,
        skipped=skipped,
        n_pool=int(plan.pool.size),
        n_test=int(plan.test.size),
        outputs=outputs,
        seconds=seconds,
        protocol=plan.describe(),
        n_reused=store.reused,
    )


# ---------------------------------------------------------------------------------------
# Steps of run_compare


class CompareInterrupted(Interrupted):
    """Ctrl-C or SIGTERM during the fits: the finished ones are kept for the next run.

    The message says how many and where; ``exit_code`` is 130 or 143.
    """


def stopped(exc: KeyboardInterrupt, *, store: FitStore, total: int) -> CompareInterrupted:
    """The :class:`CompareInterrupted` for ``exc``, saying what was kept and how to go on."""
    kind = exc if isinstance(exc, Interrupted) else Interrupted()
    if len(store):
        kept = (f"{len(store)} of {total} fits kept in {store.path}: run the same command "
                "again to continue from there.")
    else:
        kept = "no fit had finished."
    return CompareInterrupted(f"compare: interrupted by {kind.signal_name}; {kept}",
                              kind.exit_code)


def _open_store(
    *,
    config: CompareConfig,
    entries: Sequence[tuple[str, str | None]],
    pairs: Sequence[Pair],
    out_dir: Path,
) -> tuple[FitStore, Callable[[Sequence[FitTask]], list[str]]]:
    """The run's store of finished fits (what a stopped run kept, loaded) and the function
    that keys its tasks by everything their results depend on."""
    identities: list[dict[str, Any]] = [data_identity(path, layer) for path, layer in entries]
    if config.scratch is not None:
        identities.append({"scratch": data_identity(config.scratch, None),
                           "rows_of": identities[0]})
    settings = {"seed": config.seed, "epochs": config.epochs,
                "scratch_epochs": config.scratch_epochs, "class_weight": config.class_weight}
    run = {"data": identities, "settings": settings, "heads": config.heads, "cv": config.cv,
           "sweep": config.sweep, "layers": config.layers}
    store = FitStore(store_path(out_dir, run))
    if store.load():
        log.info("compare: %d finished fits kept by a stopped run in %s; fitting the rest.",
                 len(store), store.path)

    def keys(tasks: Sequence[FitTask]) -> list[str]:
        return [
            fit_key(data=identities[pairs[p].data], head=pairs[p].head,
                    params=pairs[p].grid[g], fit_rows=fit, score_rows=score,
                    settings=settings)
            for p, g, _, fit, score in tasks
        ]

    return store, keys


def _choice_folds(*, config: CompareConfig, plan: RowPlan, pairs: Sequence[Pair],
                  labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """With a recorded split and ``--sweep``: stratified folds of the train rows alone
    (positions into ``plan.pool``), on which each head's grid point is chosen, so that the
    validation rows it is scored on play no part in the choice. Empty otherwise, and when
    a class has fewer than 2 train rows (the choice is then made on the validation rows,
    and the protocol says so)."""
    if plan.protocol != "validation" or not config.sweep or plan.problem:
        return []
    if not any(pair.skip is None and len(pair.grid) > 1 for pair in pairs):
        return []
    train = plan.folds[0][0]
    k = min(config.cv, int(np.unique(labels[plan.pool[train]], return_counts=True)[1].min()))
    if k < 2:
        return []
    folds = make_folds(labels[plan.pool[train]], k, config.seed)
    return [(train[fit], train[val]) for fit, val in folds]


def _choose_inside(*, pairs: Sequence[Pair], folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   pool: np.ndarray, labels: np.ndarray,
                   outcomes: dict[int, dict[tuple[int, int], dict[str, Any]]],
                   ) -> dict[int, dict[str, Any]]:
    """Each swept pair's grid point by mean accuracy over the train-row folds; the pair's
    grid becomes that one point. Returns, per pair, the choice as the report shows it."""
    choices = {}
    for p, by_fold in outcomes.items():
        pair = pairs[p]
        grid = _grid_results(pair=pair, outcomes=by_fold, folds=folds, pool=pool,
                             labels=labels)
        scores = [r["fold_accuracy"] for r in grid]
        if all(s is None for s in scores):
            continue  # every point failed: scored as usual, where the errors are reported
        g = choose(scores)
        choices[p] = {"folds": len(folds), "chosen": pair.grid[g], "grid": grid}
        pair.grid = [pair.grid[g]]
    return choices


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
    plan: RowPlan,
    labels: np.ndarray,
    class_names: Sequence[str],
    config: CompareConfig,
) -> list[dict[str, Any]]:
    """Each pair's result: scored with its chosen grid point, or skipped with the reason."""
    pair_results = []
    for p, pair in enumerate(pairs):
        entry: dict[str, Any] = {"cache": pair.cache, "base": pair.base, "label": pair.label,
                                 "head": pair.head}
        if pair.skip is None:
            scored = _score_pair(pair=pair, outcomes=outcomes[p], folds=plan.folds,
                                 pool=plan.pool, labels=labels, class_names=class_names)
            pair.skip = scored.pop("skip", None)
            entry.update(scored)
        if pair.skip is not None:
            entry.update(status="skipped", reason=pair.skip)
            log.warning("compare: skipped %s / %s: %s", pair.label, pair.head, pair.skip)
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
    plan: RowPlan,
    class_names: Sequence[str],
    config: CompareConfig,
    progress: Progress,
    keys: Callable[[Sequence[FitTask]], list[str]],
    store: FitStore,
) -> None:
    """Refit each scored pair on every non-test row with its chosen params; score the test
    rows once."""
    pool, test = plan.pool, plan.test
    tasks: list[FitTask] = [
        (p, r["chosen"], None, pool, test)
        for p, r in enumerate(pair_results) if r["status"] == "ok"
    ]
    outs = run_tasks(tasks, pairs, data, labels, config=config, progress=progress,
                     keys=keys(tasks), store=store)
    for (p, _, _, _, _), out in zip(tasks, outs, strict=True):
        if "error" in out:
            pair_results[p]["test"] = {"error": out["error"]}
            continue
        pair_results[p]["test"] = {
            **evaluate(None, None, labels[test], class_names, pred=out["pred"]),
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
    plan: RowPlan,
    pairs: Sequence[Pair],
    pair_results: list[dict[str, Any]],
    board: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``results`` dict the report and ``results.json`` are made from."""
    ref = caches[0]
    label_of = {pair.data: pair.label for pair in pairs}
    return {
        "config": dataclasses.asdict(config),
        "protocol": _protocol_text(config, plan,
                                   nested=any("choice" in r for r in pair_results)),
        "protocol_kind": plan.protocol,
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
        "out_dir": str(out_dir),
        "class_names": list(ref.class_names),
        "n_rows": int(len(ref.labels)),
        "n_pool": int(plan.pool.size),
        "n_test": int(plan.test.size),
        "folds": {
            "k": plan.cv,
            "seed": config.seed,
            "problem": plan.problem,
            "sizes": [int(len(val)) for _, val in plan.folds],
            # fold_of_pool_row[i]: the fold that scores pool row i (paths: pool_paths).
            "fold_of_pool_row": fold_of(plan.folds, plan.pool.size),
            "pool_paths": [ref.paths[i] for i in plan.pool],
        },
        "caches": [
            {"path": path, "label": label_of.get(i, ""),
             "n_classes": len(c.class_names), "protocol": plan.describe(),
             "computed": computed_text(c.attrs),
             **{k: c.attrs.get(k) for k in (
                 "base", "weights", "layer", "pooling", "input_size", "dtype", "n_rows",
                 "data_dir", "created")}}
            for i, ((path, _), c) in enumerate(zip(entries, caches, strict=True))
        ],
        "pairs": pair_results,
        "leaderboard": board,
        "skipped": skipped,
    }


def _protocol_text(config: CompareConfig, plan: RowPlan, *, nested: bool = False) -> str:
    """How the numbers were made, in plain words, for the report and results.json
    (``nested``: the grid point was chosen within the train rows)."""
    validation = plan.protocol == "validation"
    if not config.sweep:
        choice = "library-default parameters (no sweep)"
    elif not validation:
        choice = ("parameters chosen from a small grid by mean accuracy over the folds "
                  "(not nested)")
    elif nested:
        choice = ("parameters chosen from a small grid by cross-validation within the train "
                  "rows, then fitted on all of them and scored once on the validation rows")
    else:
        choice = ("parameters chosen from a small grid by validation accuracy (a class has "
                  "too few train rows to choose within them)")
    text = (plan.describe().capitalize() + ", the same rows for every pair; " + choice
            + f"; class weights: {config.class_weight or 'none'}.")
    early = [name for name, used in (("the dense head", "dense" in config.heads),
                                     ("the scratch convnet", config.scratch is not None)) if used]
    if validation and early:
        one = len(early) == 1
        text += (f" {' and '.join(early).capitalize()} {'stops' if one else 'stop'} early on "
                 f"a seeded 10% of the train rows, never on the validation rows "
                 f"{'it is' if one else 'they are'} scored on (fit_head stops on the "
                 f"validation rows), so {'its score' if one else 'their scores'} can differ "
                 "from fit_head's.")
    return text


# ---------------------------------------------------------------------------------------
# Scoring the fits


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


def _grid_results(
    *,
    pair: Pair,
    outcomes: dict[tuple[int, int], dict[str, Any]],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    pool: np.ndarray,
    labels: np.ndarray,
) -> list[dict[str, Any]]:
    """Each grid point's per-fold accuracies and their mean, or the error that stopped it."""
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
    return grid_results


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
    grid_results = _grid_results(pair=pair, outcomes=outcomes, folds=folds, pool=pool,
                                 labels=labels)
    scores = [r["fold_accuracy"] for r in grid_results]
    if all(s is None for s in scores):
        return {"grid": grid_results, "skip": grid_results[0]["error"]}
    g = choose(scores)
    per_fold = []
    # Every pool row for cross-validation; the validation rows for a recorded split.
    scored = np.sort(np.concatenate([val for _, val in folds]))
    oof = np.empty(len(pool), dtype=labels.dtype)
    for k, (fit, val) in enumerate(folds):
        o = outcomes[(g, k)]
        oof[val] = o["pred"]
        m = evaluate(None, None, labels[pool[val]], class_names, pred=o["pred"])
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
        # Each scored row's prediction by the fit that did not see it.
        "out_of_fold": evaluate(None, None, labels[pool[scored]], class_names,
                                pred=oof[scored]),
    }
