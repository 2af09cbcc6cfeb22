"""Many heads on many caches, scored on the same rows and the same folds: a leaderboard.

The question this answers is "which base and which head, for these images?", so every
number in one run must be comparable with every other: one set of rows (caches of the
same images are matched by path), one set of stratified folds, one seed, one protocol
(:func:`run_compare` states it). The report itself (tables, plots, HTML, history) is
written by :mod:`pipeline.report`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold

from pipeline.cache import Cache, read_cache
from pipeline.fit import evaluate
from pipeline.heads import HEADS, DenseHead, head_params, make_head, save_head
from pipeline.heads.convnet import ScratchConvnet
from pipeline.progress import Progress

__all__ = [
    "COMPARE_HEADS",
    "SCRATCH_HEAD",
    "CompareConfig",
    "CompareResult",
    "ScratchConvnet",
    "choose",
    "choosing_rows",
    "make_folds",
    "match_caches",
    "param_grid",
    "run_compare",
]

# The default line-up: cheapest first; the dense head last because it is the slowest.
COMPARE_HEADS = ("logreg", "linear-svm", "svm", "knn", "dense")
# The --scratch row's head name: the demo's convnet trained from random weights on images.
SCRATCH_HEAD = "convnet"
_SPLITS = ("train", "validation", "test", "")
# Units of the scratch convnet's hidden Dense layer: Chollet's script 1 uses 64.
_SCRATCH_HIDDEN = 64
# How many paths an "image sets differ" message names on each side.
_SHOWN_PATHS = 5


@dataclass
class CompareConfig:
    """Arguments of the compare command, saved in ``results.json`` beside the leaderboard."""

    caches: list[str]
    heads: list[str] = field(default_factory=lambda: list(COMPARE_HEADS))
    cv: int = 5
    sweep: bool = False
    n_jobs: int = 1
    seed: int = 0
    scratch: str | None = None  # DATA_DIR of the cached images: adds the from-scratch row
    out: str | None = None  # default: reports/compare-<timestamp>
    history_file: str = "reports/history.jsonl"
    layers: str | None = None  # "a,b" or "all": stored layers side by side, as bases are
    epochs: int = 100  # dense head: maximum epochs (early stopping decides)
    scratch_epochs: int = 50  # scratch convnet: maximum epochs (early stopping decides)


@dataclass
class CompareResult:
    """What :func:`run_compare` did: the leaderboard rows, skipped pairs and output files."""

    out_dir: Path
    leaderboard: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    n_pool: int
    n_test: int
    outputs: dict[str, Path]
    seconds: float

    def summary(self) -> str:
        """One line: what happened and where the outputs are."""
        if not self.leaderboard:
            reasons = {s["reason"] for s in self.skipped}
            if len(reasons) == 1:  # e.g. the pool cannot be folded: say it once
                why = f"every pair: {reasons.pop()}"
            else:
                why = "; ".join(f"{s['base']} / {s['head']}: {s['reason']}" for s in self.skipped)
            return f"compare: nothing could run ({why}). Report in {self.out_dir}/"
        best = self.leaderboard[0]
        test = (
            f", test {best['test_accuracy']:.4f} on {self.n_test} rows"
            if best.get("test_accuracy") is not None
            else ""
        )
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (
            f"compare: done in {self.seconds:.0f} s. {len(self.leaderboard)} pairs scored"
            f"{skipped} on {self.n_pool} rows; best {best['base']} / {best['head']} "
            f"({best['params'] or 'defaults'}): accuracy {best['accuracy_mean']:.4f} ± "
            f"{best['accuracy_std']:.4f}{test}. Leaderboard and report.html in {self.out_dir}/"
        )


# ---------------------------------------------------------------------------------------
# Small pure decisions


def param_grid(head: str, n_features: int) -> list[dict[str, Any]]:
    """The ``--sweep`` grid of one head: ``set_params`` dicts, most regularised first.

    Small on purpose (3 to 9 points): it moves the one knob that matters most for a probe
    on frozen features, around the library default, which every grid contains. Ties go
    to the earlier, more regularised point.

    Args:
        head: a ``HEADS`` name or ``SCRATCH_HEAD``.
        n_features: features per row after flattening; the RBF width is set relative to
            it (``gamma = f / n_features`` is ``f`` times scikit-learn's ``"scale"`` on
            standardised features).

    Returns:
        A list of parameter dicts for ``estimator.set_params``.

    Raises:
        ValueError: unknown head or ``n_features < 1``.
    """
    if n_features < 1:
        raise ValueError(f"`n_features` must be >= 1. Received: n_features={n_features}")
    if head in ("logreg", "linear-svm"):
        return [{"clf__C": c} for c in (0.001, 0.01, 0.1, 1.0, 10.0)]
    if head == "svm":
        # Wider kernels (small f) and larger C than the defaults: on standardised
        # bottleneck features a kernel 10x wider than "scale" often wins, a 10x narrower
        # one rarely (on the demo cache it fell to 23-83%).
        return [
            {"clf__C": c, "clf__gamma": f / n_features}
            for c in (1.0, 10.0, 100.0)
            for f in (0.01, 0.1, 1.0)
        ]
    if head == "knn":
        # Many neighbours smooth the vote (regularise); one neighbour memorises.
        return [{"clf__n_neighbors": k} for k in (25, 15, 9, 5, 3, 1)]
    if head == "dense":
        return [{"dropout": d, "lr": lr} for d in (0.5, 0.2) for lr in (1e-4, 1e-3, 1e-2)]
    if head == SCRATCH_HEAD:
        return [{}]  # the baseline, not tuned: it is there to show what transfer bought
    raise ValueError(
        f"Unknown head. Expected one of {(*HEADS, SCRATCH_HEAD)}. Received: head={head!r}"
    )


def choosing_rows(split: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into the choosing pool (train, validation, "") and the test rows.

    Args:
        split: the cache's per-row split names.

    Returns:
        ``(pool_rows, test_rows)``, each sorted.

    Raises:
        ValueError: a split name other than train, validation, test or "".
    """
    split = np.asarray(split).astype(str)
    unknown = sorted(set(np.unique(split).tolist()) - set(_SPLITS))
    if unknown:
        raise ValueError(
            f"Unknown split names in the cache. Expected {_SPLITS}. Received: {unknown}"
        )
    is_test = split == "test"
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def make_folds(
    labels: np.ndarray,
    cv: int,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded K-fold split of the choosing pool.

    Exactly ``StratifiedKFold(cv, shuffle=True, random_state=seed).split`` (so a user can
    reproduce any fold with scikit-learn), after checking what it would reject or warn
    about, so the message says what to change.

    Args:
        labels: integer labels of the pool rows.
        cv: number of folds, >= 2.
        seed: the shuffle's random state.
        class_names: optional names for ``labels``, used in messages.

    Returns:
        ``cv`` pairs ``(fit_positions, validation_positions)`` into ``labels``.

    Raises:
        ValueError: ``cv < 2``, one class only, or a class with fewer than ``cv`` rows.
    """
    if not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ValueError(f"`cv` must be an integer >= 2. Received: cv={cv!r}")
    values, counts = np.unique(labels, return_counts=True)
    name = (lambda v: repr(class_names[v])) if class_names else (lambda v: f"id {v}")
    if values.size < 2:
        found = name(int(values[0])) if values.size else "none"
        raise ValueError(
            f"The choosing rows hold {values.size} class(es) ({found}); a classifier needs "
            "at least two."
        )
    if counts.min() < cv:
        small = int(values[np.argmin(counts)])
        raise ValueError(
            f"Cannot make {cv} stratified folds: class {name(small)} has only "
            f"{counts.min()} choosing row(s) and every class needs at least {cv}. Use "
            f"fewer folds or add images. Received: cv={cv}"
        )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))


def choose(grid_scores: Sequence[Sequence[float] | None]) -> int:
    """Index of the grid point with the highest mean score; the first one on ties.

    Args:
        grid_scores: per grid point, its per-fold scores, or None where it failed.

    Returns:
        The index into ``grid_scores``.

    Raises:
        ValueError: every grid point failed.
    """
    means = [-np.inf if s is None else float(np.mean(s)) for s in grid_scores]
    if not means or max(means) == -np.inf:
        raise ValueError("No grid point could be scored.")
    return int(np.argmax(means))  # argmax returns the first maximum


def match_caches(caches: Sequence[Cache], names: Sequence[str]) -> list[np.ndarray]:
    """Row orders that put every cache's rows in the first cache's order, matched by path.

    Caches of the same images made with different bases can hold their rows in another
    order (other batch sizes, an interrupted and resumed run, a re-indexed folder).

    Args:
        caches: the caches, read.
        names: how to call each cache in messages (e.g. its file name).

    Returns:
        One index array per cache: ``features[order]`` is aligned with the first cache.

    Raises:
        ValueError: a cache repeats a path, or the caches differ in image set, class
            names, or the label or split of an image.
    """
    ref = caches[0]
    orders = []
    for cache, name in zip(caches, names, strict=True):
        row_of = {path: i for i, path in enumerate(cache.paths)}
        if len(row_of) != len(cache.paths):
            raise ValueError(f"{name} holds some image path more than once: re-extract it.")
        if cache.class_names != ref.class_names:
            raise ValueError(
                f"{name} and {names[0]} have different classes: {cache.class_names} vs "
                f"{ref.class_names}. Compare caches of the same images."
            )
        only_ref = sorted(set(ref.paths) - row_of.keys())
        only_this = sorted(row_of.keys() - set(ref.paths))
        if only_ref or only_this:
            raise ValueError(
                f"{names[0]} and {name} hold different image sets ({len(ref.paths)} vs "
                f"{len(cache.paths)} images): {_some(only_ref)} only in {names[0]}; "
                f"{_some(only_this)} only in {name}. Compare caches of the same images "
                "(re-extract the older one)."
            )
        order = np.asarray([row_of[p] for p in ref.paths], dtype=np.int64)
        for what, ours, theirs in (
            ("label", cache.labels[order], ref.labels),
            ("split", np.asarray(cache.split)[order], np.asarray(ref.split)),
        ):
            differ = np.flatnonzero(np.asarray(ours) != np.asarray(theirs))
            if differ.size:
                raise ValueError(
                    f"{differ.size} images have another {what} in {name} than in "
                    f"{names[0]} (first: {ref.paths[differ[0]]}: {theirs[differ[0]]!r} vs "
                    f"{ours[differ[0]]!r}). Re-extract the older cache."
                )
        orders.append(order)
    return orders


def _some(paths: Sequence[str]) -> str:
    if not paths:
        return "none"
    shown = ", ".join(paths[:_SHOWN_PATHS])
    more = f" and {len(paths) - _SHOWN_PATHS} more" if len(paths) > _SHOWN_PATHS else ""
    return f"{len(paths)} ({shown}{more})"


# ---------------------------------------------------------------------------------------
# One fit: what every parallel task runs


def build_estimator(
    head: str, params: dict[str, Any], *, seed: int, epochs: int, scratch_epochs: int
) -> BaseEstimator:
    """An unfitted head (or the scratch convnet) with ``params`` set.

    Args:
        head: a ``HEADS`` name or ``SCRATCH_HEAD``.
        params: ``set_params`` overrides, e.g. a :func:`param_grid` point.
        seed: the estimator's ``random_state`` (the same for every task, so a fold's
            result does not depend on which process ran it).
        epochs: maximum epochs of the dense head.
        scratch_epochs: maximum epochs of the scratch convnet.

    Returns:
        The estimator.

    Raises:
        ValueError: unknown head or invalid parameter.
    """
    if head == SCRATCH_HEAD:
        estimator: BaseEstimator = ScratchConvnet(
            hidden=_SCRATCH_HIDDEN, epochs=scratch_epochs, random_state=seed
        )
    else:
        estimator = make_head(head, epochs=epochs, random_state=seed)
    return estimator.set_params(**params)


def _saved_bytes(estimator: BaseEstimator) -> int:
    """Bytes the fitted head takes on disk, saved exactly as fit_head saves it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_head(estimator, tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir())


