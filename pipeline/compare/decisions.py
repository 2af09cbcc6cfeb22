"""The small pure decisions of a compare run: grids, rows, folds, pairs, the chosen point, ranks.

Each is a function of its arguments alone (no files, no fitting), so each can be tested on
its own: which rows are fitted and scored, by which protocol (:func:`plan_rows`), how caches
of the same images line up (:func:`match_caches`) and what each is called
(:func:`cache_labels`), the folds (:func:`make_folds`), what is swept (:func:`param_grid`),
which pairs run or are skipped (:func:`make_pairs`), which grid point wins (:func:`choose`)
and the leaderboard's order (:func:`leaderboard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from pipeline.cache import Cache
from pipeline.compare.config import SCRATCH_HEAD, CompareConfig
from pipeline.heads import HEADS

__all__ = [
    "Pair",
    "RowPlan",
    "cache_labels",
    "choose",
    "computed_text",
    "fold_of",
    "leaderboard",
    "make_folds",
    "make_pairs",
    "match_caches",
    "param_grid",
    "plan_rows",
]

_SPLITS = ("train", "validation", "test", "")
# How many paths an "image sets differ" message names on each side.
_SHOWN_PATHS = 5


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


@dataclass
class RowPlan:
    """Which rows a compare run fits and scores, and how (the protocol).

    ``protocol`` is ``"validation"`` when the caches record a train/validation split (the
    heads are fitted on the train rows and scored on the validation rows, as fit_head
    does) or ``"cv"`` (stratified K-fold cross-validation over every non-test row).
    Either way ``folds`` holds ``(fit_positions, scored_positions)`` into ``pool``: one
    pair for the recorded split, K for cross-validation, none when the rows cannot be
    split (``problem`` says why).
    """

    protocol: str
    pool: np.ndarray  # every non-test row, sorted: the rows fitted and scored
    test: np.ndarray  # the recorded test rows, sorted: scored once at the end
    folds: list[tuple[np.ndarray, np.ndarray]]
    cv: int  # folds asked for (cross-validation); 1 for the recorded split
    problem: str | None = None

    def describe(self) -> str:
        """The protocol in plain words, e.g. "5-fold stratified cross-validation on all
        896 rows" or "validation split recorded at extract: fitted on the 717 train rows,
        scored on the 179 validation rows"."""
        if self.protocol == "validation":
            fit, val = self.folds[0]
            text = (f"validation split recorded at extract: fitted on the {len(fit)} train "
                    f"rows, scored on the {len(val)} validation rows")
            pool = "train and validation"
        else:
            pool = "non-test" if self.test.size else ""
            text = (f"{self.cv}-fold stratified cross-validation on all {self.pool.size} "
                    + (f"{pool} rows" if pool else "rows"))
        if self.test.size:
            text += (f"; the {self.test.size} test rows scored once by a refit on all "
                     f"{self.pool.size} {pool} rows")
        return text


