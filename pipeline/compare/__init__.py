"""Many heads on many caches, scored on the same rows and the same folds: a leaderboard.

The modules, in the order a run uses them:

- ``config``: ``CompareConfig`` (what was asked, checked before any file is read),
  ``CompareResult``, the default report folder;
- ``decisions``: small pure decisions (which rows choose and which test, how caches of
  the same images line up, folds, grids, pairs, the chosen grid point, the ranking);
- ``data``: caches read and aligned by path, their features, the scratch row's images;
- ``fits``: one fit (a fresh seeded head, fit, predict) and the joblib loop over them;
- ``report``: the leaderboard (CSV, Markdown), plots and ``report.html`` of one run;
- ``history``: one JSON line per run, and the table ``compare.py --history`` prints;
- ``run``: ``run_compare``, the protocol as a list of named steps.
"""

from pipeline.compare.config import COMPARE_HEADS, SCRATCH_HEAD, CompareConfig, CompareResult
from pipeline.compare.data import cache_entries
from pipeline.compare.decisions import choose, choosing_rows, make_folds, match_caches, param_grid
from pipeline.compare.fits import build_estimator, fit_and_predict
from pipeline.compare.run import run_compare
from pipeline.heads.convnet import ScratchConvnet

__all__ = [
    "COMPARE_HEADS",
    "SCRATCH_HEAD",
    "CompareConfig",
    "CompareResult",
    "ScratchConvnet",
    "build_estimator",
    "cache_entries",
    "choose",
    "choosing_rows",
    "fit_and_predict",
    "make_folds",
    "match_caches",
    "param_grid",
    "run_compare",
]