def _prepare_keras() -> None:
    """Make Keras fits in this process repeatable (whichever process runs them) and quiet."""
    # Each loky worker is its own process: without growth, the first worker to touch
    # the GPU would reserve all of its memory and the next would fail.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    # Many small models per process make TF warn about tf.function retracing after a few
    # fits: expected here, and it would bury the progress lines.
    tf.get_logger().setLevel("ERROR")
    # On CPU, TF's kernels already give identical results for identical seeds (checked:
    # serial == loky workers). On GPU, cuDNN/cuBLAS pick atomics-based kernels unless
    # told otherwise; op determinism is process-wide, so it is only switched on there.
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()


def fit_and_predict(
    head: str,
    params: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    fit_rows: np.ndarray,
    score_rows: np.ndarray,
    *,
    seed: int,
    epochs: int,
    scratch_epochs: int,
) -> dict[str, Any]:
    """Fit one head on ``fit_rows``, predict ``score_rows``; a ValueError becomes a result.

    Args:
        head: a ``HEADS`` name or ``SCRATCH_HEAD``.
        params: ``set_params`` overrides.
        X: features (or images, for the scratch convnet) of every row.
        y: integer labels of every row.
        fit_rows: rows to fit on.
        score_rows: rows to predict.
        seed: see :func:`build_estimator`.
        epochs: see :func:`build_estimator`.
        scratch_epochs: see :func:`build_estimator`.

    Returns:
        ``{"pred", "fit_seconds", "predict_seconds", "model_bytes", "warnings"}``, or
        ``{"error": why}`` when the head refused the data (e.g. more neighbours than
        fitting rows). ``warnings`` holds the distinct convergence warnings of the fit.
    """
    estimator = build_estimator(
        head, params, seed=seed, epochs=epochs, scratch_epochs=scratch_epochs
    )
    if isinstance(estimator, DenseHead):
        _prepare_keras()
    try:
        # A convergence warning per fold and grid point would bury the progress lines;
        # they are kept with the result and reported once per pair instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            start = time.perf_counter()
            estimator.fit(X[fit_rows], y[fit_rows])
            fit_seconds = time.perf_counter() - start
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        start = time.perf_counter()
        pred = np.asarray(estimator.predict(X[score_rows]))
        predict_seconds = time.perf_counter() - start
    except ValueError as exc:
        return {"error": str(exc).strip().splitlines()[0]}
    return {
        "pred": pred,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "model_bytes": _saved_bytes(estimator),
        "warnings": sorted({str(w.message) for w in caught
                            if issubclass(w.category, ConvergenceWarning)}),
    }


