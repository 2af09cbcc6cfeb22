"""Many heads on many caches, scored on the same rows and the same folds: a leaderboard.

The modules, in the order a run uses them:

- ``config``: ``CompareConfig`` (what was asked, checked before any file is read),
  ``CompareResult``, the default report folder;
- ``decisions``: small pure decisions (which rows are fitted and scored, by which
  protocol; how caches of the same images line up and what each is called; folds, grids,
  pairs, the chosen grid point, the ranking);
- ``data``: caches read and aligned by path, their features, the scratch row's images;
- ``fits``: one fit (a fresh seeded head, fit, predict);
- ``worker``: the joblib loop over the fits, and what each worker process runs (Keras
  loaded quietly, then one fit);
- ``store``: finished fits kept on disk, so a stopped run continues where it stopped;
- ``report``: the leaderboard (CSV, Markdown), plots and ``report.html`` of one run;
- ``history``: one JSON line per run, and the table ``compare.py --history`` prints;
- ``run``: ``run_compare``, the protocol as a list of named steps.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py): ``compare.py
# --history`` reads its JSON lines without importing Keras and scikit-learn (~8 s on 2 cores).
_HOMES = {
    "COMPARE_HEADS": "pipeline.compare.config",
    "SCRATCH_HEAD": "pipeline.compare.config",
    "CompareConfig": "pipeline.compare.config",
    "CompareResult": "pipeline.compare.config",
    "ScratchConvnet": "pipeline.heads.convnet",
    "build_estimator": "pipeline.compare.fits",
    "cache_entries": "pipeline.compare.data",
    "cache_labels": "pipeline.compare.decisions",
    "choose": "pipeline.compare.decisions",
    "fit_and_predict": "pipeline.compare.fits",
    "make_folds": "pipeline.compare.decisions",
    "match_caches": "pipeline.compare.decisions",
    "param_grid": "pipeline.compare.decisions",
    "plan_rows": "pipeline.compare.decisions",
    "run_compare": "pipeline.compare.run",
}

__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
