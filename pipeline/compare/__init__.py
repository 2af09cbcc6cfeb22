"""Many heads on many caches, scored on the same rows and the same folds: a leaderboard.

``run`` holds the whole command for now; this package re-exports its public names so
``from pipeline.compare import ...`` keeps working.
"""

from pipeline.compare.run import (
    COMPARE_HEADS,
    SCRATCH_HEAD,
    CompareConfig,
    CompareResult,
    ScratchConvnet,
    build_estimator,
    cache_entries,
    choose,
    choosing_rows,
    fit_and_predict,
    make_folds,
    match_caches,
    param_grid,
    run_compare,
)

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