class _Predicted:
    """Lets :func:`pipeline.fit.evaluate` score stored predictions: its input is its output."""

    @staticmethod
    def predict(X: np.ndarray) -> np.ndarray:
        return np.asarray(X)


# ---------------------------------------------------------------------------------------
# Steps of run_compare


@dataclass
class _Pair:
    """One leaderboard candidate: the data it reads and the head it fits."""

    cache: str
    base: str
    head: str
    data: int  # index into the list of aligned feature (or image) arrays
    skip: str | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)


def _check_config(config: CompareConfig) -> None:
    """Keras-style errors for every bad argument, before any file is read."""
    if not config.caches:
        raise ValueError("Give at least one cache. Received: caches=[]")
    if not config.heads or any(h not in HEADS for h in config.heads):
        raise ValueError(
            f"`heads` must be a non-empty list of {HEADS}. Received: heads={config.heads}"
        )
    if len(set(config.heads)) != len(config.heads):
        raise ValueError(f"`heads` lists a head twice. Received: heads={config.heads}")
    if not isinstance(config.cv, int) or config.cv < 2:
        raise ValueError(f"`cv` must be an integer >= 2. Received: cv={config.cv!r}")
    if not isinstance(config.n_jobs, int) or config.n_jobs == 0:
        raise ValueError(
            "`n_jobs` must be a non-zero integer (-1: all cores). "
            f"Received: n_jobs={config.n_jobs!r}"
        )
    for name in ("epochs", "scratch_epochs"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    for path in config.caches:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Cache file not found. Received: cache={path}")
    if config.scratch is not None and not Path(config.scratch).is_dir():
        raise FileNotFoundError(
            f"`scratch` must be the folder of the cached images. Received: scratch={config.scratch}"
        )


def cache_entries(paths: Sequence[str], layers: str | None) -> list[tuple[str, str | None]]:
    """(cache path, stored layer) to compare: one per cache, or one per requested layer.

    ``layers`` is ``a,b`` (each cache must hold them) or ``all`` (every layer each cache
    holds, bottom to top), so layers line up exactly as bases do: same rows, same folds.

    Raises:
        ValueError: a cache without a requested layer.
    """
    from pipeline.cache import read_attrs

    if layers is None:
        return [(p, None) for p in paths]
    entries = []
    for path in paths:
        attrs = read_attrs(path)
        stored = list(attrs.get("layers") or [attrs.get("layer")])
        wanted = stored if layers == "all" else [n.strip() for n in layers.split(",") if n]
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise ValueError(
                f"{path} holds the layers {stored}; extract with --layer to add others. "
                f"Received: layers={layers!r}"
            )
        entries += [(path, name) for name in wanted]
    return entries


def _load_caches(
    entries: Sequence[tuple[str, str | None]]
) -> tuple[list[Cache], list[np.ndarray]]:
    """Read every (cache, layer) and align its rows with the first one's, by path."""
    caches = [read_cache(p, layer=layer) for p, layer in entries]
    names = [Path(p).name + (f" @ {layer}" if layer else "") for p, layer in entries]
    if len(set(names)) != len(names):
        names = [str(p) + (f" @ {layer}" if layer else "") for p, layer in entries]
    orders = match_caches(caches, names)
    return caches, orders


def _features(cache: Cache, order: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The cache's features in the shared row order as float32, or why they are unusable."""
    X = np.asarray(cache.features[order], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))
    if bad.size:
        return X, (
            f"{bad.size} rows have NaN or infinite features (first: "
            f"{cache.paths[order[bad[0]]]}); re-extract with dtype float32"
        )
    return X, None


def _load_scratch_images(
    data_dir: Path, paths: Sequence[str], attrs: dict[str, Any]
) -> tuple[np.ndarray | None, str | None]:
    """Decode the cached images for the scratch row as extract did (size, interpolation)."""
    from pipeline.images import ImageReadError, load_image

    size = attrs.get("input_size")
    if not size or len(size) != 2:
        return None, f"the cache records no input_size (Received: input_size={size!r})"
    interpolation = attrs.get("interpolation", "bilinear")
    images = np.empty((len(paths), int(size[0]), int(size[1]), 3), dtype=np.float32)
    failed: list[str] = []
    progress = Progress(len(paths), "compare: decode for --scratch", unit="img")
    for i, rel in enumerate(paths):
        try:
            images[i] = load_image(data_dir / rel, tuple(size), interpolation)
        except (ImageReadError, OSError):
            failed.append(rel)
        progress.update()
    progress.close()
    if failed:
        return None, (
            f"{len(failed)} of {len(paths)} cached images cannot be read from {data_dir} "
            f"(first: {failed[0]}); give the folder the caches were extracted from"
        )
    return images, None


def _pairs(
    config: CompareConfig,
    entries: Sequence[tuple[str, str | None]],
    caches: Sequence[Cache],
    data_skips: Sequence[str | None],
    fold_problem: str | None,
    n_features: Sequence[int],
) -> list[_Pair]:
    """Every (cache, head) pair, plus the scratch row, with its grid or the reason to skip."""
    pairs = []
    for i, ((path, layer), cache) in enumerate(zip(entries, caches, strict=True)):
        base = Path(str(cache.attrs.get("base", "?"))).name + (f" @ {layer}" if layer else "")
        pairs += [_Pair(path, base, head, i, data_skips[i]) for head in config.heads]
    if config.scratch is not None:
        pairs.append(_Pair(config.scratch, "scratch", SCRATCH_HEAD, len(caches),
                           data_skips[len(caches)]))
    for pair in pairs:
        pair.skip = pair.skip or fold_problem
        pair.grid = param_grid(pair.head, n_features[pair.data]) if config.sweep else [{}]
    return pairs


def _run_tasks(
    tasks: list[tuple[int, int, int | None, np.ndarray, np.ndarray]],
    pairs: Sequence[_Pair],
    data: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    config: CompareConfig,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Run ``(pair, grid point, fold, fit_rows, score_rows)`` tasks with joblib, in order."""
    from joblib import Parallel, delayed

    if not tasks:
        return []
    jobs = (
        delayed(fit_and_predict)(
            pairs[p].head,
            pairs[p].grid[g],
            data[pairs[p].data],
            labels,
            fit_rows,
            score_rows,
            seed=config.seed,
            epochs=config.epochs,
            scratch_epochs=config.scratch_epochs,
        )
        for p, g, _, fit_rows, score_rows in tasks
    )
    results = []
    # Ordered generator: progress moves as fits finish, results keep the task order.
    for result in Parallel(n_jobs=config.n_jobs, return_as="generator")(jobs):
        results.append(result)
        progress.update()
    return results


def _shown_params(pair: _Pair, params: dict[str, Any], config: CompareConfig) -> dict[str, Any]:
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
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _score_pair(
    pair: _Pair,
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


def _leaderboard(pair_results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored pairs as table rows, best cross-validated accuracy first (ties: macro-F1)."""
    rows = []
    for r in pair_results:
        if r["status"] != "ok":
            continue
        test = r.get("test") or {}
        rows.append({
            "cache": r["cache"],
            "base": r["base"],
            "head": r["head"],
            "params": r["params_shown"],
            "accuracy_mean": r["accuracy_mean"],
            "accuracy_std": r["accuracy_std"],
            "macro_f1": r["macro_f1_mean"],
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "fit_seconds": r["fit_seconds"],
            "predict_ms_per_image": r["predict_ms_per_image"],
            "model_bytes": r["model_bytes"],
            "n_folds": len(r["folds"]),
            "notes": "; ".join(r["notes"]),
        })
    rows.sort(key=lambda row: (-row["accuracy_mean"], -row["macro_f1"]))  # stable
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _default_out(now: datetime) -> Path:
    return Path("reports") / f"compare-{now.strftime('%Y%m%d-%H%M%S')}"


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
    from pipeline import report

    start = time.perf_counter()
    started = datetime.now().astimezone()
    _check_config(config)
    out_dir = Path(config.out) if config.out else _default_out(started)

    entries = cache_entries(config.caches, config.layers)
    caches, orders = _load_caches(entries)
    ref = caches[0]
    labels = np.asarray(ref.labels, dtype=np.int64)
    class_names = list(ref.class_names)
    pool, test = choosing_rows(ref.split)

    data: list[np.ndarray] = []
    data_skips: list[str | None] = []
    for cache, order in zip(caches, orders, strict=True):
        X, problem = _features(cache, order)
        data.append(X)
        data_skips.append(problem)
    if config.scratch is not None:
        images, problem = _load_scratch_images(Path(config.scratch), ref.paths, ref.attrs)
        data.append(images if images is not None else np.zeros((len(labels), 1, 1, 3)))
        data_skips.append(problem)

    try:
        folds = make_folds(labels[pool], config.cv, config.seed, class_names=class_names)
        fold_problem = None
    except ValueError as exc:
        folds, fold_problem = [], str(exc)
    n_features = [int(np.prod(x.shape[1:])) for x in data]
    pairs = _pairs(config, entries, caches, data_skips, fold_problem, n_features)

    cv_tasks = [
        (p, g, k, pool[fit], pool[val])
        for p, pair in enumerate(pairs) if pair.skip is None
        for g in range(len(pair.grid))
        for k, (fit, val) in enumerate(folds)
    ]
    runnable = sum(pair.skip is None for pair in pairs)
    progress = Progress(len(cv_tasks) + (runnable if test.size else 0), "compare", unit="fits")
    cv_out = _run_tasks(cv_tasks, pairs, data, labels, config=config, progress=progress)
    outcomes: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    for (p, g, k, _, _), result in zip(cv_tasks, cv_out, strict=True):
        outcomes.setdefault(p, {})[(g, k)] = result

    pair_results = []
    for p, pair in enumerate(pairs):
        entry: dict[str, Any] = {"cache": pair.cache, "base": pair.base, "head": pair.head}
        if pair.skip is None:
            scored = _score_pair(pair, outcomes[p], folds, pool, labels, class_names)
            pair.skip = scored.pop("skip", None)
            entry.update(scored)
        if pair.skip is not None:
            entry.update(status="skipped", reason=pair.skip)
            print(f"compare: skipped {pair.base} / {pair.head}: {pair.skip}", flush=True)
        else:
            chosen = pair.grid[entry["chosen"]]
            entry.update(status="ok", params=chosen,
                         params_shown=_format_params(_shown_params(pair, chosen, config)))
        pair_results.append(entry)

    if test.size:
        _score_test(pairs, pair_results, data, labels, pool, test, class_names,
                    config=config, progress=progress)
    progress.close()

    leaderboard = _leaderboard(pair_results)
    skipped = [
        {"cache": r["cache"], "base": r["base"], "head": r["head"], "reason": r["reason"]}
        for r in pair_results if r["status"] != "ok"
    ]
    seconds = time.perf_counter() - start
    results = {
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
        "class_names": class_names,
        "n_rows": int(len(labels)),
        "n_pool": int(pool.size),
        "n_test": int(test.size),
        "folds": {
            "k": config.cv,
            "seed": config.seed,
            "problem": fold_problem,
            "sizes": [int(len(val)) for _, val in folds],
            # fold_of_pool_row[i]: the fold that scores pool row i (paths: pool_paths).
            "fold_of_pool_row": _fold_of(folds, pool.size),
            "pool_paths": [ref.paths[i] for i in pool],
        },
        "caches": [
            {"path": path, **{k: c.attrs.get(k) for k in (
                "base", "weights", "layer", "pooling", "input_size", "dtype", "n_rows")}}
            for (path, _), c in zip(entries, caches, strict=True)
        ],
        "pairs": pair_results,
        "leaderboard": leaderboard,
        "skipped": skipped,
    }
    outputs = report.write_report(out_dir, results)
    report.append_history(Path(config.history_file), report.history_entry(results))
    return CompareResult(
        out_dir=out_dir,
        leaderboard=leaderboard,
        skipped=skipped,
        n_pool=int(pool.size),
        n_test=int(test.size),
        outputs=outputs,
        seconds=seconds,
    )


def _fold_of(folds: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> list[int]:
    fold_of = np.full(n, -1, dtype=np.int64)
    for k, (_, val) in enumerate(folds):
        fold_of[val] = k
    return fold_of.tolist()


def _score_test(
    pairs: Sequence[_Pair],
    pair_results: list[dict[str, Any]],
    data: Sequence[np.ndarray],
    labels: np.ndarray,
    pool: np.ndarray,
    test: np.ndarray,
    class_names: Sequence[str],
    *,
    config: CompareConfig,
    progress: Progress,
) -> None:
    """Refit each scored pair on the whole pool with its chosen params; score the test once."""
    tasks = [
        (p, r["chosen"], None, pool, test)
        for p, r in enumerate(pair_results) if r["status"] == "ok"
    ]
    for (p, _, _, _, _), out in zip(
        tasks, _run_tasks(tasks, pairs, data, labels, config=config, progress=progress),
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