def plan_rows(
    split: Sequence[str],
    labels: np.ndarray,
    *,
    cv: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> RowPlan:
    """The rows to fit and score, by the split the cache records.

    With recorded ``train`` and ``validation`` rows the heads are scored on the validation
    rows exactly as fit_head scores them (the rows come from :func:`pipeline.fit.split_rows`,
    fit_head's own choice), so the two commands report the same accuracy. Otherwise every
    non-test row is cross-validated with :func:`make_folds`. Recorded ``test`` rows are
    held out either way.

    Args:
        split: the cache's per-row split names.
        labels: the per-row integer labels.
        cv: folds when cross-validating.
        seed: the folds' shuffle.
        class_names: names for ``labels``, used in messages.

    Returns:
        The :class:`RowPlan`; its ``problem`` says why the rows cannot be split (one class,
        a class with fewer rows than folds), which skips every pair.

    Raises:
        ValueError: a split name other than train, validation, test or "", or a cache
            mixing rows with and without a recorded split.
    """
    from pipeline.fit import split_rows

    split = np.asarray(split).astype(str)
    labels = np.asarray(labels)
    unknown = sorted(set(np.unique(split).tolist()) - set(_SPLITS))
    if unknown:
        raise ValueError(
            f"Unknown split names in the cache. Expected {_SPLITS}. Received: {unknown}"
        )
    if {"train", "validation"} <= set(split.tolist()):
        # val_split is not used when validation rows are recorded.
        train, val, test = split_rows(split, labels, 0.5, seed, class_names=class_names)
        pool = np.union1d(train, val)
        folds = [(np.searchsorted(pool, train), np.searchsorted(pool, val))]
        problem = None
        if np.unique(labels[train]).size < 2:
            problem = ("the recorded train rows hold only one class; a classifier needs "
                       "at least two")
        return RowPlan("validation", pool, test, folds, 1, problem)
    pool, test = np.flatnonzero(split != "test"), np.flatnonzero(split == "test")
    try:
        folds, problem = make_folds(labels[pool], cv, seed, class_names=class_names), None
    except ValueError as exc:
        folds, problem = [], str(exc)
    return RowPlan("cv", pool, test, folds, cv, problem)


def make_folds(
    labels: np.ndarray,
    cv: int,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded K-fold split of the rows to cross-validate.

    Exactly ``StratifiedKFold(cv, shuffle=True, random_state=seed).split`` (so a user can
    reproduce any fold with scikit-learn), after checking what it would reject or warn
    about, so the message says what to change.

    Args:
        labels: integer labels of the rows to cross-validate.
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
            f"The rows to cross-validate hold {values.size} class(es) ({found}); a "
            "classifier needs at least two."
        )
    if counts.min() < cv:
        small = int(values[np.argmin(counts)])
        raise ValueError(
            f"Cannot make {cv} stratified folds: class {name(small)} has only "
            f"{counts.min()} row(s) to cross-validate and every class needs at least {cv}. Use "
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
    """``paths`` for a message: how many, and the first few."""
    if not paths:
        return "none"
    shown = ", ".join(paths[:_SHOWN_PATHS])
    more = f" and {len(paths) - _SHOWN_PATHS} more" if len(paths) > _SHOWN_PATHS else ""
    return f"{len(paths)} ({shown}{more})"



def _size_text(size: Any) -> str:
    """``[96, 96]`` -> ``96px``; ``[96, 128]`` -> ``96x128px``; unknown -> ``?px``."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        return "?px"
    return f"{h}px" if h == w else f"{h}x{w}px"


def _base_text(base: Any) -> str:
    """The base as a label part: ``MobileNetV2``; a saved model's file name (recorded as
    ``file:NAME``); a keras-hub preset's name (``hub:<handle or folder>``)."""
    text = str(base or "?")
    for prefix in ("file:", "hub:"):
        text = text.removeprefix(prefix)
    return Path(text).name or text


def _weights_text(weights: Any) -> str:
    """The weights as a label part: ``imagenet``, ``random`` or the weights file's name."""
    text = str(weights or "?")
    return "random" if text == "none" else Path(text).name


def computed_text(attrs: dict[str, Any]) -> str:
    """How the features were computed and stored, as a label part: the precision (``fp32``,
    ``fp16``, ``bf16``), then what differs from the defaults (``BN unfolded``,
    ``jpeg-dct``, a resize method other than bilinear, ``stored fp16``)."""
    parts = [{"mixed_float16": "fp16", "mixed_bfloat16": "bf16"}.get(
        str(attrs.get("precision")), "fp32")]
    if not attrs.get("fold_batchnorm"):
        parts.append("BN unfolded")
    if attrs.get("jpeg_downscale", "off") != "off":
        parts.append(f"jpeg-{attrs['jpeg_downscale']}")
    if attrs.get("interpolation", "bilinear") != "bilinear":
        parts.append(str(attrs["interpolation"]))
    if attrs.get("dtype") == "float16":
        parts.append("stored fp16")
    return ", ".join(parts)


def cache_labels(paths: Sequence[str], attrs: Sequence[dict[str, Any]]) -> list[str]:
    """A short name per compared cache that tells it from every other one.

    Always base + layer + pooling + input size (``MobileNetV2 block_13_expand_relu avg
    96px``); caches that would still share a name get their weights added where these
    differ, else how their features were computed (``bf16``, ``BN unfolded``, ``jpeg-dct``:
    :func:`computed_text`), else their file name, else their position, so two compared
    caches never share a label.

    Args:
        paths: the cache files, one per compared entry (a file may repeat, one per layer).
        attrs: each entry's cache attributes (of the layer it reads).

    Returns:
        One label per entry, all different.
    """
    labels = [
        " ".join([_base_text(a.get("base")),
                  str(a.get("layer") or "?"),
                  str(a.get("pooling") or "?"), _size_text(a.get("input_size"))])
        for a in attrs
    ]
    extras = (
        lambda i: _weights_text(attrs[i].get("weights")),
        lambda i: f"({computed_text(attrs[i])})",
        lambda i: f"({Path(paths[i]).name})",
        lambda i: f"#{i + 1}",
    )
    for extra in extras:
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        for members in groups.values():
            words = [extra(i) for i in members]
            # A word all of them share would tell nothing apart: the next one is tried.
            if len(members) > 1 and (len(set(words)) > 1 or extra is extras[-1]):
                for i, word in zip(members, words, strict=True):
                    labels[i] = f"{labels[i]} {word}"
    return labels


@dataclass
class Pair:
    """One leaderboard candidate: the data it reads and the head it fits."""

    cache: str
    base: str
    head: str
    data: int  # index into the list of aligned feature (or image) arrays
    skip: str | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""  # what the report calls its features (:func:`cache_labels`)


def make_pairs(
    config: CompareConfig,
    entries: Sequence[tuple[str, str | None]],
    caches: Sequence[Cache],
    data_skips: Sequence[str | None],
    fold_problem: str | None,
    n_features: Sequence[int],
) -> list[Pair]:
    """Every (cache, head) pair, plus the scratch row, with its grid or the reason to skip.

    Args:
        config: the heads, ``sweep`` and ``scratch`` of the run.
        entries: (cache path, stored layer) per compared cache.
        caches: the caches read, one per entry.
        data_skips: per data array (the caches', then the scratch images'), why it is
            unusable, or None.
        fold_problem: why the pool cannot be folded, or None; it skips every pair.
        n_features: features per row of each data array, for :func:`param_grid`.

    Returns:
        The pairs in leaderboard-candidate order: each cache's heads, then the scratch row.
    """
    pairs = []
    labels = cache_labels([path for path, _ in entries], [c.attrs for c in caches])
    for i, ((path, layer), cache) in enumerate(zip(entries, caches, strict=True)):
        base = Path(str(cache.attrs.get("base", "?"))).name + (f" @ {layer}" if layer else "")
        pairs += [Pair(path, base, head, i, data_skips[i], label=labels[i])
                  for head in config.heads]
    if config.scratch is not None:
        size = _size_text(caches[0].attrs.get("input_size"))
        pairs.append(Pair(config.scratch, "scratch", SCRATCH_HEAD, len(caches),
                          data_skips[len(caches)], label=f"scratch images {size}"))
    for pair in pairs:
        pair.skip = pair.skip or fold_problem
        pair.grid = param_grid(pair.head, n_features[pair.data]) if config.sweep else [{}]
    return pairs


def leaderboard(pair_results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored pairs as table rows, best cross-validated accuracy first (ties: macro-F1).

    Args:
        pair_results: one result per pair; those whose ``status`` is not ``"ok"`` are left out.

    Returns:
        The leaderboard rows, each with its ``rank`` (1 = best).
    """
    rows = []
    for r in pair_results:
        if r["status"] != "ok":
            continue
        test = r.get("test") or {}
        rows.append({
            "cache": r["cache"],
            "base": r["base"],
            "label": r["label"],
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


def fold_of(folds: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> list[int]:
    """The fold that scores each of ``n`` pool rows (-1: none, when there are no folds).

    Args:
        folds: ``(fit_positions, validation_positions)`` pairs, as :func:`make_folds`.
        n: the number of pool rows.

    Returns:
        One fold index per pool row.
    """
    fold = np.full(n, -1, dtype=np.int64)
    for k, (_, val) in enumerate(folds):
        fold[val] = k
    return fold.tolist()
